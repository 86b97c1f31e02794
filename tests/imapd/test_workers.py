"""The IMAP worker threads (imapd/workers.py): results, exceptions, settled
futures and ``call_from_thread`` calls reach the loop thread in the order
they happened, so a change a job published before returning is seen
before the job's result (RENAME INBOX's own EXPUNGEs depend on it)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from postvault.imapd.workers import Workers, WorkersStopped


def test_results_calls_and_futures_arrive_in_order_on_the_loop_thread() -> None:
    async def main() -> list[Any]:
        loop_thread = threading.get_ident()
        pool = Workers(3, "test-workers")
        pool.start()
        seen: list[Any] = []
        done = asyncio.Event()

        def note(what: str) -> None:
            assert threading.get_ident() == loop_thread
            seen.append(what)

        def job(n: int) -> int:
            assert threading.get_ident() != loop_thread
            pool.call_from_thread(note, f"change {n}")  # published before the job returns
            return n

        def fails() -> None:
            raise ValueError("no")

        for n in range(20):
            pool.run(job, n).addCallback(lambda n: note(f"result {n}"))
        errors: list[type] = []
        pool.run(fails).addErrback(lambda f: errors.append(f.type))
        future: Future[str] = Future()
        pool.settle(future).addCallback(lambda v: (note(v), done.set()))
        threading.Thread(target=future.set_result, args=("settled",)).start()
        await asyncio.wait_for(done.wait(), 10)
        while len(seen) < 41 or not errors:
            await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, pool.stop)
        stopped: list[type] = []
        pool.run(job, 99).addErrback(lambda f: stopped.append(f.type))
        return [seen, errors, stopped]

    seen, errors, stopped = asyncio.run(main())
    for n in range(20):
        assert seen.index(f"change {n}") < seen.index(f"result {n}")
    assert "settled" in seen and errors == [ValueError] and stopped == [WorkersStopped]


def test_at_most_the_configured_threads() -> None:
    async def main() -> int:
        pool = Workers(2, "test-workers")
        pool.start()
        gate = threading.Event()
        names: set[str] = set()

        def job() -> None:
            names.add(threading.current_thread().name)
            gate.wait(10)

        ds = [pool.run(job) for _ in range(6)]
        await asyncio.sleep(0.2)
        gate.set()
        for d in ds:
            await d.asFuture(asyncio.get_running_loop())
        await asyncio.get_running_loop().run_in_executor(None, pool.stop)
        return len(names)

    assert asyncio.run(main()) == 2

