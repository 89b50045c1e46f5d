"""Images per second per core for decode + resize + normalise: EVEImageProcessor vs plain PIL + numpy.

Input: JPEG bytes of a 2000x1500 photo-like image (smooth gradients plus blurred noise, so the JPEG codec sees
realistic frequency content). Targets: the max_area policy at max_size 800 and 1600. One thread, so the numbers are
per core. Runs in about 15 s.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image, ImageFilter

from evev2.data.image_processing import CLIP_MEAN, CLIP_STD, EVEImageProcessor, target_hw

PHOTO_HW = (1500, 2000)
MAX_SIZES = (800, 1600)
SECONDS_PER_CASE = 3.0


def photo_like_jpeg(seed: int = 0) -> bytes:
    """A 2000x1500 JPEG with gradients, blurred colour noise and fine grain, at quality 90."""
    height, width = PHOTO_HW
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 80 * np.sin(x / 300), 100 + 60 * np.cos(y / 200), 90 + 50 * np.sin((x + y) / 500)], -1)
    blobs = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
    blobs = blobs.resize((width, height), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(6))
    grain = rng.normal(0, 8, (height, width, 3))
    pixels = np.clip(0.6 * base + 0.4 * np.asarray(blobs, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def baseline(data: bytes, max_size: int) -> np.ndarray:
    """What a plain data loader does: full decode, bicubic resize, float math in numpy, HWC -> CHW copy."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    out_h, out_w = target_hw(image.height, image.width, "max_area", max_size)
    array = np.asarray(image.resize((out_w, out_h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def images_per_second(fn, data: bytes) -> float:
    fn(data)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS_PER_CASE:
        fn(data)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> list[dict]:
    """Measure both pipelines at each target; print a table and return its rows."""
    torch.set_num_threads(1)
    data = photo_like_jpeg()
    rows = []
    for max_size in MAX_SIZES:
        processor = EVEImageProcessor(max_size=max_size, resize_policy="max_area")
        ours = images_per_second(lambda d: processor(d)["pixel_values"], data)
        plain = images_per_second(lambda d: baseline(d, max_size), data)
        out_h, out_w = processor.target_hw(*PHOTO_HW)
        rows.append({"target": f"{max_size}^2 -> {out_w}x{out_h}", "ours_img_s": round(ours, 1),
                     "baseline_img_s": round(plain, 1), "ratio": round(ours / plain, 2)})
    print(f"decode+resize+normalise, {PHOTO_HW[1]}x{PHOTO_HW[0]} JPEG ({len(data) // 1024} KiB), 1 thread")
    print(f"{'target':<24}{'ours img/s':>12}{'PIL+numpy img/s':>18}{'ratio':>8}")
    for row in rows:
        print(f"{row['target']:<24}{row['ours_img_s']:>12}{row['baseline_img_s']:>18}{row['ratio']:>8}")
    return rows


if __name__ == "__main__":
    main()
