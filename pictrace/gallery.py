"""The gallery: db.json (the original PicTrace's format, a JSON list of {"url", "id"?, ...}) or a folder.

Bad db.json entries are reported by position and skipped; the good ones are still indexed. A folder is walked
recursively: hidden files and folders are skipped, and a symlink that leads outside it is refused and reported.
Which of its files are images is decided by their first bytes, when they are read (pictrace/files.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pictrace.errors import GalleryError
from pictrace.metadata import MetadataError, check_metadata, check_text
from pictrace.schemas import FailedEntry, GalleryEntry
from pictrace.store.records import FileStat


@dataclass(frozen=True)
class LocatedEntry:
    """A valid entry and where its bytes are: an http(s) URL, or an absolute path resolved from db.json.

    A folder gallery's entry has no position, and its file's size and mtime as scanned (``stat``)."""

    position: int | None
    entry: GalleryEntry
    location: str
    stat: FileStat | None = None

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
    folder: Path | None = None  # a folder gallery's root, resolved; None for db.json

    def shard(self, shard: Shard) -> Gallery:
        """The entries (and invalid entries) this shard owns; positions stay those of the whole db.json."""
        return Gallery(
            entries=[e for e in self.entries if shard.owns(e.entry.url)],
            invalid=[f for f in self.invalid if shard.owns(f.url)],
            folder=self.folder,
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


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def scan_folder(root: Path) -> Gallery:
    """Every regular, non-hidden file under ``root``, each named by its path relative to it (its id and url).

    Nothing is read here, only listed and stat'ed: an unchanged file of a re-scan costs one ``stat``. A symlink
    is followed only when it stays inside the folder; a folder reached twice (a link to a parent) is walked once.
    """
    try:
        base = root.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise GalleryError(f"gallery folder {root} cannot be opened: {exc}") from exc
    if not base.is_dir():
        raise GalleryError(f"gallery folder {root} is not a folder")
    gallery = Gallery(folder=base)
    seen_dirs = {base}
    pending = [base]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                items = sorted(listing, key=lambda item: item.name)
        except OSError as exc:
            gallery.invalid.append(FailedEntry(position=None, url=_relative(directory, base), reason=str(exc)))
            continue
        for item in items:
            if _is_hidden(item.name):
                continue
            path = Path(item.path)
            relative = _relative(path, base)
            try:
                if item.is_symlink():
                    target = path.resolve(strict=True)
                    if not target.is_relative_to(base):
                        raise ValueError(f"symbolic link leads outside the folder (to {target}): refused")
                info = path.stat()  # follows a link that stays inside
            except (OSError, RuntimeError) as exc:  # a dangling link, a loop, a permission
                gallery.invalid.append(FailedEntry(position=None, url=relative, reason=f"cannot read: {exc}"))
                continue
            except ValueError as exc:
                gallery.invalid.append(FailedEntry(position=None, url=relative, reason=str(exc)))
                continue
            if stat.S_ISDIR(info.st_mode):
                real = path.resolve()
                if real not in seen_dirs:
                    seen_dirs.add(real)
                    pending.append(path)
            elif stat.S_ISREG(info.st_mode):
                entry = GalleryEntry(url=relative, id=relative)
                gallery.entries.append(
                    LocatedEntry(None, entry, str(path), FileStat(info.st_size, info.st_mtime_ns))
                )
    gallery.entries.sort(key=lambda e: e.entry.url)
    return gallery


def _relative(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix() if path != base else "."


def load_gallery(path: Path) -> Gallery:
    """Read db.json, or list a folder; raises GalleryError when the gallery as a whole is unusable."""
    if path.is_dir():
        return scan_folder(path)
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
