"""Password rules (pure), from ``[passwords]`` in policy.toml.

A password is refused when it is shorter than ``min_length``, has control
characters, or — with ``refuse_common`` — when zxcvbn (Dropbox's password
strength estimator, maintained for Python as ``zxcvbn``) scores it below
``min_score``. zxcvbn knows leaked passwords, names, English words, keyboard
walks, dates and l33t substitutions; we also give it the account's own
address and practice name, so "SmileDental2024!" is refused for Smile Dental
even though it looks strong to a rule of "upper, lower, digit, symbol".

The answer is a sentence for the person choosing the password, or None.
It never repeats the password.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from zxcvbn import zxcvbn

from postvault.policy.schema import PasswordPolicy

MIN_LENGTH = PasswordPolicy().min_length
# Longer input is legal (the store pre-hashes before bcrypt), but nobody
# types more, and a bound keeps the checks cheap.
MAX_LENGTH = 1024
# zxcvbn refuses input longer than 72 characters (its matching is
# quadratic); a password whose first 72 characters are hard to guess is
# hard to guess.
_ZXCVBN_MAX = 72
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")


def password_problem(
    password: str,
    min_length: int | None = None,
    *,
    policy: PasswordPolicy | None = None,
    user_inputs: Iterable[str] = (),
) -> str | None:
    """A sentence saying what is wrong with ``password``, or None if it is acceptable.

    ``policy`` defaults to the policy defaults; ``min_length``, when given,
    overrides its minimum (the older call). ``user_inputs`` are words about
    the account that must not make up the password: its address, practice
    name, mailbox name.
    """
    policy = policy or PasswordPolicy()
    minimum = policy.min_length if min_length is None else min_length
    if len(password) < minimum:
        return f"the password must have at least {minimum} characters"
    if len(password) > MAX_LENGTH:
        return f"the password must have at most {MAX_LENGTH} characters"
    if not password.isprintable():
        return "the password must not contain control characters"
    if policy.refuse_common:
        return _guessable(password, policy.min_score, user_words(user_inputs))
    return None


def user_words(inputs: Iterable[str]) -> list[str]:
    """The words zxcvbn should treat as known to an attacker, from the
    account's address and names: each whole, each part, and each name with
    its spaces removed ("Smile Dental" -> "smiledental", "smile", "dental").

    zxcvbn matches a user input only as a whole dictionary word, so the
    parts matter: "smiledental2024" contains none of "Smile Dental" itself.
    """
    words: list[str] = []
    for text in inputs:
        text = text.strip().lower()
        local, at, domain = text.rpartition("@")
        if at:
            # "front@dental-office.test": the TLD alone says nothing, and
            # a word like "com" would match inside many good passwords.
            site = domain.rpartition(".")[0] or domain
            candidates = [text]
            names = [local, site]
        else:
            candidates = []
            names = [text]
        for name in names:
            parts = [p for p in _NOT_ALNUM.split(name) if p]
            candidates += [name, "".join(parts), *parts]
        for word in candidates:
            # One or two letters would match inside every password.
            if len(word) >= 3 and word not in words:
                words.append(word)
    return words


def _guessable(password: str, min_score: int, words: list[str]) -> str | None:
    result = zxcvbn(password[:_ZXCVBN_MAX], user_inputs=words)
    if result["score"] >= min_score:
        return None
    if any(m.get("dictionary_name") == "user_inputs" for m in result["sequence"]):
        return ("the password is easy to guess: it is built from your address or practice name; "
                "choose a phrase of several unrelated words instead")
    warning = result["feedback"].get("warning", "").rstrip(".")
    why = f" ({warning[0].lower()}{warning[1:]})" if warning else ""
    return f"the password is too easy to guess{why}; choose a phrase of several unrelated words instead"
