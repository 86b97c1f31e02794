"""The search index and header cache filled after login, in the background.

Delivery holds only public keys, so it writes no sealed search entry and no
header cache entry (store/searchindex.py, store/headercache.py); without
this, the first header SEARCH of a large folder decrypts every header while
the client waits. After a login this fills them, folder by folder (INBOX
first), in rounds of ``[imap] index_round_messages`` through
``Store.fill_search_index`` (the search's own fill code).

Invariants:
- One thread per process, not the IMAP worker pool: a session's commands
  never queue behind the fill. A short pause between rounds leaves the
  GIL and SQLite's write lock to the sessions.
- One job per account at a time; a second login while it runs starts none.
- The fill uses the private key of a session that is still logged in,
  taken afresh for each round: when the account's last (writable) session
  of this process ends (LOGOUT, lost connection, the BYE after a password
  change, shutdown), the job stops at the next round and keeps no key.
- Emergency access sessions (read-only) start nothing and lend no key.
- Each copy without an entry is looked at once per job (the rounds walk up
  the UIDs), so a message that does not open is skipped, not retried.
- Logs carry account and folder ids and counts, never names or content.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from ..errors import MailboxNotFound, PostvaultError
from ..policy import folders
from ..store.types import AccountSession

log = logging.getLogger("postvault.imapd.indexfill")

# Seconds between rounds: the sessions' commands get the GIL and the write
# lock (a round's write transaction is short; its decryption is not).
PAUSE = 0.05


class IndexFiller:
    """The background fill of one IMAP service (see the module docstring)."""

    def __init__(self, store: Any, enabled: bool, round_messages: int) -> None:
        self.store = store
        self.enabled = enabled
        self.round_messages = round_messages
        self._lock = threading.Condition()
        # account id -> that account's logged-in writable sessions here.
        self._live: dict[int, list[AccountSession]] = {}
        self._queue: deque[int] = deque()
        self._jobs: set[int] = set()  # queued or running
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the sessions call (reactor thread) ------------------------------

    def logged_in(self, session: AccountSession) -> None:
        """A login succeeded: remember the session, and queue the account's
        fill unless one is queued or running."""
        if not self.enabled or session.read_only:
            return
        with self._lock:
            if self._halt.is_set():
                return
            self._live.setdefault(session.account_id, []).append(session)
            if session.account_id in self._jobs:
                return
            self._jobs.add(session.account_id)
            self._queue.append(session.account_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="postvault-index-fill", daemon=True)
                self._thread.start()
            self._lock.notify()

    def logged_out(self, session: AccountSession) -> None:
        """The session ended: its key is no longer lent to the fill."""
        with self._lock:
            live = self._live.get(session.account_id)
            if not live:
                return
            for i, s in enumerate(live):
                if s is session:
                    del live[i]
                    break
            if not live:
                del self._live[session.account_id]

    def stop(self, timeout: float) -> None:
        """Server shutdown: no new rounds; wait up to ``timeout`` for the
        one running (blocking: call it off the reactor)."""
        with self._lock:
            self._halt.set()
            self._queue.clear()
            self._live.clear()
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # -- the thread ---------------------------------------------------------------

    def _session(self, account_id: int) -> AccountSession | None:
        with self._lock:
            live = self._live.get(account_id)
            return live[0] if live and not self._halt.is_set() else None

    def _main(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._halt.is_set():
                    self._lock.wait()
                if self._halt.is_set():
                    return
                account_id = self._queue.popleft()
            done = False
            try:
                done = self._fill_account(account_id)
            except Exception as exc:  # the thread must outlive one account's failure
                log.warning("search index fill of account %d stopped: %s", account_id, type(exc).__name__)
                done = True
            finally:
                with self._lock:
                    if not done and account_id in self._live and not self._halt.is_set():
                        # Stopped for want of a session, and one logged in
                        # just after: its login found this job and started none.
                        self._queue.append(account_id)
                    else:
                        self._jobs.discard(account_id)

    def _fill_account(self, account_id: int) -> bool:
        """Every folder of the account, INBOX first; False if it stopped
        early (no session left, or shutdown)."""
        session = self._session(account_id)
        if session is None:
            return False
        boxes = self.store.list_mailboxes(session)
        del session
        names = [b.name for b in boxes if b.name == folders.INBOX] + [b.name for b in boxes if b.name != folders.INBOX]
        for name in names:
            if not self._fill_folder(account_id, name):
                return False
        return True

    def _fill_folder(self, account_id: int, name: str) -> bool:
        started = time.monotonic()
        after: int | None = 0
        box_id = looked = written = 0
        while after is not None:
            session = self._session(account_id)
            if session is None:
                return False
            try:
                box_id, n, w, after = self.store.fill_search_index(session, name, after, self.round_messages)
            except MailboxNotFound:
                return True  # deleted or renamed meanwhile: its new name is filled by the next login
            except PostvaultError as exc:
                log.warning("search index fill of account %d skipped a folder: %s", account_id, type(exc).__name__)
                return True
            finally:
                del session
            looked += n
            written += w
            if after is not None and self._halt.wait(PAUSE):
                return False
        if looked:
            # Written can be fewer than looked at: messages that did not
            # open, or entries a search wrote meanwhile.
            log.info("search index filled: account %d folder %d, %d of %d messages without entries in %.1f s",
                     account_id, box_id, written, looked, time.monotonic() - started)
        return True
