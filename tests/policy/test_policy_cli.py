"""``postvault policy check`` as an admin runs it: the installed console
script in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("postvault") or sys.exit("the postvault console script is not installed")
    base = {k: v for k, v in os.environ.items() if not k.startswith("POSTVAULT_")}
    return subprocess.run([exe, *args], check=False, capture_output=True, text=True, timeout=120, env={**base, **(env or {})},
                          stdin=subprocess.DEVNULL)


def home_with(tmp_path: Path, text: str) -> Path:
    home = tmp_path / "home"
    (home / "conf").mkdir(parents=True)
    (home / "conf" / "policy.toml").write_text(text, "utf-8")
    return home


def test_shipped_policy_is_ok() -> None:
    path = REPO / "conf" / "policy.toml"
    proc = run("policy", "check", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"policy OK: {path}\n" and proc.stderr == ""


def test_the_home_folder_policy_by_default(tmp_path: Path) -> None:
    home = home_with(tmp_path, (REPO / "conf" / "policy.toml").read_text("utf-8"))
    proc = run("policy", "check", "--home", str(home))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"policy OK: {home / 'conf' / 'policy.toml'}"
    proc = run("policy", "check", env={"POSTVAULT_HOME": str(home)})
    assert proc.returncode == 0 and str(home) in proc.stdout


def test_a_home_made_by_init_passes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run("init", "--home", str(home)).returncode == 0
    proc = run("policy", "check", "--home", str(home))
    assert proc.returncode == 0, proc.stderr


def test_every_problem_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        '[attachments]\nmax_size = "15 MB"\nmax_mesage_size = 1\n\n[sessions]\nimap_idle_minutes = 10\n', "utf-8")
    proc = run("policy", "check", str(path))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:2", f"{path}:3", f"{path}:6"]
    assert '"MB" is ambiguous' in lines[0]
    assert 'did you mean "attachments.max_message_size"?' in lines[1]
    assert "RFC 9051 §5.4" in lines[2]


def test_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[auth]\nlockout_after = = 3\n", "utf-8")
    proc = run("policy", "check", str(path))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{path}:2: expected valid TOML") and len(proc.stderr.splitlines()) == 1


def test_missing_file(tmp_path: Path) -> None:
    proc = run("policy", "check", str(tmp_path / "nope.toml"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{tmp_path / 'nope.toml'}: no such file"
