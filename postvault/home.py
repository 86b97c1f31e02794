"""The home folder of DESIGN.md: where it is, how ``init`` makes it, and
how the rest of the program opens what is inside (config, store).

```
DIR/conf/postvault.toml   server config
DIR/conf/policy.toml      policy
DIR/certs/                ca.pem, server.pem, server.key, audit-signing.key/.pub
DIR/data/                 the SQLite database and sealed blobs
```
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from .certs.devca import write_dev_certs
from .conf.load import load_config, render_default_config
from .conf.schema import Config, is_dns_name
from .errors import HomeError
from .policy.load import POLICY_FILE
from .store.api import KdfSettings, Store
from .store.auditsign import ensure_signing_key

DEFAULT_HOME = "postvault-home"


def resolve_home(arg: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """``--home``, else ``$POSTVAULT_HOME``, else ``./postvault-home``."""
    env = os.environ if environ is None else environ
    return Path(arg or env.get("POSTVAULT_HOME") or DEFAULT_HOME).absolute()


def policy_path(home: Path) -> Path:
    return home / POLICY_FILE


def default_policy_text() -> str:
    return resources.files("postvault.policy").joinpath("default.toml").read_text("utf-8")


def init_home(home: Path, hostname: str, overrides: Mapping[str, object] | None = None) -> Config:
    """Create a complete home folder; refuse to touch an existing one."""
    if not is_dns_name(hostname):
        raise HomeError(f"--hostname: {hostname!r} is not a DNS host name")
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise HomeError(f"{home} already exists and is not empty; refusing to overwrite a home folder")
    # Nothing in a home folder is for other users: keys, mail, audit.
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    try:
        return _fill_home(home, hostname, overrides)
    except BaseException:
        # The folder was empty when we started: leave it so, not half made.
        for child in home.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _fill_home(home: Path, hostname: str, overrides: Mapping[str, object] | None) -> Config:
    (home / "conf").mkdir(mode=0o700)
    (home / "data").mkdir(mode=0o700)
    (home / "conf" / "postvault.toml").write_text(render_default_config(hostname, overrides), "utf-8")
    (home / "conf" / "policy.toml").write_text(default_policy_text(), "utf-8")
    write_dev_certs(home / "certs", hostname)
    # Signs audit checkpoints; a file, so the database alone cannot re-sign.
    ensure_signing_key(home)
    # The effective config (env overrides included) says where the store is.
    config = load_config(home)
    open_store(config).close()
    return config


def open_store(config: Config) -> Store:
    """The store the config names, its schema upgraded to the newest
    revision, with the recovery officers' keys of ``[recovery]`` if set."""
    kdf = KdfSettings(config.store.kdf_memory_kib, config.store.kdf_iterations, config.store.kdf_lanes)
    store = Store.open(config.store.url, config.store.blobs or "database", kdf)
    if config.recovery.keys:
        from .store.escrow import RecoveryKeys  # GnuPG only where escrow is configured

        try:
            store.recovery_keys = RecoveryKeys.load(config.recovery.keys, config.recovery.gnupg_home)
        except BaseException:
            store.close()
            raise
    return store
