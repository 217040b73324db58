"""Decoding user images: what is accepted and normalised, what is refused and with which error."""

import io

import numpy as np
import pytest
from PIL import Image, features

from handler.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from handler.serving.responses import http_status
from handler.imaging import (FULL_SIZE, ImageLimits, Preprocessor, colormap_lut, decode_image, full_photo,
                             photo_size, render_overlay)
from handler.models import Preprocessing, get_spec


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", pytest.param("AVIF", marks=pytest.mark.skipif(
    not features.check("avif"), reason="this Pillow has no AVIF codec (the server then refuses AVIF by name)"))])
def test_common_formats_decode_to_rgb(photo, fmt):
    image = decode_image(encode(photo, fmt))
    assert image.mode == "RGB" and image.size == (60, 40)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_other_modes_are_converted(photo, mode):
    source = photo.convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    assert source.mode == mode
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    image = decode_image(encode(source, fmt))
    assert image.mode == "RGB" and image.size == (60, 40)
    if mode == "I;16":  # 16-bit values are rescaled, not clipped to white
        assert 60 < np.asarray(image).mean() < 200


def test_transparent_pixels_become_white(photo):
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)
    assert np.asarray(decode_image(encode(rgba, "PNG"))).min() == 255


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image = decode_image(encode(photo, "JPEG", exif=exif.tobytes()))
    assert image.size == (40, 60)


@pytest.fixture(scope="module")
def large_photo():
    """A 2400 x 1600 photo-like image (smooth, with fine grain), the size class of a phone upload."""
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8), "RGB").resize((2400, 1600),
                                                                                              Image.BICUBIC)
    grain = rng.integers(-8, 9, (1600, 2400, 3))
    return Image.fromarray(np.clip(np.asarray(small, dtype=int) + grain, 0, 255).astype(np.uint8), "RGB")


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_shorter_side_and_knows_its_full_size(
        large_photo):
    data = encode(large_photo, "JPEG", quality=90)
    full = decode_image(data)
    reduced = decode_image(data, least_side=512)  # 1600 / 2 = 800 >= 512 > 1600 / 4
    assert full.size == photo_size(full) == (2400, 1600) and FULL_SIZE not in full.info
    assert reduced.size == (1200, 800) and reduced.mode == "RGB"
    assert photo_size(reduced) == (2400, 1600)
    assert reduced.info["pathway_sha256"] == full.info["pathway_sha256"]  # the record names the bytes sent
    assert np.array_equal(np.asarray(full_photo(reduced)), np.asarray(full))
    # the reduced decode is the photo, not something else: close to the full decode downscaled
    downscaled = np.asarray(full.resize(reduced.size, Image.BOX), dtype=float)
    assert np.abs(np.asarray(reduced, dtype=float) - downscaled).mean() < 3.0
    assert decode_image(data, least_side=300).size == (600, 400)  # 1/4: 400 >= 300
    assert decode_image(data, least_side=900).size == (2400, 1600)  # no scale keeps 900: full size


def test_a_reduced_jpeg_is_upright_and_reports_its_upright_full_size(large_photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    reduced = decode_image(encode(large_photo, "JPEG", exif=exif.tobytes()), least_side=512)
    assert reduced.size == (800, 1200) and photo_size(reduced) == (1600, 2400)
    assert full_photo(reduced).size == (1600, 2400)


def test_only_large_jpegs_are_decoded_at_a_reduced_scale(large_photo, photo):
    assert decode_image(encode(large_photo, "PNG", compress_level=1), least_side=512).size == (2400, 1600)
    assert decode_image(encode(large_photo, "WEBP"), least_side=512).size == (2400, 1600)
    assert decode_image(encode(photo, "JPEG"), least_side=32).size == (60, 40)  # 40 < 2 x 32: no scale keeps 32


def test_the_model_window_of_a_reduced_jpeg_is_reported_in_full_size_coordinates(large_photo):
    pre = Preprocessor(Preprocessing(resize=256, crop=224))
    data = encode(large_photo, "JPEG", quality=90)
    assert pre.least_decoded_side == 1024
    assert Preprocessor(Preprocessing(jpeg_draft=False)).least_decoded_side is None
    reduced, full = decode_image(data, least_side=512), decode_image(data)
    described = pre.describe(reduced)
    assert described["image_size"] == [2400, 1600] and described["decoded_size"] == [1200, 800]
    assert "decoded_size" not in pre.describe(full)
    assert np.allclose(described["crop_box"], pre.describe(full)["crop_box"], atol=2.0)


def test_animated_gif_uses_the_first_frame(photo):
    frames = [photo, Image.new("RGB", photo.size, (255, 0, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = np.asarray(decode_image(data)).astype(int)
    assert np.abs(first - np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).max() == 0


@pytest.mark.parametrize("data, error, type_", [
    (b"", InvalidImage, "empty_image"),
    (b"hello, this is text", InvalidImage, "not_an_image"),
    (b'{"image": "abc"}', InvalidImage, "not_an_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, InvalidImage, None),
])
def test_non_images_are_refused(data, error, type_):
    with pytest.raises(error) as info:
        decode_image(data)
    if type_:
        assert info.value.code == type_
    assert http_status(info.value) == 400


def test_truncated_jpeg_is_refused(photo):
    data = encode(photo, "JPEG")
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


# The leading bytes of what people send by mistake (an iPhone's HEIC, an SVG drawing, a PDF, an archive).
HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'


@pytest.mark.parametrize("data, error, code, says", [
    (HEIC_HEAD, UnsupportedImage, "unsupported_image_format", "image format HEIC is not accepted (a HEIC photo (an "
                                                              "iPhone's default)); convert it to JPEG or send one of "
                                                              "JPEG, PNG"),
    (SVG, UnsupportedImage, "unsupported_image_format", "image format SVG (vector graphics) is not accepted"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + b"0" * 40, InvalidImage, "not_an_image", "(it is a PDF document; send the "
                                                                                  "image itself)"),
    (b"PK\x03\x04" + b"\x00" * 40, InvalidImage, "not_an_image", "it is a ZIP archive"),
    (b"\x1f\x8b\x08" + b"\x00" * 40, InvalidImage, "not_an_image", "it is gzip-compressed"),
])
def test_what_people_send_by_mistake_is_named(data, error, code, says):
    with pytest.raises(error) as info:
        decode_image(data)
    assert info.value.code == code and says in str(info.value)
    assert http_status(info.value) == (415 if error is UnsupportedImage else 400)


def _damaged(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


@pytest.mark.parametrize("fmt, damage", [
    ("PNG", lambda d: _damaged(d, 29, bytes([d[29] ^ 0xFF]))),  # the header chunk's checksum
    ("PNG", lambda d: _damaged(d, 16, b"\x00\x00\x00\x00")),  # width 0
    ("TIFF", lambda d: _damaged(d, 4, b"\xff\xff\xff\x7f")),  # the first directory far past the end
])
def test_an_image_whose_header_is_damaged_is_corrupt_not_unrecognised(photo, fmt, damage):
    with pytest.raises(InvalidImage) as info:
        decode_image(damage(encode(photo, fmt)))
    assert info.value.code == "corrupt_image" and f"starts like a {fmt} image" in str(info.value), info.value


def test_text_that_starts_like_a_bitmap_is_not_called_a_damaged_bitmap():
    with pytest.raises(InvalidImage) as info:
        decode_image(b"BMW photos: see the attachment")
    assert "starts like a BMP" not in str(info.value)


def test_refusals_list_the_formats_actually_accepted(photo):
    limits = ImageLimits(formats=("PNG", "MPO", "JPEG"))
    with pytest.raises(InvalidImage, match=r"send one of PNG, JPEG$"):
        decode_image(b"hello, this is text", limits)
    with pytest.raises(UnsupportedImage, match=r"image format WEBP is not accepted; send one of PNG, JPEG$"):
        decode_image(encode(photo, "WEBP"), limits)


def test_unsupported_format_is_415(photo):
    with pytest.raises(UnsupportedImage) as info:
        decode_image(encode(photo, "ICO"))
    assert http_status(info.value) == 415


def test_too_many_pixels_is_413_before_decoding():
    import zlib

    header = encode(Image.new("L", (10, 10)), "PNG")
    # rewrite the IHDR chunk to declare 60000 x 60000 pixels (a decompression bomb), with a valid CRC
    ihdr = b"IHDR" + (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big") + header[24:29]
    bomb = header[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + header[33:]
    with pytest.raises(ImageTooLarge) as info:
        decode_image(bomb)
    assert http_status(info.value) == 413
    with pytest.raises(ImageTooLarge):
        decode_image(encode(Image.new("RGB", (300, 300)), "PNG"), ImageLimits(max_pixels=50_000))


def test_tiny_images_are_refused():
    with pytest.raises(InvalidImage, match="at least"):
        decode_image(encode(Image.new("RGB", (1, 1)), "PNG"))


def test_crop_box_maps_the_model_window_back_onto_the_photo():
    pre = Preprocessor(Preprocessing(resize=256, crop=224))
    box = pre.crop_box((600, 400))  # resized to 384x256, crop 224 at (80, 16)
    assert (box.left, box.top, box.right, box.bottom) == (125.0, 25.0, 475.0, 375.0)


def test_overlay_keeps_the_photo_outside_the_model_window(photo):
    big = photo.resize((600, 400))
    pre = Preprocessor(Preprocessing(resize=256, crop=224))
    attribution = np.ones((224, 224), np.float32)
    overlay = render_overlay(big, attribution, pre.crop_box(big.size))
    assert overlay.size == big.size
    a, b = np.asarray(overlay), np.asarray(big)
    assert (a[:, :120] == b[:, :120]).all() and (a[:20] == b[:20]).all()
    assert (a[100:300, 200:400] != b[100:300, 200:400]).any()


def test_colormaps_are_256_colour_ramps():
    lut = colormap_lut("viridis")
    assert lut.shape == (256, 3) and tuple(lut[0]) == (68, 1, 84) and tuple(lut[-1]) == (253, 231, 37)


@pytest.mark.parametrize("size", [(100, 900), (1300, 120), (17, 400)])
def test_extreme_aspect_photos_are_windowed_without_changing_what_the_model_sees(size):
    """Past MAX_ASPECT the photo is cut to a centred window before the resize; the centre crop is unchanged."""
    from handler.imaging import MAX_ASPECT
    from handler.samples import sample_photo

    assert max(size) / min(size) > MAX_ASPECT
    prep = Preprocessor(get_spec("efficientnet_lite0").preprocessing)
    photo = Image.open(sample_photo("coffee")).convert("RGB").resize(size, Image.BILINEAR)
    windowed, full = prep(photo), prep.transform(photo)
    # the same region up to torchvision's integer rounding of the resized size (a fraction of a pixel)
    assert (windowed - full).abs().mean() < 0.02 and np.corrcoef(windowed.ravel(), full.ravel())[0, 1] > 0.99


def test_a_tiny_png_of_extreme_aspect_cannot_make_the_resize_huge():
    """8 x 2,000,000 pixels is under the pixel cap; resized to a 256 shorter side it would be 16 G pixels."""
    from handler.imaging import MAX_ASPECT

    prep = Preprocessor(get_spec("efficientnet_lite0").preprocessing)
    seen = []
    transform = prep.transform
    prep.transform = lambda image: seen.append(image.size) or transform(image)
    x = prep(Image.new("RGB", (8, 2_000_000), (200, 10, 10)))
    assert tuple(x.shape) == (3, 224, 224)
    assert seen == [(8, 8 * MAX_ASPECT)]


def test_the_spec_switches_reduced_jpeg_decoding_off_and_rejects_a_malformed_value():
    from handler.models import ModelLoadError, ModelSpec

    data = get_spec("efficientnet_lite0").to_dict()
    assert data["preprocessing"]["jpeg_draft"] is True
    off = ModelSpec.from_dict(dict(data, preprocessing=dict(data["preprocessing"], jpeg_draft=False)))
    assert off.preprocessing.jpeg_draft is False and ModelSpec.from_dict(off.to_dict()) == off
    with pytest.raises(ModelLoadError, match="jpeg_draft"):
        ModelSpec.from_dict(dict(data, preprocessing=dict(data["preprocessing"], jpeg_draft="yes")))
