"""Validated DICOM UIDs and the object keys built from them.

A UID (PS3.5 §9.1) is at most 64 characters of digits and dots, with no
empty component. PS3.5 also forbids zero-padded components, but real
modalities send them, and refusing a study for that would lose it; so they
pass. Anything else is refused here, before it can become part of a storage key:
a UID like ``../../etc/passwd`` must never reach the file system.
"""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64


class InvalidUID(ValueError):
    """A value that is not a valid DICOM UID."""


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidUID`.

    Trailing NUL/space padding (allowed on the wire) is stripped first.
    """
    if value is None:
        raise InvalidUID(f"{what} is missing")
    uid = str(value).rstrip("\x00 ")
    if not uid:
        raise InvalidUID(f"{what} is empty")
    if len(uid) > MAX_UID_LENGTH:
        raise InvalidUID(f"{what} {uid[:80]!r} is {len(uid)} characters long (at most {MAX_UID_LENGTH})")
    if not _UID_RE.match(uid):
        raise InvalidUID(f"{what} {uid[:80]!r} is not a valid DICOM UID (digits and dots only, no empty component)")
    return uid


def is_valid_uid(value: object) -> bool:
    try:
        validate_uid(value)
    except InvalidUID:
        return False
    return True


def object_key(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """Storage key of an instance: ``{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm``."""
    return "/".join(
        (
            validate_uid(study_uid, "StudyInstanceUID"),
            validate_uid(series_uid, "SeriesInstanceUID"),
            validate_uid(sop_instance_uid, "SOPInstanceUID") + ".dcm",
        )
    )


def parse_object_key(key: str) -> tuple[str, str, str]:
    """Inverse of :func:`object_key`; raises :class:`InvalidUID` for a key that is not one of ours."""
    parts = key.split("/")
    if len(parts) != 3 or not parts[2].endswith(".dcm"):
        raise InvalidUID(f"{key!r} is not an instance key (STUDY/SERIES/SOP.dcm)")
    study, series, sop = parts[0], parts[1], parts[2][: -len(".dcm")]
    return (
        validate_uid(study, "StudyInstanceUID"),
        validate_uid(series, "SeriesInstanceUID"),
        validate_uid(sop, "SOPInstanceUID"),
    )
