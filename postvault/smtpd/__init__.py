"""SMTP submission (RFC 6409, 8314) on aiosmtpd: TLS-only, authenticated,
policy-enforced, delivering into the encrypted store. Arrives with issue 4."""
