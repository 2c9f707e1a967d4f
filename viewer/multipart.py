"""multipart/related bodies (RFC 2387, as DICOMweb uses them), read and written as streams.

STOW-RS uploads can be gigabytes over a slow link: each part is written to
a file as it arrives, never held whole. WADO-RS responses are generated part
by part from object storage.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

_CHUNK = 1 << 20
_MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    """A body that is not the multipart/related it claims to be."""


@dataclass(frozen=True)
class MediaType:
    """A media type with its parameters, e.g. multipart/related; type="application/dicom"."""

    type: str
    params: dict[str, str]

    @classmethod
    def parse(cls, value: str) -> MediaType:
        message = Message()
        message["Content-Type"] = value
        params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}  # type: ignore[misc]
        return cls(message.get_content_type().lower(), params)


def split_media_ranges(accept: str) -> list[MediaType]:
    """The media ranges of an Accept header (``,`` outside quotes separates them)."""
    ranges: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in accept:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            ranges.append("".join(current))
            current = []
        else:
            current.append(ch)
    ranges.append("".join(current))
    return [MediaType.parse(r.strip()) for r in ranges if r.strip()]


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]  # lower-case names
    path: Path
    size: int

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def read_parts(stream: IO[bytes], boundary: str, new_path: Callable[[], Path]) -> Iterator[Part]:
    """The parts of a multipart body read from ``stream``, each body written to a fresh ``new_path()``.

    A part is yielded once its body is complete; the caller owns (and removes) its file.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    reader = _Reader(stream)
    if not reader.skip_past(delimiter):
        raise MultipartError("the body has no part (boundary not found)")
    while True:
        after = reader.read_exact(2)
        if after == b"--":
            return  # close delimiter
        if after != b"\r\n":
            raise MultipartError("malformed boundary line")
        headers = _parse_headers(reader.read_until(b"\r\n\r\n", _MAX_HEADER_BYTES))
        path = new_path()
        size = 0
        try:
            with open(path, "wb") as out:
                for chunk in reader.iter_until(b"\r\n" + delimiter):
                    out.write(chunk)
                    size += len(chunk)
        except BaseException:
            path.unlink(missing_ok=True)  # a part cut short leaves nothing behind
            raise
        yield Part(headers, path, size)


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError(f"malformed part header {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


class _Reader:
    """Buffered reads from a stream, with searches for a delimiter across chunk edges."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.buffer = b""
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.stream.read(_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise MultipartError("the body ends in the middle of a part (upload cut short?)")
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def skip_past(self, marker: bytes) -> bool:
        while True:
            at = self.buffer.find(marker)
            if at >= 0:
                self.buffer = self.buffer[at + len(marker):]
                return True
            self.buffer = self.buffer[-len(marker):]
            if not self._fill():
                return False

    def read_until(self, marker: bytes, limit: int) -> bytes:
        while True:
            at = self.buffer.find(marker)
            if at >= 0:
                data, self.buffer = self.buffer[:at], self.buffer[at + len(marker):]
                return data
            if len(self.buffer) > limit:
                raise MultipartError("part headers too long")
            if not self._fill():
                raise MultipartError("the body ends in the middle of part headers")

    def iter_until(self, marker: bytes) -> Iterator[bytes]:
        """Chunks up to ``marker`` (consumed, not returned)."""
        while True:
            at = self.buffer.find(marker)
            if at >= 0:
                data, self.buffer = self.buffer[:at], self.buffer[at + len(marker):]
                if data:
                    yield data
                return
            keep = len(marker) - 1
            if len(self.buffer) > keep:
                data, self.buffer = self.buffer[:-keep], self.buffer[-keep:]
                yield data
            if not self._fill():
                raise MultipartError("the body ends in the middle of a part (upload cut short?)")


def new_boundary() -> str:
    return "telepacs-" + secrets.token_hex(16)


def write_parts(parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """A multipart body from (content type, body chunks) pairs, generated as it is sent."""
    for content_type, chunks in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")
        yield from chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")
