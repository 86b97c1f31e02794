"""MIME helpers that work on message bytes without the store: the message
summary IMAP's ENVELOPE and BODYSTRUCTURE are built from (``summary``)."""
