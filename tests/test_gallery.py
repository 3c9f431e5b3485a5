"""db.json validation: bad entries are reported by position, good ones are kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pictrace.errors import GalleryError
from pictrace.gallery import load_gallery, parse_gallery


def test_valid_entries_keep_id_metadata_and_resolve_paths(tmp_path: Path) -> None:
    gallery = parse_gallery(
        [
            {"url": "https://example.com/a.jpg", "id": 7, "title": "A", "tags": ["x"]},
            {"url": "images/b.png"},
        ],
        tmp_path,
    )
    assert gallery.invalid == []
    first, second = gallery.entries
    assert first.entry.id == "7" and first.entry.metadata == {"title": "A", "tags": ["x"]}
    assert first.location == "https://example.com/a.jpg" and first.is_remote
    assert second.location == str((tmp_path / "images/b.png").resolve()) and not second.is_remote
    assert second.entry.key == "images/b.png"


def test_bad_entries_reported_by_position_good_ones_kept(tmp_path: Path) -> None:
    gallery = parse_gallery(
        [
            {"url": "https://example.com/ok.jpg"},
            "just a string",
            {"id": "no-url"},
            {"url": "ftp://example.com/x.jpg"},
            {"url": "/etc/passwd"},
            {"url": "https://example.com/ok.jpg"},
            {"url": "http:///nohost.jpg"},
            {"url": "b.jpg", "id": {"nested": 1}},
            {"url": "c.jpg", "id": "dup"},
            {"url": "d.jpg", "id": "dup"},
        ],
        tmp_path,
    )
    assert [e.position for e in gallery.entries] == [0, 8]
    reasons = {f.position: f.reason for f in gallery.invalid}
    assert set(reasons) == {1, 2, 3, 4, 5, 6, 7, 9}
    assert "url" in reasons[2]
    assert "scheme" in reasons[3]
    assert "relative" in reasons[4]
    assert "entry 0" in reasons[5]
    assert "host" in reasons[6]
    assert "duplicate id" in reasons[9]


def test_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="does not exist"):
        load_gallery(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GalleryError, match="not valid JSON"):
        load_gallery(bad)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"url": "x.jpg"}))
    with pytest.raises(GalleryError, match="JSON list"):
        load_gallery(obj)


def test_shipped_demo_gallery_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    gallery = load_gallery(root / "db.json")
    assert gallery.invalid == []
    assert len(gallery.entries) >= 10
    for located in gallery.entries:
        assert Path(located.location).is_file(), located.location
        assert "licence" in located.entry.metadata
