"""Fuzz harness: the policy file loader (``postvault.policy.load``).

``postvault policy check``, startup and every SIGHUP reload read
``conf/policy.toml``, a file an admin edits by hand. Promise: for any bytes,
the loader either returns a ``Policy`` or reports problems (``PolicyInvalid``,
a ``ConfigError``); it never raises anything else (the CLI would print a
traceback, a reload would die). Invariants:

- bytes that are not UTF-8 are reported, not raised (as ``_read`` does it);
- ``check_policy_text`` returns no problem exactly when
  ``load_policy_text`` returns a policy; each problem is one line,
  ``SOURCE:LINE: ...``, with LINE inside the file;
- a loaded policy works: the attachment check runs with it on a small
  message and returns a decision.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import re

from fuzz._common import check, fuzzing, instrumented, main

with instrumented(fuzzing(__name__), ["postvault.policy.load", "postvault.conf.load"]):
    from postvault.policy import load
    from postvault.policy.attachments import check_attachments
    from postvault.policy.decision import Decision

SOURCE = "policy.toml"
_PROBLEM = re.compile(re.escape(SOURCE) + r":(\d+): ")
MESSAGE = (b"From: a@b.test\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
           b"Content-Type: application/pdf; name=a.pdf\r\n\r\n%PDF-1.4\r\n--x--\r\n")


def one_input(data: bytes) -> None:
    """Load one policy file's bytes; check the promises (module docstring)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load._read reports it; covered by tests/policy
    problems = load.check_policy_text(text, SOURCE)
    lines = max(1, len(text.splitlines()))
    for problem in problems:
        m = _PROBLEM.match(problem)
        check(m and 1 <= int(m[1]) <= lines + 1, f"problem without a line inside the file: {problem[:80]!r}")
        check("\n" not in problem and "\r" not in problem, "a problem spans lines")
    try:
        policy = load.load_policy_text(text, SOURCE)
    except load.PolicyInvalid as exc:
        check(problems and exc.problems == problems, "load and check disagree about the problems")
        return
    check(not problems, "load returned a policy that check finds problems in")
    check(isinstance(check_attachments(MESSAGE, policy.attachments), Decision), "no decision with the policy")


if __name__ == "__main__":
    main(one_input)
