"""Read and validate db.json, the original PicTrace's gallery format: a JSON list of {"url", "id"?, ...}.

Bad entries are reported by position and skipped; the good ones are still indexed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pictrace.errors import GalleryError
from pictrace.metadata import MetadataError, check_metadata, check_text
from pictrace.schemas import FailedEntry, GalleryEntry


@dataclass(frozen=True)
class LocatedEntry:
    """A valid entry and where its bytes are: an http(s) URL, or an absolute path resolved from db.json."""

    position: int
    entry: GalleryEntry
    location: str

    @property
    def is_remote(self) -> bool:
        return self.location.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Shard:
    """``--shard I/N``: this worker owns the entries whose URL hashes to I modulo N.

    The hash is SHA-256 of the URL as written in db.json, so every worker, on any machine, agrees.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise ValueError(f"shard {text!r}: expected I/N, e.g. 0/4")
        return cls(int(match[1]), int(match[2]))

    def owns(self, entry_url: str) -> bool:
        digest = hashlib.sha256(entry_url.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index


@dataclass
class Gallery:
    entries: list[LocatedEntry] = field(default_factory=list)
    invalid: list[FailedEntry] = field(default_factory=list)

    def shard(self, shard: Shard) -> Gallery:
        """The entries (and invalid entries) this shard owns; positions stay those of the whole db.json."""
        return Gallery(
            entries=[e for e in self.entries if shard.owns(e.entry.url)],
            invalid=[f for f in self.invalid if shard.owns(f.url)],
        )


def parse_entry(position: int, raw: Any, base_dir: Path) -> LocatedEntry:
    """Validate one entry; raises ValueError with a reason a person can act on."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object with a 'url', got {type(raw).__name__}")
    url = raw.get("url")
    if not isinstance(url, str) or not url.strip():
        raise ValueError("missing or empty 'url'")
    url = url.strip()
    raw_id = raw.get("id")
    if raw_id is not None and not isinstance(raw_id, str | int):
        raise ValueError("'id' must be a string or an integer")
    check_text(url, "'url'")
    if isinstance(raw_id, str):
        check_text(raw_id, "'id'")
    elif isinstance(raw_id, int) and not -(1 << 63) <= raw_id < 1 << 63:
        raise ValueError("'id' is an integer outside 64 bits")
    metadata = check_metadata({k: v for k, v in raw.items() if k not in ("url", "id")}, None, "the entry")
    entry = GalleryEntry(url=url, id=None if raw_id is None else str(raw_id), metadata=metadata)
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"URL has no host: {url!r}")
        return LocatedEntry(position, entry, url)
    if parts.scheme and len(parts.scheme) > 1:  # one letter would be a Windows drive
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} (use http, https or a relative path)")
    path = Path(url)
    if path.is_absolute():
        raise ValueError(f"absolute path {url!r}: use a path relative to db.json")
    return LocatedEntry(position, entry, str((base_dir / path).resolve()))


def parse_gallery(data: Any, base_dir: Path) -> Gallery:
    if not isinstance(data, list):
        raise GalleryError(f"db.json must be a JSON list of entries, got {type(data).__name__}")
    gallery = Gallery()
    seen_locations: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    for position, raw in enumerate(data):
        try:
            located = parse_entry(position, raw, base_dir)
            if located.location in seen_locations:
                raise ValueError(f"same url as entry {seen_locations[located.location]}")
            if located.entry.id is not None and located.entry.id in seen_ids:
                raise ValueError(
                    f"duplicate id {located.entry.id!r} (first used by entry {seen_ids[located.entry.id]})"
                )
        except (ValueError, MetadataError) as exc:
            url = raw.get("url") if isinstance(raw, dict) else None
            shown = url.encode("utf-8", "replace").decode() if isinstance(url, str) else ""
            gallery.invalid.append(FailedEntry(position=position, url=shown, reason=str(exc)))
            continue
        seen_locations[located.location] = position
        if located.entry.id is not None:
            seen_ids[located.entry.id] = position
        gallery.entries.append(located)
    return gallery


def load_gallery(path: Path) -> Gallery:
    """Read db.json; raises GalleryError when the file as a whole is unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise GalleryError(f"gallery file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise GalleryError(f"cannot read gallery file {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GalleryError(f"{path} is not valid JSON: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # a 5,000-digit integer, a nest deeper than Python's stack
        raise GalleryError(f"{path} cannot be read as JSON: {exc}") from exc
    return parse_gallery(data, path.resolve().parent)
