"""Password rules: length from policy, control characters, and zxcvbn's
guessability with the account's own words."""

from __future__ import annotations

import pytest

from postvault.policy.passwords import MAX_LENGTH, MIN_LENGTH, password_problem, user_words
from postvault.policy.schema import PasswordPolicy

SMILE = ("office@smiledental.test", "Smile Dental")
GOOD = "correct horse battery staple"


def test_the_old_call_still_works() -> None:
    assert MIN_LENGTH == 12
    assert password_problem(GOOD) is None
    assert password_problem("short") == "the password must have at least 12 characters"
    # The positional minimum of the first version.
    assert password_problem("tall giraffe", 30) == "the password must have at least 30 characters"


@pytest.mark.parametrize(
    "bad, good, policy, words",
    [
        # Length from policy.
        ("elevenchars", "twelve chars", PasswordPolicy(refuse_common=False), "at least 12 characters"),
        ("quince tree", "quince trees", PasswordPolicy(min_length=12, refuse_common=False), "at least 12"),
        ("pear tree", "pear trees", PasswordPolicy(min_length=10, refuse_common=False), "at least 10"),
        # Control characters.
        ("horse battery\tstaple", "horse battery staple", PasswordPolicy(), "control characters"),
        ("horse battery\x00staple", "horse battery staple", PasswordPolicy(), "control characters"),
        # Too long.
        ("x" * (MAX_LENGTH + 1), "x" * MAX_LENGTH, PasswordPolicy(refuse_common=False), f"at most {MAX_LENGTH}"),
        # Common passwords and patterns (zxcvbn).
        ("Password123!", GOOD, PasswordPolicy(), "too easy to guess"),
        ("qwertyuiop123", GOOD, PasswordPolicy(), "too easy to guess"),
        ("iloveyou2024", GOOD, PasswordPolicy(), "too easy to guess"),
        ("aaaaaaaaaaaaaaaa", GOOD, PasswordPolicy(), "too easy to guess"),
        ("123456789012", GOOD, PasswordPolicy(), "too easy to guess"),
    ],
)
def test_refused_with_allowed_twin(bad: str, good: str, policy: PasswordPolicy, words: str) -> None:
    problem = password_problem(bad, policy=policy)
    assert problem is not None and words in problem
    assert bad not in problem  # never echoed
    assert password_problem(good, policy=policy) is None


def test_common_passwords_pass_when_the_check_is_off() -> None:
    assert password_problem("Password123!", policy=PasswordPolicy(refuse_common=False)) is None


def test_min_score_is_the_bar() -> None:
    # "Tr0ub4dour&3xyz" scores 3: enough for 3, not for 4.
    assert password_problem("Tr0ub4dour&3xyz", policy=PasswordPolicy(min_score=3)) is None
    assert password_problem("Tr0ub4dour&3xyz", policy=PasswordPolicy(min_score=4)) is not None


def test_practice_name_and_address_are_refused() -> None:
    # Strong-looking, but built from the practice's own name.
    problem = password_problem("SmileDental2024!", user_inputs=SMILE)
    assert problem is not None and "address or practice name" in problem
    # Twin: the same password for another practice passes.
    assert password_problem("SmileDental2024!", user_inputs=("front@clinic.test", "Family Clinic")) is None
    assert password_problem("SmileDental2024!") is None


@pytest.mark.parametrize(
    "password, inputs",
    [
        ("smiledental#2024", SMILE),
        ("OrthoPartners99", ("dr@ortho.test", "Ortho Partners")),
        # From the address alone: the domain without its TLD.
        ("dental-office-42", ("front@dental-office.test",)),
    ],
)
def test_account_words_in_various_shapes(password: str, inputs: tuple[str, ...]) -> None:
    problem = password_problem(password, user_inputs=inputs)
    assert problem is not None and "address or practice name" in problem
    # Twin: the same password for an unrelated account passes.
    assert password_problem(password, user_inputs=("zz@unrelated.test", "Unrelated Name")) is None


def test_policy_and_inputs_together() -> None:
    policy = PasswordPolicy(min_length=16)
    # Length is checked first: the cheaper fix to explain.
    assert password_problem("SmileDental2024", policy=policy, user_inputs=SMILE) == \
        "the password must have at least 16 characters"
    assert password_problem(GOOD, policy=policy, user_inputs=SMILE) is None
    # An explicit minimum overrides the policy's (the older call's meaning).
    assert password_problem("short words!", 8, policy=policy, user_inputs=SMILE) is None


def test_passphrases_pass() -> None:
    for phrase in (GOOD, "a long passphrase here", "blue giraffe eats lunch", "Kettle-Forest-Marble-7"):
        assert password_problem(phrase, user_inputs=SMILE) is None, phrase


def test_long_passwords_are_judged_by_their_start() -> None:
    # zxcvbn takes at most 72 characters; the rest can't make it weaker.
    assert password_problem(GOOD + " " + "a" * 500) is None
    assert password_problem("a" * 100) is not None


def test_user_words() -> None:
    words = user_words(["Office@SmileDental.test", "Smile Dental", "", "  "])
    assert {"office@smiledental.test", "office", "smiledental", "smile dental", "smile", "dental"} <= set(words)
    # The TLD alone, and very short pieces, would match inside good passwords.
    assert "test" not in words and all(len(w) >= 3 for w in words)
    assert len(words) == len(set(words))
