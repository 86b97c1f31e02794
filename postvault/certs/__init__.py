"""TLS: the one place that builds the server ``ssl.SSLContext`` for every
listener (TLS 1.2+, AEAD suites only, reloadable), and the self-made
development CA that ``postvault init`` uses."""
