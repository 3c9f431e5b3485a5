"""Regenerate the offline demo gallery (``demo/``) and the default ``db.json``.

Every source image ships inside the installed scikit-image package
(``skimage/data/``); nothing is downloaded. Only images whose licence, as stated
in scikit-image's own docstrings, permits redistribution are used; see
``demo/LICENSES.md``.

Outputs (all deterministic for a given Pillow version):

* ``demo/gallery/<id>.jpg``  originals, RGB, JPEG q90, longest side <= 800 px
* ``demo/gallery/<id>.jpg``  a few edited copies of some originals
* ``demo/queries/<name>.jpg`` query images that are *not* in the gallery
* ``db.json``                 the gallery index (repo root, urls relative to it)

Run with ``python scripts/make_demo_gallery.py``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import skimage
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "demo"
GALLERY_DIR = DEMO_DIR / "gallery"
QUERY_DIR = DEMO_DIR / "queries"
DB_PATH = REPO_ROOT / "db.json"
SKIMAGE_DATA = Path(skimage.__file__).resolve().parent / "data"

MAX_SIDE = 800
JPEG_QUALITY = 90
SKIMAGE_CREDIT = f"scikit-image {version('scikit-image')} sample data (skimage.data)"


@dataclass(frozen=True)
class Source:
    """One original image taken from scikit-image's bundled sample data."""

    id: str
    filename: str
    title: str
    licence: str
    source: str


# Licences and credits exactly as stated in the docstrings of skimage/data/_fetchers.py.
SOURCES: tuple[Source, ...] = (
    Source(
        "astronaut",
        "astronaut.png",
        "Astronaut Eileen Collins",
        "Public domain",
        "NASA Great Images database (https://flic.kr/p/r9qvLn)",
    ),
    Source(
        "chelsea",
        "chelsea.png",
        "Chelsea the cat",
        "CC0",
        "Stefan van der Walt (photographer)",
    ),
    Source(
        "coffee",
        "coffee.png",
        "Coffee cup (courtesy of Pikolo Espresso Bar)",
        "CC0",
        "Rachel Michetti (photographer)",
    ),
    Source(
        "rocket",
        "rocket.jpg",
        "Falcon 9 launch carrying DSCOVR",
        "Public domain",
        "SpaceX Photos (https://www.flickr.com/photos/spacexphotos/16511594820/)",
    ),
    Source(
        "hubble_deep_field",
        "hubble_deep_field.jpg",
        "Hubble eXtreme Deep Field",
        "Public domain",
        "NASA / HubbleSite (http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/)",
    ),
    Source(
        "camera",
        "camera.png",
        "Man with a camera on a tripod (grayscale)",
        "CC0",
        "Lav Varshney (photographer)",
    ),
    Source(
        "coins",
        "coins.png",
        "Greek coins from Pompeii (grayscale)",
        "No known copyright restrictions",
        "Brooklyn Museum Collection (https://www.brooklynmuseum.org/opencollection/archives/image/51611)",
    ),
    Source(
        "ihc",
        "ihc.png",
        "Immunohistochemistry: colonic glands, DAB + hematoxylin stain",
        "No known copyright restrictions",
        "Center for Microscopy And Molecular Imaging (CMMI)",
    ),
    Source(
        "retina",
        "retina.jpg",
        "Fundus photograph of a normal left eye",
        "CC0 1.0",
        "Mikael Häggström, Wikimedia Commons "
        "(https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg)",
    ),
    Source(
        "brick",
        "brick.png",
        "Brick wall texture (grayscale)",
        "CC0",
        "CC0Textures, Bricks25 (https://cc0textures.com/view.php?tex=Bricks25)",
    ),
    Source(
        "grass",
        "grass.png",
        "Grass texture (grayscale)",
        "CC0",
        "linolafett on DeviantArt (https://www.deviantart.com/linolafett/art/Grass-01-434853879)",
    ),
    Source(
        "gravel",
        "gravel.png",
        "Gravel texture (grayscale)",
        "CC0",
        "CC0Textures, Gravel04 (https://cc0textures.com/view.php?tex=Gravel04)",
    ),
    Source(
        "clock",
        "clock_motion.png",
        "Motion-blurred wall clock (grayscale)",
        "Public domain",
        "Stefan van der Walt (photographer)",
    ),
    Source(
        "horse",
        "horse.png",
        "Black and white silhouette of a horse",
        "CC0",
        "Andreas Preuss (marauder), openclipart (http://openclipart.org/detail/158377/horse-by-marauder)",
    ),
)


# ---------------------------------------------------------------------------
# image helpers
# ---------------------------------------------------------------------------


def load_rgb(filename: str) -> Image.Image:
    """Load a bundled scikit-image sample as RGB, longest side <= MAX_SIDE."""
    path = SKIMAGE_DATA / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not bundled with this scikit-image install")
    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB")
    return limit_size(rgb, MAX_SIDE)


def limit_size(im: Image.Image, max_side: int) -> Image.Image:
    w, h = im.size
    if max(w, h) <= max_side:
        return im
    scale = max_side / max(w, h)
    return im.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)


def scale(im: Image.Image, factor: float) -> Image.Image:
    w, h = im.size
    return im.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.LANCZOS)


def crop_fraction(im: Image.Image, frac: float, cx: float = 0.5, cy: float = 0.5) -> Image.Image:
    """Crop a window of ``frac`` x the image's width/height centred at (cx, cy) (relative coords)."""
    w, h = im.size
    cw, ch = round(w * frac), round(h * frac)
    left = min(max(0, round(cx * w - cw / 2)), w - cw)
    top = min(max(0, round(cy * h - ch / 2)), h - ch)
    return im.crop((left, top, left + cw, top + ch))


def rotate_and_crop(im: Image.Image, degrees: float) -> Image.Image:
    """Rotate about the centre and crop the largest axis-aligned rectangle free of borders."""
    w, h = im.size
    rotated = im.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=False)
    a = math.radians(abs(degrees))
    sin_a, cos_a = math.sin(a), math.cos(a)
    long_side, short_side = max(w, h), min(w, h)
    if short_side <= 2.0 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        x = 0.5 * short_side
        wr, hr = (x / sin_a, x / cos_a) if w >= h else (x / cos_a, x / sin_a)
    else:
        cos_2a = cos_a * cos_a - sin_a * sin_a
        wr, hr = (w * cos_a - h * sin_a) / cos_2a, (h * cos_a - w * sin_a) / cos_2a
    wr, hr = math.floor(wr) - 2, math.floor(hr) - 2  # small margin against interpolation fringes
    left, top = (w - wr) // 2, (h - hr) // 2
    return rotated.crop((left, top, left + wr, top + hr))


def recolour(im: Image.Image, hue_shift: float, saturation: float, brightness: float) -> Image.Image:
    """Shift hue (fraction of a turn), scale saturation and brightness."""
    hsv = np.asarray(im.convert("HSV"), dtype=np.float32)
    hsv[..., 0] = (hsv[..., 0] + hue_shift * 256.0) % 256.0
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * brightness, 0, 255)
    return Image.fromarray(np.round(hsv).astype(np.uint8), mode="HSV").convert("RGB")


def grayscale(im: Image.Image) -> Image.Image:
    return im.convert("L").convert("RGB")


def screenshot_paste(im: Image.Image) -> Image.Image:
    """Paste ``im`` at 80% into a larger white 'web page' canvas with a title bar and text lines."""
    inner = scale(im, 0.8)
    iw, ih = inner.size
    cw, ch = iw + 320, ih + 260
    canvas = Image.new("RGB", (cw, ch), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, cw, 36), fill=(60, 64, 72))  # browser-ish title bar
    for i, colour in enumerate(((237, 106, 94), (245, 191, 79), (98, 197, 84))):
        draw.ellipse((14 + 22 * i, 12, 26 + 22 * i, 24), fill=colour)
    draw.rectangle((120, 9, cw - 40, 27), fill=(235, 235, 235))  # address bar
    for i in range(4):  # fake text lines under the picture
        y = 70 + ih + 30 + 24 * i
        draw.rectangle((60, y, 60 + (iw + 140 if i < 3 else iw // 2), y + 10), fill=(205, 205, 205))
    canvas.paste(inner, (60, 60))
    return canvas


def save_jpeg(im: Image.Image, path: Path, quality: int = JPEG_QUALITY) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.convert("RGB").save(path, format="JPEG", quality=quality, optimize=False, progressive=False)


# ---------------------------------------------------------------------------
# edits and queries
# ---------------------------------------------------------------------------

Transform = Callable[[Image.Image], Image.Image]


@dataclass(frozen=True)
class Derived:
    """An edited copy (gallery) or a query image derived from one original."""

    name: str
    original: str
    edit: str
    transform: Transform
    quality: int = JPEG_QUALITY


# Edited copies that live IN the gallery (so a search for the original also finds them).
EDITS: tuple[Derived, ...] = (
    Derived(
        "chelsea-crop", "chelsea", "centre crop, 60% of width and height", lambda im: crop_fraction(im, 0.6)
    ),
    Derived(
        "coffee-rot90",
        "coffee",
        "rotated 90 degrees counter-clockwise",
        lambda im: im.transpose(Image.Transpose.ROTATE_90),
    ),
    Derived(
        "astronaut-q30",
        "astronaut",
        "downscaled to 1/2 and recompressed at JPEG quality 30",
        lambda im: scale(im, 0.5),
        quality=30,
    ),
    Derived(
        "rocket-rot10-crop",
        "rocket",
        "rotated 10 degrees, cropped to remove the borders",
        lambda im: rotate_and_crop(im, 10),
    ),
    Derived(
        "coins-mirror",
        "coins",
        "mirrored left-right",
        lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    ),
)

# Query images that are NOT in the gallery; each should find `original` (and its edits).
QUERIES: tuple[Derived, ...] = (
    Derived(
        "astronaut-face-crop",
        "astronaut",
        "new 45% crop around the face (not the gallery's q30 copy)",
        lambda im: crop_fraction(im, 0.45, cx=0.43, cy=0.3),
    ),
    Derived(
        "chelsea-rot-recolour",
        "chelsea",
        "rotated 7 degrees + cropped, hue shifted and desaturated",
        lambda im: recolour(rotate_and_crop(im, -7), hue_shift=0.08, saturation=0.6, brightness=1.1),
    ),
    Derived(
        "coffee-screenshot",
        "coffee",
        "pasted at 80% into a white web-page-like canvas (screenshot)",
        screenshot_paste,
    ),
    Derived(
        "camera-small-q25",
        "camera",
        "downscaled to 1/4 and saved at JPEG quality 25",
        lambda im: scale(im, 0.25),
        quality=25,
    ),
    Derived(
        "retina-gray-crop",
        "retina",
        "converted to grayscale, 70% off-centre crop",
        lambda im: grayscale(crop_fraction(im, 0.7, cx=0.4, cy=0.55)),
    ),
)


def main() -> int:
    by_id = {s.id: s for s in SOURCES}
    originals: dict[str, Image.Image] = {}
    db: list[dict[str, str]] = []

    for old in (*GALLERY_DIR.glob("*.jpg"), *QUERY_DIR.glob("*.jpg")):
        old.unlink()  # regenerate from scratch so stale files never linger

    for src in SOURCES:
        im = load_rgb(src.filename)
        originals[src.id] = im
        path = GALLERY_DIR / f"{src.id}.jpg"
        save_jpeg(im, path)
        db.append(
            {
                "id": src.id,
                "url": path.relative_to(DB_PATH.parent).as_posix(),
                "title": src.title,
                "licence": src.licence,
                "source": f"{src.source}; via {SKIMAGE_CREDIT}, file {src.filename}",
            }
        )

    for edit in EDITS:
        src = by_id[edit.original]
        path = GALLERY_DIR / f"{edit.name}.jpg"
        save_jpeg(edit.transform(originals[src.id]), path, quality=edit.quality)
        db.append(
            {
                "id": edit.name,
                "url": path.relative_to(DB_PATH.parent).as_posix(),
                "title": f"{src.title} (edited copy)",
                "licence": src.licence,
                "source": f"derived from '{src.id}' by scripts/make_demo_gallery.py; original: {src.source}",
                "edit": edit.edit,
                "original": src.id,
            }
        )

    for query in QUERIES:
        out = query.transform(originals[query.original])
        save_jpeg(out, QUERY_DIR / f"{query.name}.jpg", quality=query.quality)

    DB_PATH.write_text(json.dumps(db, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    print(f"wrote {len(SOURCES)} originals + {len(EDITS)} edits to {GALLERY_DIR.relative_to(REPO_ROOT)}/")
    print(f"wrote {len(QUERIES)} queries to {QUERY_DIR.relative_to(REPO_ROOT)}/")
    for query in QUERIES:
        print(f"  demo/queries/{query.name}.jpg -> should match '{query.original}' ({query.edit})")
    print(f"wrote {DB_PATH.relative_to(REPO_ROOT)} ({len(db)} entries); demo/ total {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
