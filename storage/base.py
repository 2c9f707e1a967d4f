"""The object store interface shared by every storage backend.

An object store maps *keys* (relative POSIX-like paths such as
``1.2.3/1.2.3.4/1.2.3.4.5.dcm``) to immutable byte strings.  Backends translate
their own failures into :class:`StorageError` (and :class:`ObjectNotFound` for a
missing key) so callers catch one exception type whatever the backend.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

__all__ = ["StorageError", "ObjectNotFound", "ObjectStore", "validate_key"]


class StorageError(Exception):
    """The storage backend failed: unreachable, disk full, permission denied, ...

    The message says what failed and where (key, root or endpoint/bucket); it never
    contains credentials.
    """


class ObjectNotFound(StorageError):
    """No object is stored under the requested key."""


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ``ValueError``.

    A key is a relative POSIX-like path: not empty, not absolute, no ``..`` or
    ``.`` component, no empty component (``a//b``, trailing ``/``), no backslash
    and no NUL or other control character.
    """
    if not isinstance(key, str):
        raise ValueError(f"object key must be a string, not {type(key).__name__}")
    if not key:
        raise ValueError("object key is empty")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} is absolute")
    if "\\" in key:
        raise ValueError(f"object key {key!r} contains a backslash")
    if _CONTROL_CHARACTER.search(key):
        raise ValueError(f"object key {key!r} contains a NUL or control character")
    for part in key.split("/"):
        if part == "":
            raise ValueError(f"object key {key!r} has an empty component")
        if part in (".", ".."):
            raise ValueError(f"object key {key!r} contains {part!r}")
    return key


@runtime_checkable
class ObjectStore(Protocol):
    """Where object bytes live: a local directory, an S3 bucket, a spool in front of one.

    Every method that takes a key raises ``ValueError`` for an invalid key (see
    :func:`validate_key`) and :class:`StorageError` when the backend fails.
    """

    #: Where the objects are, e.g. ``file:///srv/telepacs/objects`` or
    #: ``s3://host:9000/bucket``; never contains credentials.
    description: str

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        """Store the bytes of the local file ``path`` under ``key`` (replacing any).

        The object is durable when this returns.  With ``move=True`` the store may
        take the file over (rename it when on the same file system) and the caller
        must not use ``path`` afterwards; otherwise the file is copied and left as is.
        """
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (replacing any); durable when this returns."""
        ...

    def open(self, key: str) -> BinaryIO:
        """Return a readable binary stream of the object; the caller closes it.

        The bytes are streamed, not loaded in memory.  Raises :class:`ObjectNotFound`.
        """
        ...

    def get_bytes(self, key: str) -> bytes:
        """Return the whole object in memory.  Raises :class:`ObjectNotFound`."""
        ...

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Yield the object's bytes in chunks of at most ``chunk_size`` bytes.

        Raises :class:`ObjectNotFound` (on the first ``next()``) for a missing key.
        """
        ...

    def exists(self, key: str) -> bool:
        """Return whether an object is stored under ``key``."""
        ...

    def size(self, key: str) -> int:
        """Return the object's size in bytes.  Raises :class:`ObjectNotFound`."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing key is not an error."""
        ...

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Yield every key that starts with ``prefix`` (a plain string prefix)."""
        ...

    def check(self) -> None:
        """Raise :class:`StorageError` unless the backend is usable now.

        Detects an unreachable server, a missing bucket, a directory that is not
        writable.
        """
        ...

    def close(self) -> None:
        """Release connections and threads; the store is not used afterwards."""
        ...
