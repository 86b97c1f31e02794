"""Fixtures for the store's own tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from postvault.store.db import make_engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """Our SQLite engine on ``tmp_path/pv.db`` with one table, ``t (x)``."""
    e = make_engine(f"sqlite:///{tmp_path / 'pv.db'}")
    with e.connect() as c:
        c.execute(text("CREATE TABLE t (x INTEGER)"))
        c.commit()
    yield e
    e.dispose()
