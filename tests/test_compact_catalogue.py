"""The compact catalogue rows (float16 embedding, ORB2 keypoints, WebP thumbnail that SSIM also reads) answer as
the rows written before them, and a catalogue of those older rows opens and searches as it did: every blob says
what it is, so nothing is migrated and a catalogue may hold both."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import crop, encode, recompress, resize, rotate90

from pictrace.config import Settings
from pictrace.decode import decode_image
from pictrace.features.extract import orb_of
from pictrace.features.orb import OrbFeatures
from pictrace.features.ssim import gray256
from pictrace.features.thumbnail import encode_gray_png, encode_thumbnail
from pictrace.gallery import load_gallery
from pictrace.service import Service, open_catalogue

NAMES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "brick"]
EDITS: dict[str, Callable[[np.ndarray], bytes]] = {
    "crop": lambda rgb: encode(crop(rgb, 0.6, 0.15)),
    "rotate90": lambda rgb: encode(rotate90(rgb)),
    "jpeg-q30": lambda rgb: recompress(rgb, 30),
    "quarter-size": lambda rgb: encode(resize(rgb, 0.25)),
    "mirror": lambda rgb: encode(np.ascontiguousarray(rgb[:, ::-1])),
}
Answer = tuple[str, str, tuple[str, ...]]  # (best id, its verdict, the ids judged copies)


@pytest.fixture(params=["sqlite", "postgres"])
def make_catalogue(request: pytest.FixtureRequest, make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings of a fresh catalogue on each call: a SQLite file in the data dir, or a new PostgreSQL database."""

    def make(**overrides: object) -> Settings:
        if request.param == "postgres":
            overrides["database_url"] = request.getfixturevalue("postgres_server").new_database()
        return make_settings(**overrides)

    return make


def _gallery(root: Path, photos: dict[str, np.ndarray], make_catalogue: Callable[..., Settings]) -> Settings:
    settings = make_catalogue(data_dir=root / "data", db=root / "db.json")
    (root / "g").mkdir(parents=True)
    for name in NAMES:
        (root / "g" / f"{name}.jpg").write_bytes(encode(photos[name]))
    settings.db.write_text(json.dumps([{"id": n, "url": f"g/{n}.jpg"} for n in NAMES]))
    return settings


async def _answers(service: Service, photos: dict[str, np.ndarray]) -> dict[str, Answer]:
    out = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        for edit, make in EDITS.items():
            results = service.searcher.search_bytes(make(photos[name])).results
            copies = tuple(sorted(m.id for m in results if m.verdict == "copy"))
            out[f"{name}/{edit}"] = (results[0].id, results[0].verdict, copies)
    return out


def _rows(settings: Settings) -> list[tuple[bytes, ...]]:
    catalogue = open_catalogue(settings)
    try:
        rows = catalogue._query("SELECT embedding, gray, orb, thumbnail FROM images")
    finally:
        catalogue.close()
    return [tuple(bytes(blob) for blob in row) for row in rows]


def _orb1(orb: OrbFeatures) -> bytes:
    """ORB as catalogues stored it before ORB2: float32 points."""
    header = struct.pack("<4sIIId", b"ORB1", len(orb), orb.width, orb.height, float(orb.scale))
    return header + orb.points.astype("<f4").tobytes() + orb.descriptors.astype(np.uint8).tobytes()


def _write_rows_as_before(service: Service) -> None:
    """Every image's features again, each encoded as the code before the compact rows wrote them (float32
    embedding, 256x256 gray PNG, ORB1 with every keypoint, JPEG 82 thumbnail)."""
    rows = service.catalogue._query("SELECT i.vec_id, s.url FROM images i JOIN sources s ON s.sha256 = i.sha256")
    assert len(rows) == len(NAMES)
    with service.catalogue._transaction() as conn:
        for vec_id, url in rows:
            image = decode_image(Path(url).read_bytes(), max_pixels=service.settings.max_pixels)
            embedding = service.embedder.embed([image.rgb])[0].astype("<f4").tobytes()
            orb = _orb1(orb_of(image.rgb, service.tuning, image.scale))
            gray = encode_gray_png(gray256(image.rgb))
            conn.execute(
                "UPDATE images SET embedding = ?, gray = ?, orb = ?, thumbnail = ? WHERE vec_id = ?",
                (embedding, gray, orb, encode_thumbnail(image.rgb), vec_id),
            )


@pytest.mark.slow
async def test_older_rows_open_and_search_as_the_compact_ones(
    tmp_path: Path, photos: dict[str, np.ndarray], make_catalogue: Callable[..., Settings]
) -> None:
    compact = _gallery(tmp_path / "compact", photos, make_catalogue)
    service = await Service.start(compact)
    try:
        report = await service.ingestor.ingest_gallery(load_gallery(compact.db))
        assert report.added == len(NAMES)
        now = await _answers(service, photos)
    finally:
        await service.close()
    for embedding, gray, orb, thumbnail in _rows(compact):
        assert len(embedding) == 3 + 2 * 1280 and embedding.startswith(b"f16")
        assert gray == b"" and thumbnail[:4] == b"RIFF" and thumbnail[8:12] == b"WEBP"
        assert orb[:4] == b"ORB2"

    before = _gallery(tmp_path / "before", photos, make_catalogue)
    service = await Service.start(before)
    try:
        await service.ingestor.ingest_gallery(load_gallery(before.db))
        _write_rows_as_before(service)
    finally:
        await service.close()
    # the catalogue now holds only rows as older code wrote them; indexes rebuilt from them at start
    for embedding, gray, orb, thumbnail in _rows(before):
        assert len(embedding) == 4 * 1280 and gray[:4] == b"\x89PNG" and orb[:4] == b"ORB1"
        assert thumbnail[:3] == b"\xff\xd8\xff"
    service = await Service.start(before, rebuild_index=True)
    try:
        then = await _answers(service, photos)
    finally:
        await service.close()
    assert {row[2][:4] for row in _rows(before)} == {b"ORB1"}  # nothing was rewritten on open

    assert then == now
    for query, (best, verdict, copies) in now.items():  # and the answers are the right ones
        assert best == query.split("/")[0] and verdict == "copy" and best in copies, (query, now[query])
