"""The fuzz harnesses in ``fuzz/`` (docs/hardening.md section 1).

1. Every seed and regression input in ``fuzz/corpus/<harness>/`` replays
   through its harness without a crash (fast; the regression inputs are
   the crashes campaigns found, so each stays fixed).
2. The committed corpus and dictionaries are exactly what
   ``fuzz/make_seeds.py`` writes.
3. Each harness fuzzes for a short bounded time through ``fuzz/run.py``
   (atheris, coverage-guided) without a crash: about ten seconds each, so a
   regression that any mutation of the seeds reaches fails CI. Longer
   campaigns: ``python3 fuzz/run.py --seconds 300``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import make_seeds
from fuzz._common import HARNESSES, corpus_files
from fuzz.run import HARNESSES as RUN_HARNESSES
from fuzz.run import run_one

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 10


def test_every_harness_is_run_and_has_a_corpus() -> None:
    assert RUN_HARNESSES == HARNESSES
    for name in HARNESSES:
        assert (ROOT / "fuzz" / f"{name}.py").is_file()
        assert len(corpus_files(name)) >= 5, name


@pytest.mark.parametrize("name", HARNESSES)
def test_corpus_replays_without_a_crash(name: str) -> None:
    harness = importlib.import_module(f"fuzz.{name}")
    for path in corpus_files(name):
        try:
            harness.one_input(path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"fuzz/corpus/{name}/{path.name}: {type(exc).__name__}: {exc}") from exc


def test_corpus_matches_make_seeds() -> None:
    expected = make_seeds.expected_files()
    for path, data in expected.items():
        assert path.is_file() and path.read_bytes() == data, f"{path}: run python3 fuzz/make_seeds.py"
    for name in HARNESSES:
        extra = set(corpus_files(name)) - set(expected)
        assert not extra, f"files not written by make_seeds.py: {sorted(str(p) for p in extra)}"


CRASHER = """
import sys
sys.path[0] = {root!r}
from fuzz._common import main

def one_input(data: bytes) -> None:
    if data.startswith(b"boom"):
        raise ValueError("found")

main(one_input)
"""


def test_a_crash_is_reported_and_kept(tmp_path: Path) -> None:
    """The runner's failure path, with a harness that raises on its seed:
    a CRASH line, the input kept under --crashes, and a failing result."""
    (tmp_path / "corpus" / "crasher").mkdir(parents=True)
    (tmp_path / "corpus" / "crasher" / "seed").write_bytes(b"boom")
    (tmp_path / "crasher.py").write_text(CRASHER.format(root=str(ROOT)))
    result = run_one("crasher", 5, tmp_path / "work", tmp_path / "crashes", fuzz_dir=tmp_path)
    assert not result.ok and result.detail.startswith("crash: "), result
    kept = list((tmp_path / "crashes").glob("crasher-crash-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"boom"
    assert "ValueError: found" in (tmp_path / "crashes" / "crasher.log").read_text()


@pytest.mark.parametrize("name", HARNESSES)
def test_fuzz_briefly(name: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "run.py"), "--seconds", str(SECONDS), "--work", str(tmp_path / "work"),
         "--crashes", str(tmp_path / "crashes"), name],
        check=False, capture_output=True, text=True, timeout=SECONDS + 200, cwd=ROOT)
    log = tmp_path / "crashes" / f"{name}.log"
    tail = log.read_text()[-3000:] if log.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{tail}"
    assert f"{name}" in proc.stdout and " ok " in proc.stdout, proc.stdout
    # It really fuzzed: libFuzzer reports its runs.
    assert "Done " in tail or "DONE" in tail, tail
