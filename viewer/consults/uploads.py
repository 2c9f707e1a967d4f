"""Resumable browser uploads: which of the files a browser holds are already stored, byte for byte.

The browser sends, per file, the SOP Instance UID it read from the file, its size and its SHA-256;
the archive answers whether that instance is stored with the same size and SHA-256 (hashed from
storage on demand: the index keeps BLAKE3, which browsers cannot compute natively). A re-run after
a dropped link skips what arrived and sends the rest; a consult is submitted only when every file
is confirmed. No Flask here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from archive.keys import InvalidUID, validate_uid
from archive.service import Archive
from storage import ObjectNotFound

MAX_CHECK = 2000


@dataclass(frozen=True)
class FileClaim:
    sop_instance_uid: str
    size: int
    sha256: str


@dataclass(frozen=True)
class StoredCheck:
    sop_instance_uid: str
    stored: bool  # the instance is in the archive
    same: bool  # ...with exactly these bytes
    study_uid: str = ""


def check_stored(archive: Archive, claims: list[FileClaim]) -> list[StoredCheck]:
    if len(claims) > MAX_CHECK:
        raise ValueError(f"at most {MAX_CHECK} files per check")
    results = []
    for claim in claims:
        try:
            validate_uid(claim.sop_instance_uid)
        except InvalidUID as exc:
            raise ValueError(f"{claim.sop_instance_uid!r} is not a UID: {exc}") from None
        if len(claim.sha256) != 64 or any(c not in "0123456789abcdef" for c in claim.sha256):
            raise ValueError(f"sha256 of {claim.sop_instance_uid} must be 64 lower-case hex digits")
        found = archive.index.find_instance(claim.sop_instance_uid)
        if found is None:
            results.append(StoredCheck(claim.sop_instance_uid, False, False))
            continue
        same = found.size == claim.size and _sha256(archive, found.object_key) == claim.sha256
        results.append(StoredCheck(claim.sop_instance_uid, True, same, found.study_uid))
    return results


def _sha256(archive: Archive, key: str) -> str:
    digest = hashlib.sha256()
    try:
        with archive.store.open(key) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except ObjectNotFound:
        return ""
    return digest.hexdigest()
