"""Turn the bytes of one input file into the bytes that go into a shard — or a reason to reject it.

The format is detected from the bytes (Pillow's signature checks), never from the file name. What is stored:

* an RGB or greyscale JPEG: the source bytes, unchanged (no generation loss, and the round trip is byte-exact);
* anything else Pillow can read — a CMYK/YCCK JPEG, PNG with or without alpha, WebP, GIF, BMP, TIFF, 16-bit
  greyscale — re-encoded **once** to an RGB JPEG at a recorded quality (alpha composited onto white).

Every image is validated by actually decoding it (a truncated or corrupt file must not reach training), after a
pixel-count check on the header so a decompression bomb is refused before any pixel is allocated.

    >>> result = prepare_image(open("x.png", "rb").read(), ImageOptions(quality=95))
    >>> result.ok, result.reencoded, result.width, result.height
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

# Reject categories: the first word of every ``Reject.reason`` (the rest is detail for a human).
ZERO_BYTE = "zero-byte"
NOT_AN_IMAGE = "not-an-image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
BOMB = "decompression-bomb"
UNREADABLE = "unreadable"

#: Pillow's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS``): ~179 megapixels. ImageNet's largest image is ~30 MP.
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_QUALITY = 95

# JPEG modes kept byte-for-byte (Pillow reports greyscale JPEGs as "L"); everything else is re-encoded.
_KEPT_JPEG_MODES = {"RGB", "L"}
# MPO is a camera's multi-picture JPEG: its bytes open as the first picture in every JPEG decoder.
_JPEG_FORMATS = {"JPEG", "MPO"}


@dataclass(frozen=True)
class ImageOptions:
    """How images are validated and (re-)encoded."""

    quality: int = DEFAULT_QUALITY  #: JPEG quality (1-95) used when an image must be re-encoded
    max_pixels: int = DEFAULT_MAX_PIXELS  #: width x height above which an image is rejected as a decompression bomb

    def __post_init__(self):
        if not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be an integer in 1..100, got {self.quality!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")


@dataclass(frozen=True)
class PreparedImage:
    """The outcome for one input: ``data`` (JPEG bytes) and its size, or ``reject`` (a reason)."""

    data: bytes = b""
    width: int = 0
    height: int = 0
    reencoded: bool = False
    source_format: str = ""  #: what the bytes were detected as (``JPEG``, ``PNG``, ...)
    reject: str = ""  #: ``"<category>: <detail>"`` when the input is refused

    @property
    def ok(self) -> bool:
        return not self.reject


def _reject(category: str, detail: str = "") -> PreparedImage:
    return PreparedImage(reject=f"{category}: {detail}" if detail else category)


def _open(data: bytes) -> Image.Image:
    # JPEG is by far the common case: open it with its plugin directly rather than letting Image.open try
    # every registered format in turn (saves ~30% of the per-image cost on small images).
    if data[:3] == b"\xff\xd8\xff":
        return JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    return Image.open(io.BytesIO(data))


def prepare_image(data: bytes, options: ImageOptions = ImageOptions()) -> PreparedImage:
    """Validate ``data`` by decoding it and return the bytes to store, or a reject reason. Never raises for bad
    input (only for programming errors)."""
    if not data:
        return _reject(ZERO_BYTE, "file is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and at 2x errors) on huge images; we apply our own limit below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open(data)
            width, height = img.size
            if width * height > options.max_pixels:
                return _reject(BOMB, f"{width}x{height} = {width * height} pixels > max_pixels {options.max_pixels}")
            if width < 1 or height < 1:
                return _reject(CORRUPT, f"invalid size {width}x{height}")
            fmt = img.format or "unknown"
            keep = fmt in _JPEG_FORMATS and img.mode in _KEPT_JPEG_MODES
            if keep:
                # A kept JPEG's pixels are not needed here, only the proof that it decodes: libjpeg's DCT scaling
                # still entropy-decodes the whole stream (so truncation and broken data still raise) but skips
                # most of the inverse DCT and colour conversion.
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()  # the real validation: decode the image (raises on truncated or broken data)
    except Image.DecompressionBombError as e:
        return _reject(BOMB, str(e))
    except UnidentifiedImageError:
        if looks_like_image(data[:16]):  # an image signature Pillow could not get past: a damaged header
            return _reject(CORRUPT, "image signature present but the header cannot be read")
        return _reject(NOT_AN_IMAGE, "no known image signature")
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg or isinstance(e, EOFError):
            return _reject(TRUNCATED, msg)
        return _reject(CORRUPT, msg)

    if keep:
        return PreparedImage(data, width, height, reencoded=False, source_format=fmt)
    try:
        out = _encode_rgb_jpeg(img, options.quality)
    except (OSError, ValueError, SyntaxError) as e:  # e.g. an exotic mode Pillow cannot convert
        return _reject(CORRUPT, f"cannot convert {fmt} mode {img.mode} to RGB: {e}")
    return PreparedImage(out, width, height, reencoded=True, source_format=fmt)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: alpha composited onto white, 16-bit greyscale scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        # 16-bit data (PNG's I;16, or "I" holding 16-bit values) keeps its top byte; 8-bit-range data stays.
        arr = arr >> 8 if arr.max(initial=0) > 255 else arr
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _encode_rgb_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # No EXIF/ICC copied: the pixels are what training sees; quality is recorded in the sample's json.
    to_rgb(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# Signatures of the formats Pillow reads that we expect in datasets; used only for the cheap "is there any image
# at all" pre-flight check (the real detection is Pillow's, in prepare_image).
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)


def looks_like_image(head: bytes) -> bool:
    """Whether the first bytes of a file carry a known image signature (JPEG, PNG, GIF, BMP, TIFF, WebP)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(sig) for sig in _SIGNATURES)
