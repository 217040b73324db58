"""Images in and out: decoding user bytes safely, preprocessing for a model spec, rendering heatmaps.

Decoding rejects what cannot be explained with a specific :class:`~handler.errors.ExplainError`
(empty, not an image, unsupported format, too large, too small, truncated) and
normalises what can (EXIF orientation, palette, grayscale, 16-bit, CMYK, alpha).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2 as T

from .errors import ImageTooLarge, InvalidImage, InvalidOption, UnsupportedImage

#: Formats accepted by default (Pillow's names; MPO is the multi-picture JPEG many phones write).
DEFAULT_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 8


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    formats: Sequence[str] = DEFAULT_FORMATS


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes to an upright RGB image, or a specific error saying why not."""
    if not data:
        raise InvalidImage("the request has no image: the body (or image field) is empty", code="empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"image declares more than {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise InvalidImage(
            f"the data is not an image in a known format ({_describe_bytes(data)}); send JPEG, PNG, WebP, BMP or GIF",
            code="not_an_image") from None
    except Exception as err:
        raise InvalidImage(f"cannot read the image header: {err}", code="corrupt_image") from None
    if image.format not in limits.formats:
        raise UnsupportedImage(f"image format {image.format} is not accepted; send one of "
                               f"{', '.join(f for f in limits.formats if f != 'MPO')}")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise InvalidImage(f"image is {width}x{height}; each side must be at least {limits.min_side} pixels",
                           code="image_too_small")
    try:
        image.seek(0)  # animated images: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow's plugins raise OSError, SyntaxError, struct.error, ...
        raise InvalidImage(f"the image data is truncated or corrupt: {err}", code="corrupt_image") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: high bit depths rescaled, transparency composited on white."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def open_image(source, limits: Optional[ImageLimits] = None) -> Image.Image:
    """A path, bytes or PIL image as a decoded RGB image (the server's checks)."""
    limits = limits or ImageLimits()
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), limits)
    return decode_image(Path(source).read_bytes(), limits)


def _describe_bytes(data: bytes) -> str:
    head = bytes(data[:16]).lstrip()
    if head[:1] in (b"{", b"["):
        return "it looks like JSON; send it with Content-Type: application/json"
    if head[:5].lower() in (b"<!doc", b"<html", b"<?xml"):
        return "it looks like HTML/XML"
    try:
        bytes(data[:64]).decode("ascii")
        return "it looks like text"
    except UnicodeDecodeError:
        return f"{len(data)} bytes of unrecognised binary data"


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------

_INTERPOLATION = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class CropBox:
    """Where the model's input window lies in the original photo (pixel coordinates)."""

    left: float
    top: float
    right: float
    bottom: float


#: Longest side / shortest side the resize sees. Resizing the shorter side to 256 makes the image
#: 256 x 256·aspect pixels: a tiny 8 x 5,000,000 PNG under the pixel cap would become 41 G pixels (a dead
#: worker). Beyond this ratio the photo is first cut to a centred window of this aspect; the centre crop
#: the model sees lies deep inside it, so its pixels are the same up to resampling rounding.
MAX_ASPECT = 8


def _centre_window(image: Image.Image, max_aspect: float) -> Image.Image:
    width, height = image.size
    if max(width, height) <= max_aspect * min(width, height):
        return image
    if width > height:
        keep = int(math.ceil(max_aspect * height))
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    keep = int(math.ceil(max_aspect * width))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


class Preprocessor:
    """The model spec's preprocessing, with torchvision transforms; also maps the crop back onto the photo."""

    def __init__(self, prep):
        self.prep = prep
        if prep.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}")
        self.transform = T.Compose([
            T.Resize(prep.resize, interpolation=_INTERPOLATION[prep.interpolation], antialias=True),
            T.CenterCrop(prep.crop),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(prep.mean), list(prep.std)),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(_centre_window(image, MAX_ASPECT))

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])

    def crop_box(self, size: tuple) -> CropBox:
        """The original-image rectangle the model sees after resize + centre crop (torchvision's rounding)."""
        width, height = size
        short, long = (width, height) if width <= height else (height, width)
        new_short = self.prep.resize
        new_long = int(self.prep.resize * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        crop = self.prep.crop
        top = int(round((new_h - crop) / 2.0))
        left = int(round((new_w - crop) / 2.0))
        sx, sy = width / new_w, height / new_h
        return CropBox(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)

    def describe(self, size: Optional[tuple] = None) -> dict:
        info = self.prep.to_dict()
        if size is not None:
            box = self.crop_box(size)
            info["image_size"] = list(size)
            info["crop_box"] = [round(box.left, 2), round(box.top, 2), round(box.right, 2), round(box.bottom, 2)]
        return info


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

_ANCHORS = {
    "viridis": ["440154", "482475", "414487", "355f8d", "2a788e", "21918c", "22a884", "44bf70", "7ad151",
                "bddf26", "fde725"],
    "inferno": ["000004", "160b39", "420a68", "6a176e", "932667", "bc3754", "dd513a", "f37819", "fca50a",
                "f6d746", "fcffa4"],
    "magma": ["000004", "140e36", "3b0f70", "641a80", "8c2981", "b73779", "de4968", "f7705c", "fe9f6d",
              "fecf92", "fcfdbf"],
    "jet": ["000080", "0000ff", "0080ff", "00ffff", "80ff80", "ffff00", "ff8000", "ff0000", "800000"],
    "gray": ["000000", "ffffff"],
    "red_blue": ["2166ac", "67a9cf", "d1e5f0", "f7f7f7", "fddbc7", "ef8a62", "b2182b"],
}
COLORMAPS = tuple(sorted(_ANCHORS))
#: How a signed map is shown: |·| (default), only the positive or negative part, or both on a diverging scale.
POLARITIES = ("absolute", "positive", "negative", "both")


def colormap_lut(name: str) -> np.ndarray:
    """A 256×3 uint8 lookup table, linearly interpolated between the colormap's anchor colours."""
    if name not in _ANCHORS:
        raise InvalidOption(f"unknown colormap {name!r}; choose one of: {', '.join(COLORMAPS)}",
                            code="unknown_colormap")
    anchors = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in _ANCHORS[name]], dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(anchors))
    x = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(x, positions, anchors[:, c]) for c in range(3)], 1).round().astype(np.uint8)


def display_values(attribution: np.ndarray, polarity: str = "absolute", clip_percentile: float = 99.5) -> np.ndarray:
    """A signed map in [-1, 1] to display intensities in [0, 1] (``both``: 0.5 is zero)."""
    if polarity not in POLARITIES:
        raise InvalidOption(f"unknown polarity {polarity!r}; choose one of: {', '.join(POLARITIES)}",
                            code="invalid_option")
    a = np.asarray(attribution, dtype=np.float32)
    if polarity == "positive":
        a = np.clip(a, 0, None)
    elif polarity == "negative":
        a = np.clip(-a, 0, None)
    magnitude = np.abs(a)
    top = float(np.percentile(magnitude, clip_percentile)) if magnitude.size else 0.0
    if top <= 0:
        top = float(magnitude.max(initial=0.0))
    if top <= 0:
        return np.full(a.shape, 0.5 if polarity == "both" else 0.0, dtype=np.float32)
    if polarity == "both":
        return np.clip(a / top, -1, 1) * 0.5 + 0.5
    return np.clip(magnitude / top, 0, 1)


def render_heatmap(attribution: np.ndarray, colormap: str = "inferno", polarity: str = "absolute") -> Image.Image:
    """The map as a palette image (one byte per pixel, the colormap as palette): small PNGs."""
    values = display_values(attribution, polarity)
    image = Image.fromarray((values * 255).round().astype(np.uint8), "P")
    image.putpalette(colormap_lut(colormap).flatten().tolist())
    return image


def render_overlay(
    photo: Image.Image,
    attribution: np.ndarray,
    box: CropBox,
    colormap: str = "inferno",
    polarity: str = "absolute",
    opacity: float = 0.75,
) -> Image.Image:
    """The heatmap laid over the photo at the photo's own size, inside the window the model saw.

    Each pixel's opacity grows with its relevance, so irrelevant regions show
    the photo unchanged; outside the model's crop nothing is drawn.
    """
    values = display_values(attribution, polarity)
    lut = colormap_lut(colormap)
    left, top = int(round(box.left)), int(round(box.top))
    right = min(photo.width, int(round(box.right)))
    bottom = min(photo.height, int(round(box.bottom)))
    size = (max(1, right - left), max(1, bottom - top))
    heat = Image.fromarray((values * 255).round().astype(np.uint8), "L").resize(size, Image.BILINEAR)
    heat = np.asarray(heat)
    colours = lut[heat].astype(np.float32)
    alpha = (heat.astype(np.float32) / 255.0) * opacity
    if polarity == "both":
        alpha = np.abs(heat.astype(np.float32) / 255.0 - 0.5) * 2 * opacity
    base = np.array(photo.convert("RGB"), dtype=np.float32)
    region = base[top:top + size[1], left:left + size[0]]
    h, w = region.shape[:2]
    a = alpha[:h, :w, None]
    base[top:top + h, left:left + w] = region * (1 - a) + colours[:h, :w] * a
    return Image.fromarray(base.round().clip(0, 255).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
