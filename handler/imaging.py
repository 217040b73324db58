"""Images in and out: decoding user bytes safely, preprocessing for a model spec, rendering heatmaps.

Decoding rejects what cannot be explained with a specific :class:`~handler.errors.ExplainError`
(empty, not an image, unsupported format, too large, too small, truncated) and
normalises what can (EXIF orientation, palette, grayscale, 16-bit, CMYK, alpha).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError, features
from torchvision.transforms import v2 as T

from .engine.options import OptionSpec
from .errors import ExplainError, ImageTooLarge, InvalidImage, InvalidOption, UnsupportedImage, shown

#: Formats accepted by default (Pillow's names; MPO is the multi-picture JPEG many phones write; AVIF, what
#: browsers and image CDNs now serve, where this Pillow decodes it).
DEFAULT_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF") + (("AVIF",) if features.check("avif") else ())
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 8


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    formats: Sequence[str] = DEFAULT_FORMATS


#: Key of ``Image.info`` where :func:`decode_image` keeps the SHA-256 of the bytes it decoded (an explanation's
#: provenance records it).
IMAGE_SHA256 = "pathway_sha256"
#: Keys of ``Image.info`` of a JPEG decoded at a reduced scale (see :func:`decode_image`): the photo's upright
#: size in pixels, and the bytes, for :func:`full_photo`.
FULL_SIZE = "pathway_full_size"
SOURCE_BYTES = "pathway_source"


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), least_side: Optional[int] = None) -> Image.Image:
    """Bytes to an upright RGB image, or a specific error saying why not; ``info[IMAGE_SHA256]`` is the
    SHA-256 of ``data``.

    ``least_side``: a JPEG whose shorter side is at least twice this is decoded at the smallest of libjpeg's
    scales (1/2, 1/4, 1/8) that keeps its shorter side at least ``least_side`` (Pillow's ``draft``): the
    decoder skips the detail a downscale would discard, several times faster for a phone photo. Such an
    image carries its full size in ``info[FULL_SIZE]`` (see :func:`photo_size` and :func:`full_photo`).
    """
    if not data:
        raise InvalidImage("the request has no image: the body (or image field) is empty", code="empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"image declares more than {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise _refuse_unidentified(data, limits) from None
    except Exception as err:
        raise InvalidImage(f"cannot read the image header: {err}", code="corrupt_image") from None
    if image.format not in limits.formats:
        raise UnsupportedImage(f"image format {image.format} is not accepted; send one of {accepted_formats(limits)}")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise InvalidImage(f"image is {width}x{height}; each side must be at least {limits.min_side} pixels",
                           code="image_too_small")
    try:
        image.seek(0)  # animated images: the first frame
        full_size = _reduce_jpeg(image, least_side)
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image))
        image.info[IMAGE_SHA256] = hashlib.sha256(bytes(data)).hexdigest()
        if full_size is not None:
            image.info[FULL_SIZE] = full_size
            image.info[SOURCE_BYTES] = bytes(data)
        return image
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow's plugins raise OSError, SyntaxError, struct.error, ...
        raise InvalidImage(f"the image data is truncated or corrupt: {err}", code="corrupt_image") from None


#: EXIF orientations that turn the stored image by a quarter (its width and height swap when made upright).
_QUARTER_TURNS = (5, 6, 7, 8)


def _reduce_jpeg(image: Image.Image, least_side: Optional[int]) -> Optional[tuple]:
    """Ask libjpeg for a reduced scale before loading (see :func:`decode_image`); the upright full size if it
    took one, else None."""
    if least_side is None or image.format not in ("JPEG", "MPO"):
        return None
    width, height = image.size
    scale = least_side / min(width, height)
    if scale > 0.5:  # the smallest reduction libjpeg offers would go below least_side
        return None
    image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
    if image.size == (width, height):
        return None
    quarter = image.getexif().get(0x0112) in _QUARTER_TURNS
    return (height, width) if quarter else (width, height)


def photo_size(image: Image.Image) -> tuple:
    """The photo's upright size in pixels, also for a JPEG decoded at a reduced scale."""
    return tuple(image.info.get(FULL_SIZE, image.size))


def full_photo(image: Image.Image, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The photo at its full size: ``image`` itself, or, for a JPEG decoded at a reduced scale, decoded again
    in full (what an overlay is drawn on)."""
    if FULL_SIZE not in image.info:
        return image
    return decode_image(image.info[SOURCE_BYTES], limits)


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


def open_image(source, limits: Optional[ImageLimits] = None, least_side: Optional[int] = None) -> Image.Image:
    """A path, bytes or PIL image as a decoded RGB image (the server's checks; ``least_side`` as
    :func:`decode_image`'s)."""
    limits = limits or ImageLimits()
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), limits, least_side)
    data = Path(source).read_bytes()
    if not data:  # a file, not a request body: say so in a file's terms
        raise InvalidImage("the file is empty", code="empty_image")
    return decode_image(data, limits, least_side)


def accepted_formats(limits: ImageLimits) -> str:
    """The accepted formats as a user names them (MPO is a JPEG to its sender)."""
    return ", ".join(f for f in limits.formats if f != "MPO")


#: What people send by mistake, by its leading bytes: ``(offset, signature, image format or None, what it is)``.
#: An image format Pillow cannot decode here is refused as an unsupported format (415), anything else as not an
#: image (400).
_KNOWN_CONTAINERS = (
    (4, b"ftypheic", "HEIC", "a HEIC photo (an iPhone's default)"),
    (4, b"ftypheix", "HEIC", "a HEIC photo"),
    (4, b"ftypmif1", "HEIF", "a HEIF image"),
    (4, b"ftypavif", "AVIF", "an AVIF image, which this server's Pillow does not decode"),
    (0, b"%PDF", None, "it is a PDF document; send the image itself"),
    (0, b"PK\x03\x04", None, "it is a ZIP archive; send one image per request"),
    (0, b"\x1f\x8b", None, "it is gzip-compressed; send the image uncompressed"),
)


#: Leading bytes of the raster formats Pillow reads: data that starts like one but that no plugin identifies has a
#: damaged header (a bad checksum, a zero width) or is a variant Pillow does not decode (64-bit TIFF samples).
_IMAGE_SIGNATURES = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG"), (0, b"\xff\xd8\xff", "JPEG"), (0, b"GIF87a", "GIF"), (0, b"GIF89a", "GIF"),
    (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (8, b"WEBP", "WebP"),
)
#: A BMP's two-byte "BM" is followed, at offset 14, by the size of one of its header versions (a text that happens
#: to start with "BM" is not a damaged BMP).
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)


def _looks_like(data: bytes) -> Optional[str]:
    """The raster format whose signature ``data`` starts with, if any."""
    for offset, signature, fmt in _IMAGE_SIGNATURES:
        if bytes(data[offset:offset + len(signature)]) == signature:
            return fmt
    if bytes(data[:2]) == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    return None


def _refuse_unidentified(data: bytes, limits: ImageLimits) -> ExplainError:
    """The error for bytes Pillow does not recognise: a damaged image, an image format it cannot decode, named,
    or not an image."""
    fmt = _looks_like(data)
    if fmt is not None:
        return InvalidImage(f"the data starts like a {fmt} image, but its header cannot be read: the file is "
                            "damaged or truncated, or a variant this server does not decode; re-save it as PNG or "
                            "JPEG", code="corrupt_image")
    for offset, signature, fmt, what in _KNOWN_CONTAINERS:
        if bytes(data[offset:offset + len(signature)]) == signature:
            if fmt is not None:
                return UnsupportedImage(f"image format {fmt} is not accepted ({what}); convert it to JPEG or send "
                                        f"one of {accepted_formats(limits)}")
            return InvalidImage(f"the data is not an image ({what})", code="not_an_image")
    if b"<svg" in bytes(data[:1024]).lower():
        return UnsupportedImage(f"image format SVG (vector graphics) is not accepted; send a raster image: one of "
                                f"{accepted_formats(limits)}")
    return InvalidImage(f"the data is not an image in a known format ({_describe_bytes(data)}); send one of "
                        f"{accepted_formats(limits)}", code="not_an_image")


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


#: A JPEG is decoded at a reduced scale only down to this many times the spec's resize (see
#: :attr:`Preprocessor.least_decoded_side`). At 4 a reduced decode moves the predictions of the sample photos
#: no more than saving them at another JPEG quality does; at 2 it moved them several times more (and flipped
#: two close calls): benchmarks/speed/results/decode-cpu.md.
JPEG_DRAFT_MARGIN = 4


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

    @property
    def least_decoded_side(self) -> Optional[int]:
        """The shorter side a JPEG is decoded to at least (:func:`decode_image`'s ``least_side``), or None where
        the spec's ``jpeg_draft`` is off: :data:`JPEG_DRAFT_MARGIN` times the resize, so the antialiased resize
        still does the last, larger step."""
        return JPEG_DRAFT_MARGIN * self.prep.resize if self.prep.jpeg_draft else None

    def window(self, image: Image.Image) -> CropBox:
        """The model's window in the photo's full-size pixel coordinates (:func:`photo_size`), also for a JPEG
        decoded at a reduced scale: the window in the decoded image, scaled to the full size."""
        box = self.crop_box(image.size)
        full = photo_size(image)
        if full == tuple(image.size):
            return box
        sx, sy = full[0] / image.width, full[1] / image.height
        return CropBox(box.left * sx, box.top * sy, box.right * sx, box.bottom * sy)

    def describe(self, image: Optional[Image.Image] = None) -> dict:
        """The preprocessing as the document reports it; with ``image``: the photo's size, the decoded size where
        a JPEG was decoded at a reduced scale, and the model's window in the photo (:meth:`window`)."""
        info = self.prep.to_dict()
        if image is not None:
            box, full = self.window(image), photo_size(image)
            info["image_size"] = list(full)
            if full != tuple(image.size):
                info["decoded_size"] = list(image.size)
            info["crop_box"] = [round(box.left, 2), round(box.top, 2), round(box.right, 2), round(box.bottom, 2)]
        return info


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

#: Colormap name -> the maintained ``cmap`` package's exact lookup table it comes from (the same data as
#: matplotlib's maps). ``red_blue`` and ``pink_green`` are diverging: zero in the middle, for ``polarity=both``;
#: ``pink_green`` is Vertex Explainable AI's PINK_GREEN (positive green, negative pink).
COLORMAP_SOURCES = {
    "gray": "matlab:gray",
    "inferno": "bids:inferno",
    "jet": "matlab:jet",
    "magma": "bids:magma",
    "pink_green": "colorbrewer:PiYG",
    "red_blue": "colorbrewer:RdBu_r",
    "viridis": "bids:viridis",
}
COLORMAPS = tuple(sorted(COLORMAP_SOURCES))
#: How a signed map is shown: |·| (default), only the positive or negative part, or both on a diverging scale.
POLARITIES = ("absolute", "positive", "negative", "both")
#: ``pixels``: each pixel coloured by its intensity; ``outlines``: contours around the strongest regions.
VISUALIZATIONS = ("pixels", "outlines")
#: What lies under the colours: the photo, the photo in grayscale, the photo seen through the attribution
#: (black where it is weak), or nothing (black).
OVERLAY_TYPES = ("original", "grayscale", "mask_black", "none")
#: Colours are opaque from this intensity up, and fade linearly to transparent below it, so the upper half
#: of the clipped range covers the photo instead of tinting it (``mask_black``: shows it unchanged).
OPAQUE_FROM = 0.5
#: ``outlines`` surround the pixels whose intensity is at least this.
OUTLINE_LEVEL = 0.5
MAX_SMOOTH = 16.0

#: The visualisation settings as declared options (Vertex Explainable AI's image visualisation settings,
#: with defaults measured for pathway gradient's sparse, pixel-fine maps; see ``tests/test_visualization.py``).
VISUALIZATION_OPTIONS = {
    "visualization": OptionSpec(str, "pixels", choices=VISUALIZATIONS,
                                help="pixels (each pixel coloured by its intensity) or outlines (contours around "
                                     "the strongest regions, drawn over the photo)"),
    "polarity": OptionSpec(str, "absolute", choices=POLARITIES,
                           help="absolute (|attribution|), positive, negative, or both (a diverging colormap)"),
    "colormap": OptionSpec(str, None, choices=COLORMAPS,
                           help="colours; default inferno, or pink_green with polarity both"),
    "clip_percent_upper": OptionSpec(float, 99.9, minimum=0.0, maximum=100.0,
                                     help="percentile of |attribution| shown at full intensity"),
    "clip_percent_lower": OptionSpec(float, 62.0, minimum=0.0, maximum=100.0,
                                     help="percentile of |attribution| at and below which nothing is shown"),
    "overlay_type": OptionSpec(str, "original", choices=OVERLAY_TYPES,
                               help="what the overlay draws over: original, grayscale, mask_black or none"),
    "smooth": OptionSpec(float, 1.0, minimum=0.0, maximum=MAX_SMOOTH,
                         help="display-only Gaussian blur, sigma in model input pixels (0: none); the "
                              "attribution itself is never smoothed"),
}


@dataclass(frozen=True)
class VisualizationSettings:
    """How an attribution map is drawn: the heatmap at model resolution and the overlay at the photo's size.

    Intensity is the attribution's percentile rank, mapped linearly from ``clip_percent_lower`` (nothing
    shown) to ``clip_percent_upper`` (full): an equalised scale. Pathway gradient maps are sparse and
    heavy-tailed, so a scale linear in value leaves all but a few pixels near zero and the overlay looks
    like the untouched photo. ``visualization`` and ``overlay_type`` shape the overlay only; the heatmap
    is the intensities themselves, coloured.
    Build one with :meth:`from_options` (checks each value against :data:`VISUALIZATION_OPTIONS`).
    """

    visualization: str = VISUALIZATION_OPTIONS["visualization"].default
    polarity: str = VISUALIZATION_OPTIONS["polarity"].default
    colormap: Optional[str] = None  # None: inferno, or pink_green with polarity both
    clip_percent_upper: float = VISUALIZATION_OPTIONS["clip_percent_upper"].default
    clip_percent_lower: float = VISUALIZATION_OPTIONS["clip_percent_lower"].default
    overlay_type: str = VISUALIZATION_OPTIONS["overlay_type"].default
    smooth: float = VISUALIZATION_OPTIONS["smooth"].default

    def __post_init__(self):
        for name, spec in VISUALIZATION_OPTIONS.items():
            value = getattr(self, name)
            if value is not None or spec.default is not None:
                object.__setattr__(self, name, _coerce(name, spec, value))
        if self.clip_percent_lower >= self.clip_percent_upper:
            raise InvalidOption(f"clip_percent_lower ({self.clip_percent_lower:g}) must be below "
                                f"clip_percent_upper ({self.clip_percent_upper:g})", code="invalid_visualization")

    @classmethod
    def from_options(cls, raw: Mapping[str, Any]) -> "VisualizationSettings":
        """Settings from loosely typed values (JSON, multipart text, headers, CLI flags); None or "" = default.

        Names may use dashes (``clip-percent-upper``); an unknown name is an error that lists the known ones.
        """
        values = {}
        for key, value in raw.items():
            name = str(key).strip().lower().replace("-", "_")
            if name not in VISUALIZATION_OPTIONS:
                raise InvalidOption(f"unknown visualisation setting {shown(key)}; settings are: "
                                    f"{', '.join(VISUALIZATION_OPTIONS)}", code="unknown_option")
            if isinstance(value, (bytes, bytearray)):
                value = bytes(value).decode("utf-8", "replace")
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            values[name] = value
        return cls(**values)

    @property
    def resolved_colormap(self) -> str:
        if self.colormap is not None:
            return self.colormap
        return "pink_green" if self.polarity == "both" else "inferno"


def _coerce(name: str, spec: OptionSpec, value: Any) -> Any:
    try:
        return spec.coerce(name, value)
    except InvalidOption as err:
        if name != "colormap":
            err.code = "invalid_visualization"
            raise
        raise InvalidOption(f"unknown colormap {shown(value)}; {err}", code="unknown_colormap") from None


@functools.lru_cache(maxsize=None)
def colormap_lut(name: str) -> np.ndarray:
    """The colormap's 256×3 uint8 lookup table, exactly as the ``cmap`` package (and matplotlib) define it."""
    if name not in COLORMAP_SOURCES:
        raise InvalidOption(f"unknown colormap {name!r}; choose one of: {', '.join(COLORMAPS)}",
                            code="unknown_colormap")
    import cmap  # imported on first use: ~0.1 s

    lut = (cmap.Colormap(COLORMAP_SOURCES[name]).lut(256)[:, :3] * 255.0).round().astype(np.uint8)
    lut.setflags(write=False)
    return lut


def gaussian_smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of a 2-D map (a new array), normalised at the borders so edges keep their level.

    The two matrix products run in torch, on the engine's thread pool: NumPy's OpenBLAS keeps its own
    threads spinning after a product, and on a worker with as many torch threads as cores they took the
    cores from the next explanation (benchmarks/speed/README.md, "Figures the code relies on")."""
    values = np.asarray(values, dtype=np.float32)
    if sigma <= 0:
        return values.copy()
    rows, columns = (_blur_matrix(n, float(sigma)) for n in values.shape)
    return (rows @ torch.from_numpy(values) @ columns.T).numpy()


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """The ``n``×``n`` row-normalised Gaussian weights of :func:`gaussian_smooth` (kept: every map of a model has
    the same size, and building them cost about as much as the blur itself)."""
    idx = np.arange(n, dtype=np.float32)
    weights = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    weights[np.abs(idx[:, None] - idx[None, :]) > math.ceil(4 * sigma)] = 0
    return torch.from_numpy(weights / weights.sum(1, keepdims=True))


def display_values(attribution: np.ndarray, settings: "VisualizationSettings" = VisualizationSettings()) -> np.ndarray:
    """The map's display intensities in [0, 1] at its own resolution (``both``: 0.5 is zero, 1 and 0 the extremes).

    The attribution is never modified: smoothing works on a copy.
    """
    a = np.asarray(attribution, dtype=np.float32)
    if settings.polarity == "positive":
        a = np.clip(a, 0, None)
    elif settings.polarity == "negative":
        a = np.clip(-a, 0, None)
    elif settings.polarity == "absolute":
        a = np.abs(a)
    a = gaussian_smooth(a, settings.smooth)  # after |·|: opposite signs of neighbours must not cancel
    magnitude = np.abs(a)
    intensity = _percentile_rank_intensity(magnitude, settings.clip_percent_lower, settings.clip_percent_upper)
    if settings.polarity == "both":
        return (0.5 + 0.5 * np.sign(a) * intensity).astype(np.float32)
    return intensity


def _percentile_rank_intensity(magnitude: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Each value's percentile rank (share of values at or below it), linear from ``lower`` (0) to ``upper`` (1)."""
    values = magnitude.ravel()
    order = np.argsort(values)
    ordered = values[order]
    if ordered.size == 0 or ordered[-1] <= 0:
        return np.zeros(magnitude.shape, np.float32)
    # share at or below each value: position of the last of its equals, plus one (one sort; a binary search
    # per pixel in the sorted copy costs several times more)
    last_of_equals = np.flatnonzero(np.append(ordered[1:] != ordered[:-1], True))
    at_or_below = np.repeat(last_of_equals + 1, np.diff(last_of_equals, prepend=-1))
    rank = np.empty(values.size, np.float64)
    rank[order] = at_or_below * (100.0 / values.size)
    intensity = np.clip((rank.reshape(magnitude.shape) - lower) / (upper - lower), 0.0, 1.0).astype(np.float32)
    intensity[magnitude <= 0] = 0.0
    return intensity


def render_heatmap(attribution: np.ndarray, settings: VisualizationSettings = VisualizationSettings()) -> Image.Image:
    """The intensities as a palette image (palette index = intensity, the colormap as palette): small PNGs."""
    values = display_values(attribution, settings)
    image = Image.fromarray((values * 255).round().astype(np.uint8), "P")
    image.putpalette(colormap_lut(settings.resolved_colormap).flatten().tolist())
    return image


def render_overlay(
    photo: Image.Image,
    attribution: np.ndarray,
    box: CropBox,
    settings: VisualizationSettings = VisualizationSettings(),
) -> Image.Image:
    """The explanation drawn over the photo at the photo's own size, inside the window the model saw.

    Outside the model's window the photo is left as it is (``grayscale``: in grayscale; ``mask_black`` and
    ``none``: black, as nothing is known there).
    """
    values = display_values(attribution, settings)
    lut = colormap_lut(settings.resolved_colormap).astype(np.float32)
    left, top = int(round(box.left)), int(round(box.top))
    right = min(photo.width, int(round(box.right)))
    bottom = min(photo.height, int(round(box.bottom)))
    size = (max(1, right - left), max(1, bottom - top))
    values = np.clip(np.asarray(Image.fromarray(values, "F").resize(size, Image.BILINEAR)), 0.0, 1.0)
    strength = np.abs(values - 0.5) * 2 if settings.polarity == "both" else values
    opacity = np.clip(strength / OPAQUE_FROM, 0.0, 1.0)

    photo = photo.convert("RGB")
    if settings.overlay_type == "grayscale":
        photo = photo.convert("L").convert("RGB")
    base = np.array(photo, dtype=np.float32)
    if settings.overlay_type in ("mask_black", "none"):
        window = base[top:bottom, left:right].copy()
        base[:] = 0
        if settings.overlay_type == "mask_black":
            base[top:bottom, left:right] = window * opacity[:window.shape[0], :window.shape[1], None]
    region = base[top:bottom, left:right]
    h, w = region.shape[:2]
    values, opacity = values[:h, :w], opacity[:h, :w]

    if settings.visualization == "pixels":
        if settings.overlay_type != "mask_black":  # the mask itself shows the attribution there
            alpha = opacity[..., None]
            colours = lut[(values * 255).round().astype(np.intp)]
            base[top:top + h, left:left + w] = region * (1 - alpha) + colours * alpha
    else:
        thickness = max(3, int(round(min(w, h) / 150)) | 1)
        if settings.polarity == "both":
            regions = ((values >= 0.5 + OUTLINE_LEVEL / 2, lut[255]), (values <= 0.5 - OUTLINE_LEVEL / 2, lut[0]))
        else:
            regions = ((values >= OUTLINE_LEVEL, lut[255]),)
        for mask, colour in regions:
            region[_outline(mask, thickness)] = colour
    return Image.fromarray(base.round().clip(0, 255).astype(np.uint8), "RGB")


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """The boundary pixels of a binary mask, thickened to about ``thickness`` pixels (numpy shifts: fast at 12 MP)."""
    edge = mask & ~_spread(mask, 1, np.logical_and)
    return _spread(edge, thickness // 2, np.logical_or)


def _spread(mask: np.ndarray, radius: int, combine) -> np.ndarray:
    """A square dilation (``logical_or``) or erosion (``logical_and``) of ``radius`` pixels, done separably."""
    out = mask.copy()
    for axis in (0, 1):
        source = out.copy()
        n = source.shape[axis]
        for shift in range(1, min(radius, n - 1) + 1):
            ahead = [slice(None)] * 2
            behind = [slice(None)] * 2
            ahead[axis], behind[axis] = slice(shift, None), slice(None, n - shift)
            combine(out[tuple(behind)], source[tuple(ahead)], out=out[tuple(behind)])
            combine(out[tuple(ahead)], source[tuple(behind)], out=out[tuple(ahead)])
    return out


#: Height of each panel of a several-target strip (smaller photos keep their own height).
STRIP_PANEL_HEIGHT = 448


def render_strip(panels: Sequence[Image.Image], captions: Sequence[str]) -> Image.Image:
    """Several overlays of one photo side by side, each under a caption bar naming its class.

    What ``Accept: image/png`` returns for a request with several targets: one picture a person can
    compare at a glance, in the order the targets were asked. Panels are scaled to a common height of
    at most :data:`STRIP_PANEL_HEIGHT` so the strip stays a few hundred kB whatever the photo's size.
    """
    from PIL import ImageDraw, ImageFont

    height = min(STRIP_PANEL_HEIGHT, max(p.height for p in panels))
    scaled = [p.resize((max(1, round(p.width * height / p.height)), height), Image.BILINEAR) for p in panels]
    font = ImageFont.load_default(size=max(12, height // 24))
    bar = int(font.size * 1.8)
    gap = 4
    strip = Image.new("RGB", (sum(p.width for p in scaled) + gap * (len(scaled) - 1), height + bar), "white")
    draw = ImageDraw.Draw(strip)
    x = 0
    for panel, caption in zip(scaled, captions):
        strip.paste(panel, (x, bar))
        text = caption
        while len(text) > 1 and draw.textlength(text, font=font) > panel.width - 8:
            text = text[:-2] + "…"  # shortened from the end, keeping the ellipsis
        draw.text((x + 4, bar // 2), text, fill="black", font=font, anchor="lm")
        x += panel.width + gap
    return strip


#: zlib level of every PNG the service writes. Level 1 instead of Pillow's 6: much faster to encode for a few per
#: cent more bytes, the same pixels (benchmarks/speed/README.md, "Figures the code relies on").
PNG_COMPRESS_LEVEL = 1


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
