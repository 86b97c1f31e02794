"""A throwaway PostgreSQL cluster for the tests, owned by the test session.

Debian's server binaries (``apt-get install postgresql``: the
``/usr/lib/postgresql/<version>/bin`` programs) make a cluster in a
temporary folder with ``initdb`` and run it with ``pg_ctl`` on a free
loopback port, so the tests depend on no system service and leave nothing
behind. ``initdb`` refuses to run as root, so under root (CI) the cluster
belongs to the ``postgres`` OS user that the Debian package creates and
its programs run through ``runuser``.

Authentication is ``trust`` for one role on 127.0.0.1 only, and the
cluster runs without fsync: it holds test data for minutes and is thrown
away, and durability is not what these tests are about (a commit is still
a commit to every other connection).

Each test gets a database of its own: ``CREATE DATABASE ... TEMPLATE``
from a database the session migrated once, which is a file copy.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import free_port

ROLE = "postvault"
TEMPLATE = "postvault_template"


def _bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL's server programs are missing: apt-get install postgresql")
    return found[-1].parent


def _as_owner(argv: list[str]) -> list[str]:
    """``argv`` run as the cluster's owner: ``postgres`` when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


class Cluster:
    """One running cluster; ``url(name)`` is a SQLAlchemy URL for a database in it."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        # Under root the folder must be reachable by the postgres user:
        # /tmp is, whatever $TMPDIR says.
        self.root = Path(tempfile.mkdtemp(prefix="postvault-pg-", dir="/tmp" if os.geteuid() == 0 else None))
        self.data = self.root / "data"
        self.port = free_port()
        self._names = itertools.count(1)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        subprocess.run(
            _as_owner([str(self.bindir / "initdb"), "-D", str(self.data), "-U", ROLE, "-A", "trust",
                       "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]),
            check=True, capture_output=True, timeout=120,
        )
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        subprocess.run(
            _as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
                       "-o", options, "-w", "-t", "60", "start"]),
            check=True, capture_output=True, timeout=90,
        )
        self._admin = self._connect("postgres")

    def _connect(self, db: str):  # type: ignore[no-untyped-def]
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                return psycopg.connect(host="127.0.0.1", port=self.port, user=ROLE, dbname=db, autocommit=True)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://{ROLE}@127.0.0.1:{self.port}/{db}"

    def make_template(self) -> None:
        """The database every test database is copied from: schema at head."""
        from postvault.store.db import make_engine, upgrade

        self._admin.execute(f"CREATE DATABASE {TEMPLATE}")
        engine = make_engine(self.url(TEMPLATE))
        try:
            upgrade(engine)
        finally:
            engine.dispose()

    def new_database(self, *, empty: bool = False) -> str:
        """A fresh database (schema at head, or ``empty``); its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        template = "template0" if empty else TEMPLATE
        self._admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._admin.close()
            subprocess.run(
                _as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
                capture_output=True, timeout=60,
            )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
