"""The encrypted store: database models and migrations, sealed blobs,
per-account keys, and the one API (``Store``) that both servers call.
Neither server touches SQL or cryptography directly."""
