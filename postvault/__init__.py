"""Postvault: a secure mail server for healthcare practices.

Subpackages are the parts of the design (see DESIGN.md): ``conf`` (config
schema and loading), ``certs`` (TLS contexts and the development CA),
``store`` (database, encrypted blobs, keys; the one API both servers use),
``policy`` (pure decisions), ``smtpd`` (submission), ``imapd`` (IMAP) and
``cli`` (the ``postvault`` command).
"""

__version__ = "0.1.0"
