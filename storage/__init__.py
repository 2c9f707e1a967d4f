"""Object storage for telepacs: where the bytes of each stored object live.

``open_store(url)`` is the one place that names backends:

* ``file:///abs/path`` or a plain path → :class:`LocalObjectStore`
* ``s3://ACCESS:SECRET@host:port/bucket?secure=false&region=…&spool=true|false``
  → :class:`S3ObjectStore`, wrapped in a started :class:`SpooledObjectStore` when
  ``spool`` is true (the default) and a ``spool_dir`` is given.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .base import ObjectNotFound, ObjectStore, StorageError, validate_key
from .local import LocalObjectStore
from .s3 import S3ObjectStore
from .spool import SpooledObjectStore

__all__ = [
    "LocalObjectStore",
    "ObjectNotFound",
    "ObjectStore",
    "S3ObjectStore",
    "SpooledObjectStore",
    "StorageError",
    "open_store",
    "validate_key",
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(query: dict[str, list[str]], name: str, default: bool) -> bool:
    values = query.get(name)
    if not values:
        return default
    value = values[-1].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"storage URL option {name}={values[-1]!r} is not true/false")


def open_store(url: str, *, spool_dir: Path | None = None, drain: bool = True,
               drain_idle_rescan: float | None = None) -> ObjectStore:
    """Open the object store that ``url`` names.

    ``file:///abs/path`` or a plain path gives a :class:`LocalObjectStore`.
    ``s3://ACCESS:SECRET@host:port/bucket`` gives an :class:`S3ObjectStore`
    (credentials URL-decoded; query options ``secure`` (default true), ``region``,
    ``create_bucket`` (default true) and ``spool`` (default true)).  When ``spool``
    is true and ``spool_dir`` is given, the S3 store is wrapped in a
    :class:`SpooledObjectStore`, whose drainer is started here unless ``drain``
    is false (another process drains the spool; ``drain_idle_rescan`` is then how
    often that process looks for new files).

    Raises ``ValueError`` for an unknown scheme or a malformed URL.
    """
    if "://" not in url:
        if not url:
            raise ValueError("storage URL is empty")
        return LocalObjectStore(Path(url))
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file storage URL must be file:///absolute/path, not host {parts.netloc!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError("file storage URL must name an absolute path")
        return LocalObjectStore(Path(path))
    if scheme == "s3":
        query = parse_qs(parts.query, keep_blank_values=True)
        known = {"secure", "region", "spool", "create_bucket"}
        unknown = set(query) - known
        if unknown:
            raise ValueError(f"unknown s3 storage URL option(s): {', '.join(sorted(unknown))}")
        host = parts.hostname
        if not host:
            raise ValueError("s3 storage URL has no host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError("s3 storage URL has an invalid port") from exc
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        endpoint = f"{host}:{port}" if port else host
        bucket = parts.path.strip("/")
        if not bucket or "/" in bucket:
            raise ValueError("s3 storage URL must be s3://ACCESS:SECRET@host[:port]/bucket")
        access_key = unquote(parts.username or "")
        secret_key = unquote(parts.password or "")
        region = (query.get("region") or [""])[-1] or None
        store = S3ObjectStore(
            endpoint,
            access_key,
            secret_key,
            bucket,
            secure=_flag(query, "secure", True),
            region=region,
            create_bucket=_flag(query, "create_bucket", True),
        )
        if _flag(query, "spool", True) and spool_dir is not None:
            options = {} if drain_idle_rescan is None else {"idle_rescan": drain_idle_rescan}
            spooled = SpooledObjectStore(store, spool_dir, **options)  # type: ignore[arg-type]
            if drain:
                spooled.start()
            return spooled
        return store
    raise ValueError(f"unknown storage URL scheme {parts.scheme!r} (expected file or s3)")
