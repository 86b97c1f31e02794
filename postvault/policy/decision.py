"""The result type of every policy decision.

A decision either allows, or refuses with what the protocol edge needs: an
SMTP reply code and enhanced status code (RFC 3463), a sentence for the
person at the client (it may name the recipient or file they chose), and a
``rule`` id for logs and the audit trail. Logs get ``rule`` only, never
``text``: a file name or subject can be PHI.

IMAP answers the same decisions with a tagged NO: ``text`` is written so it
also reads as IMAP response text, and ``imap_code`` optionally carries the
RFC 5530 response code (``NOPERM``, ``CANNOT``, ``NONEXISTENT``, ...) that
the IMAP server puts in brackets before it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    allowed: bool
    code: int = 250
    enhanced: str = "2.0.0"
    text: str = "OK"
    rule: str = ""
    # RFC 5530 response code for IMAP, without brackets; "" for none.
    imap_code: str = ""

    @property
    def smtp_reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def imap_text(self) -> str:
        """The text of an IMAP tagged response: ``[CODE] text``, or ``text``."""
        return f"[{self.imap_code}] {self.text}" if self.imap_code else self.text


ALLOW = Decision(True)


def refuse(code: int, enhanced: str, text: str, rule: str, imap_code: str = "") -> Decision:
    """A refusal; ``text`` is one sentence a person can act on."""
    return Decision(False, code, enhanced, text, rule, imap_code)
