"""``SpooledObjectStore``: a durable local spool in front of a (slow) remote store.

``put_file``/``put_bytes`` land in a local spool directory, fsynced, before they
return, so a receiver can acknowledge quickly; a background drainer thread uploads
each spooled object to the remote, confirms it (stat + size compare) and only then
deletes the local copy.  Failed uploads are retried with exponential back-off and
never dropped; a restart resumes whatever is left in the spool.

Spool layout (several processes may share one ``spool_dir``)::

    spool_dir/
      .lock              flock'ed around the short "commit" and "remove" steps
      tmp/               files being written (stale ones removed at start)
      ready/<h>.key      the object key (UTF-8), h = sha256(key)
      ready/<h>.data     the object bytes; present = pending upload

A ``.data`` file appears only by rename, after its bytes and its ``.key`` sidecar
are fsynced, so a crash never leaves a half file that looks complete.  A drainer
claims a ``.data`` file with a non-blocking ``flock`` before uploading it, so two
drainers never upload the same file at once, and a file that vanished (another
process finished it) is simply skipped.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .base import ObjectStore, StorageError, validate_key
from .local import fsync_dir, os_error_message, remove_stale_temp_files

__all__ = ["SpooledObjectStore"]

log = logging.getLogger(__name__)

GiB = 1024**3
_COPY_BUFSIZE = 1 << 20
#: While idle the drainer wakes this often to pick up files another (dead) process
#: left and to probe the remote's health.  Woken at once by put_file.
_IDLE_RESCAN_SECONDS = 30.0
_BACKLOG_CACHE_SECONDS = 0.5


class _SizeMismatch(Exception):
    """The remote copy does not have the size of the spooled file."""


class SpooledObjectStore:
    """A local, durable write spool in front of ``remote`` (see the module docstring)."""

    def __init__(
        self,
        remote: ObjectStore,
        spool_dir: Path | str,
        *,
        max_backlog_bytes: int = 20 * GiB,
        accept_while_remote_down: bool = False,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        health_interval: float = 2.0,
        idle_rescan: float = _IDLE_RESCAN_SECONDS,
    ) -> None:
        self.remote = remote
        self.description = remote.description
        self.spool_dir = Path(spool_dir).absolute()
        self.max_backlog_bytes = max_backlog_bytes
        self.accept_while_remote_down = accept_while_remote_down
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.health_interval = health_interval
        self.idle_rescan = idle_rescan

        self._tmp = self.spool_dir / "tmp"
        self._ready = self.spool_dir / "ready"
        self._lock_path = self.spool_dir / ".lock"
        # Present while the drainer (in whichever process runs it) finds the remote
        # down: writers in other processes refuse new objects as this one would.
        self._down_marker = self.spool_dir / "remote-down"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._ready.mkdir(parents=True, exist_ok=True)
            self._lock_path.touch(exist_ok=True)
        except OSError as exc:
            raise StorageError(os_error_message(exc, "creating spool", str(self.spool_dir))) from exc
        remove_stale_temp_files(self._tmp)
        self._remove_orphan_keys()

        self._thread_lock = threading.Lock()  # serialises .lock use within this process
        self._cond = threading.Condition()
        self._wakeups = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Remote health, as seen by this process's drainer.
        self._remote_ok = True
        self._last_error: str | None = None
        self.last_failure: float | None = None
        self.last_success: float | None = None
        self._backlog_cache: tuple[float, int] | None = None

    def __repr__(self) -> str:
        return f"SpooledObjectStore({self.description!r}, spool_dir={str(self.spool_dir)!r})"

    # -- paths and locks ---------------------------------------------------------
    @staticmethod
    def _name(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def _data_path(self, key: str) -> Path:
        return self._ready / f"{self._name(key)}.data"

    def _key_path(self, key: str) -> Path:
        return self._ready / f"{self._name(key)}.key"

    @contextmanager
    def _spool_lock(self) -> Iterator[None]:
        """Exclusive lock on the spool (all processes) for commit/remove steps."""
        with self._thread_lock:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _remove_orphan_keys(self, max_age: float = 3600.0) -> None:
        """Remove ``.key`` sidecars without ``.data`` left by a crash (older than an hour)."""
        cutoff = time.time() - max_age
        for entry in os.scandir(self._ready):
            if not entry.name.endswith(".key"):
                continue
            data = entry.path[: -len(".key")] + ".data"
            try:
                if not os.path.exists(data) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass

    # -- health ------------------------------------------------------------------
    def remote_healthy(self) -> bool:
        """False while a drainer's last contact with the remote failed (this process's or another's)."""
        return self._remote_ok and not self._down_marker.exists()

    def _remote_error(self) -> str | None:
        if not self._remote_ok:
            return self._last_error
        try:
            return self._down_marker.read_text(errors="replace").strip() or "unreachable"
        except FileNotFoundError:
            return None

    def _mark_ok(self) -> None:
        if not self._remote_ok:
            log.info("object storage %s reachable again", self.description)
        self._remote_ok = True
        self._last_error = None
        self.last_success = time.time()
        _unlink_quietly(self._down_marker)

    def _mark_failed(self, exc: BaseException) -> None:
        if self._remote_ok:
            log.error("object storage %s failed: %s", self.description, exc)
        self._remote_ok = False
        self._last_error = str(exc)
        self.last_failure = time.time()
        try:
            tmp = self._new_tmp()
            tmp.write_text(str(exc))
            os.replace(tmp, self._down_marker)
        except OSError as marker_exc:
            log.error("could not record the outage in %s: %s", self._down_marker, marker_exc)

    # -- backlog -----------------------------------------------------------------
    def _scan(self) -> list[tuple[float, int, Path]]:
        """Pending ``.data`` files as (mtime, size, path), oldest first."""
        out: list[tuple[float, int, Path]] = []
        try:
            entries = list(os.scandir(self._ready))
        except FileNotFoundError:
            return out
        for entry in entries:
            if not entry.name.endswith(".data"):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, Path(entry.path)))
        out.sort()
        return out

    def pending_count(self) -> int:
        """Number of objects in the spool not yet confirmed by the remote."""
        return len(self._scan())

    def pending_bytes(self) -> int:
        """Bytes in the spool not yet confirmed by the remote."""
        total = sum(size for _, size, _ in self._scan())
        self._backlog_cache = (time.monotonic(), total)
        return total

    def _backlog(self) -> int:
        cached = self._backlog_cache
        if cached and time.monotonic() - cached[0] < _BACKLOG_CACHE_SECONDS:
            return cached[1]
        return self.pending_bytes()

    def _gate(self, key: str, size: int) -> None:
        """Refuse a write the archive could not honour."""
        error = None if self.accept_while_remote_down else self._remote_error()
        if error is not None:
            raise StorageError(
                f"object storage {self.description} unreachable: {error}; not accepting {key}"
            )
        backlog = self._backlog()
        if backlog + size > self.max_backlog_bytes:
            backlog = self.pending_bytes()  # the cache may be stale: refuse only on a fresh count
        if backlog + size > self.max_backlog_bytes:
            raise StorageError(
                f"spool {self.spool_dir} full: {backlog} bytes waiting for "
                f"{self.description} (limit {self.max_backlog_bytes}); not accepting {key}"
            )

    # -- writing -----------------------------------------------------------------
    def _new_tmp(self) -> Path:
        return self._tmp / f".tmp-{uuid.uuid4().hex}"

    def _write_tmp(self, fill: Callable[[int], None]) -> Path:
        tmp = self._new_tmp()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fill(fd)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        return tmp

    def _commit(self, key: str, data_tmp: Path, size: int) -> None:
        """Write the key sidecar, then rename the data into ``ready/`` (durably)."""
        key_tmp: Path | None = None
        try:
            encoded = key.encode("utf-8")
            key_tmp = self._write_tmp(lambda fd: _write_all(fd, encoded))
            with self._spool_lock():
                os.replace(key_tmp, self._key_path(key))
                key_tmp = None
                os.replace(data_tmp, self._data_path(key))
            fsync_dir(self._ready)
        except BaseException:
            if key_tmp is not None:
                _unlink_quietly(key_tmp)
            raise
        # Count the new object into the cached backlog instead of dropping the cache: a full
        # scan of the spool on every put made each one cost O(spool size) while the drainer
        # lagged. The cache still refreshes every _BACKLOG_CACHE_SECONDS, and until then it
        # can only overestimate (uploads are not subtracted), which errs on the safe side.
        cached = self._backlog_cache
        if cached is not None:
            self._backlog_cache = (cached[0], cached[1] + size)
        with self._cond:
            self._wakeups += 1
            self._cond.notify_all()

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        validate_key(key)
        src = Path(path)
        try:
            st = os.stat(src)
        except OSError as exc:
            raise StorageError(os_error_message(exc, "reading", str(src))) from exc
        self._gate(key, st.st_size)
        tmp: Path | None = None
        rename = move and st.st_dev == os.stat(self._tmp).st_dev
        try:
            if rename:
                fd = os.open(src, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                tmp = self._new_tmp()
                os.rename(src, tmp)
            else:
                def fill(fd: int) -> None:
                    with open(src, "rb") as f:
                        while chunk := f.read(_COPY_BUFSIZE):
                            _write_all(fd, chunk)

                tmp = self._write_tmp(fill)
            self._commit(key, tmp, st.st_size)
            tmp = None
        except OSError as exc:
            raise StorageError(
                os_error_message(exc, "spooling", f"{key} under {self.spool_dir}")
            ) from exc
        finally:
            if tmp is not None:
                _unlink_quietly(tmp)
        if move and not rename:
            _unlink_quietly(src)

    def put_bytes(self, key: str, data: bytes) -> None:
        validate_key(key)
        self._gate(key, len(data))
        try:
            tmp = self._write_tmp(lambda fd: _write_all(fd, data))
            try:
                self._commit(key, tmp, len(data))
            except BaseException:
                _unlink_quietly(tmp)
                raise
        except OSError as exc:
            raise StorageError(
                os_error_message(exc, "spooling", f"{key} under {self.spool_dir}")
            ) from exc

    # -- reading -----------------------------------------------------------------
    def open(self, key: str) -> BinaryIO:
        validate_key(key)
        try:
            return open(self._data_path(key), "rb")
        except FileNotFoundError:
            return self.remote.open(key)
        except OSError as exc:
            raise StorageError(os_error_message(exc, "reading", f"{key} in spool")) from exc

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        validate_key(key)
        try:
            f = open(self._data_path(key), "rb")
        except FileNotFoundError:
            yield from self.remote.iter_chunks(key, chunk_size)
            return
        with f:
            while chunk := f.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        validate_key(key)
        return self._data_path(key).exists() or self.remote.exists(key)

    def size(self, key: str) -> int:
        validate_key(key)
        try:
            return os.stat(self._data_path(key)).st_size
        except FileNotFoundError:
            return self.remote.size(key)

    def delete(self, key: str) -> None:
        validate_key(key)
        data = self._data_path(key)
        try:
            fd = os.open(data, os.O_RDONLY)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                # Wait for a drainer uploading this file, then remove our copy.
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._remove_if_same(key, os.fstat(fd))
            finally:
                os.close(fd)
        self.remote.delete(key)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        spooled: set[str] = set()
        for _, _, data in self._scan():
            key = _read_key(data.with_suffix(".key"))
            if key is not None and key.startswith(prefix):
                spooled.add(key)
        for key in self.remote.list_keys(prefix):
            spooled.discard(key)
            yield key
        yield from sorted(spooled)

    # -- draining ----------------------------------------------------------------
    def _remove_if_same(self, key: str, st: os.stat_result) -> bool:
        """Remove the spooled copy if it is still the file ``st`` describes."""
        data, keyp = self._data_path(key), self._key_path(key)
        with self._spool_lock():
            try:
                cur = os.stat(data)
            except FileNotFoundError:
                return False
            if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                return False  # replaced by a newer put: that one is uploaded next
            os.unlink(data)
            _unlink_quietly(keyp)
        fsync_dir(self._ready)
        self._backlog_cache = None
        return True

    def _upload_one(self, data: Path) -> str:
        """Upload one spooled file. Returns "done", "busy" or "gone".

        Raises StorageError when the remote fails, _SizeMismatch when the remote copy
        does not match.
        """
        try:
            fd = os.open(data, os.O_RDONLY)
        except FileNotFoundError:
            return "gone"
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return "busy"
                raise
            st = os.fstat(fd)
            try:
                cur = os.stat(data)
            except FileNotFoundError:
                return "gone"
            if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                return "gone"  # finished/replaced meanwhile; rescan picks up the new one
            key = _read_key(data.with_suffix(".key"))
            if key is None:
                log.error("spool file %s has no readable key sidecar; left in place", data)
                return "busy"
            # Upload the very inode we hold (not whatever the path names later).
            self.remote.put_file(key, Path(f"/proc/self/fd/{fd}") if _PROC_FD else data)
            remote_size = self.remote.size(key)
            if remote_size != st.st_size:
                raise _SizeMismatch(
                    f"{key}: remote has {remote_size} bytes, spool has {st.st_size}"
                )
            self._remove_if_same(key, st)
            log.debug("uploaded %s (%d bytes) to %s", key, st.st_size, self.description)
            return "done"
        finally:
            os.close(fd)

    def start(self) -> None:
        """Start the drainer thread (it first resumes whatever is already spooled)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"spool-drainer {self.description}", daemon=True
        )
        self._thread.start()

    def _wait(self, timeout: float, seen: int) -> None:
        with self._cond:
            if self._stopping or self._wakeups != seen:
                return
            self._cond.wait(timeout)

    def _run(self) -> None:
        backoff = self.retry_initial
        next_attempt = 0.0  # monotonic time before which uploads are not retried
        next_probe = 0.0  # monotonic time of the next health probe while down
        while not self._stopping:
            with self._cond:
                seen = self._wakeups
            now = time.monotonic()
            if not self._remote_ok and now >= next_probe:
                next_probe = now + self.health_interval
                if self._probe():
                    backoff, next_attempt = self.retry_initial, 0.0
            if now < next_attempt:
                until = next_attempt if self._remote_ok else min(next_attempt, next_probe)
                self._wait(max(until - now, 0.0), seen)
                continue
            pending = self._scan()
            uploaded = 0
            failed = False
            for _, _, data in pending:
                if self._stopping:
                    break
                try:
                    result = self._upload_one(data)
                except StorageError as exc:
                    self._mark_failed(exc)
                    failed = True
                    break
                except _SizeMismatch as exc:
                    log.warning("upload not confirmed, will retry: %s", exc)
                    failed = True
                    continue
                except Exception:  # noqa: BLE001 - the drainer must never die
                    log.exception("unexpected error uploading %s; will retry", data)
                    failed = True
                    continue
                if result == "done":
                    uploaded += 1
                    self._mark_ok()
                    with self._cond:
                        self._cond.notify_all()  # wake drain() waiters
            if self._stopping:
                break
            if failed:
                now = time.monotonic()
                next_attempt = now + backoff
                next_probe = now + self.health_interval
                backoff = min(backoff * 2, self.retry_max)
                continue
            backoff = self.retry_initial
            if uploaded:
                continue  # rescan: more may have arrived meanwhile
            # Idle (nothing to do, or only files another process is uploading):
            # sleep until put_file wakes us; now and then rescan and probe health.
            with self._cond:
                self._cond.notify_all()
                if self._wakeups == seen and not self._stopping:
                    if self._remote_ok:
                        self._cond.wait(self.idle_rescan)
                    else:  # keep probing every health_interval while down
                        self._cond.wait(max(next_probe - time.monotonic(), 0.05))
                woken = self._wakeups != seen
            if not woken and not self._stopping and self._remote_ok and self._due_probe():
                self._probe()

    def _due_probe(self) -> bool:
        """While idle, probe the remote's health at most every ``_IDLE_RESCAN_SECONDS``."""
        now = time.monotonic()
        if now - getattr(self, "_last_idle_probe", 0.0) < _IDLE_RESCAN_SECONDS:
            return False
        self._last_idle_probe = now
        return True

    def _probe(self) -> bool:
        """Run ``remote.check()`` and record the outcome; True if healthy."""
        try:
            self.remote.check()
        except Exception as exc:  # noqa: BLE001 - StorageError, or a bug: both "down"
            self._mark_failed(exc)
            return False
        self._mark_ok()
        return True

    def drain(self, timeout: float) -> bool:
        """Wait until the spool is empty (all processes' files); True if it is."""
        deadline = time.monotonic() + timeout
        while True:
            if self.pending_count() == 0:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._cond:
                self._cond.wait(min(remaining, 0.1))

    # -- lifecycle ---------------------------------------------------------------
    def check(self) -> None:
        """Raise StorageError unless the spool is writable and the remote usable."""
        tmp = self._new_tmp()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
        except OSError as exc:
            raise StorageError(os_error_message(exc, "writing", str(self.spool_dir))) from exc
        finally:
            _unlink_quietly(tmp)
        try:
            self.remote.check()
        except StorageError as exc:
            self._mark_failed(exc)
            raise
        self._mark_ok()

    def close(self) -> None:
        """Stop the drainer (after its current upload) and close the remote."""
        self._stopping = True
        with self._cond:
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self.remote.close()


_PROC_FD = os.path.isdir("/proc/self/fd")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_key(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

