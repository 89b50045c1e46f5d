import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from evev2.data.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    EVEImageProcessor,
    ImageLoadError,
    num_image_tokens,
    open_image,
    target_hw,
)

MEAN_RGB = tuple(round(c * 255) for c in CLIP_MEAN)  # (123, 117, 104)


def _random_rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encoded(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _reference_normalize(rgb_uint8):
    """float64 (x / 255 - mean) / std, channels first."""
    x = rgb_uint8.astype(np.float64) / 255.0
    x = (x - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return x.transpose(2, 0, 1)


# ---- sizes: every policy against formulas worked out by hand -------------------------------------------------------

@pytest.mark.parametrize(("height", "width", "expected"), [
    (480, 640, (480, 640)),  # s = 0.69 < 1: no scaling, 15 x 20 units
    (200, 3000, (192, 3008)),  # s = 0.97: 6.25 -> 6 units, 93.75 -> 94 units
    (20, 20, (32, 32)),  # tiny: one-unit minimum
    (3000, 4000, (704, 928)),  # s = 4.33: 692.8 -> 22 units, 923.8 -> 29 units
    (80, 80, (64, 64)),  # 2.5 units: Python's round goes to even (2), as the official code does
    (112, 112, (128, 128)),  # 3.5 units -> 4
])
def test_official_train_sizes(height, width, expected):
    assert target_hw(height, width, "official_train", max_size=800) == expected


@pytest.mark.parametrize(("height", "width", "max_size", "expected"), [
    (480, 640, 1600, (1408, 1856)),  # known value: s = 0.3464, 1385.6 -> 44 units, 1847.5 -> 58 units
    (50, 100, 800, (576, 1152)),  # upscales small images: 565.7 -> 18 units, 1131.4 -> 36 units
    (3000, 4000, 800, (704, 928)),  # 692.8 -> 22 units, 923.8 -> 29 units (ceil)
])
def test_official_eval_sizes(height, width, max_size, expected):
    assert target_hw(height, width, "official_eval", max_size=max_size) == expected


def test_max_area_sizes_keep_the_area_cap_after_rounding():
    assert target_hw(480, 640, "max_area", max_size=800) == (480, 640)
    # official_train rounds 4000x3000 to 704x928 = 653,312 px > 800^2; the height, rounded up most, drops a unit
    assert target_hw(3000, 4000, "max_area", max_size=800) == (672, 928)
    # a 10x64000 strip: the one-unit minimum height forces the width down to 640000 / 32 = 20000
    assert target_hw(10, 64000, "max_area", max_size=800) == (32, 20000)
    assert target_hw(20, 20, "max_area", max_size=800) == (32, 32)  # never upscales beyond the one-unit minimum


def test_max_area_property_over_random_sizes():
    rng = np.random.default_rng(1)
    for height, width in rng.integers(10, 5000, size=(300, 2)):
        out_h, out_w = target_hw(int(height), int(width), "max_area", max_size=800)
        assert out_h % 32 == 0 and out_w % 32 == 0 and out_h >= 32 and out_w >= 32
        assert out_h * out_w <= 800 * 800
        if height * width <= 700 * 700 and min(height, width) >= 64:  # no downscale: within half a unit per side
            assert abs(out_h - height) <= 16 and abs(out_w - width) <= 16
        if min(out_h, out_w) >= 256:  # aspect ratio kept up to rounding
            assert math.isclose(out_w / out_h, width / height, rel_tol=0.15)


def test_longest_edge_native_and_square_sizes():
    assert target_hw(2000, 3000, "longest_edge", max_size=800) == (544, 800)  # 533.3 -> 17 units
    assert target_hw(300, 200, "longest_edge", max_size=800) == (288, 192)  # downscale only
    assert target_hw(300, 500, "native", max_pixels=10**6) == (288, 512)  # own size, rounded
    # over the cap: s = 1.2247 -> 244.9 x 408.2 -> 256 x 416 = 106,496 px > 1e5, so the height drops to 224
    assert target_hw(300, 500, "native", max_pixels=100_000) == (224, 416)
    assert target_hw(300, 500, "square", max_size=800) == (800, 800)
    with pytest.raises(ValueError, match="unknown resize policy"):
        target_hw(300, 500, "bogus")


def test_num_image_tokens():
    assert num_image_tokens(64, 96) == 1 + 2 * (3 + 1)
    assert EVEImageProcessor().num_image_tokens(480, 640) == 1 + 15 * 21
    assert EVEImageProcessor(resize_policy="official_eval", max_size=1600).num_image_tokens(480, 640) == 2597
    with pytest.raises(ValueError, match="multiple of 32"):
        num_image_tokens(50, 64)


# ---- pixel values ---------------------------------------------------------------------------------------------------

def test_pixel_values_match_numpy_reference_without_resize():
    rgb = _random_rgb(96, 64)
    out = EVEImageProcessor(resize_policy="native")(Image.fromarray(rgb))
    values = out["pixel_values"]
    assert isinstance(values, list) and len(values) == 1
    assert values[0].dtype == torch.float32 and values[0].shape == (3, 96, 64)
    np.testing.assert_allclose(values[0].numpy(), _reference_normalize(rgb), atol=2e-6)


def test_batch_of_different_sizes_returns_a_list_with_policy_sizes():
    images = [Image.fromarray(_random_rgb(300, 500, seed=2)), Image.fromarray(_random_rgb(1000, 1200, seed=3))]
    processor = EVEImageProcessor(max_size=512)
    values = processor(images)["pixel_values"]
    for image, tensor in zip(images, values):
        expected = processor.target_hw(image.height, image.width)
        assert tensor.shape == (3, *expected)
        resized = np.asarray(image.resize(expected[::-1], resample=Image.Resampling.BICUBIC))
        np.testing.assert_allclose(tensor.numpy(), _reference_normalize(resized), atol=2e-6)


def test_official_train_matches_transformers_clip_processor():
    """The official path: PIL default (bicubic) resize to the rounded size, then CLIPImageProcessor."""
    image = Image.fromarray(_random_rgb(300, 400, seed=4))
    ours = EVEImageProcessor(resize_policy="official_train")(image)["pixel_values"][0]
    reference = CLIPImageProcessorPil(do_resize=False, do_center_crop=False)(
        image.resize((384, 288)), return_tensors="pt")["pixel_values"][0]
    assert ours.shape == reference.shape == (3, 288, 384)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_jpeg_draft_decode_keeps_target_size_and_content():
    rgb = _random_rgb(150, 200, seed=5)
    rgb = np.asarray(Image.fromarray(rgb).resize((2000, 1500), resample=Image.Resampling.BILINEAR))
    data = _encoded(Image.fromarray(rgb), "JPEG", quality=95)
    processor = EVEImageProcessor(max_size=512)
    fast = processor(data)["pixel_values"][0]
    assert fast.shape == (3, *processor.target_hw(1500, 2000))
    full = processor(open_image(data))["pixel_values"][0]  # decoded at full size, then resized
    assert (fast - full).abs().mean() < 0.05  # same picture; only the decoder's downscale differs


def test_save_and_load_round_trip(tmp_path):
    processor = EVEImageProcessor(max_size=1600, resize_policy="official_eval", max_pixels=123_456, patch_size=8)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    loaded = EVEImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert (loaded.max_size, loaded.resize_policy, loaded.unit) == (1600, "official_eval", 16)
    image = Image.fromarray(_random_rgb(40, 70, seed=6))
    torch.testing.assert_close(loaded(image)["pixel_values"][0], processor(image)["pixel_values"][0])


def test_constructor_rejects_unknown_policy():
    with pytest.raises(ValueError, match="unknown resize policy"):
        EVEImageProcessor(resize_policy="crop")


# ---- opening images: modes ------------------------------------------------------------------------------------------

def test_greyscale_palette_cmyk_and_bilevel_become_rgb(tmp_path):
    grey = np.random.default_rng(7).integers(0, 256, (20, 30), dtype=np.uint8)
    out = open_image(Image.fromarray(grey, mode="L"))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.repeat(grey[..., None], 3, axis=2))
    palette = Image.fromarray(_random_rgb(20, 30, seed=8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    path = tmp_path / "p.png"
    palette.save(path)
    assert np.array_equal(np.asarray(open_image(path)), np.asarray(palette.convert("RGB")))
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no black ink, full magenta + yellow = red
    assert open_image(_encoded(cmyk, "TIFF")).getpixel((3, 3)) == (255, 0, 0)
    bilevel = Image.new("1", (8, 8), 1)
    assert open_image(bilevel).getpixel((0, 0)) == (255, 255, 255)


def test_alpha_is_composited_on_the_clip_mean():
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 10, 50)
    rgba[0, :, 3] = 255  # opaque row
    rgba[1, :, 3] = 0  # transparent row
    rgba[2, :, 3] = 128  # half
    out = np.asarray(open_image(_encoded(Image.fromarray(rgba, mode="RGBA"), "PNG"))).astype(int)
    assert tuple(out[0, 0]) == (200, 10, 50)
    assert tuple(out[1, 0]) == MEAN_RGB
    expected_half = [round((c * 128 + m * 127) / 255) for c, m in zip((200, 10, 50), MEAN_RGB)]
    assert np.abs(out[2, 0] - expected_half).max() <= 1
    la = Image.fromarray(np.stack([np.full((3, 3), 90, np.uint8), np.zeros((3, 3), np.uint8)], -1), mode="LA")
    assert open_image(la).getpixel((1, 1)) == MEAN_RGB


def test_palette_transparency_is_composited(tmp_path):
    palette = Image.new("P", (5, 5), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 1)
    path = tmp_path / "t.png"
    palette.save(path, transparency=0)  # index 0 (red) is transparent
    out = open_image(path)
    assert out.getpixel((0, 0)) == (0, 0, 255) and out.getpixel((3, 3)) == MEAN_RGB


def test_sixteen_bit_and_float_images_scale_to_eight_bits(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # PIL writes a 16-bit greyscale PNG and reads it back as I;16 or I
    assert Image.open(path).mode in ("I;16", "I")
    out = np.asarray(open_image(path))[0, :, 0]
    assert out.tolist() == [0, 1, 128, 255]
    as_int32 = Image.fromarray(values.astype(np.int32), mode="I")
    assert np.asarray(open_image(as_int32))[0, :, 0].tolist() == [0, 1, 128, 255]
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(open_image(unit_float))[0, :, 0].tolist() == [0, 128, 255]
    wide_float = Image.fromarray(np.array([[-5.0, 100.0, 300.0]], dtype=np.float32), mode="F")
    assert np.asarray(open_image(wide_float))[0, :, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((40, 60, 3), dtype=np.uint8)
    stored[:10, :10] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    out = open_image(path)
    assert out.size == (40, 60)  # width and height swapped
    red, green, blue = out.getpixel((35, 4))  # the top-left corner moved to the top-right
    assert red > 200 and green < 60 and blue < 60
    processor = EVEImageProcessor(resize_policy="native")
    assert processor(path)["pixel_values"][0].shape == (3, 64, 32)  # sizes come from the upright 40x60 image


# ---- opening images: failures ---------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not found") as info:
        open_image(tmp_path / "nope.png")
    assert info.value.reason == "missing_image"


def test_undecodable_bytes():
    with pytest.raises(ImageLoadError, match="cannot decode") as info:
        open_image(b"this is not an image at all" * 10)
    assert info.value.reason == "bad_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, fmt):
    data = _encoded(Image.fromarray(_random_rgb(64, 64, seed=9)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated|cannot decode"):
        open_image(path)


def test_decompression_bomb_is_refused_before_decoding():
    data = _encoded(Image.new("L", (3000, 2000), 7), "PNG")  # tiny file, 6M pixels declared
    assert len(data) < 50_000
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        open_image(data, max_pixels=1_000_000)
    assert open_image(data, max_pixels=10_000_000).size == (3000, 2000)  # the cap is ours, not PIL's global
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        open_image(Image.new("RGB", (100, 100)), max_pixels=9_999)
