"""IMAP4rev1 on Twisted's ``imap4`` server: TLS-only, decrypting per
session through the store API. Arrives with issue 5."""
