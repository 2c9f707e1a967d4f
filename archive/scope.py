"""Which studies a user may see: all of them (administrators), or those of some facilities plus named studies.

A :class:`StudyScope` is computed per request by ``viewer.auth.access_scope()`` and passed down to
the queries (``archive.query.find(..., scope=...)``) so that filtering happens in SQL, and to the
single-object checks (:meth:`StudyScope.allows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import false, or_
from sqlalchemy.sql.elements import ColumnElement

from archive.models import Study


@dataclass(frozen=True)
class StudyScope:
    everything: bool = False
    facilities: frozenset[str] = field(default_factory=frozenset)
    study_uids: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def all(cls) -> StudyScope:
        return cls(everything=True)

    def allows(self, study_uid: str, facility: str | None) -> bool:
        """Whether a study (its UID and its ``studies.facility``) is in scope."""
        return self.everything or (facility is not None and facility in self.facilities) or study_uid in self.study_uids

    def study_condition(self) -> ColumnElement[bool]:
        """A WHERE condition on the ``studies`` table selecting exactly the studies in scope."""
        if self.everything:
            raise ValueError("an unrestricted scope needs no condition")
        conditions: list[Any] = []
        if self.facilities:
            conditions.append(Study.facility.in_(sorted(self.facilities)))
        if self.study_uids:
            conditions.append(Study.study_uid.in_(sorted(self.study_uids)))
        return or_(*conditions) if conditions else false()


__all__ = ["StudyScope"]
