"""Shared fixtures: real home folders made by ``postvault init`` in temp
folders, and real stores (SQLite files, sealed blobs on disk).

``--db postgresql`` puts every home folder's store in a database of its
own on a throwaway PostgreSQL cluster (``tests/pgcluster.py``), blobs
included (``[store] blobs = "database"``). Modules marked ``databases``
are the ones written to pass on both; CI runs them a second time with
``python3 -m pytest --db postgresql -m databases``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from postvault.conf.schema import Config
from postvault.home import init_home, open_store
from postvault.store.api import Store

if TYPE_CHECKING:
    from tests.pgcluster import Cluster

PASSWORD = "correct horse battery staple"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db", choices=("sqlite", "postgresql"), default="sqlite",
        help="the database of the stores the tests make (postgresql: a throwaway cluster of "
             "Debian's PostgreSQL; run with -m databases)",
    )


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator["Cluster"]:
    from tests.pgcluster import Cluster

    cluster = Cluster()
    try:
        cluster.make_template()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def store_overrides(request: pytest.FixtureRequest) -> Callable[[], dict[str, str]]:
    """Config overrides for a new home folder's store: none on SQLite (the
    shipped default), else a fresh PostgreSQL database with its blobs in it."""
    if request.config.getoption("--db") == "sqlite":
        return dict
    cluster = request.getfixturevalue("pg_cluster")
    return lambda: {"store.url": cluster.new_database(), "store.blobs": "database"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_overrides: Callable[[], dict[str, str]]) -> Path:
    for var in list(__import__("os").environ):
        if var.startswith("POSTVAULT_"):
            monkeypatch.delenv(var)
    path = tmp_path / "home"
    init_home(path, "mail.example.test", store_overrides())
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
