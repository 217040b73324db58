"""A corpus of malformed and unusual-but-valid uploads, made in memory (no files, nothing downloaded).

Each case is ``(id, request kwargs for requests.post, expected status, expected error type or None)``;
``status`` 200 marks unusual-but-valid images that the handler converts.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
from PIL import Image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def gradient_image(size=(64, 48), mode="RGB") -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, size[1], dtype=np.float64)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (size[1], size[0], 1)), np.broadcast_to(y, (size[1], size[0], 1)),
                          np.full((size[1], size[0], 1), 128.0)], axis=2).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(rgb, "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 frame header is rewritten to claim ``width`` x ``height``."""
    data = bytearray(encode(gradient_image((16, 16)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def sixteen_bit_png() -> bytes:
    array = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    image = Image.fromarray(array)  # mode I;16
    assert image.mode.startswith("I;16")
    return encode(image, "PNG")


def animated_gif() -> bytes:
    frames = [gradient_image((64, 48)).convert("P"), gradient_image((64, 48)).rotate(90).convert("P")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_png_with_transparency() -> bytes:
    image = gradient_image((64, 48)).convert("P", palette=Image.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    image = gradient_image((64, 48))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return encode(image, "JPEG", exif=exif.tobytes())


RAW = {"Content-Type": "application/octet-stream"}
#: Refused by TorchServe's frontend before any handler runs: netty answers 413 with an empty body.
FRONTEND_REFUSED = {"body above max_request_size"}


def corpus(photo: bytes, max_request_size: int) -> list:
    """The cases; ``photo`` is a valid image used where only options are wrong."""
    jpeg = encode(gradient_image((64, 48)), "JPEG")
    png = encode(gradient_image((64, 48)), "PNG")
    corrupt_png = bytearray(png)
    corrupt_png[29:33] = b"\x00\x00\x00\x00"  # IHDR CRC
    photo64 = b64(photo)
    cases = [
        # -- malformed images -------------------------------------------------------------------------
        ("truncated JPEG", dict(data=jpeg[: len(jpeg) // 3], headers=RAW), 400, "corrupt_image"),
        ("truncated PNG", dict(data=png[: len(png) // 2], headers=RAW), 400, "corrupt_image"),
        ("JPEG header only", dict(data=jpeg[:180], headers=RAW), 400, None),
        ("PNG with a corrupt header CRC", dict(data=bytes(corrupt_png), headers=RAW), 400, None),
        ("PNG signature then garbage", dict(data=b"\x89PNG\r\n\x1a\n" + b"\x07" * 300, headers=RAW), 400, None),
        ("zero bytes", dict(data=b"", headers=RAW), 400, None),
        ("zero bytes as JSON base64", dict(json={"image": ""}), 400, "empty_image"),
        ("1x1 image", dict(data=encode(Image.new("RGB", (1, 1)), "PNG"), headers=RAW), 400, "image_too_small"),
        ("decompression bomb PNG declaring 60000x60000",
         dict(data=png_declaring(60000, 60000), headers=RAW), 413, "image_too_large"),
        ("decompression bomb JPEG declaring 65000x65000",
         dict(data=jpeg_declaring(65000, 65000), headers=RAW), 413, "image_too_large"),
        ("ICO (unsupported format)", dict(data=encode(Image.new("RGB", (32, 32)), "ICO"), headers=RAW), 415,
         "unsupported_image_format"),
        ("an iPhone's HEIC photo", dict(data=b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200,
                                      headers={"Content-Type": "image/heic"}), 415, "unsupported_image_format"),
        ("a PDF document", dict(data=b"%PDF-1.7\n" + b"0" * 200, headers=RAW), 400, "not_an_image"),
        ("text sent as image/jpeg", dict(data=b"this is not a picture at all", headers={"Content-Type": "image/jpeg"}),
         400, "not_an_image"),
        ("HTML sent as image/png", dict(data=b"<!doctype html><html></html>", headers={"Content-Type": "image/png"}),
         400, "not_an_image"),
        ("JSON sent as octet-stream", dict(data=json.dumps({"image": photo64[:20]}).encode(), headers=RAW), 400,
         "not_an_image"),
        ("text/plain body", dict(data="just words", headers={"Content-Type": "text/plain"}), 415, None),
        ("URL-encoded form without an image field",
         dict(data=b"a=b&c=d", headers={"Content-Type": "application/x-www-form-urlencoded"}), 400, "missing_image"),
        # -- malformed JSON and base64 ----------------------------------------------------------------
        ("malformed JSON", dict(data=b'{"image": "abc', headers={"Content-Type": "application/json"}), 400,
         "malformed_json"),
        ("JSON that is not UTF-8", dict(data=b'{"image": "\xff\xfe"}', headers={"Content-Type": "application/json"}),
         400, None),
        ("JSON list body", dict(json=[photo64]), 400, None),
        ("JSON without an image", dict(json={"target": 3}), 400, "missing_image"),
        ("base64 with invalid characters", dict(json={"image": "!!!not base64!!!"}), 400, "bad_base64"),
        ("base64 of text", dict(json={"image": b64(b"hello world, no pixels here")}), 400, "not_an_image"),
        ("truncated base64 image", dict(json={"image": photo64[: len(photo64) // 2 + 1]}), 400, None),
        # -- wrong field types and absurd options -----------------------------------------------------
        ("image field is a number", dict(json={"image": 12345}), 400, "bad_base64"),
        ("image field is a list", dict(json={"image": [photo64]}), 400, "bad_base64"),
        ("target is a list", dict(json={"image": photo64, "target": [1, 2]}), 400, "invalid_target"),
        ("target is a boolean", dict(json={"image": photo64, "target": True}), 400, "invalid_target"),
        ("target index 10**12", dict(json={"image": photo64, "target": 10 ** 12}), 400, "target_out_of_range"),
        ("sparsity is text", dict(json={"image": photo64, "sparsity": "lots"}), 400, "invalid_option"),
        ("sparsity NaN", dict(json={"image": photo64, "sparsity": "NaN"}), 400, "invalid_option"),
        ("sparsity 1.0", dict(json={"image": photo64, "sparsity": 1.0}), 400, "invalid_sparsity"),
        ("sparsity in a header is not a number", dict(data=photo, headers={**RAW, "X-Explain-Sparsity": "0.5.5"}),
         400, "invalid_option"),
        ("top_k 0", dict(json={"image": photo64, "top_k": 0}), 400, "invalid_top_k"),
        ("top_k 10**9", dict(json={"image": photo64, "top_k": 10 ** 9}), 400, "invalid_top_k"),
        ("outputs is a number", dict(json={"image": photo64, "outputs": 7}), 400, "invalid_option"),
        ("unknown colormap", dict(json={"image": photo64, "colormap": "rainbow-unicorn"}), 400, "unknown_colormap"),
        ("method is a number", dict(json={"image": photo64, "method": 3}), 400, "invalid_option"),
        ("unknown option", dict(json={"image": photo64, "steps_please": 10 ** 6}), 400, "unknown_option"),
        # -- visualisation settings and several targets, through each transport ---------------------
        ("visualization unknown (JSON)", dict(json={"image": photo64, "visualization": "dots"}), 400,
         "invalid_visualization"),
        ("clip_percent_upper 101 (header)", dict(data=photo, headers={**RAW, "X-Explain-Clip-Percent-Upper": "101"}),
         400, "invalid_visualization"),
        ("clip_percent_lower above the upper (multipart)",
         dict(files={"image": ("photo.png", photo), "clip_percent_lower": (None, "99.95")}), 400,
         "invalid_visualization"),
        ("overlay_type unknown (KServe v1 parameters)",
         dict(json={"instances": [{"image": {"b64": photo64}}], "parameters": {"overlay_type": "sepia"}}), 400,
         "invalid_visualization"),
        ("smooth is text (KServe v2 parameters)",
         dict(json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [photo64]}],
                    "parameters": {"smooth": "blurry"}}), 400, "invalid_visualization"),
        ("polarity unknown (header)", dict(data=photo, headers={**RAW, "X-Explain-Polarity": "up"}), 400,
         "invalid_visualization"),
        ("colormap unknown (multipart)", dict(files={"image": ("photo.png", photo), "colormap": (None, "rainbow")}),
         400, "unknown_colormap"),
        ("duplicate targets, label and index (JSON)", dict(json={"image": photo64, "targets": ["espresso", 967]}),
         400, "duplicate_target"),
        ("duplicate targets (multipart)", dict(files={"image": ("photo.png", photo), "targets": (None, "967,967")}),
         400, "duplicate_target"),
        ("unknown label among targets (header)",
         dict(data=photo, headers={**RAW, "X-Explain-Targets": "espresso,no such class"}), 400, "unknown_label"),
        ("unknown label among one instance's targets (KServe v1)",
         dict(json={"instances": [{"image": {"b64": photo64}, "targets": [967]},
                                  {"image": {"b64": photo64}, "targets": ["cup", "no such class"]}]}), 400,
         "unknown_label"),
        ("explain_top_k above the cap (KServe v2 parameters)",
         dict(json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [photo64]}],
                    "parameters": {"explain_top_k": 11}}), 400, "too_many_targets"),
        ("11 targets (JSON)", dict(json={"image": photo64, "targets": list(range(11))}), 400, "too_many_targets"),
        ("explain_top_k 0 (header)", dict(data=photo, headers={**RAW, "X-Explain-Explain-Top-K": "0"}), 400,
         "invalid_option"),
        ("targets is an empty list (JSON)", dict(json={"image": photo64, "targets": []}), 400, "invalid_target"),
        ("target and targets together (JSON)", dict(json={"image": photo64, "target": 967, "targets": [968, 925]}),
         400, "conflicting_targets"),
        ("parameters is not an object", dict(json={"instances": [photo64], "parameters": [1]}), 400, "bad_request"),
        ("instances is not a list", dict(json={"instances": {"image": photo64}}), 400, "bad_request"),
        ("17 KServe instances", dict(json={"instances": [photo64] * 17}), 413, "too_many_instances"),
        ("KServe v2 without an image tensor",
         dict(json={"inputs": [{"name": "target", "datatype": "INT64", "shape": [1], "data": [1]}]}), 400,
         "missing_image"),
        ("multipart without an image field", dict(files={"target": (None, "3")}), 400, "missing_image"),
        ("body above max_request_size", dict(data=b"\0" * (max_request_size + 1024), headers=RAW), 413, None),
        # -- unusual but valid: the handler converts them (200) ---------------------------------------
        ("valid 16-bit grayscale PNG (converted)", dict(data=sixteen_bit_png(), headers=RAW), 200, None),
        ("valid CMYK JPEG (converted)", dict(data=encode(gradient_image((64, 48), "CMYK"), "JPEG"), headers=RAW), 200,
         None),
        ("valid palette PNG (converted)", dict(data=encode(gradient_image((64, 48)).convert("P"), "PNG"), headers=RAW),
         200, None),
        ("valid palette PNG with transparency (composited)", dict(data=palette_png_with_transparency(), headers=RAW),
         200, None),
        ("valid animated GIF (first frame)", dict(data=animated_gif(), headers=RAW), 200, None),
        ("valid grayscale JPEG (converted)", dict(data=encode(gradient_image((64, 48), "L"), "JPEG"), headers=RAW),
         200, None),
        ("valid RGBA PNG (composited)", dict(data=encode(gradient_image((64, 48), "RGBA"), "PNG"), headers=RAW), 200,
         None),
        ("valid EXIF-rotated JPEG (turned upright)", dict(data=exif_rotated_jpeg(), headers=RAW), 200, None),
        # 1.6 M pixels in 12 kB: resized to a 256-pixel shorter side it would be 410 M pixels without the window
        ("valid 8x200000 strip (centre window)", dict(data=encode(Image.new("RGB", (8, 200_000), (200, 10, 10)),
                                                                  "PNG"), headers=RAW), 200, None),
    ]
    return cases
