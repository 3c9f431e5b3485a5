"""Read and validate db.json, the original PicTrace's gallery format: a JSON list of {"url", "id"?, ...}.

Bad entries are reported by position and skipped; the good ones are still indexed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pictrace.errors import GalleryError
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


@dataclass
class Gallery:
    entries: list[LocatedEntry] = field(default_factory=list)
    invalid: list[FailedEntry] = field(default_factory=list)


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
    metadata = {k: v for k, v in raw.items() if k not in ("url", "id")}
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
        except ValueError as exc:
            url = raw.get("url") if isinstance(raw, dict) else None
            gallery.invalid.append(FailedEntry(position=position, url=str(url or ""), reason=str(exc)))
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
    return parse_gallery(data, path.resolve().parent)
