"""Image inputs: every accepted form decodes to the same pixels; every bad one is refused with a clear message."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from evev2.infer.errors import ImageInputError
from evev2.infer.images import ImageLimits, load_image


@pytest.fixture(scope="module")
def noise_png() -> tuple[np.ndarray, bytes]:
    pixels = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return pixels, buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def test_every_accepted_form_gives_the_same_pixels(noise_png, tmp_path):
    pixels, png = noise_png
    path = tmp_path / "noise.png"
    path.write_bytes(png)
    wrapped = "\n".join(base64.b64encode(png).decode()[i:i + 76] for i in range(0, 200, 76))  # MIME line breaks
    sources = [Image.fromarray(pixels), png, bytearray(png), str(path), path, data_url(png),
               "data:;base64," + base64.b64encode(png).decode(),
               "data:image/png;base64," + wrapped + base64.b64encode(png).decode()[228:]]
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("source, message", [
    (b"definitely not an image", "cannot decode"),
    ("data:text/plain;base64,aGVsbG8=", "expected image/*"),
    ("data:image/png,rawpayload", "base64"),
    ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
    ("data:image/png;base64", "malformed data URL"),
    ("http://127.0.0.1:9/cat.png", "remote image URLs are disabled"),
    ("HTTPS://example.com/cat.png", "remote image URLs are disabled"),
    (12345, "unsupported image input"),
])
def test_bad_sources_are_refused_with_a_reason(source, message):
    with pytest.raises(ImageInputError, match=message):
        load_image(source)


def test_corrupt_and_truncated_images_are_refused(noise_png, tmp_path):
    _, png = noise_png
    with pytest.raises(ImageInputError, match="corrupt or truncated|cannot decode"):
        load_image(png[: len(png) // 2])
    with pytest.raises(ImageInputError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_byte_limit_is_checked_before_decoding(noise_png, tmp_path):
    _, png = noise_png
    limits = ImageLimits(max_bytes=len(png) - 1)
    huge = "data:image/png;base64," + "A" * 4_000_000  # would be 3 MB; refused from its length alone
    for source in (png, data_url(png), huge):
        with pytest.raises(ImageInputError, match="over the limit"):
            load_image(source, limits)
    path = tmp_path / "noise.png"
    path.write_bytes(png)
    with pytest.raises(ImageInputError, match="over the limit"):
        load_image(path, limits)
    assert load_image(png, ImageLimits(max_bytes=len(png))).size == (56, 40)


def test_pixel_limit_is_checked_on_the_header(noise_png):
    pixels, png = noise_png
    with pytest.raises(ImageInputError, match="over the cap"):
        load_image(png, ImageLimits(max_pixels=40 * 56 - 1))
    with pytest.raises(ImageInputError, match="over the cap"):
        load_image(Image.fromarray(pixels), ImageLimits(max_pixels=100))
    assert load_image(png, ImageLimits(max_pixels=40 * 56)).size == (56, 40)


def test_remote_images_are_fetched_only_when_enabled(noise_png, tmp_path):
    pixels, png = noise_png
    (tmp_path / "noise.png").write_bytes(png)
    (tmp_path / "big.png").write_bytes(png + b"\0" * 100)
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ImageInputError, match="disabled"):
            load_image(f"{base}/noise.png")
        remote = ImageLimits(allow_remote=True, max_bytes=len(png) + 50)
        np.testing.assert_array_equal(np.asarray(load_image(f"{base}/noise.png", remote)), pixels)
        with pytest.raises(ImageInputError, match="over the limit"):
            load_image(f"{base}/big.png", remote)
        with pytest.raises(ImageInputError, match="cannot fetch"):
            load_image(f"{base}/missing.png", remote)
        server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass
