"""Streaming OpenPGP encryption and decryption of a backup with GnuPG
(python-gnupg), so a backup of any size passes through in constant memory
and its plaintext never lands in a temporary file.

Encryption: the caller writes the archive into a pipe; python-gnupg copies
the pipe to ``gpg --encrypt`` and hands gpg's output, chunk by chunk, to
``on_data``, which appends it to the output file. Decryption is the mirror
image: gpg's plaintext goes into a pipe that the caller reads.

The recipient is a key file (imported into a throwaway keyring) or a
fingerprint / key id in the admin's keyring (``--gnupg-home``, else
``$GNUPGHOME``, else ``~/.gnupg``). Naming a key on the command line is the
admin's statement of trust, hence ``--trust-model always``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import gnupg

from ..errors import BackupError

# Blobs are ciphertext already: compressing them only costs time.
_EXTRA = ["--compress-algo", "none"]
_BUFFER = 64 * 1024


def _quiet_gnupg() -> None:
    # python-gnupg logs a traceback when gpg stops reading early; we report
    # gpg's own status as one line instead.
    logging.getLogger("gnupg").setLevel(logging.CRITICAL)


def _gpg(home: Path | None) -> gnupg.GPG:
    _quiet_gnupg()
    try:
        gpg = gnupg.GPG(gnupghome=str(home) if home else None)
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot run GnuPG: {exc}") from None
    gpg.buffer_size = _BUFFER
    return gpg


@contextmanager
def _recipient(spec: str, gnupg_home: Path | None) -> Iterator[tuple[gnupg.GPG, list[str]]]:
    """A GPG instance and the fingerprints to encrypt to."""
    path = Path(spec)
    if path.is_file():
        tmp = tempfile.mkdtemp(prefix="postvault-gpg-")
        try:
            gpg = _gpg(Path(tmp))
            imported = gpg.import_keys(path.read_bytes())
            fprs = [f for f in (imported.fingerprints or []) if f]
            if not fprs:
                raise BackupError(f"{path}: no OpenPGP public key in this file")
            yield gpg, sorted(set(fprs))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    gpg = _gpg(gnupg_home)
    keys = gpg.list_keys(keys=[spec])
    if not keys:
        where = gnupg_home or os.environ.get("GNUPGHOME") or "~/.gnupg"
        raise BackupError(f"--encrypt-to: no OpenPGP public key {spec!r} in the keyring {where} and no such file")
    yield gpg, [k["fingerprint"] for k in keys]


@contextmanager
def encrypting_sink(out: BinaryIO, spec: str, gnupg_home: Path | None) -> Iterator[BinaryIO]:
    """A writable pipe whose bytes reach ``out`` encrypted to ``spec``."""
    with _recipient(spec, gnupg_home) as (gpg, recipients):
        read_fd, write_fd = os.pipe()
        # Unbuffered: closing it must not wait for a lock held by
        # python-gnupg's copying thread, blocked in a read.
        reader = os.fdopen(read_fd, "rb", buffering=0)
        writer = os.fdopen(write_fd, "wb")

        def on_data(chunk: bytes) -> bool:
            if chunk:
                out.write(chunk)
            return False  # not buffered in memory as well

        gpg.on_data = on_data
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = gpg.encrypt_file(reader, recipients, armor=False, always_trust=True,
                                                 extra_args=_EXTRA)
            except (OSError, ValueError) as exc:  # reported by _check, in the caller's thread
                box["error"] = exc
            finally:
                # If gpg stopped early, the producer's next write fails
                # (BrokenPipeError) instead of blocking on a full pipe.
                reader.close()

        thread = threading.Thread(target=run, name="gpg-encrypt", daemon=True)
        thread.start()
        try:
            yield writer
        finally:
            try:
                writer.close()
            except BrokenPipeError:
                pass
            thread.join()
            # A gpg failure is the cause of whatever the producer saw
            # (usually BrokenPipeError), so it is the error reported.
            _check(box, "encrypt")


@contextmanager
def decrypting_source(src: BinaryIO, gnupg_home: Path | None) -> Iterator[BinaryIO]:
    """A readable pipe of ``src`` decrypted by gpg with the admin's keyring.

    gpg writes plaintext before it has checked the message's integrity
    (the MDC comes last), so the caller must treat what it read as
    provisional until this context exits without an error.
    """
    gpg = _gpg(gnupg_home)
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb")
    writer = os.fdopen(write_fd, "wb")
    broken = False

    def on_data(chunk: bytes) -> bool:
        nonlocal broken
        if not chunk:
            _close_quietly(writer)
        elif not broken:
            try:
                writer.write(chunk)
            except OSError:
                broken = True  # the reader gave up; let gpg drain
        return False

    gpg.on_data = on_data
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = gpg.decrypt_file(src, always_trust=True)
        except (OSError, ValueError) as exc:  # reported by _check
            box["error"] = exc
        finally:
            _close_quietly(writer)

    thread = threading.Thread(target=run, name="gpg-decrypt", daemon=True)
    thread.start()
    try:
        yield reader
        # Whatever follows the archive's end must still pass through gpg
        # for its integrity check to run.
        while reader.read(_BUFFER):
            pass
    finally:
        reader.close()
        thread.join()
        _check(box, "decrypt")


def _check(box: dict[str, Any], verb: str) -> None:
    result = box.get("result")
    if "error" in box or result is None or not result.ok:
        status = getattr(result, "status", None) or box.get("error") or "no result"
        raise BackupError(f"GnuPG could not {verb} the backup: {status}")


def _close_quietly(f: BinaryIO) -> None:
    try:
        f.close()
    except OSError:
        pass


def looks_encrypted(head: bytes) -> bool:
    """Whether a file's first bytes are OpenPGP rather than a tar archive."""
    if head.startswith(b"-----BEGIN PGP MESSAGE-----"):
        return True
    # A tar header has "ustar" at offset 257; an OpenPGP packet's first
    # byte always has its high bit set (RFC 4880 §4.2).
    return head[257:262] != b"ustar" and bool(head) and head[0] & 0x80 == 0x80
