"""Pixel preprocessing for EVEv2: robust image opening, resolution policies and CLIP normalisation.

An EVEv2 patch embedding turns every `patch_size * patch_merge` (16 * 2 = 32) pixel square into one token, so every
policy here returns sides that are multiples of that unit; nothing is padded or cropped. The target size is a pure
function of the input size (`target_hw`), so data code can count image tokens (`num_image_tokens`) without decoding.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from typing import Literal, Sequence, Union

import numpy as np
import torch
from PIL import ExifTags, Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A decoded RGB image of this many pixels takes 300 MB; anything larger is treated as a decompression bomb.
DEFAULT_MAX_DECODE_PIXELS = 100_000_000
# An image file stores at most 8 bytes per pixel (16-bit RGBA, uncompressed): a file larger than that many bytes per
# pixel of the decode cap (+ 16 MiB of metadata) is no image we would decode (a video, a tar shard named .jpg), and is
# refused unread instead of being loaded whole into memory.
BYTES_PER_PIXEL = 8
# Pixel cap of the "native" policy: the official eval budget, about 2.5k tokens.
DEFAULT_NATIVE_MAX_PIXELS = 1600 * 1600

ResizePolicy = Literal["max_area", "official_train", "official_eval", "longest_edge", "native", "square"]
RESIZE_POLICIES: tuple[str, ...] = ("max_area", "official_train", "official_eval", "longest_edge", "native", "square")
ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image]

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# EXIF orientation -> the transposition that makes the image upright (as `ImageOps.exif_transpose`, without rewriting
# the EXIF block, which fails on broken metadata)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
# What Pillow raises on a malformed file, per its own fuzzing tests (Tests/oss-fuzz/test_fuzzers.py), plus EOFError
# (truncated data) and TypeError (a TIFF tag of the wrong type, e.g. RATIONAL strip offsets, found by fuzzing the server).
# DecompressionBombError and UnidentifiedImageError are among them (OSError).
_PIL_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, MemoryError, NotImplementedError, OverflowError,
                    TypeError)


class ImageLoadError(ValueError):
    """An image could not be turned into RGB pixels (missing, corrupt, truncated, too large, odd mode).

    `reason` is "missing_image" for a file that does not exist and "bad_image" otherwise, the skip counters of
    `evev2.data.errors`, so a data pipeline can count skips per cause.
    """

    def __init__(self, message: str, reason: str = "bad_image") -> None:
        super().__init__(message)
        self.reason = reason


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return str(source)


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file, read only if it is one (a FIFO would block, /dev/zero would never end) and, with
    `max_bytes`, only if it is no larger.

    Raises OSError (FileNotFoundError when there is no such file; a plain OSError for anything that is not a regular
    file, or too large) or ValueError (a NUL in the path, or a name the file system encoding cannot hold).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise OSError(f"{path} has {info.st_size} bytes, over the limit of {max_bytes}")
        os.set_blocking(fd, True)  # back to plain reads (network file systems may honour the flag)
        with open(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)


def _read_file(path: str | os.PathLike, max_pixels: int) -> bytes:
    """An image file's bytes; one larger than `BYTES_PER_PIXEL * max_pixels` (+ 16 MiB of metadata) is not read."""
    try:
        return read_regular_file(path, max_bytes=BYTES_PER_PIXEL * max_pixels + (16 << 20))
    except FileNotFoundError as err:
        raise ImageLoadError(f"image file not found: {path}", reason="missing_image") from err
    except OSError as err:
        raise ImageLoadError(f"cannot read image file {path}: {err}") from err
    except ValueError as err:  # a NUL in the path, or a name the file system encoding cannot hold
        raise ImageLoadError(f"invalid image path {path!r}: {err}") from err


def _open_lazily(source: ImageSource, max_pixels: int) -> Image.Image:
    """Read only the header, so the pixel cap is checked before any pixel is decoded."""
    if isinstance(source, Image.Image):
        image = source
    else:
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else _read_file(source, max_pixels)
        try:
            with warnings.catch_warnings():
                # We enforce our own cap below; PIL's global one would only warn or disagree with it.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise ImageLoadError(f"image {_describe(source)} is a decompression bomb: {err}") from err
        except Image.UnidentifiedImageError as err:
            raise ImageLoadError(
                f"cannot decode image {_describe(source)}: not an image in any format Pillow reads") from err
        except _PIL_DATA_ERRORS as err:
            raise ImageLoadError(f"cannot decode image {_describe(source)}: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"image {_describe(source)} declares {width}x{height} = {width * height} pixels, over the cap of "
            f"{max_pixels} (decompression bomb guard)"
        )
    if width < 1 or height < 1:
        raise ImageLoadError(f"image {_describe(source)} has an empty size {width}x{height}")
    return image


def _decode(image: Image.Image, source: ImageSource) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"image {_describe(source)} is a decompression bomb: {err}") from err
    except _PIL_DATA_ERRORS as err:
        # Truncated files land here ("image file is truncated"), as do broken chunks and bad huffman tables.
        raise ImageLoadError(f"cannot decode image {_describe(source)} (corrupt or truncated): {err}") from err


def _exif_orientation(image: Image.Image, source: ImageSource | None = None) -> int:
    """The EXIF orientation, 1 to 8; 1 when there is none or it holds anything else.

    Reading it may decode the whole file (PNG keeps EXIF after the pixels), so a broken file fails here too.
    """
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _PIL_DATA_ERRORS as err:
        raise ImageLoadError(f"cannot read the EXIF data of image {_describe(source or image)}: {err}") from err
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float greyscale -> 8 bits, scaling the value range instead of clipping it.

    PIL's own `convert("L")` clips these modes at 255, which turns most 16-bit photos white.
    I;16* and I are read as 16-bit samples (0..65535, PIL decodes 16-bit PNG/TIFF into them); F is read as
    0..1 when all finite values lie in that range, else as 0..255.
    """
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        finite_max = float(values.max()) if values.size else 0.0
        scale = 255.0 if 0.0 <= float(values.min()) and finite_max <= 1.0 else 1.0
        return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    # rint(v / 257) clipped to 0..255, in 32-bit integers (a quarter of the memory of float64 at the pixel cap):
    # floor((v + 128) / 257) equals it on 0..65535, as v / 257 is never a tie (257 is odd); 65535 / 257 = 255.
    values = np.asarray(image).astype(np.int32)
    np.clip(values, 0, 65535, out=values)
    values += 128
    values //= 257
    return values.astype(np.uint8)


def to_rgb(image: Image.Image, background: Sequence[float] = CLIP_MEAN) -> Image.Image:
    """Any PIL mode -> upright RGB. Transparent pixels are composited on `background` (0..1 per channel).

    The CLIP mean is the default background because it normalises to zero, the same "no content" value that
    the official code uses for its dummy images. The input is never modified; an upright RGB image is returned as is.
    """
    orientation = _exif_orientation(image)
    if orientation != 1:
        image = image.transpose(_UPRIGHT[orientation])
    if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(_high_depth_to_uint8(image), mode="L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        fill = tuple(int(round(c * 255)) for c in background)
        canvas = Image.new("RGB", rgba.size, fill)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageLoadError(f"cannot convert image mode {image.mode} to RGB: {err}") from err


def open_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> Image.Image:
    """Open a path, encoded bytes or PIL image as upright RGB, or raise `ImageLoadError` saying why not.

    The pixel cap is checked on the header size before decoding, independent of PIL's global
    `Image.MAX_IMAGE_PIXELS`, so a crafted file cannot allocate gigabytes.
    """
    image = _open_lazily(source, max_pixels)
    _decode(image, source)
    return to_rgb(image)


def _round_to_unit(side: float, unit: int) -> int:
    """Nearest multiple of `unit`, at least one unit (Python's round, as in the official training code)."""
    return max(int(round(side / unit)), 1) * unit


def _fit_area(height: float, width: float, max_area: int, unit: int) -> tuple[int, int]:
    """Downscale-only to area <= max_area, sides rounded to the unit, and the cap then holds exactly.

    Rounding to the nearest unit (or the one-unit minimum on very thin images) can overshoot the area; then the side
    that was rounded up the most is floored until the cap holds, so the token budget is a hard bound.
    """
    scale = math.sqrt(height * width / max_area)
    if scale > 1:
        height, width = height / scale, width / scale
    out_h, out_w = _round_to_unit(height, unit), _round_to_unit(width, unit)
    if out_h * out_w > max_area:
        if out_h / height >= out_w / width:
            out_h = max(unit, (max_area // out_w) // unit * unit)
        else:
            out_w = max(unit, (max_area // out_h) // unit * unit)
    if out_h * out_w > max_area:  # the one-unit minimum forced it; shrink the other side too
        if out_h == unit:
            out_w = max(unit, (max_area // out_h) // unit * unit)
        else:
            out_h = max(unit, (max_area // out_w) // unit * unit)
    return out_h, out_w


def target_hw(
    height: int,
    width: int,
    policy: ResizePolicy = "max_area",
    max_size: int = 800,
    max_pixels: int = DEFAULT_NATIVE_MAX_PIXELS,
    unit: int = 32,
) -> tuple[int, int]:
    """The (H, W) an image of (height, width) is resized to under `policy`; both are multiples of `unit`.

    See `EVEImageProcessor` for what each policy means.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max_size < unit:
        raise ValueError(f"max_size {max_size} is smaller than one token ({unit} px)")
    if policy == "max_area":
        return _fit_area(height, width, max_size * max_size, unit)
    if policy == "native":
        return _fit_area(height, width, max_pixels, unit)
    if policy == "official_train":
        scale = math.sqrt(width * height) / max_size
        h, w = (height / scale, width / scale) if scale > 1 else (float(height), float(width))
        return _round_to_unit(h, unit), _round_to_unit(w, unit)
    if policy == "official_eval":
        scale = math.sqrt(width * height) / max_size
        return (max(math.ceil(height / scale / unit), 1) * unit, max(math.ceil(width / scale / unit), 1) * unit)
    if policy == "longest_edge":
        scale = max(height, width) / max_size
        h, w = (height / scale, width / scale) if scale > 1 else (float(height), float(width))
        cap = max_size // unit * unit
        return min(_round_to_unit(h, unit), cap), min(_round_to_unit(w, unit), cap)
    if policy == "square":
        side = _round_to_unit(max_size, unit)
        return side, side
    raise ValueError(f"unknown resize policy {policy!r}; choose one of {RESIZE_POLICIES}")


def num_image_tokens(height: int, width: int, unit: int = 32) -> int:
    """Tokens for an (H, W) image after resizing: one class token, then each row of patches plus a split token."""
    if height % unit or width % unit or height < unit or width < unit:
        raise ValueError(f"image size {height}x{width} is not a positive multiple of {unit}")
    return 1 + (height // unit) * (width // unit + 1)


def grid_token_index(row: int, column: int, width: int, unit: int = 32) -> int:
    """Index, among an image's tokens, of the patch at (row, column) of an image `width` px wide (after resizing):
    the class token comes first, and a split token closes every row."""
    return 1 + row * (width // unit + 1) + column


class EVEImageProcessor(BaseImageProcessor):
    """Resize to multiples of 32 px under a resolution policy, then CLIP rescale (x1/255) and normalise.

    Returns `pixel_values` as a list of float32 `[3, H, W]` tensors: sizes differ per image and nothing is padded.

    Policies (`resize_policy`) and how they map onto the paper's Figure 8 resize settings:

    - `"max_area"` (default, train and inference; the paper's AnyRatio_LD, area-limited): downscale only so that
      H*W <= max_size**2, sides rounded to the nearest multiple of 32 (min 32); unlike `official_train` the area cap
      is a hard bound after rounding. Large JPEGs are decoded at a reduced DCT scale first when that stays above the
      target (much faster, same output size).
    - `"official_train"`: the official training path bit for bit: s = sqrt(w*h)/max_size, divide both sides by s if
      s > 1, round each side to the nearest multiple of 32 (min 32), PIL bicubic resize, CLIP normalisation.
    - `"official_eval"`: the official inference path: always rescale to area ~ max_size**2 (small images are
      upscaled), each side ceil(side/s/32)*32.
    - `"longest_edge"` (AnyRatio_maxL): downscale only so the longest side <= max_size.
    - `"native"` (AnyResolution): the image's own size rounded to 32, downscaled only above `max_pixels`.
    - `"square"` (the fixed-resolution setting): max_size x max_size, aspect ratio not kept.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        max_size: int = 800,
        resize_policy: ResizePolicy = "max_area",
        max_pixels: int = DEFAULT_NATIVE_MAX_PIXELS,
        patch_size: int = 16,
        patch_merge: int = 2,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        resample: int = Image.Resampling.BICUBIC,
        **kwargs,
    ) -> None:
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        if resize_policy not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {resize_policy!r}; choose one of {RESIZE_POLICIES}")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"image_mean/image_std must be 3 values with std > 0, got {image_mean}, {image_std}")
        self.max_size = int(max_size)
        self.resize_policy = resize_policy
        self.max_pixels = int(max_pixels)
        self.patch_size = int(patch_size)
        self.patch_merge = int(patch_merge)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.resample = int(resample)

    @property
    def unit(self) -> int:
        """Pixels per token side: patch_size * patch_merge."""
        return self.patch_size * self.patch_merge

    def target_hw(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) this processor resizes an image of (height, width) to."""
        return target_hw(height, width, self.resize_policy, self.max_size, self.max_pixels, self.unit)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens for an input image of (height, width), without decoding or resizing it."""
        return num_image_tokens(*self.target_hw(height, width), unit=self.unit)

    def load(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> tuple[Image.Image, int, int]:
        """`open_image`, plus the upright full (height, width); large JPEGs decode at a reduced DCT scale.

        The reduced decode is only used by the non-official policies and always stays at or above the target size;
        the target is computed from the full size, so the token count is what `num_image_tokens` predicts.
        """
        image = _open_lazily(source, max_pixels)
        width, height = image.size
        if image.format == "JPEG" and not self.resize_policy.startswith("official"):
            # JPEG keeps EXIF in its header: the orientation is known before any pixel is decoded
            swapped = _exif_orientation(image, source) in _ROTATING_ORIENTATIONS
            out_h, out_w = self.target_hw(*((width, height) if swapped else (height, width)))
            image.draft(None, (out_h, out_w) if swapped else (out_w, out_h))  # PIL wants the stored (w, h)
        _decode(image, source)  # before reading EXIF, which decodes a PNG anyway (its EXIF may follow the pixels)
        if _exif_orientation(image, source) in _ROTATING_ORIENTATIONS:
            width, height = height, width
        return to_rgb(image), height, width

    def resize(self, image: Image.Image, height: int, width: int) -> Image.Image:
        """Resize an RGB image whose full size is (height, width) to its policy target."""
        out_h, out_w = self.target_hw(height, width)
        if image.size == (out_w, out_h):
            return image
        return image.resize((out_w, out_h), resample=self.resample)

    def normalize_to_tensor(self, image: Image.Image) -> torch.Tensor:
        """uint8 RGB -> float32 [3, H, W] = (x / 255 - mean) / std, done as one multiply-add per channel."""
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.image_std], dtype=torch.float32)
        offset = torch.tensor([-m / s for m, s in zip(self.image_mean, self.image_std)], dtype=torch.float32)
        hwc = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W, 3], a writable copy of the bytes
        chw = torch.empty((3, hwc.shape[0], hwc.shape[1]), dtype=torch.float32)
        chw.copy_(hwc.permute(2, 0, 1))  # [3, H, W]
        return chw.mul_(scale[:, None, None]).add_(offset[:, None, None])

    def preprocess(self, images: ImageSource | Sequence[ImageSource]) -> BatchFeature:
        """One image or a list (PIL images, paths or encoded bytes) -> BatchFeature(pixel_values=[[3, H, W], ...])."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        pixel_values = [self.normalize_to_tensor(self.resize(*self.load(item))) for item in batch]
        return BatchFeature(data={"pixel_values": pixel_values})
