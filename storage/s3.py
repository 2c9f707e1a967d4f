"""``S3ObjectStore``: objects in an S3 bucket, through the ``minio`` SDK.

Only standard S3 calls are used (PUT object / multipart upload, GET, HEAD, DELETE,
ListObjectsV2, HEAD/PUT bucket), so the same code works against MinIO, SeaweedFS
and AWS S3.  The HTTP pool has a short connect timeout, a bounded read timeout and
few retries, so an unreachable server fails within seconds.  Credentials never
appear in ``description``, ``repr`` or error messages.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, cast

import certifi
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from urllib3.util import Retry, Timeout

from .base import ObjectNotFound, StorageError, validate_key

__all__ = ["S3ObjectStore"]

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 16 * 1024 * 1024
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"})


class _ResponseReader(io.RawIOBase):
    """A raw stream over a urllib3 response; closing it releases the connection."""

    def __init__(self, response: Any, where: str) -> None:
        super().__init__()
        self._response = response
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._response.read(len(buffer))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(f"reading {self._where} failed: {exc}") from exc
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._response.close()
                self._response.release_conn()
            finally:
                super().close()


class S3ObjectStore:
    """Objects stored in ``bucket`` on an S3-compatible server at ``endpoint`` (host:port)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool,
        region: str | None = None,
        create_bucket: bool = True,
        part_size: int = DEFAULT_PART_SIZE,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
        retries: int = 2,
    ) -> None:
        if not bucket:
            raise ValueError("S3 bucket name is empty")
        if part_size < 5 * 1024 * 1024:
            raise ValueError("S3 part_size must be at least 5 MiB")
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        self.part_size = part_size
        self.create_bucket = create_bucket
        scheme_note = "" if secure else "?secure=false"
        self.description = f"s3://{endpoint}/{bucket}{scheme_note}"
        self._http = urllib3.PoolManager(
            timeout=Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=Retry(
                total=retries,
                connect=1,
                read=1,
                backoff_factor=0.2,
                status_forcelist=[500, 502, 503, 504],
            ),
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=self._http,
        )
        self._bucket_ready = False

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.description!r})"

    # -- errors ----------------------------------------------------------------
    def _where(self, key: str | None = None) -> str:
        return f"{key} in {self.description}" if key else self.description

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Translate minio/urllib3 failures into StorageError / ObjectNotFound."""
        try:
            yield
        except S3Error as exc:
            if key is not None and exc.code in _NOT_FOUND_CODES:
                raise ObjectNotFound(f"no object {self._where(key)}") from exc
            if exc.code == "NoSuchBucket":
                raise StorageError(f"bucket missing: {action} {self._where(key)}") from exc
            raise StorageError(
                f"object storage {self.description} refused {action} {key or ''}: "
                f"{exc.code}: {exc.message}"
            ) from exc
        except MinioException as exc:  # ServerError, InvalidResponseError
            raise StorageError(
                f"object storage {self.description} failed {action} {key or ''}: {exc}"
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # MaxRetryError, NewConnectionError, ProtocolError, timeouts, socket errors.
            reason = getattr(exc, "reason", None) or exc
            raise StorageError(
                f"object storage {self.description} unreachable while {action} "
                f"{key or ''}: {type(reason).__name__}: {_short(reason)}"
            ) from exc

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._errors("checking bucket"):
            if not self._client.bucket_exists(bucket_name=self.bucket):
                if not self.create_bucket:
                    raise StorageError(f"bucket missing: {self.description}")
                try:
                    self._client.make_bucket(bucket_name=self.bucket)
                    log.info("created bucket %s", self.description)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        self._bucket_ready = True

    # -- writing ---------------------------------------------------------------
    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        validate_key(key)
        self._ensure_bucket()
        try:
            length = os.stat(path).st_size
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        with self._errors("writing", key), open(path, "rb") as f:
            self._client.put_object(
                bucket_name=self.bucket,
                object_name=key,
                data=f,
                length=length,
                part_size=self.part_size,
            )
        if move:
            try:
                os.unlink(path)
            except OSError:
                pass

    def put_bytes(self, key: str, data: bytes) -> None:
        validate_key(key)
        self._ensure_bucket()
        with self._errors("writing", key):
            self._client.put_object(
                bucket_name=self.bucket,
                object_name=key,
                data=io.BytesIO(data),
                length=len(data),
                part_size=self.part_size,
            )

    # -- reading ---------------------------------------------------------------
    def _get(self, key: str) -> Any:
        validate_key(key)
        with self._errors("reading", key):
            return self._client.get_object(bucket_name=self.bucket, object_name=key)

    def open(self, key: str) -> BinaryIO:
        response = self._get(key)
        return cast(BinaryIO, io.BufferedReader(_ResponseReader(response, self._where(key))))

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        response = self._get(key)
        try:
            with self._errors("reading", key):
                for chunk in response.stream(chunk_size):
                    yield chunk
        finally:
            response.close()
            response.release_conn()

    def _stat(self, key: str) -> Any:
        validate_key(key)
        with self._errors("reading", key):
            return self._client.stat_object(bucket_name=self.bucket, object_name=key)

    def exists(self, key: str) -> bool:
        try:
            self._stat(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._stat(key).size)

    def delete(self, key: str) -> None:
        validate_key(key)
        try:
            with self._errors("deleting", key):
                self._client.remove_object(bucket_name=self.bucket, object_name=key)
        except ObjectNotFound:
            pass

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        with self._errors("listing", prefix or None):
            for obj in self._client.list_objects(
                bucket_name=self.bucket, prefix=prefix or None, recursive=True
            ):
                if obj.is_dir or obj.object_name is None:
                    continue
                yield obj.object_name

    # -- lifecycle -------------------------------------------------------------
    def check(self) -> None:
        self._bucket_ready = False
        self._ensure_bucket()

    def close(self) -> None:
        self._http.clear()


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."
