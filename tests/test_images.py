"""Image validation and normalisation: format from bytes, JPEGs kept byte-for-byte, everything else re-encoded once
to RGB JPEG, bad input rejected with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dino_model.data.images import (
    BOMB,
    CORRUPT,
    NOT_AN_IMAGE,
    TRUNCATED,
    ZERO_BYTE,
    ImageOptions,
    looks_like_image,
    prepare_image,
)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(mode: str, size=(48, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, size=(size[1], size[0], bands), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if bands == 1 else arr, mode)


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_rgb_and_greyscale_jpeg_kept_byte_for_byte(mode):
    data = _encode(_noise(mode), "JPEG", quality=80)
    out = prepare_image(data)
    assert out.ok and not out.reencoded
    assert out.data == data
    assert (out.width, out.height) == (48, 32)


def test_cmyk_jpeg_reencoded_to_rgb():
    data = _encode(_noise("CMYK"), "JPEG")
    out = prepare_image(data, ImageOptions(quality=90))
    assert out.ok and out.reencoded and out.source_format == "JPEG"
    img = _decode(out.data)
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (48, 32)


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGBA", "PNG"), ("RGB", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP"),
     ("RGB", "GIF"), ("RGB", "TIFF")],
)
def test_other_formats_reencoded_to_rgb_jpeg(mode, fmt):
    img = _noise("RGBA" if mode in ("RGBA", "LA") else "RGB").convert(mode)
    out = prepare_image(_encode(img, fmt))
    assert out.ok, out.reject
    assert out.reencoded and out.source_format == fmt
    decoded = _decode(out.data)
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and decoded.size == (48, 32)


def test_alpha_composited_on_white():
    img = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black
    out = prepare_image(_encode(img, "PNG"))
    assert np.asarray(_decode(out.data)).min() > 240  # white, not black


def test_16bit_greyscale_png_scaled():
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    out = prepare_image(_encode(img, "PNG"))
    assert out.ok and out.reencoded
    assert np.asarray(_decode(out.data)).min() > 240


def test_format_detected_from_bytes_not_extension():
    # A PNG is a PNG whatever the caller thinks: prepare_image never sees a file name.
    out = prepare_image(_encode(_noise("RGB"), "PNG"))
    assert out.source_format == "PNG" and out.reencoded


def test_quality_is_applied():
    img = _noise("RGB", (64, 64))
    low = prepare_image(_encode(img, "PNG"), ImageOptions(quality=10))
    high = prepare_image(_encode(img, "PNG"), ImageOptions(quality=95))
    assert len(low.data) < len(high.data)


def test_reencoding_is_deterministic():
    data = _encode(_noise("RGBA"), "PNG")
    assert prepare_image(data).data == prepare_image(data).data


def _reason(data: bytes, **kw) -> str:
    out = prepare_image(data, ImageOptions(**kw))
    assert not out.ok
    return out.reject


def test_bad_inputs_rejected_with_reason():
    jpeg = _encode(_noise("RGB", (64, 64)), "JPEG")
    assert _reason(b"").startswith(ZERO_BYTE)
    assert _reason(b"hello, this is a text file\n" * 10).startswith(NOT_AN_IMAGE)
    assert _reason(jpeg[: len(jpeg) // 2]).startswith(TRUNCATED)
    # JPEG signature followed by garbage: recognised as JPEG, undecodable.
    assert _reason(jpeg[:3] + bytes(range(256)) * 4).startswith(CORRUPT)
    png = _encode(_noise("RGB"), "PNG")
    assert _reason(png[:40]).startswith(CORRUPT)  # a PNG signature whose header is cut: corrupt, not "not an image"


def test_decompression_bomb_rejected_before_decoding():
    # A 10000x10000 PNG of zeros compresses to a few KB but would need 300 MB decoded.
    data = _encode(Image.new("L", (10000, 10000)), "PNG")
    assert len(data) < 1 << 20
    reason = _reason(data, max_pixels=50_000_000)
    assert reason.startswith(BOMB) and "10000x10000" in reason
    assert prepare_image(_encode(_noise("RGB", (100, 100)), "PNG"), ImageOptions(max_pixels=10_000)).ok
    assert _reason(_encode(_noise("RGB", (100, 101)), "PNG"), max_pixels=10_000).startswith(BOMB)


def test_options_validated():
    with pytest.raises(ValueError, match="quality"):
        ImageOptions(quality=0)
    with pytest.raises(ValueError, match="max_pixels"):
        ImageOptions(max_pixels=0)


def test_looks_like_image():
    assert looks_like_image(_encode(_noise("RGB"), "JPEG")[:16])
    assert looks_like_image(_encode(_noise("RGB"), "WEBP")[:16])
    assert not looks_like_image(b"%PDF-1.4 ....")
