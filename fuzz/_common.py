"""What every fuzz harness shares: how it is started, what counts as a crash.

A harness is a module in ``fuzz/`` with a function ``one_input(data: bytes)``
that feeds ``data`` to one parser and checks the invariants it promises. It
returns normally for every input the parser handles as documented (including
the documented refusals: our ``errors.py`` hierarchy, ``BadCommand``, a
refusal decision) and raises for anything else. So the same function serves
two callers:

- the fuzzer: ``python3 fuzz/<name>.py CORPUS... [libFuzzer flags]`` runs
  :func:`main`, which hands ``one_input`` to atheris with the product
  modules instrumented for coverage; an exception is a crash, whose input
  atheris writes under ``-artifact_prefix`` (``fuzz/run.py`` points that at
  ``fuzz/crashes/``);
- the tests: ``tests/test_fuzz.py`` imports the module without atheris and
  replays every seed and regression input through ``one_input``.

Invariant failures raise :class:`InvariantBroken`, so a crash report always
says whether a parser raised or a promise was broken.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
CORPUS_DIR = FUZZ_DIR / "corpus"
CRASH_DIR = FUZZ_DIR / "crashes"
# libFuzzer writes the new inputs it finds into the first corpus directory
# it is given; this one (gitignored) takes them, so the seed corpus in the
# repository only ever changes through make_seeds.py.
WORK_DIR = FUZZ_DIR / "work"

HARNESSES = ("mime", "imap", "smtp_data", "contacts_csv", "policy")


class InvariantBroken(AssertionError):
    """A parser returned, but broke a promise it makes about its result."""


def check(condition: object, what: str) -> None:
    """Raise :class:`InvariantBroken` with ``what`` unless ``condition``."""
    if not condition:
        raise InvariantBroken(what)


def fuzzing(module_name: str) -> bool:
    """Whether the harness module runs as the fuzzer's main program."""
    return module_name == "__main__"


@contextlib.contextmanager
def instrumented(active: bool, modules: list[str]) -> Iterator[None]:
    """Import the product with ``modules`` (and their submodules) under
    atheris' coverage instrumentation when fuzzing; a plain import
    otherwise (tests, replays). Only the parsers under test: instrumenting
    the whole package costs half a minute of start-up on a busy machine."""
    if not active:
        yield
        return
    import atheris

    with atheris.instrument_imports(include=modules):
        yield


@contextlib.contextmanager
def patched(obj: object, name: str, value: object) -> Iterator[None]:
    """Set ``obj.name`` for the duration of one input only: the tests
    replay inputs in the same process as the rest of the suite."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def quiet(*loggers: str) -> None:
    """Fuzzing only: the product's own warnings about hostile input are
    expected by the thousand; keep them off the fuzzer's output."""
    for name in loggers:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(one_input: Callable[[bytes], None]) -> None:
    """Run ``one_input`` under atheris with the command line's libFuzzer
    flags and corpus directories (see ``fuzz/run.py``)."""
    import atheris

    # Guide the mutator towards the strings the parsers compare against.
    # (Not the "RegEx" hook: its pattern proxy lacks the pos/endpos
    # arguments of finditer, which structure.py uses.)
    atheris.enabled_hooks.add("str")
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


def corpus_files(name: str) -> list[Path]:
    """The seed corpus of harness ``name``, sorted."""
    folder = CORPUS_DIR / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
