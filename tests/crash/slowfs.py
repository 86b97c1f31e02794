"""A slow disk for tests: a FUSE passthrough file system whose writes and
fsyncs take longer (``python3 tests/crash/slowfs.py SOURCE MOUNTPOINT``).

Every file operation is passed to the folder SOURCE; each ``write`` waits
``--write-delay`` seconds and each ``fsync`` (and ``fdatasync``)
``--fsync-delay`` seconds before it is done, as on a busy network volume or
a dying disk. Reads are not delayed, and the file system answers several
requests at once (fusepy's threads), so a slow commit does not by itself
hold up other readers: what the server does with the slowness is what is
under test. When unmounted it writes, to ``--stats``, how many writes and
fsyncs it delayed (JSON), so a test can check it really was in the path.

Uses fusepy (ctypes over Debian's libfuse2); the kernel's /dev/fuse and
root (for mount(2)) are needed.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import threading
import time
from typing import Any

from fuse import FUSE, FuseOSError, Operations  # type: ignore[import-untyped]


class SlowPassthrough(Operations):  # type: ignore[misc]
    def __init__(self, root: str, write_delay: float, fsync_delay: float) -> None:
        self.root = os.path.realpath(root)
        self.write_delay = write_delay
        self.fsync_delay = fsync_delay
        self._mutex = threading.Lock()  # not "lock": fusepy would take it for the lock operation
        self.counts = {"write": 0, "fsync": 0, "read": 0}

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _count(self, what: str) -> None:
        with self._mutex:
            self.counts[what] += 1

    def __call__(self, op: str, *args: Any) -> Any:
        # fusepy turns OSError into the errno only for FuseOSError.
        try:
            return super().__call__(op, *args)
        except OSError as exc:
            if isinstance(exc, FuseOSError):
                raise
            raise FuseOSError(exc.errno or errno.EIO) from exc

    # -- metadata ---------------------------------------------------------------

    def access(self, path: str, mode: int) -> None:
        if not os.access(self._path(path), mode):
            raise FuseOSError(errno.EACCES)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._path(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._path(path), uid, gid)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        st = os.lstat(self._path(path))
        return {key: getattr(st, key) for key in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime",
                                                  "st_nlink", "st_size", "st_uid")}

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def mknod(self, path: str, mode: int, dev: int) -> None:
        os.mknod(self._path(path), mode, dev)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._path(path))

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._path(path), mode)

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._path(path))
        return {key: getattr(st, key) for key in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                  "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def unlink(self, path: str) -> None:
        os.unlink(self._path(path))

    def symlink(self, name: str, target: str) -> None:
        os.symlink(target, self._path(name))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._path(old), self._path(new))

    def link(self, target: str, name: str) -> None:
        os.link(self._path(name), self._path(target))

    def utimens(self, path: str, times: Any = None) -> None:
        os.utime(self._path(path), times)

    # -- data ---------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        return os.open(self._path(path), flags)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        # Read and write: SQLite opens its files O_RDWR | O_CREAT and reads
        # back through the same handle.
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT, mode)

    def read(self, path: str, length: int, offset: int, fh: int) -> bytes:
        self._count("read")
        return os.pread(fh, length, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._count("write")
        time.sleep(self.write_delay)
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        with open(self._path(path), "r+b") as f:
            f.truncate(length)

    def flush(self, path: str, fh: int) -> None:
        pass

    def release(self, path: str, fh: int) -> None:
        os.close(fh)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self._count("fsync")
        time.sleep(self.fsync_delay)
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    def fsyncdir(self, path: str, datasync: int, fh: Any) -> None:
        self._count("fsync")
        time.sleep(self.fsync_delay)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("mountpoint")
    ap.add_argument("--write-delay", type=float, default=0.01)
    ap.add_argument("--fsync-delay", type=float, default=0.5)
    ap.add_argument("--stats", help="write the counts here (JSON) once unmounted")
    args = ap.parse_args()
    fs = SlowPassthrough(args.source, args.write_delay, args.fsync_delay)
    try:
        # foreground: the test owns the process; allow_other: the server may
        # run as another user than the mounter; default_permissions: the
        # kernel checks modes as on a local disk.
        FUSE(fs, args.mountpoint, foreground=True, nothreads=False, allow_other=True, default_permissions=True)
    finally:
        if args.stats:
            # Whole or not at all: the test reads it as soon as it appears.
            tmp = args.stats + ".tmp"
            with open(tmp, "w", encoding="ascii") as f:
                json.dump(fs.counts, f)
            os.replace(tmp, args.stats)


if __name__ == "__main__":
    main()
