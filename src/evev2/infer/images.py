"""Turn whatever a caller hands us as an image into a decoded RGB PIL image, within limits.

Accepted: PIL images, file paths, encoded bytes, and `data:image/...;base64,` URLs. Remote http(s) URLs are refused
unless explicitly enabled, because fetching caller-chosen URLs from a server is a request-forgery (SSRF) hole.
Byte limits are checked before decoding (a base64 payload by its length), pixel limits on the header before any
pixel is decoded (`open_image`), so one request cannot make the process allocate gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image

from evev2.data.image_processing import ImageLoadError, open_image
from evev2.infer.errors import ImageInputError

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray]

DEFAULT_MAX_IMAGE_PIXELS = 25_000_000  # 5000 x 5000; decoded RGB is 75 MB
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
REMOTE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost: encoded bytes, decoded pixels, and whether http(s) URLs may be fetched."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    allow_remote: bool = False


def load_image(source: ImageInput, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode one image source to upright RGB, or raise `ImageInputError` saying what is wrong with it."""
    if isinstance(source, Image.Image):
        data: Image.Image | bytes | Path = source
    elif isinstance(source, (bytes, bytearray)):
        data = _check_size(bytes(source), limits, "image")
    elif isinstance(source, str) and source.startswith("data:"):
        data = _decode_data_url(source, limits)
    elif isinstance(source, str) and source.lower().startswith(("http://", "https://")):
        data = _fetch_remote(source, limits)
    elif isinstance(source, (str, os.PathLike)):
        data = Path(source)
        if data.is_file() and data.stat().st_size > limits.max_bytes:
            raise ImageInputError(f"image file {data} has {data.stat().st_size} bytes, over the limit of "
                                  f"{limits.max_bytes}")
    else:
        raise ImageInputError(f"unsupported image input of type {type(source).__name__}; pass a PIL image, a path, "
                              "bytes or a data:image/...;base64, URL")
    try:
        return open_image(data, max_pixels=limits.max_pixels)
    except ImageLoadError as err:
        raise ImageInputError(str(err)) from err


def _check_size(data: bytes, limits: ImageLimits, what: str) -> bytes:
    if len(data) > limits.max_bytes:
        raise ImageInputError(f"{what} has {len(data)} bytes, over the limit of {limits.max_bytes}")
    return data


def _decode_data_url(url: str, limits: ImageLimits) -> bytes:
    """`data:[image/<subtype>][;base64],<payload>`; only base64 payloads of an image (or unstated) media type."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageInputError("malformed data URL: no ',' between header and payload")
    params = header[len("data:"):].split(";")
    media_type = params[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise ImageInputError(f"data URL has media type {media_type!r}; expected image/*")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageInputError("data URL images must be base64-encoded (data:image/png;base64,...)")
    payload = "".join(payload.split())  # line breaks are legal inside base64
    if len(payload) // 4 * 3 > limits.max_bytes:  # checked before decoding: never materialise an oversized payload
        raise ImageInputError(f"data URL image has about {len(payload) // 4 * 3} bytes, over the limit of "
                              f"{limits.max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageInputError(f"data URL payload is not valid base64: {err}") from err
    return _check_size(data, limits, "data URL image")


def _fetch_remote(url: str, limits: ImageLimits) -> bytes:
    if not limits.allow_remote:
        raise ImageInputError("remote image URLs are disabled (server-side request forgery risk); send the image "
                              "as a data:image/...;base64, URL, or enable remote images explicitly")
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 (raises for a port that is not a number in 0..65535)
    except ValueError as err:
        raise ImageInputError(f"malformed image URL {url!r}: {err}") from err
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 (scheme checked above)
            data = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        # HTTPException: a URL with control characters (InvalidURL), or a server that breaks HTTP (bad status line,
        # broken chunked body, overlong or too many header lines). The URL is quoted: it may hold anything, lone
        # surrogates included, which a JSON error body could not encode.
        raise ImageInputError(f"cannot fetch image {url!r}: {err}") from err
    return _check_size(data, limits, f"image at {url!r}")
