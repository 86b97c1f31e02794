"""The example files in conf/ are exactly what ``postvault init`` writes."""

from pathlib import Path

from postvault.home import default_policy_text

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_policy_matches_default() -> None:
    assert (ROOT / "conf/policy.toml").read_text("utf-8") == default_policy_text()
