"""Policy: pure decisions over plain data (reply-only rules, attachment
policy, folder mapping, auth limits), driven by ``conf/policy.toml``.
No sockets, no database. The full engine arrives with issue 3."""
