"""TLS: the one place that builds the server ``ssl.SSLContext`` for every
listener (TLS 1.2+, AEAD suites only, reloadable), and the self-made
development CA that ``postvault init`` uses."""

from postvault.certs.context import TLSContextHolder, client_context, server_context
from postvault.certs.devca import DevCerts, make_dev_certs, write_dev_certs

__all__ = [
    "DevCerts",
    "TLSContextHolder",
    "client_context",
    "make_dev_certs",
    "server_context",
    "write_dev_certs",
]
