"""Fixtures of the outbound tests: dev certificates, a clock to move."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.outbound.sink import Certs, write_certs


class Clock:
    """A clock the test moves by hand (UTC, as the queue stores)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return write_certs(tmp_path_factory.mktemp("sink-certs"))


@pytest.fixture
def certs_dir(certs: Certs) -> Path:
    return certs.ca.parent
