"""Shared fixtures: real home folders made by ``postvault init`` in temp
folders, and real stores (SQLite files, sealed blobs on disk)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from postvault.conf.schema import Config
from postvault.home import init_home, open_store
from postvault.store.api import Store

PASSWORD = "correct horse battery staple"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in list(__import__("os").environ):
        if var.startswith("POSTVAULT_"):
            monkeypatch.delenv(var)
    path = tmp_path / "home"
    init_home(path, "mail.example.test")
    return path


@pytest.fixture
def config(home: Path) -> Config:
    from postvault.conf.load import load_config

    return load_config(home)


@pytest.fixture
def store(config: Config) -> Iterator[Store]:
    s = open_store(config)
    yield s
    s.close()


@pytest.fixture
def people(store: Store) -> dict[str, str]:
    """A member office, a second member, and a colleague in the first's address book."""
    store.create_account("office@dental.test", "member", "Smile Dental", PASSWORD, "America/New_York")
    store.create_account("front@clinic.test", "member", "Family Clinic", PASSWORD)
    store.create_account("dr@ortho.test", "colleague", "Ortho Partners", PASSWORD, invited_by="office@dental.test")
    return {"member": "office@dental.test", "member2": "front@clinic.test", "colleague": "dr@ortho.test"}
