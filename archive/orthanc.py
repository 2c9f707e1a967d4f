"""Exchange studies with an Orthanc server over its REST API (``telepacs orthanc pull|push``).

Pull lists the matching studies (``POST /tools/find``), then downloads each
instance's Part 10 file (``GET /instances/{id}/file``, streamed) into
:meth:`Archive.ingest_stream`, the one way in. Push streams each stored
instance of a study from storage into ``POST /instances``.

Both resume after an interruption: pull skips an instance whose SOP Instance
UID is indexed here with the same bytes as Orthanc's (Orthanc's MD5 of its
file against ours), push skips one that Orthanc already has
(``POST /tools/lookup``). One failed instance is reported and the others go
on; an unreachable server, refused credentials or an unknown study stop the
run with an :class:`OrthancError`.

The HTTP client is ``orthanc-api-client`` (the Orthanc team's own client);
its exceptions are translated into :class:`OrthancError` here, so callers
see one exception type.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Protocol

import requests
from orthanc_api_client import OrthancApiClient
from orthanc_api_client import exceptions as orthanc_errors

from archive.index import Source
from archive.matching import Level, MatchKey
from archive.query import find
from archive.service import Archive, IngestError, IngestOutcome
from storage import StorageError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


class OrthancError(Exception):
    """The Orthanc server cannot be used: unreachable, credentials refused, unknown study, bad answer."""


class OrthancUnavailable(OrthancError):
    """The Orthanc cannot be reached or refuses us: no point going on with the next instance."""


@dataclass(frozen=True)
class OrthancTarget:
    """Where an Orthanc's REST API is, and how to log in (credentials kept out of :attr:`url`)."""

    url: str
    user: str | None = None
    password: str | None = None


def parse_target(url: str, user: str | None = None, password: str | None = None) -> OrthancTarget:
    """The target of ``http[s]://[user:password@]host[:port][/prefix]``; explicit ``user``/``password`` win."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OrthancError(f"not an Orthanc URL: {url!r} (expected http://host:port or https://…)")
    try:
        port = parts.port
    except ValueError:
        raise OrthancError(f"not an Orthanc URL: {url!r} (bad port)") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{port}" if port else host
    clean = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/", "", ""))
    url_user = urllib.parse.unquote(parts.username) if parts.username else None
    url_password = urllib.parse.unquote(parts.password) if parts.password else None
    return OrthancTarget(clean, user or url_user, password or url_password)


def parse_since(value: str) -> str:
    """``YYYYMMDD`` or ``YYYY-MM-DD`` as a DICOM date; :class:`OrthancError` if it is no valid date."""
    match = _DATE.match(value.strip())
    if match is None:
        raise OrthancError(f"not a date: {value!r} (expected YYYYMMDD or YYYY-MM-DD)")
    year, month, day = (int(g) for g in match.groups())
    try:
        dt.date(year, month, day)
    except ValueError as exc:
        raise OrthancError(f"not a date: {value!r} ({exc})") from None
    return f"{year:04d}{month:02d}{day:02d}"


@dataclass(frozen=True)
class Selection:
    """Which studies to pull: one study, one patient, studies since a date, or (all None) every study."""

    study_uid: str | None = None
    patient_id: str | None = None
    since: str | None = None  # DICOM date, see parse_since

    def query(self) -> dict[str, str]:
        """The ``Query`` of Orthanc's ``/tools/find`` for this selection."""
        query: dict[str, str] = {}
        if self.study_uid:
            query["StudyInstanceUID"] = self.study_uid
        if self.patient_id:
            query["PatientID"] = self.patient_id
        if self.since:
            query["StudyDate"] = f"{self.since}-"
        return query

    def describe(self) -> str:
        named = [f"study {self.study_uid}" if self.study_uid else "",
                 f"patient {self.patient_id}" if self.patient_id else "",
                 f"studies since {self.since}" if self.since else ""]
        return ", ".join(n for n in named if n) or "every study"

    @property
    def must_match(self) -> bool:
        """A named study or patient that matches nothing is an error (a date range may well be empty)."""
        return bool(self.study_uid or self.patient_id)


@dataclass(frozen=True)
class RemoteInstance:
    """An instance as Orthanc lists it."""

    orthanc_id: str
    sop_instance_uid: str
    size: int


@dataclass(frozen=True)
class LocalInstance:
    """An instance of ours to push."""

    sop_instance_uid: str
    size: int


class OrthancApi(Protocol):
    """What pull and push need from an Orthanc (the REST client below; tests may wrap it)."""

    url: str

    def find_studies(self, query: dict[str, str]) -> list[str]: ...
    def study_instances(self, study_id: str) -> list[RemoteInstance]: ...
    def instance_md5(self, orthanc_id: str) -> str | None: ...
    def download(self, orthanc_id: str) -> Iterator[bytes]: ...
    def lookup_instance(self, sop_instance_uid: str) -> str | None: ...
    def upload(self, chunks: Iterator[bytes]) -> str: ...
    def close(self) -> None: ...


class OrthancRest:
    """Orthanc's REST API through ``orthanc-api-client``, errors as :class:`OrthancError`."""

    def __init__(self, target: OrthancTarget, timeout: float = 60.0) -> None:
        self.url = target.url
        self.timeout = timeout
        self._client: Any = OrthancApiClient(target.url, user=target.user, pwd=target.password)

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, endpoint: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            response: requests.Response = getattr(self._client, method)(endpoint, **kwargs)
        except orthanc_errors.NotAuthorized as exc:
            raise OrthancUnavailable(f"Orthanc at {self.url} refused the credentials (HTTP {exc.http_status_code}); "
                               "give them in the URL (http://user:password@host:port) or with --user/--password"
                               ) from None
        except orthanc_errors.ConnectionError:
            raise OrthancUnavailable(f"Orthanc at {self.url} is unreachable (connection failed)") from None
        except orthanc_errors.TimeoutError:
            raise OrthancUnavailable(f"Orthanc at {self.url} did not answer within {self.timeout:.0f} s") from None
        except orthanc_errors.HttpError as exc:
            raise OrthancError(f"Orthanc at {self.url} answered {method.upper()} /{endpoint} with HTTP "
                               f"{exc.http_status_code}: {exc.msg}") from None
        except orthanc_errors.OrthancApiException as exc:
            raise OrthancError(f"Orthanc at {self.url}: {exc.msg} ({method.upper()} /{endpoint})") from None
        except requests.RequestException as exc:
            raise OrthancError(f"Orthanc at {self.url}: {type(exc).__name__}: {exc}") from None
        if response is None:  # the client returns None for an SSL error it did not translate
            raise OrthancError(f"Orthanc at {self.url}: no answer to {method.upper()} /{endpoint}")
        return response

    def _json(self, method: str, endpoint: str, **kwargs: Any) -> Any:
        response = self._call(method, endpoint, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise OrthancError(f"{self.url} answered {method.upper()} /{endpoint} with something that is not "
                               "JSON: is it an Orthanc?") from None

    def check(self) -> str:
        """Orthanc's version; raises :class:`OrthancError` when it cannot be used."""
        system = self._json("get", "system")
        if not isinstance(system, dict) or "Version" not in system:
            raise OrthancError(f"{self.url} does not look like an Orthanc (no Version in /system)")
        return str(system["Version"])

    def find_studies(self, query: dict[str, str]) -> list[str]:
        found = self._json("post", "tools/find", json={"Level": "Study", "Query": query, "Expand": False})
        return [str(study_id) for study_id in found]

    def study_instances(self, study_id: str) -> list[RemoteInstance]:
        return [RemoteInstance(str(i["ID"]), str(i["MainDicomTags"]["SOPInstanceUID"]), int(i.get("FileSize", -1)))
                for i in self._json("get", f"studies/{study_id}/instances")]

    def instance_md5(self, orthanc_id: str) -> str | None:
        try:
            return self._call("get", f"instances/{orthanc_id}/attachments/dicom/md5").text.strip() or None
        except OrthancUnavailable:
            raise
        except OrthancError as exc:
            log.info("no MD5 from Orthanc for instance %s: %s", orthanc_id, exc)
            return None

    def download(self, orthanc_id: str) -> Iterator[bytes]:
        response = self._call("get", f"instances/{orthanc_id}/file", stream=True)
        try:
            yield from response.iter_content(_CHUNK)
        except requests.RequestException as exc:
            raise OrthancError(f"download of instance {orthanc_id} from {self.url} broke off: {exc}") from None
        finally:
            response.close()

    def lookup_instance(self, sop_instance_uid: str) -> str | None:
        for hit in self._json("post", "tools/lookup", data=sop_instance_uid):
            if hit.get("Type") == "Instance":
                return str(hit["ID"])
        return None

    def upload(self, chunks: Iterator[bytes]) -> str:
        answer = self._json("post", "instances", data=chunks, headers={"Content-Type": "application/dicom"})
        if not isinstance(answer, dict) or "ID" not in answer:
            raise OrthancError(f"Orthanc at {self.url} did not store the instance: {answer!r}")
        return str(answer.get("Status", "Success"))


def connect(target: OrthancTarget, timeout: float = 60.0) -> OrthancRest:
    """A REST client for ``target``, checked to answer as an Orthanc (else :class:`OrthancError`)."""
    api = OrthancRest(target, timeout=timeout)
    try:
        version = api.check()
    except OrthancError:
        api.close()
        raise
    log.info("connected to Orthanc %s at %s", version, target.url)
    return api


# --------------------------------------------------------------------------- the sync itself


@dataclass
class SyncReport:
    """What a pull or a push did, instance by instance."""

    total: int = 0
    transferred: int = 0  # stored here (pull) or sent there (push)
    skipped: int = 0  # already there with the same bytes: nothing to do
    duplicates: int = 0  # pull: downloaded, and the archive had the same dataset already
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, why)
    aborted: str | None = None  # why the run stopped before the end (server gone, credentials refused)

    @property
    def ok(self) -> bool:
        return not self.failed and self.aborted is None

    def summary(self, verb: str) -> str:
        text = f"{verb}: {self.transferred}, skipped (already there): {self.skipped}"
        if self.duplicates:
            text += f", duplicates: {self.duplicates}"
        return text + f", failed: {len(self.failed)} (of {self.total} instances, {self.bytes / 1e6:.1f} MB)"


Progress = Callable[[int, int], None]  # (instances done, bytes moved) since the last call


def _no_progress(instances: int, nbytes: int) -> None:
    return None


def plan_pull(api: OrthancApi, selection: Selection) -> list[RemoteInstance]:
    """Every instance of the studies ``selection`` names on the Orthanc; :class:`OrthancError` if it names
    a study or patient the Orthanc does not have."""
    studies = api.find_studies(selection.query())
    if not studies and selection.must_match:
        raise OrthancError(f"Orthanc at {api.url} has no {selection.describe()}")
    instances: list[RemoteInstance] = []
    for study_id in studies:
        instances.extend(api.study_instances(study_id))
    log.info("Orthanc at %s: %s: %d studies, %d instances", api.url, selection.describe(), len(studies),
             len(instances))
    return instances


def pull(archive: Archive, api: OrthancApi, instances: list[RemoteInstance],
         progress: Progress = _no_progress) -> SyncReport:
    """Ingest ``instances`` from the Orthanc, skipping those already here with the same bytes."""
    source = Source("orthanc", host=urllib.parse.urlsplit(api.url).netloc[-64:])
    report = SyncReport(total=len(instances))
    for remote in instances:
        try:
            if _already_pulled(archive, api, remote):
                report.skipped += 1
                progress(1, 0)
                continue
            nbytes = _pull_one(archive, api, remote, source, report, progress)
        except OrthancUnavailable as exc:
            log.error("pull from %s stopped: %s", api.url, exc)
            report.aborted = str(exc)
            break
        except (OrthancError, IngestError, OSError) as exc:
            reason = exc.message if isinstance(exc, IngestError) else str(exc)
            log.error("pull of instance %s from %s failed: %s", remote.sop_instance_uid, api.url, reason)
            report.failed.append((remote.sop_instance_uid, reason))
            nbytes = 0
        report.bytes += nbytes
        progress(1, 0)
    log.info("pull from %s: %s", api.url, report.summary("stored"))
    return report


def _pull_one(archive: Archive, api: OrthancApi, remote: RemoteInstance, source: Source, report: SyncReport,
              progress: Progress) -> int:
    stream = _ChunkReader(api.download(remote.orthanc_id), progress)
    result = archive.ingest_stream(stream, source, name=f"{api.url}instances/{remote.orthanc_id}")  # type: ignore[arg-type]
    if result.sop_instance_uid != remote.sop_instance_uid:
        log.warning("Orthanc listed instance %s as %s, its file says %s", remote.orthanc_id,
                    remote.sop_instance_uid, result.sop_instance_uid)
    if result.outcome is IngestOutcome.DUPLICATE:
        report.duplicates += 1
    else:
        report.transferred += 1
    return stream.count


def _already_pulled(archive: Archive, api: OrthancApi, remote: RemoteInstance) -> bool:
    """True if the instance is indexed here and Orthanc's file is byte for byte the object we hold."""
    ours = archive.index.find_instance(remote.sop_instance_uid)
    if ours is None or (remote.size >= 0 and ours.size != remote.size):
        return False
    theirs = api.instance_md5(remote.orthanc_id)
    if theirs is None:
        return False
    try:
        return _stored_md5(archive, remote.sop_instance_uid) == theirs.lower()
    except (StorageError, OSError) as exc:
        log.warning("instance %s is indexed but cannot be read (%s): pulling it again", remote.sop_instance_uid, exc)
        return False


def _stored_md5(archive: Archive, sop_instance_uid: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with archive.open_instance(sop_instance_uid) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _ChunkReader:
    """A read()-able view of an iterator of byte chunks that counts what passed (and reports it)."""

    def __init__(self, chunks: Iterator[bytes], progress: Progress) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._progress = progress
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buffer) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self.count += len(chunk)
            self._progress(0, len(chunk))
            self._buffer += chunk
        size = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


def plan_push(archive: Archive, study_uid: str) -> list[LocalInstance]:
    """The instances of ``study_uid`` in this archive; :class:`OrthancError` if there are none."""
    rows = find(archive.index, Level.IMAGE, [MatchKey("StudyInstanceUID", study_uid), MatchKey("SOPInstanceUID", "")])
    try:
        uids = [str(row["SOPInstanceUID"]) for row in rows]
    finally:
        rows.close()  # type: ignore[attr-defined]
    if not uids:
        raise OrthancError(f"study {study_uid} is not in this archive")
    instances = []
    for uid in uids:
        found = archive.index.find_instance(uid)
        if found is not None:
            instances.append(LocalInstance(uid, found.size))
    return instances


def push(archive: Archive, api: OrthancApi, instances: list[LocalInstance],
         progress: Progress = _no_progress) -> SyncReport:
    """Send ``instances`` to the Orthanc as stored, skipping those it already has."""
    report = SyncReport(total=len(instances))
    for local in instances:
        try:
            if api.lookup_instance(local.sop_instance_uid) is not None:
                report.skipped += 1
                progress(1, 0)
                continue
            with archive.open_instance(local.sop_instance_uid) as f:
                status = api.upload(_read_chunks(f, progress))
            report.transferred += 1
            report.bytes += local.size
            log.info("pushed %s to %s (%s)", local.sop_instance_uid, api.url, status)
        except OrthancUnavailable as exc:
            log.error("push to %s stopped: %s", api.url, exc)
            report.aborted = str(exc)
            break
        except (OrthancError, StorageError, OSError) as exc:
            log.error("push of instance %s to %s failed: %s", local.sop_instance_uid, api.url, exc)
            report.failed.append((local.sop_instance_uid, str(exc)))
        progress(1, 0)
    log.info("push to %s: %s", api.url, report.summary("sent"))
    return report


def _read_chunks(f: BinaryIO, progress: Progress) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        progress(0, len(chunk))
        yield chunk
