"""Compare two tracemalloc snapshots written by ``postvault serve``.

Run the server with ``PYTHONTRACEMALLOC=N`` and send it SIGUSR1 (see
postvault/serve.py) at two moments, then::

    python bench/tracemalloc_diff.py OLD.snap NEW.snap [--top 25] [--by lineno|traceback]

prints the allocation sites whose live memory grew most between them
(``Snapshot.compare_to``), leaving out tracemalloc's and the import
machinery's own allocations.
"""

from __future__ import annotations

import argparse
import tracemalloc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--by", choices=("lineno", "traceback", "filename"), default="lineno")
    args = ap.parse_args()
    filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
               tracemalloc.Filter(False, "<unknown>")]
    old = tracemalloc.Snapshot.load(args.old).filter_traces(filters)
    new = tracemalloc.Snapshot.load(args.new).filter_traces(filters)
    total_old = sum(s.size for s in old.statistics("filename"))
    total_new = sum(s.size for s in new.statistics("filename"))
    print(f"traced: {total_old / 2**20:.1f} MiB -> {total_new / 2**20:.1f} MiB")
    for stat in new.compare_to(old, args.by)[:args.top]:
        print(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  now {stat.size / 1024:9.1f} KiB")
        lines = stat.traceback.format(limit=None if args.by == "traceback" else 1)
        for line in lines:
            print("    " + line.strip())


if __name__ == "__main__":
    main()
