"""Logs carry no message content, even in a library's exception text."""

from __future__ import annotations

import logging
from pathlib import Path

from postvault.conf.schema import LogConfig
from postvault.logs import configure_logging


def test_exception_messages_are_withheld(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(LogConfig(level="debug", file=tmp_path / "server.log"))
        # Data arrives at run time; the traceback's source lines show code only.
        patient = "".join(["Ja", "ne Roe"])
        try:
            try:
                raise KeyError(f"Subject: biopsy results for {patient}")
            except KeyError as inner:
                raise ValueError(f"could not parse 'xray-{patient.lower()}.png'") from inner
        except ValueError:
            logging.getLogger("postvault.test").exception("parsing failed")
        logging.getLogger("mail.log").debug("DATA readline: %r", f"Subject: {patient}")
        for h in root.handlers:
            h.flush()
        text = (tmp_path / "server.log").read_text()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    assert "parsing failed" in text
    assert "builtins.ValueError" in text and "builtins.KeyError" in text and "test_logs.py" in text
    assert "Jane" not in text and "jane" not in text
