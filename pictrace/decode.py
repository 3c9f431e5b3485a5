"""Untrusted bytes -> 8-bit RGB pixels, safely.

Everything PicTrace indexes or searches comes through here, from uploads and from arbitrary URLs, so this
module is the one place that decides what counts as an image. It:

* accepts only an allow-list of raster formats (Pillow is told to try only those plugins, so exotic or
  script-driven decoders such as EPS never see untrusted data); HEIF/HEIC (phones) comes from the
  pillow-heif plugin, AVIF from Pillow's own plugin;
* checks ``width * height`` against ``max_pixels`` from the header, before a single pixel is decoded, so a
  tiny file claiming 65535x65535 pixels (a decompression bomb) costs nothing;
* forces the full decode (``.load()``) so truncation is an error, never a silently grey image
  (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set here);
* normalises every colour mode (palette, CMYK, 16-bit, float, 1-bit, alpha) to 8-bit RGB, with transparent
  pixels composited onto white, and applies the EXIF orientation so a phone photo matches its rotated copy;
* decodes a large JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, Pillow's draft mode) when that
  still leaves ``draft_min_side`` pixels on its longest side, and reduces other large images right after their
  decode: every feature works on 640 px or less, so a 50 MP photo costs a 3 MP decode, not 150 MB of pixels
  copied through each feature;
* says what a decode will cost in pixels before it runs (:func:`decode_cost`), so concurrent decodes can be
  bounded by pixels, not by count;
* raises only :class:`TooLargeError`, :class:`UnsupportedFormatError` or :class:`DecodeError` for bad input.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pictrace.errors import DecodeError, TooLargeError, UnsupportedFormatError

log = logging.getLogger(__name__)

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "HEIF", "AVIF"})

_ACCEPTED = ", ".join(sorted(ALLOWED_FORMATS))
# Pillow plugin names to try when opening; MPO is opened by the JPEG plugin's factory.
_PLUGINS = tuple(sorted(ALLOWED_FORMATS - {"MPO"}))
_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "RGBa", "PA"})
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;16S"})

# ``warnings.catch_warnings`` swaps process-global state; serialise our (cheap, header-only) use of it so two
# decoder threads cannot restore each other's filters.
_WARNINGS_LOCK = threading.Lock()
_REGISTER_LOCK = threading.Lock()
_available: tuple[str, ...] | None = None


def _plugins() -> tuple[str, ...]:
    """The allowed formats' Pillow plugins that this install has, HEIF taught to Pillow on first use (not at
    import). Thumbnails, depth maps and auxiliary images are not parsed: only the primary image is wanted,
    and less of an untrusted file is read. A plugin missing (a Pillow without libavif, no pillow-heif) costs
    its format only: Pillow fails every open when asked for a plugin it does not know."""
    global _available
    if _available is None:
        with _REGISTER_LOCK:
            if _available is None:
                try:
                    from pillow_heif import register_heif_opener

                    register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
                except ImportError as exc:
                    log.warning("HEIF/HEIC images will be refused: %s (pip install -r requirements.txt)", exc)
                Image.init()
                _available = tuple(p for p in _PLUGINS if p in Image.OPEN)
    return _available


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """Decoded pixels plus what the header said; width/height are the picture's own (after EXIF orientation),
    whatever size ``rgb`` was decoded at, so that what is reported (sizes, crop boxes) is in the file's pixels."""

    rgb: np.ndarray  # (H, W, 3) uint8, C-contiguous
    format: str
    width: int
    height: int
    scale: float = 1.0  # rgb pixels per picture pixel: below 1 for a large image decoded smaller


def sniff(data: bytes) -> str | None:
    """Best-effort name of what the bytes are, for error messages and for 'allowed but corrupt' decisions."""
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return "ICO"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
        return "an ISO media file (video?)"
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG 2000"
    text = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text or (text.startswith(b"<?xml") and b"svg" in text):
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:256]:
        return "HTML"
    if text.startswith(b"<"):
        return "XML/markup"
    if text[:1] in (b"{", b"["):
        return "JSON/text"
    try:
        sample = data[:1024].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if sample and sum(ch.isprintable() or ch in "\r\n\t" for ch in sample) >= 0.95 * len(sample):
        return "text"
    return None


def _unsupported(data: bytes, sniffed: str | None) -> UnsupportedFormatError:
    if not data:
        what = "empty body (0 bytes)"
    elif sniffed is not None:
        what = sniffed
    else:
        what = f"unrecognised binary data ({len(data)} bytes, starting {data[:8].hex()})"
    return UnsupportedFormatError(f"not a supported image: received {what}; accepted formats: {_ACCEPTED}")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"image header declares an empty size {width}x{height}")
    if width * height > max_pixels:
        msg = f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
        raise TooLargeError(msg)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse only the header, with the format allow-list and Pillow's bomb guard turned into our errors."""
    if not data:
        raise _unsupported(data, None)
    sniffed = sniff(data)
    if sniffed is not None and sniffed not in ALLOWED_FORMATS:
        # Known non-allowed formats never reach a decoder at all.
        raise _unsupported(data, sniffed)
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that. Below our own limit the warning is
    # noise; when the operator's limit is stricter than Pillow's the warning is a bomb and is an error.
    action: Literal["error", "ignore"] = "error" if max_pixels <= (Image.MAX_IMAGE_PIXELS or 0) else "ignore"
    plugins = _plugins()
    if sniffed in ("HEIF", "AVIF") and sniffed not in plugins:
        raise UnsupportedFormatError(f"{sniffed} is not decoded by this install (see requirements.txt)")
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter(action, Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=plugins)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        if sniffed in ALLOWED_FORMATS:
            raise DecodeError(f"corrupt {sniffed} data: the header cannot be parsed") from exc
        raise _unsupported(data, sniffed) from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's header parsers raise a zoo of types on hostile input.
        raise DecodeError(f"corrupt {sniffed or 'image'} header: {type(exc).__name__}: {exc}") from exc
    if im.format not in ALLOWED_FORMATS:
        raise _unsupported(data, im.format)
    _check_pixels(im.width, im.height, max_pixels)
    return im


_DRAFTABLE = frozenset({"JPEG", "MPO"})
_REDUCIBLE_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "CMYK", "YCbCr"})


def _reduction(fmt: str | None, width: int, height: int, draft_min_side: int) -> int:
    """The power of two (1, 2, 4, 8) a JPEG is decoded smaller by, keeping ``draft_min_side`` on its long side."""
    if not draft_min_side or fmt not in _DRAFTABLE:
        return 1
    reduction = 1
    while reduction < 8 and max(width, height) // (reduction * 2) >= draft_min_side:
        reduction *= 2
    return reduction


def decode_cost(data: bytes, *, max_pixels: int, draft_min_side: int = 0) -> int:
    """The pixels a decode of ``data`` will hold, from its header alone (raises as :func:`decode_image` would
    for an unsupported format or an image over ``max_pixels``)."""
    fmt, width, height = probe_image(data, max_pixels=max_pixels)
    reduction = _reduction(fmt, width, height, draft_min_side)
    return max(1, (width // reduction) * (height // reduction))


def probe_image(data: bytes, *, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) from the header alone: cheap admission control before any pixel work.

    The size is the stored one, before EXIF orientation (reading orientation can require a decode); HEIF
    reports it already turned as its ``irot`` box says.
    """
    with _open(data, max_pixels) as im:
        return str(im.format), im.width, im.height


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by rounding division (65535 -> 255, not clipped)."""
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _high_bit_to_gray8(im: Image.Image) -> np.ndarray:
    """Scale 16-bit, 32-bit int and float grayscale to uint8 instead of clipping (which Pillow would do)."""
    arr = np.asarray(im)
    if im.mode == "F":
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            out = values * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            out = values
        elif hi > lo:
            out = (values - lo) * (255.0 / (hi - lo))
        else:
            out = np.zeros_like(values)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    wide = arr.astype(np.int64)
    lo, hi = int(wide.min()), int(wide.max())
    if lo >= 0 and hi <= 65535:  # what 16-bit PNG/TIFF ("I;16", often widened to "I") carry
        return _scale_16bit(wide)
    if hi == lo:
        return np.zeros(wide.shape, dtype=np.uint8)
    return ((wide - lo) * 255 // (hi - lo)).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8, alpha composited onto white."""
    mode = im.mode
    transparency = im.info.get("transparency")
    if mode in _HIGH_BIT_MODES:
        gray = _high_bit_to_gray8(im)
        if isinstance(transparency, int):  # a tRNS colour key on a 16-bit grayscale PNG
            gray[np.asarray(im) == transparency] = 255
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or transparency is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb_im = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode == "RGB":
        rgb_im = im
    else:  # P, L, 1, CMYK, YCbCr, LAB, HSV, ...
        rgb_im = im.convert("RGB")
    return np.array(rgb_im, dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int, draft_min_side: int = 0) -> DecodedImage:
    """Decode the first frame of an allowed image to RGB, refusing oversized or malformed input.

    ``draft_min_side`` (0: never): an image whose longest side is at least twice this is returned smaller, keeping
    at least this many pixels on that side: a JPEG is decoded at 1/2, 1/4 or 1/8 scale, anything else is reduced
    by an integer box filter right after its decode (every feature works on 640 px or less, and full-size copies
    of a 50 MP image cost 150 MB each). Its width and height stay the picture's, and ``scale`` says how much
    smaller ``rgb`` is, so that sizes and crop boxes are reported in the file's pixels.
    """
    im = _open(data, max_pixels)
    fmt = str(im.format)
    full = (im.width, im.height)  # before any reduction; swapped below if EXIF turns the picture
    try:
        reduction = _reduction(fmt, im.width, im.height, draft_min_side)
        if reduction > 1:
            im.draft(im.mode, (im.width // reduction, im.height // reduction))
        try:
            im.load()  # forces the full decode, so truncation is detected here and not later
        except Image.DecompressionBombError as exc:
            raise TooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
        except MemoryError:
            raise
        except Exception as exc:  # OSError, SyntaxError, ValueError, EOFError, struct.error, ...
            raise DecodeError(f"cannot decode {fmt} data: {type(exc).__name__}: {exc}") from exc
        stored = (im.width, im.height)
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except MemoryError:
            raise
        except Exception:  # malformed EXIF must not cost us the picture: keep the stored orientation
            pass
        if (im.width, im.height) != stored:
            full = (full[1], full[0])
        try:
            _check_pixels(im.width, im.height, max_pixels)
            shrink = max(im.width, im.height) // draft_min_side if draft_min_side else 1
            if shrink >= 2 and im.mode in _REDUCIBLE_MODES:
                with im.reduce(shrink) as small:  # box-filtered: no full-size RGB copy is ever made
                    rgb = _to_rgb(small)
            else:
                rgb = _to_rgb(im)
                if shrink >= 2:
                    with Image.fromarray(rgb).reduce(shrink) as small:
                        rgb = np.asarray(small)
        except (TooLargeError, DecodeError, MemoryError):
            raise
        except Exception as exc:
            raise DecodeError(f"cannot convert {fmt} image in mode {im.mode} to RGB: {exc}") from exc
    finally:
        im.close()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DecodeError(f"decoded {fmt} image has an unexpected shape {rgb.shape}")
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.shape[1] == full[0]:
        return DecodedImage(rgb=rgb, format=fmt, width=int(rgb.shape[1]), height=int(rgb.shape[0]))
    return DecodedImage(rgb=rgb, format=fmt, width=full[0], height=full[1], scale=rgb.shape[1] / full[0])
