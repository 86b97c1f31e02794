"""What every service of ``postvault serve`` shares: the config, the store,
the current policy and the TLS context, and how SIGHUP reloads the last two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .certs.context import TLSContextHolder
from .conf.load import load_config
from .conf.schema import Config
from .errors import PostvaultError
from .home import open_store, policy_path
from .policy.load import PolicyHolder
from .store.api import Store

log = logging.getLogger("postvault.runtime")


@dataclass
class Runtime:
    home: Path
    config: Config
    store: Store
    policy: PolicyHolder
    tls: TLSContextHolder

    @classmethod
    def open(cls, home: Path) -> "Runtime":
        """Load config and policy, build the TLS context, open (and upgrade) the store."""
        config = load_config(home)
        policy = PolicyHolder.from_file(policy_path(home))
        tls = TLSContextHolder(config.tls.cert, config.tls.key)
        return cls(home, config, open_store(config), policy, tls)

    def reload(self, *, record: bool = True) -> list[str]:
        """SIGHUP: re-read policy.toml and the certificate files. What fails to
        load is reported and the old version kept; the rest takes effect.
        ``record``: write the audit event (a submission worker process,
        which reloads when its parent does, leaves that to the parent)."""
        problems = self.policy.reload(policy_path(self.home))
        try:
            self.tls.reload()
        except PostvaultError as exc:
            problems.append(str(exc))
        outcome = "kept-old" if problems else "ok"
        if record:
            self.store.record_event("policy.reload", actor="admin", detail=f"result={outcome}")
        for problem in problems:
            log.error("reload: %s", problem)
        log.info("reload done: %s", outcome)
        return problems

    def close(self) -> None:
        self.store.close()
