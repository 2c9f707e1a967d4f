"""The archive service: the only place where object storage and the index meet.

Ingest order (every protocol goes through :meth:`Archive.ingest_file`):

1. parse and validate the header (UIDs, completeness) — refuse early;
2. checksum the bytes; look the SOP Instance UID up (same bytes: duplicate,
   nothing to do; different bytes: the configured policy);
3. put the object in storage — durable when it returns;
4. commit the index row; if that fails, delete the object again.

Only then does the caller report success. So there is never an index row
without its object, nor an object left behind by a failed ingest.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import secrets
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Generator, Iterable, Iterator, Sequence

from blake3 import blake3
from sqlalchemy.exc import SQLAlchemyError

from archive.config import DuplicatePolicy, Settings
from archive.dataset import InvalidDataset, ParsedInstance, parse_instance, wrap_raw_dataset
from archive.db import describe_db_url, make_engine, upgrade_schema
from archive.index import CatalogIndex, ConcurrentInsert, IndexedInstance, IndexUnavailable, Source, StoredObject
from archive.keys import object_key, parse_object_key, InvalidUID
from storage import ObjectNotFound, ObjectStore, StorageError, open_store

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20
# Files in the incoming directory older than this were left by a crash or a dropped association.
_STALE_INCOMING_SECONDS = 3600


class IngestFailure(str, enum.Enum):
    """Why an instance was refused; each maps to one DICOM status and one HTTP answer."""

    INVALID_DATASET = "invalid-dataset"
    UID_MISMATCH = "uid-mismatch"
    SOP_CLASS_MISMATCH = "sop-class-mismatch"
    DUPLICATE_REJECTED = "duplicate-rejected"
    STORAGE_UNAVAILABLE = "storage-unavailable"
    INDEX_UNAVAILABLE = "index-unavailable"


class IngestError(Exception):
    def __init__(self, failure: IngestFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


class IngestOutcome(str, enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing changed
    REPLACED = "replaced"  # different bytes, policy keep-newer
    KEPT_EXISTING = "kept-existing"  # different bytes, policy keep-existing


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    key: str
    size: int
    checksum: str


@dataclass(frozen=True)
class Expected:
    """What the protocol announced (e.g. the C-STORE command), to check against the dataset."""

    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_uid: str | None = None


@dataclass(frozen=True)
class Checksums:
    """BLAKE3-256 (hex) of the whole stored file, and of the dataset alone (after the file meta group).

    BLAKE3 is a cryptographic hash that runs at several GB/s here, where
    SHA-256 (no SHA extensions on these CPUs) managed under 200 MB/s and
    dominated the cost of receiving an instance. ``b3sum`` checks it by hand.

    The object checksum is what ``verify`` checks. The dataset checksum is the
    instance's identity for duplicate detection: the same dataset sent over
    C-STORE and imported from a file gets different file meta, yet is the same.
    """

    object_checksum: str
    dataset_checksum: str
    size: int


def part10_checksums(path: Path, offset: int) -> Checksums:
    """Checksums of the Part 10 file at ``path`` whose dataset starts at ``offset``."""
    whole = blake3()
    dataset = blake3()
    with open(path, "rb") as f:
        head = f.read(offset)
        whole.update(head)
        size = len(head)
        while chunk := f.read(_HASH_CHUNK):
            whole.update(chunk)
            dataset.update(chunk)
            size += len(chunk)
    return Checksums(whole.hexdigest(), dataset.hexdigest(), size)


def _stream_checksum(stream: BinaryIO) -> tuple[str, int]:
    digest = blake3()
    size = 0
    while chunk := stream.read(_HASH_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


class _IncomingNames:
    """Names for incoming files: ``in-{pid}-{token}-{n}{suffix}``, unique across threads and processes.

    The counter is an ``itertools.count`` (``next`` on it is atomic under the GIL); the
    random token tells apart processes that reuse a pid, and a forked worker (new pid) picks
    a new token before its first name.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._prefix = ""
        self._counter = itertools.count()

    def next(self, suffix: str) -> str:
        pid = os.getpid()
        if pid != self._pid:
            self._prefix = f"in-{pid}-{secrets.token_hex(4)}-"
            self._pid = pid
        return f"{self._prefix}{next(self._counter)}{suffix}"


class Archive:
    """Ingest, look up and read instances; wires an :class:`ObjectStore` to a :class:`CatalogIndex`."""

    def __init__(self, settings: Settings, store: ObjectStore, index: CatalogIndex) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self._ae_facilities: dict[str, tuple[float, str | None]] = {}
        self._incoming_dir = settings.incoming_dir
        self._incoming_dir.mkdir(parents=True, exist_ok=True)
        self._incoming_names = _IncomingNames()

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True, drain_spool: bool = True) -> Archive:
        """Open storage and index named by the settings (creating the schema when ``migrate``).

        ``drain_spool=False`` leaves uploading a spool to object storage to
        another process (``telepacs drain``, which ``telepacs serve`` starts).
        """
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.db_url)
        if migrate:
            upgrade_schema(engine)
        index = CatalogIndex(engine)
        store = open_store(settings.storage_url, spool_dir=settings.spool_dir, drain=drain_spool)
        archive = cls(settings, store, index)
        if settings.facilities:
            index.sync_facilities(dict(settings.facilities))
        log.info("archive open: index %s, storage %s", describe_db_url(settings.db_url), store.description)
        return archive

    def close(self) -> None:
        self.store.close()
        self.index.close()

    AE_FACILITY_SECONDS = 30.0  # how soon `telepacs facility ae` reaches running receivers

    def facility_for(self, ae_title: str | None) -> str | None:
        """The facility whose instances an AE title sends: ``[dicom.facilities]`` first, else the
        ``facility_ae_titles`` table (``telepacs facility add --ae``), looked up at most every 30 s."""
        configured = self.settings.facility_for(ae_title)
        if configured is not None or not ae_title or not ae_title.strip():
            return configured
        title = ae_title.strip()
        cached = self._ae_facilities.get(title)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        from archive.people import facility_for_ae

        try:
            with self.index.session() as session:
                code = facility_for_ae(session, title)
        except SQLAlchemyError as exc:
            log.error("cannot look up the facility of AE title %s: %s", title, exc)
            return None
        if len(self._ae_facilities) > 4096:
            self._ae_facilities.clear()
        self._ae_facilities[title] = (time.monotonic() + self.AE_FACILITY_SECONDS, code)
        return code

    # -- ingest ------------------------------------------------------------

    def new_incoming_path(self, suffix: str = ".dcm") -> Path:
        """A fresh, empty file on the data dir's file system (so storing can be a rename).

        Created with O_EXCL under a name unique to this process (see :class:`_IncomingNames`):
        ``tempfile.mkstemp`` cost ~0.3 ms per received instance (random names from a shared
        generator, a lock, and a retry loop written for untrusted directories).
        """
        while True:
            path = self._incoming_dir / self._incoming_names.next(suffix)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # a leftover of an earlier process that had the same pid and token
            os.close(fd)
            return path

    def remove_stale_incoming(self, older_than: float = _STALE_INCOMING_SECONDS) -> int:
        """Delete temporary files left by a crash or a dropped association; returns how many."""
        limit = time.time() - older_than
        removed = 0
        for path in self.settings.incoming_dir.glob("*"):
            try:
                if path.is_file() and path.stat().st_mtime < limit:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d stale incoming file(s) from %s", removed, self.settings.incoming_dir)
        return removed

    def ingest_file(
        self,
        path: Path,
        source: Source,
        *,
        expected: Expected | None = None,
        move: bool = False,
        checksums: Checksums | None = None,
    ) -> IngestResult:
        """Store and catalogue the Part 10 file at ``path``; raise :class:`IngestError` if refused.

        With ``move`` the file may be renamed into storage (the caller must
        not use it afterwards, and should not delete it if the call raised:
        it is then still there, or already removed). ``checksums`` computed
        while the file was written (e.g. as it arrived) spare reading it again.
        """
        try:
            parsed = parse_instance(path)
        except InvalidDataset as exc:
            raise self._refuse(IngestFailure.INVALID_DATASET, str(exc), source) from None
        self._check_expected(parsed, expected, source)
        sums = checksums or part10_checksums(path, parsed.dataset_offset)
        key = object_key(parsed.study_uid, parsed.series_uid, parsed.sop_instance_uid)
        for attempt in range(3):
            try:
                return self._store_and_index(path, parsed, key, sums, source, move)
            except ConcurrentInsert:
                log.info("instance %s was inserted concurrently; retrying (%d)", parsed.sop_instance_uid, attempt + 1)
        raise self._refuse(IngestFailure.INDEX_UNAVAILABLE,
                           f"instance {parsed.sop_instance_uid} kept colliding with concurrent inserts", source)

    def _check_expected(self, parsed: ParsedInstance, expected: Expected | None, source: Source) -> None:
        if expected is None:
            return
        if expected.sop_instance_uid and expected.sop_instance_uid.rstrip("\x00 ") != parsed.sop_instance_uid:
            raise self._refuse(
                IngestFailure.UID_MISMATCH,
                f"SOP Instance UID in the request ({expected.sop_instance_uid}) differs from the dataset's "
                f"({parsed.sop_instance_uid})",
                source,
            )
        if expected.sop_class_uid and expected.sop_class_uid.rstrip("\x00 ") != parsed.sop_class_uid:
            raise self._refuse(
                IngestFailure.SOP_CLASS_MISMATCH,
                f"SOP Class UID in the request ({expected.sop_class_uid}) differs from the dataset's "
                f"({parsed.sop_class_uid}) for instance {parsed.sop_instance_uid}",
                source,
            )
        if expected.study_uid and expected.study_uid != parsed.study_uid:
            raise self._refuse(
                IngestFailure.UID_MISMATCH,
                f"instance {parsed.sop_instance_uid} belongs to study {parsed.study_uid}, not {expected.study_uid}",
                source,
            )

    def _store_and_index(
        self, path: Path, parsed: ParsedInstance, key: str, sums: Checksums, source: Source, move: bool
    ) -> IngestResult:
        checksum, size = sums.object_checksum, sums.size

        def result(outcome: IngestOutcome) -> IngestResult:
            return IngestResult(outcome, parsed.sop_instance_uid, parsed.sop_class_uid, parsed.study_uid,
                                parsed.series_uid, key, size, checksum)

        try:
            existing = self.index.find_instance(parsed.sop_instance_uid)
        except IndexUnavailable as exc:
            raise self._refuse(IngestFailure.INDEX_UNAVAILABLE, str(exc), source) from None

        if existing is not None:
            same = existing.dataset_checksum == sums.dataset_checksum
            if same and existing.object_key == key and self._object_present(key):
                log.info("duplicate %s from %s: same dataset, nothing to do", parsed.sop_instance_uid,
                         source.describe())
                return result(IngestOutcome.DUPLICATE)
            if not same:
                policy = self.settings.duplicate_policy
                if policy is DuplicatePolicy.REJECT:
                    raise self._refuse(
                        IngestFailure.DUPLICATE_REJECTED,
                        f"instance {parsed.sop_instance_uid} already stored with different content "
                        f"(dataset checksum {existing.dataset_checksum[:12]}…, new {sums.dataset_checksum[:12]}…); "
                        "policy is reject",
                        source,
                    )
                if policy is DuplicatePolicy.KEEP_EXISTING:
                    self._record_kept(existing, sums.dataset_checksum, source)
                    log.warning("instance %s from %s differs from the stored one; kept the existing (policy)",
                                parsed.sop_instance_uid, source.describe())
                    return result(IngestOutcome.KEPT_EXISTING)

        try:
            self.store.put_file(key, path, move=move)
        except StorageError as exc:
            raise self._refuse(IngestFailure.STORAGE_UNAVAILABLE, f"storing {key} failed: {exc}", source) from None

        stored = StoredObject(key, size, checksum, sums.dataset_checksum)
        try:
            self.index.record_instance(parsed, stored, source, replaces=existing)
        except ConcurrentInsert:
            raise
        except IndexUnavailable as exc:
            if existing is None:
                self._discard_object(key)
            else:
                log.error("index failed while replacing %s: storage holds the new bytes, the index the old "
                          "checksum; `telepacs verify` will report it", key)
            raise self._refuse(IngestFailure.INDEX_UNAVAILABLE, str(exc), source) from None

        if existing is not None and existing.object_key != key:
            self._discard_object(existing.object_key)
        if existing is not None and existing.dataset_checksum != sums.dataset_checksum:
            log.warning("replaced %s from %s: new content (dataset checksum %s… was %s…)", parsed.sop_instance_uid,
                        source.describe(), sums.dataset_checksum[:12], existing.dataset_checksum[:12])
            return result(IngestOutcome.REPLACED)
        log.info("stored %s (study %s, series %s, %d bytes) from %s", parsed.sop_instance_uid, parsed.study_uid,
                 parsed.series_uid, size, source.describe())
        return result(IngestOutcome.STORED)

    def _object_present(self, key: str) -> bool:
        try:
            return self.store.exists(key)
        except StorageError:
            return False

    def _record_kept(self, existing: IndexedInstance, checksum: str, source: Source) -> None:
        try:
            self.index.record_kept_existing(existing.sop_instance_uid, existing.dataset_checksum, checksum, source)
        except Exception as exc:  # noqa: BLE001 - the audit row is secondary; the decision stands
            log.error("could not record kept-existing decision for %s: %s", existing.sop_instance_uid, exc)

    def _discard_object(self, key: str) -> None:
        try:
            self.store.delete(key)
        except StorageError as exc:
            log.error("could not delete object %s after a failed ingest: %s (`telepacs verify` lists orphans)",
                      key, exc)

    def _refuse(self, failure: IngestFailure, message: str, source: Source) -> IngestError:
        level = logging.ERROR if failure in (IngestFailure.STORAGE_UNAVAILABLE, IngestFailure.INDEX_UNAVAILABLE) \
            else logging.WARNING
        log.log(level, "refused instance from %s: %s: %s", source.describe(), failure.value, message)
        return IngestError(failure, message)

    def ingest_stream(self, stream: BinaryIO, source: Source, *, name: str = "stream",
                      expected: Expected | None = None) -> IngestResult:
        """Ingest a Part 10 file (or a raw dataset without file meta) read from ``stream``."""
        tmp = self.new_incoming_path()
        try:
            with open(tmp, "wb") as out:
                head = stream.read(132)
                if len(head) == 132 and head[128:132] == b"DICM":
                    out.write(head)
                    shutil.copyfileobj(stream, out, _HASH_CHUNK)
                else:
                    try:
                        wrap_raw_dataset(_Rewind(head, stream), out, source_ae=source.ae_title)  # type: ignore[arg-type]
                    except InvalidDataset as exc:
                        raise self._refuse(IngestFailure.INVALID_DATASET, f"{name}: {exc}", source) from None
                out.flush()
            return self.ingest_file(tmp, source, expected=expected, move=True)
        finally:
            tmp.unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------

    def open_instance(self, sop_instance_uid: str) -> BinaryIO:
        found = self.index.find_instance(sop_instance_uid)
        if found is None:
            raise ObjectNotFound(f"instance {sop_instance_uid} is not in the index")
        return self.store.open(found.object_key)

    def open_instances(self, sop_instance_uids: Sequence[str], batch: int = 500
                       ) -> Generator[tuple[str, BinaryIO | None, str], None, None]:
        """Each instance's stored object, opened in turn as the caller advances (the caller closes it).

        Object keys are looked up ``batch`` UIDs at a time (a retrieve of
        thousands of instances is a handful of index queries, not one per
        instance). Yields (UID, object, "") or, for one that cannot be
        opened, (UID, None, why).
        """
        for start in range(0, len(sop_instance_uids), batch):
            chunk = sop_instance_uids[start:start + batch]
            keys = self.index.object_keys(chunk)
            for uid in chunk:
                key = keys.get(uid)
                if key is None:
                    yield uid, None, "it is no longer in the index"
                    continue
                try:
                    stream = self.store.open(key)
                except (StorageError, OSError) as exc:
                    yield uid, None, f"cannot be read from storage: {type(exc).__name__}: {exc}"
                    continue
                yield uid, stream, ""

    # -- recovery ----------------------------------------------------------

    def reindex(self, progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Rebuild the whole index from the objects in storage alone."""
        self.index.clear()
        counts = {"indexed": 0, "skipped": 0}
        for key in self.store.list_keys():
            try:
                parse_object_key(key)
            except InvalidUID:
                log.warning("reindex: skipping %s (not an instance key)", key)
                counts["skipped"] += 1
                continue
            tmp = self.new_incoming_path()
            try:
                with self.store.open(key) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, _HASH_CHUNK)
                parsed = parse_instance(tmp)
                sums = part10_checksums(tmp, parsed.dataset_offset)
                if object_key(parsed.study_uid, parsed.series_uid, parsed.sop_instance_uid) != key:
                    log.warning("reindex: %s holds instance %s of another key; skipped", key, parsed.sop_instance_uid)
                    counts["skipped"] += 1
                    continue
                existing = self.index.find_instance(parsed.sop_instance_uid)
                stored = StoredObject(key, sums.size, sums.object_checksum, sums.dataset_checksum)
                self.index.record_instance(parsed, stored, Source("reindex"),
                                           replaces=existing)
                counts["indexed"] += 1
            except InvalidDataset as exc:
                log.warning("reindex: %s is not a usable instance: %s", key, exc)
                counts["skipped"] += 1
            finally:
                tmp.unlink(missing_ok=True)
            if progress:
                progress(1)
        return counts

    def verify(self, progress: Callable[[int], None] | None = None, *, checksums: bool = True) -> VerifyReport:
        """Check that every indexed object exists (with its checksum) and list orphaned objects."""
        report = VerifyReport()
        indexed_keys: set[str] = set()
        for inst in self.index.iter_instances():
            indexed_keys.add(inst.object_key)
            report.checked += 1
            try:
                if checksums:
                    with self.store.open(inst.object_key) as f:
                        checksum, size = _stream_checksum(f)
                    if checksum != inst.checksum or size != inst.size:
                        report.corrupt.append(inst.object_key)
                elif not self.store.exists(inst.object_key):
                    report.missing.append(inst.object_key)
            except ObjectNotFound:
                report.missing.append(inst.object_key)
            if progress:
                progress(1)
        for key in self.store.list_keys():
            if key not in indexed_keys:
                report.orphaned.append(key)
        return report


@dataclass
class VerifyReport:
    checked: int = 0

    def __post_init__(self) -> None:
        self.missing: list[str] = []
        self.corrupt: list[str] = []
        self.orphaned: list[str] = []

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.orphaned)


class _Rewind:
    """A read-only stream that replays ``head`` before the rest of ``stream`` and supports seek(0)."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        self._spool.write(head)
        shutil.copyfileobj(stream, self._spool, _HASH_CHUNK)
        self._spool.seek(0)

    def read(self, n: int = -1) -> bytes:
        return self._spool.read(n)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._spool.seek(pos, whence)

    def tell(self) -> int:
        return self._spool.tell()


def iter_dicom_paths(paths: Iterable[Path]) -> Iterator[tuple[str, Callable[[], BinaryIO]]]:
    """Files of folders (recursively) and members of zip archives, as (name, opener) pairs."""
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                yield from iter_dicom_paths([child])
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        yield f"{path.name}:{info.filename}", (lambda zf=zf, info=info: zf.open(info))  # type: ignore[misc]
        else:
            yield str(path), (lambda path=path: open(path, "rb"))  # type: ignore[misc]

