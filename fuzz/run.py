"""Run the fuzz harnesses: ``python3 fuzz/run.py --seconds N [NAME ...]``.

Each harness (``fuzz/<name>.py``, all of them if none is named) runs as its
own subprocess under atheris for N seconds (libFuzzer's
``-max_total_time``), one after the other, starting from its seed corpus
``fuzz/corpus/<name>/`` and dictionary ``fuzz/dicts/<name>.dict``. New
coverage-increasing inputs go to ``--work`` (default ``fuzz/work/<name>/``,
gitignored) so the seed corpus stays as ``make_seeds.py`` writes it, and
a later run resumes from them. A crash stops that harness; its input is
written to ``--crashes`` (default ``fuzz/crashes/``, gitignored) as
``<name>-crash-<sha1>`` and its log as ``<name>.log``.

Prints one summary line per harness and exits 1 if any crashed (or did not
run), else 0. Replay a crash with ``python3 fuzz/<name>.py CRASHFILE``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
HARNESSES = ("mime", "imap", "smtp_data", "contacts_csv", "policy")
# Longest input the mutator makes, per harness: enough for the seeds and for
# the structures that matter (nesting a few hundred levels deep, long lines),
# small enough to keep thousands of runs a second.
MAX_LEN = {"mime": 16384, "imap": 4096, "smtp_data": 2048, "contacts_csv": 4096, "policy": 16384}
# One input taking longer than this is reported as a crash (a hang, or
# work that grows too fast with the input).
INPUT_TIMEOUT = 25
# Beyond the fuzzing time: interpreter start, imports, corpus load.
GRACE = 120


@dataclass
class Result:
    name: str
    ok: bool
    runs: int
    seconds: float
    coverage: int
    detail: str


def _stat(pattern: str, text: str) -> int:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else 0


def run_one(name: str, seconds: int, work: Path, crashes: Path, fuzz_dir: Path = FUZZ_DIR) -> Result:
    """Fuzz harness ``name`` (``fuzz_dir/<name>.py``, seeds in
    ``fuzz_dir/corpus/<name>/``) for ``seconds``; see the module docstring."""
    corpus = work / name
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.glob(f"{name}-*"))
    cmd = [
        sys.executable, str(fuzz_dir / f"{name}.py"), str(corpus), str(fuzz_dir / "corpus" / name),
        f"-max_total_time={seconds}", f"-timeout={INPUT_TIMEOUT}", f"-max_len={MAX_LEN.get(name, 4096)}",
        f"-artifact_prefix={crashes}/{name}-", "-print_final_stats=1",
    ]
    dictionary = fuzz_dir / "dicts" / f"{name}.dict"
    if dictionary.is_file():
        cmd.append(f"-dict={dictionary}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    log = crashes / f"{name}.log"
    try:
        proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                              timeout=seconds + GRACE, cwd=ROOT)
        output, code = proc.stdout.decode("utf-8", "replace"), proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode("utf-8", "replace")
        code = -1
        output += f"\nrun.py: no result after {seconds + GRACE} s; stopped\n"
    elapsed = time.monotonic() - started
    log.write_text(output, encoding="utf-8")
    found = sorted(set(crashes.glob(f"{name}-*")) - before - {log})
    runs = _stat(r"Done (\d+) runs", output) or _stat(r"#(\d+)\s", output)
    coverage = _stat(r"cov: (\d+)", output)
    if code == 0 and not found:
        return Result(name, True, runs, elapsed, coverage, "no crash")
    reason = "crash" if found else f"exit code {code}"
    where = ", ".join(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p) for p in found)
    first = next((line for line in output.splitlines() if "Uncaught Python exception" in line
                  or "Error" in line or "ERROR" in line), "")
    return Result(name, False, runs, elapsed, coverage, f"{reason}: {where or first or 'see ' + str(log)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the fuzz harnesses for a bounded time each.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"harnesses to run (default: all of {', '.join(HARNESSES)})")
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per harness (default 60)")
    parser.add_argument("--work", type=Path, default=FUZZ_DIR / "work", help="where each harness keeps its corpus")
    parser.add_argument("--crashes", type=Path, default=FUZZ_DIR / "crashes", help="where crash inputs go")
    args = parser.parse_args(argv)
    names = args.names or list(HARNESSES)
    unknown = [n for n in names if n not in HARNESSES]
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; expected {', '.join(HARNESSES)}")
    results = []
    for name in names:
        result = run_one(name, args.seconds, args.work.resolve(), args.crashes.resolve())
        results.append(result)
        print(f"{result.name:13} {'ok   ' if result.ok else 'CRASH'} {result.runs:>9} runs "
              f"{result.seconds:6.0f} s  cov {result.coverage:>5}  {result.detail}", flush=True)
    bad = [r.name for r in results if not r.ok]
    print(f"fuzz: {len(results) - len(bad)} of {len(results)} harnesses without a crash"
          + (f"; crashed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
