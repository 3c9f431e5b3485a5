"""decode_image/probe_image against a corpus of hostile and exotic inputs, all built in code."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from pictrace.decode import ALLOWED_FORMATS, DecodedImage, decode_image, probe_image
from pictrace.errors import DecodeError, TooLargeError, UnsupportedFormatError

MAX = 50_000_000
RED = (255, 0, 0)
BLUE = (0, 0, 255)
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _save(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise_rgb(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    # blocky noise: compresses to a JPEG with real content all the way through
    return np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w])


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _png_bomb(side: int) -> bytes:
    """A genuine, valid 1-bit PNG of side x side zeros: a few hundred KiB that inflates to side**2 pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    chunks = [comp.compress(row * 1000) for _ in range(side // 1000)]
    chunks.append(comp.compress(row * (side % 1000)))
    chunks.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = b"".join(chunks)
    return PNG_SIG + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _gif_header_only(width: int, height: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    image = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + image + b"\x08\x02\x4c\x01\x00;"


def _corrupt_png() -> bytes:
    data = bytearray(_save(Image.fromarray(_noise_rgb()), "PNG"))
    start = data.index(b"IDAT") + 4
    for i in range(start + 20, start + 60):
        data[i] ^= 0xFF
    return bytes(data)


# --------------------------------------------------------------------------------------------- bad inputs

BAD_INPUTS: list[tuple[str, bytes, type[Exception]]] = [
    ("empty", b"", UnsupportedFormatError),
    ("text", b"just some text, not an image\n" * 10, UnsupportedFormatError),
    ("html", b"<!DOCTYPE html><html><body><img src='x.png'></body></html>", UnsupportedFormatError),
    (
        "svg",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        b'<rect width="10" height="10" fill="red"/></svg>',
        UnsupportedFormatError,
    ),
    ("pdf", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", UnsupportedFormatError),
    ("ico", _save(Image.new("RGB", (16, 16), RED), "ICO"), UnsupportedFormatError),
    ("random", np.random.default_rng(1).bytes(4096), UnsupportedFormatError),
    ("png signature only", b"\x89PNG\r\n\x1a\n", DecodeError),
    ("truncated png", _save(Image.fromarray(_noise_rgb()), "PNG")[:300], DecodeError),
    ("corrupt png idat", _corrupt_png(), DecodeError),
    ("png header 65535x65535", _png_header_only(65535, 65535), TooLargeError),
    ("gif header 65535x65535", _gif_header_only(65535, 65535), TooLargeError),
    ("png header 0x0", _png_header_only(0, 0), DecodeError),
]


@pytest.mark.parametrize(("name", "data", "error"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_exact_error(name: str, data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_image(data, max_pixels=MAX)


def test_truncated_jpeg_is_decode_error() -> None:
    # the guarantee comes from .load(), not from this flag being flipped
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = _save(Image.fromarray(_noise_rgb(256, 256)), "JPEG", quality=90)
    with pytest.raises(DecodeError):
        decode_image(data[: len(data) // 2], max_pixels=MAX)


def test_unsupported_message_says_what_and_what_is_accepted() -> None:
    with pytest.raises(UnsupportedFormatError) as info:
        decode_image(BAD_INPUTS[3][1], max_pixels=MAX)
    assert "SVG" in str(info.value)
    assert "PNG" in str(info.value)
    assert "JPEG" in str(info.value)


def test_png_bomb_refused_from_header_without_decoding() -> None:
    bomb = _png_bomb(30_000)
    assert len(bomb) < 1_000_000  # tiny on the wire, 900 megapixels inflated
    start = time.perf_counter()
    with pytest.raises(TooLargeError):
        decode_image(bomb, max_pixels=50_000_000)
    with pytest.raises(TooLargeError):
        probe_image(bomb, max_pixels=50_000_000)
    assert time.perf_counter() - start < 1.0


def test_header_bomb_refused_by_probe() -> None:
    with pytest.raises(TooLargeError):
        probe_image(_png_header_only(65535, 65535), max_pixels=MAX)
    with pytest.raises(TooLargeError):
        probe_image(_gif_header_only(65535, 65535), max_pixels=MAX)


def test_small_max_pixels_refuses_modest_image() -> None:
    data = _save(Image.new("RGB", (200, 200), RED), "PNG")
    with pytest.raises(TooLargeError):
        decode_image(data, max_pixels=10_000)
    assert decode_image(data, max_pixels=40_000).rgb.shape == (200, 200, 3)


def test_pillow_global_limit_is_untouched() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(TooLargeError):
        decode_image(_png_header_only(65535, 65535), max_pixels=MAX)
    assert before == Image.MAX_IMAGE_PIXELS


# -------------------------------------------------------------------------------------------- good inputs


def _decode(data: bytes) -> DecodedImage:
    out = decode_image(data, max_pixels=MAX)
    assert out.rgb.dtype == np.uint8
    assert out.rgb.ndim == 3
    assert out.rgb.shape == (out.height, out.width, 3)
    assert out.rgb.flags["C_CONTIGUOUS"]
    assert out.format in ALLOWED_FORMATS
    return out


def test_probe_reports_format_and_size() -> None:
    data = _save(Image.new("RGB", (30, 20), RED), "PNG")
    assert probe_image(data, max_pixels=MAX) == ("PNG", 30, 20)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    data = _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    out = _decode(data)
    assert out.format == "JPEG"
    assert np.abs(out.rgb.astype(int) - RED).max() <= 3


def test_16bit_png_is_scaled_not_clipped() -> None:
    arr = np.zeros((8, 12), dtype=np.uint16)
    arr[:, 4:8] = 128 * 257
    arr[:, 8:] = 65535
    data = _save(Image.fromarray(arr), "PNG")
    out = _decode(data)
    assert out.rgb.shape == (8, 12, 3)
    assert (out.rgb[:, :4] == 0).all()
    assert (out.rgb[:, 4:8] == 128).all()
    assert (out.rgb[:, 8:] == 255).all()


def test_16bit_tiff_is_scaled() -> None:
    arr = np.full((6, 6), 1000 * 257 // 4, dtype=np.uint16)  # 64250 -> 250
    assert (_decode(_save(Image.fromarray(arr), "TIFF")).rgb == 250).all()


def test_float_tiff_in_unit_range_is_scaled() -> None:
    arr = np.full((4, 4), 0.5, dtype=np.float32)
    arr[0, 0] = 1.0
    out = _decode(_save(Image.fromarray(arr, mode="F"), "TIFF"))
    assert tuple(out.rgb[0, 0]) == (255, 255, 255)
    assert tuple(out.rgb[1, 1]) == (128, 128, 128)


def test_rgba_png_transparent_pixels_become_white() -> None:
    arr = np.zeros((10, 10, 4), dtype=np.uint8)
    arr[:, :5] = (255, 0, 0, 0)  # fully transparent red -> white
    arr[:, 5:] = (0, 0, 255, 255)  # opaque blue stays blue
    arr[0, 9] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = _decode(_save(Image.fromarray(arr, mode="RGBA"), "PNG"))
    assert (out.rgb[:, :5] == 255).all()
    assert tuple(out.rgb[5, 7]) == BLUE
    assert all(120 <= v <= 135 for v in out.rgb[0, 9])


def test_la_png_composited_on_white() -> None:
    arr = np.zeros((4, 4, 2), dtype=np.uint8)  # black, fully transparent
    out = _decode(_save(Image.fromarray(arr, mode="LA"), "PNG"))
    assert (out.rgb == 255).all()


def test_palette_png_with_transparency() -> None:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    im.paste(1, (4, 0, 8, 8))
    out = _decode(_save(im, "PNG", transparency=0))
    assert (out.rgb[:, :4] == 255).all()  # index 0 is transparent
    assert (out.rgb[:, 4:] == (0, 255, 0)).all()


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = _decode(data)
    assert out.format == "GIF"
    assert (out.rgb == RED).all()


def test_gif_transparency_is_white() -> None:
    im = Image.new("P", (8, 8), 1)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.paste(0, (0, 0, 4, 8))
    out = _decode(_save(im, "GIF", transparency=0))
    assert (out.rgb[:, :4] == 255).all()
    assert (out.rgb[:, 4:] == BLUE).all()


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("PNG", {}), ("GIF", {})],
)
def test_lossless_formats_roundtrip_exact(fmt: str, kwargs: dict[str, object]) -> None:
    arr = np.zeros((12, 20, 3), dtype=np.uint8)
    arr[:6] = RED
    arr[6:, 10:] = BLUE
    out = _decode(_save(Image.fromarray(arr), fmt, **kwargs))
    assert out.format == fmt
    assert (out.width, out.height) == (20, 12)
    np.testing.assert_array_equal(out.rgb, arr)


def test_lossy_webp_decodes() -> None:
    out = _decode(_save(Image.new("RGB", (40, 30), BLUE), "WEBP", quality=80))
    assert out.format == "WEBP"
    assert np.abs(out.rgb.astype(int) - BLUE).max() <= 6


def test_mpo_first_image() -> None:
    frames = [Image.new("RGB", (32, 24), RED), Image.new("RGB", (32, 24), BLUE)]
    data = _save(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)
    out = _decode(data)
    assert out.format == "MPO"
    assert np.abs(out.rgb.astype(int) - RED).max() <= 3


def test_exif_orientation_6_rotates_clockwise() -> None:
    green, white = (0, 255, 0), (255, 255, 255)
    # H=32, W=48 quadrants: TL red, TR blue, BL green, BR white
    stored = np.zeros((32, 48, 3), dtype=np.uint8)
    stored[:16, :24], stored[:16, 24:], stored[16:, :24], stored[16:, 24:] = RED, BLUE, green, white
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(Image.fromarray(stored), "JPEG", quality=98, exif=exif)
    assert probe_image(data, max_pixels=MAX) == ("JPEG", 48, 32)  # header size, before orientation
    out = _decode(data)
    assert (out.width, out.height) == (32, 48)
    expected = np.rot90(stored, k=-1)  # 90° clockwise: TL green, TR red, BR blue, BL white
    for y, x in [(6, 6), (6, 26), (40, 6), (40, 26)]:  # quadrant interiors, clear of JPEG edge ringing
        assert np.abs(out.rgb[y, x].astype(int) - expected[y, x].astype(int)).max() <= 12
    assert np.abs(out.rgb[6, 6].astype(int) - green).max() <= 12
    assert np.abs(out.rgb[6, 26].astype(int) - RED).max() <= 12
    assert np.abs(out.rgb[40, 26].astype(int) - BLUE).max() <= 12
    assert np.abs(out.rgb[40, 6].astype(int) - white).max() <= 12


def test_grayscale_and_one_bit() -> None:
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    out = _decode(_save(Image.fromarray(gray, mode="L"), "PNG"))
    np.testing.assert_array_equal(out.rgb, np.repeat(gray[:, :, None], 3, axis=2))
    bits = Image.new("1", (8, 8), 0)
    bits.paste(1, (0, 0, 4, 8))
    out = _decode(_save(bits, "PNG"))
    assert (out.rgb[:, :4] == 255).all()
    assert (out.rgb[:, 4:] == 0).all()


# ----------------------------------------------------------------------------------------------- fuzzing

_SEEDS: list[bytes] = [
    _save(Image.fromarray(_noise_rgb(24, 32, 3)), "PNG"),
    _save(Image.fromarray(_noise_rgb(24, 32, 4)), "JPEG", quality=80),
    _save(Image.fromarray(_noise_rgb(24, 32, 5)).convert("P"), "GIF"),
    _save(Image.fromarray(_noise_rgb(16, 16, 6)), "BMP"),
    _save(Image.fromarray(_noise_rgb(16, 16, 7)), "TIFF"),
    _save(Image.fromarray(_noise_rgb(16, 16, 8)), "WEBP", quality=70),
]

_mutation: st.SearchStrategy[Mutation] = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 64)),
)


Mutation = tuple[str, int, int | bytes]


def _mutate(data: bytes, mutations: Sequence[Mutation]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in mutations:
        if not buf:
            break
        i = pos % len(buf)
        if kind == "insert" and isinstance(arg, bytes):
            buf[i:i] = arg
        elif kind == "cut":
            del buf[i:]
        elif isinstance(arg, int):
            if kind == "flip":
                buf[i] ^= arg
            else:
                del buf[i : i + arg]
    return bytes(buf)


def _apply(case: tuple[bytes, list[Mutation]]) -> bytes:
    return _mutate(*case)


_inputs = st.one_of(
    st.tuples(st.sampled_from(_SEEDS), st.lists(_mutation, min_size=1, max_size=6)).map(_apply),
    st.binary(max_size=2048),
    st.sampled_from(_SEEDS).flatmap(lambda s: st.binary(max_size=64).map(lambda tail: s[:16] + tail)),
)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF/TIFF tags we feed it
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_inputs)
def test_fuzz_never_raises_anything_else(data: bytes) -> None:
    try:
        out = decode_image(data, max_pixels=2_000_000)
    except (UnsupportedFormatError, DecodeError, TooLargeError):
        return
    assert isinstance(out, DecodedImage)
    assert out.rgb.dtype == np.uint8
    assert out.rgb.ndim == 3
    assert out.rgb.shape == (out.height, out.width, 3)
    assert out.width * out.height <= 2_000_000
    assert out.rgb.flags["C_CONTIGUOUS"]


# ------------------------------------------------------------------------- phone and web formats: HEIF, AVIF


def _phone(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """HEIF written by pillow-heif (the plugin PicTrace reads it with), AVIF by Pillow's own plugin."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    return _save(im, fmt, **kwargs)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heif_and_avif_decode(fmt: str) -> None:
    data = _phone(Image.fromarray(_noise_rgb(96, 128)), fmt, quality=95)
    assert probe_image(data, max_pixels=MAX) == (fmt, 128, 96)
    out = _decode(data)
    assert out.format == fmt and (out.width, out.height) == (128, 96)
    # lossy, but the same picture: blocky noise survives with a small mean error
    assert np.abs(out.rgb.astype(int) - _noise_rgb(96, 128)).mean() < 12


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heif_and_avif_exif_orientation_6_rotates_clockwise(fmt: str) -> None:
    green, white = (0, 255, 0), (255, 255, 255)
    stored = np.zeros((32, 48, 3), dtype=np.uint8)
    stored[:16, :24], stored[:16, 24:], stored[16:, :24], stored[16:, 24:] = RED, BLUE, green, white
    exif = Image.Exif()
    exif[0x0112] = 6  # what a phone held upright writes
    out = _decode(_phone(Image.fromarray(stored), fmt, quality=98, exif=exif.tobytes()))
    assert (out.width, out.height) == (32, 48)
    for (y, x), colour in zip([(6, 6), (6, 26), (40, 26), (40, 6)], [green, RED, BLUE, white], strict=True):
        assert np.abs(out.rgb[y, x].astype(int) - colour).max() <= 40, (y, x, out.rgb[y, x])


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heif_and_avif_alpha_is_white(fmt: str) -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)  # left opaque red, right fully transparent
    out = _decode(_phone(Image.fromarray(rgba), fmt, quality=98))
    assert np.abs(out.rgb[16, 4].astype(int) - RED).max() <= 30
    assert (out.rgb[16, 28].astype(int) >= 225).all()


def test_heif_with_several_images_gives_the_first() -> None:
    frames = [Image.new("RGB", (64, 48), RED), Image.new("RGB", (64, 48), BLUE)]
    out = _decode(_phone(frames[0], "HEIF", save_all=True, append_images=frames[1:], quality=95))
    assert np.abs(out.rgb[10, 10].astype(int) - RED).max() <= 12


def test_heif_over_the_pixel_cap_is_refused_from_the_header() -> None:
    data = _phone(Image.fromarray(_noise_rgb(1200, 1600)), "HEIF", quality=50)
    start = time.perf_counter()
    with pytest.raises(TooLargeError):
        probe_image(data, max_pixels=1_000_000)
    with pytest.raises(TooLargeError):
        decode_image(data, max_pixels=1_000_000)
    assert time.perf_counter() - start < 1.0  # generous: the header is a few hundred bytes of boxes


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_truncated_heif_and_avif_are_decode_errors(fmt: str) -> None:
    data = _phone(Image.fromarray(_noise_rgb(128, 128)), fmt, quality=90)
    with pytest.raises(DecodeError):
        decode_image(data[: len(data) // 2], max_pixels=MAX)


@pytest.mark.parametrize(("orientation", "size"), [(1, (3000, 2000)), (6, (2000, 3000))])
def test_a_large_jpeg_is_decoded_smaller_but_keeps_the_pictures_size(orientation: int, size: tuple[int, int]) -> None:
    """Draft mode saves the pixels, not the truth: width and height stay the file's (after EXIF orientation),
    and ``scale`` says how many decoded pixels there are per picture pixel."""
    rgb = np.random.default_rng(3).integers(0, 255, (2000, 3000, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(rgb), "JPEG", quality=90, exif=exif)
    out = decode_image(data, max_pixels=MAX, draft_min_side=1280)
    assert (out.width, out.height) == size
    assert max(out.rgb.shape[:2]) < 3000 and max(out.rgb.shape[:2]) >= 1280
    assert (out.rgb.shape[0] > out.rgb.shape[1]) == (size[1] > size[0])
    assert out.scale == pytest.approx(out.rgb.shape[1] / size[0])
    full = decode_image(data, max_pixels=MAX)
    assert (full.width, full.height, full.scale) == (*size, 1.0) and full.rgb.shape[:2] == size[::-1]
