"""``LocalObjectStore``: objects as files under a root directory.

Writes are atomic and durable: the bytes go to a temporary file in ``<root>/.tmp/``
(same file system), which is flushed, fsynced and renamed onto the final path, and
the destination directory is fsynced.  A crash never leaves a half-written object
under its key; ``list_keys`` never lists temporary files.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .base import ObjectNotFound, StorageError, validate_key

__all__ = ["LocalObjectStore"]

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
STALE_TMP_SECONDS = 3600.0
_COPY_BUFSIZE = 1 << 20
_CHECKED_DIRS = 4096


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or creation inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error_message(exc: OSError, action: str, where: str) -> str:
    """Describe an OSError for humans: ``disk full writing <key> under <root>``..."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "disk full"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "permission denied" if code != errno.EROFS else "read-only file system"
    elif code == errno.EIO:
        what = "I/O error"
    else:
        what = exc.strerror or type(exc).__name__
    return f"{what} {action} {where}"


def remove_stale_temp_files(tmp_dir: Path, max_age: float = STALE_TMP_SECONDS) -> int:
    """Delete files in ``tmp_dir`` older than ``max_age`` seconds; return how many."""
    removed = 0
    cutoff = time.time() - max_age
    try:
        entries = list(os.scandir(tmp_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove stale temp file %s: %s", entry.path, exc)
    if removed:
        log.info("removed %d stale temp file(s) from %s", removed, tmp_dir)
    return removed


class LocalObjectStore:
    """Objects stored as files under ``root`` (``root/<key>``).

    Keys whose first component is ``.tmp`` are reserved (the temp directory).
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self.description = self.root.as_uri()
        self._tmp = self.root / TMP_DIR
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(os_error_message(exc, "creating", str(self._tmp))) from exc
        self._real_root = Path(os.path.realpath(self.root))
        self._tmp_dev = os.stat(self._tmp).st_dev
        # Parent directories (relative) already seen to resolve inside the root; see _dest_path().
        self._checked_dirs: dict[str, None] = {}
        remove_stale_temp_files(self._tmp)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    # -- paths -----------------------------------------------------------------
    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/", 1)[0] == TMP_DIR:
            raise ValueError(f"object key {key!r} uses the reserved name {TMP_DIR!r}")
        path = self.root / key
        # Symlinks inside the root must not lead outside it.
        real = os.path.realpath(path)
        if os.path.commonpath([real, str(self._real_root)]) != str(self._real_root):
            raise ValueError(f"object key {key!r} escapes the store root {self.root}")
        return path

    def _dest_path(self, key: str) -> Path:
        """The path to write ``key`` to: :meth:`_path`'s checks, with the realpath walk done once per directory.

        Resolving the whole path on every put cost a few stat calls per component for each
        instance of a series. A write replaces the final component (``os.replace`` does not
        follow a symlink there), so only the parent directory must resolve inside the root;
        that answer is remembered once the directory exists. Swapping a checked directory
        for a symlink afterwards takes write access to the store root itself.
        """
        validate_key(key)
        parent, _, _name = key.rpartition("/")
        if parent in self._checked_dirs:
            return self.root / key
        if key.split("/", 1)[0] == TMP_DIR:
            raise ValueError(f"object key {key!r} uses the reserved name {TMP_DIR!r}")
        real = os.path.realpath(self.root / parent) if parent else str(self._real_root)
        if os.path.commonpath([real, str(self._real_root)]) != str(self._real_root):
            raise ValueError(f"object key {key!r} escapes the store root {self.root}")
        if parent and os.path.isdir(real):
            if len(self._checked_dirs) >= _CHECKED_DIRS:
                self._checked_dirs.clear()
            self._checked_dirs[parent] = None
        return self.root / key

    def _where(self, key: str) -> str:
        return f"{key} under {self.root}"

    # -- writing ---------------------------------------------------------------
    def _make_parent(self, path: Path) -> None:
        """Create the parent directories of ``path`` and fsync each new one's parent."""
        parent = path.parent
        missing: list[Path] = []
        p = parent
        while not p.is_dir():
            missing.append(p)
            p = p.parent
        if not missing:
            return
        parent.mkdir(parents=True, exist_ok=True)
        for d in reversed(missing):
            fsync_dir(d.parent)

    def _tmp_path(self) -> Path:
        return self._tmp / f".tmp-{uuid.uuid4().hex}"

    def _commit(self, tmp: Path, path: Path) -> None:
        try:
            os.replace(tmp, path)  # the parent usually exists (an instance of a series seen before)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            self._make_parent(path)
            os.replace(tmp, path)
        fsync_dir(path.parent)

    def _write_atomic(self, key: str, path: Path, fill: Callable[[int], None]) -> None:
        tmp = self._tmp_path()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fill(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._commit(tmp, path)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise StorageError(os_error_message(exc, "writing", self._where(key))) from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._dest_path(key)

        def fill(fd: int) -> None:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]

        self._write_atomic(key, path, fill)

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        dest = self._dest_path(key)
        src = Path(path)
        try:
            src_dev = os.stat(src).st_dev
        except OSError as exc:
            raise StorageError(os_error_message(exc, "reading", str(src))) from exc
        if move and src_dev == self._tmp_dev:
            try:
                fd = os.open(src, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._commit(src, dest)
            except OSError as exc:
                raise StorageError(os_error_message(exc, "moving", self._where(key))) from exc
            return

        def fill(fd: int) -> None:
            with open(src, "rb") as f:
                while chunk := f.read(_COPY_BUFSIZE):
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]

        self._write_atomic(key, dest, fill)
        if move:
            _unlink_quietly(src)

    # -- reading ---------------------------------------------------------------
    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no object {self._where(key)}") from exc
        except OSError as exc:
            raise StorageError(os_error_message(exc, "reading", self._where(key))) from exc

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            try:
                return f.read()
            except OSError as exc:
                raise StorageError(os_error_message(exc, "reading", self._where(key))) from exc

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with self.open(key) as f:
            while True:
                try:
                    chunk = f.read(chunk_size)
                except OSError as exc:
                    raise StorageError(
                        os_error_message(exc, "reading", self._where(key))
                    ) from exc
                if not chunk:
                    return
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no object {self._where(key)}") from exc
        except OSError as exc:
            raise StorageError(os_error_message(exc, "reading", self._where(key))) from exc
        if not os.path.isfile(path):
            raise ObjectNotFound(f"no object {self._where(key)}")
        return st.st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return
        except OSError as exc:
            raise StorageError(os_error_message(exc, "deleting", self._where(key))) from exc
        try:
            fsync_dir(path.parent)
        except OSError:
            pass

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        # Start the walk at the deepest directory the prefix names.
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        if base_rel:
            try:
                validate_key(base_rel)
            except ValueError:
                return
        start = self.root / base_rel if base_rel else self.root
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            if not rel_dir:
                dirnames[:] = [d for d in dirnames if d != TMP_DIR]
            dirnames.sort()
            # Prune directories that cannot contain a match.
            dirnames[:] = [
                d for d in dirnames
                if (rel_dir + d + "/").startswith(prefix) or prefix.startswith(rel_dir + d + "/")
            ]
            for name in sorted(filenames):
                key = rel_dir + name
                if key.startswith(prefix):
                    yield key

    # -- lifecycle -------------------------------------------------------------
    def check(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"storage root {self.root} does not exist")
        tmp = self._tmp_path()
        try:
            self._tmp.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(os_error_message(exc, "writing under", str(self.root))) from exc
        finally:
            _unlink_quietly(tmp)

    def close(self) -> None:
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ += ["fsync_dir", "os_error_message", "remove_stale_temp_files"]
