"""Transcript tests: each file in ``transcripts/`` is one conversation,
replayed byte for byte over a real TLS socket against ``postvault serve``
(see ``client.py`` for the format). One file per command and per error."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from .client import Client, replay
from .conftest import PASSWORD, Server

HERE = Path(__file__).parent
TRANSCRIPTS = sorted((HERE / "transcripts").glob("*.txt"))


def _headers(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("# ") and ":" in line:
            key, _, value = line[2:].partition(":")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(request: pytest.FixtureRequest, path: Path) -> None:
    headers = _headers(path)
    # "# server: folders": the server whose policy allows user folders.
    server: Server = request.getfixturevalue("folders_server" if headers.get("server") == ["folders"] else "server")
    member = server.account("member")
    # Accounts cost a KDF each: a fresh colleague only where one logs in;
    # otherwise one shared colleague is the sender of delivered mail.
    fresh = "colleague" in headers.get("login", [])
    colleague = server.account("colleague", invited_by=member) if fresh else server.sender
    for spec in headers.get("deliver", []):
        count, name = spec.split()
        raw = (HERE / "data" / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        for _ in range(int(count)):
            server.store.deliver(raw, colleague, [member], save_sent=True)
    plain = headers.get("use", ["imaps"])[0] == "imap"
    client = Client("127.0.0.1", server.imap if plain else server.imaps, None if plain else server.context())
    values = {"member": member, "colleague": colleague, "password": PASSWORD,
              "plain": base64.b64encode(f"\0{member}\0{PASSWORD}".encode()).decode(),
              "login_user": base64.b64encode(member.encode()).decode(),
              "login_password": base64.b64encode(PASSWORD.encode()).decode()}
    try:
        replay(path, client, values, server.context())
    finally:
        client.close()
