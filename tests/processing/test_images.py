"""FlorenceVLProcessor image side: pixel values vs the original code's, an independent PIL/numpy computation, input
modes and types, and image errors."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from florence_vl_hf.processing import FlorenceVLProcessor, florence2_image_processor

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
FILL = (123, 116, 103)  # int(m * 255) of the ImageNet mean
ORIENTATION = 0x0112


def make_processor(base, image_size, image_aspect_ratio="pad"):
    return FlorenceVLProcessor(
        image_processor=florence2_image_processor(image_size),
        tokenizer=base.tokenizer,
        num_image_tokens=2,
        task_prompt_names=base.task_prompt_names,
        task_prompt_texts=base.task_prompt_texts,
        task_prompt_ids=base.task_prompt_ids,
        image_aspect_ratio=image_aspect_ratio,
    )


@pytest.fixture(scope="module")
def identity_processor(phi3_processor):
    """24 px, so 24x24 inputs are not resampled: pixel values map one to one to the RGB pixels."""
    return make_processor(phi3_processor, 24)


def pixels(processor, image):
    return processor(text="<image>", images=image, return_tensors="np")["pixel_values"][0]


def normalize(rgb_uint8):
    """(x / 255 - mean) / std, HWC uint8 -> CHW float64."""
    return ((rgb_uint8.astype(np.float64) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def noise(shape, seed):
    return np.random.RandomState(seed).randint(0, 256, size=shape, dtype=np.uint8)


# --------------------------------------------------------------------------------- vs the original's pixel values
def rebuild(recipe):
    namespace = {"np": np, "Image": Image}
    *statements, expression = recipe.split("; ")
    for statement in statements:
        exec(statement, namespace)
    return eval(expression, namespace)


OBSERVED_MAX_DIFF = {}


def test_pixel_values_match_original(full_phi3_processor, pixel_data):
    assert full_phi3_processor.image_processor.size == {"height": 768, "width": 768}
    names = []
    for entry in pixel_data["images"]:
        image = rebuild(entry["recipe"])
        assert list(image.size) == entry["input_size_wh"]
        out = full_phi3_processor(text="<image>", images=image, return_tensors="np")["pixel_values"]
        assert out.shape == (1, *entry["shape"])
        assert out.dtype == np.float32
        flat = out[0].reshape(-1)
        indices = np.asarray(entry["sample_indices"])
        np.testing.assert_array_equal(
            indices, np.random.RandomState(123).choice(flat.size, 2000, replace=False)
        )
        sampled = flat[indices].astype(np.float64)
        expected = np.asarray(entry["sample_values"], dtype=np.float64)
        OBSERVED_MAX_DIFF[entry["name"]] = float(np.abs(sampled - expected).max())
        np.testing.assert_allclose(sampled, expected, rtol=0, atol=1e-5)
        assert flat.astype(np.float64).sum() == pytest.approx(entry["sum"], rel=1e-9, abs=1e-3)
        assert flat.astype(np.float64).mean() == pytest.approx(entry["mean"], rel=1e-9, abs=1e-8)
        names.append(entry["name"])
    assert names == ["wide_noise", "tall_gradient", "square_noise_gray"]
    print("max |diff| vs original:", OBSERVED_MAX_DIFF)


def test_pixel_values_original_batch(full_llama_processor, pixel_data):
    """The three images in one call, llama processor (same image processor) and torch tensors."""
    images = [rebuild(e["recipe"]) for e in pixel_data["images"]]
    out = full_llama_processor(text="<image>" * 3, images=images, return_tensors="pt")["pixel_values"]
    assert out.shape == (3, 3, 768, 768)
    for index, entry in enumerate(pixel_data["images"]):
        flat = out[index].reshape(-1).double().numpy()
        np.testing.assert_allclose(flat[entry["sample_indices"]], entry["sample_values"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ independent computation
@pytest.mark.parametrize("size_wh", [(45, 20), (20, 45), (31, 30), (16, 16), (7, 50)])
def test_pad_resize_normalize_by_hand(phi3_processor, size_wh):
    width, height = size_wh
    image = Image.fromarray(noise((height, width, 3), seed=width * 100 + height))
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), FILL)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    expected = normalize(np.asarray(canvas.resize((32, 32), Image.Resampling.BICUBIC)))
    out = pixels(phi3_processor, image)
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_padding_colour_and_position(identity_processor):
    """A 24x12 white image on the 24x24 canvas: rows 0-5 and 18-23 are the fill colour, 6-17 white."""
    out = pixels(identity_processor, Image.new("RGB", (24, 12), (255, 255, 255)))
    fill = ((np.array(FILL) / 255.0 - MEAN) / STD)[:, None]
    white = ((1.0 - MEAN) / STD)[:, None]
    for row in range(24):
        want = white if 6 <= row < 18 else fill
        np.testing.assert_allclose(out[:, row, :], np.broadcast_to(want, (3, 24)), rtol=0, atol=1e-5)
    # odd difference: the extra row goes to the bottom/right ((side - h) // 2 on top)
    out = pixels(identity_processor, Image.new("RGB", (24, 11), (255, 255, 255)))
    assert np.allclose(out[:, 6, 0], white[:, 0], atol=1e-5) and np.allclose(out[:, 5, 0], fill[:, 0], atol=1e-5)
    assert np.allclose(out[:, 16, 0], white[:, 0], atol=1e-5) and np.allclose(out[:, 17, 0], fill[:, 0], atol=1e-5)


@pytest.mark.parametrize("size_wh", [(45, 20), (20, 45)])
def test_square_aspect_ratio_no_padding(phi3_processor, size_wh):
    processor = make_processor(phi3_processor, 32, image_aspect_ratio="square")
    image = Image.fromarray(noise((size_wh[1], size_wh[0], 3), seed=1))
    expected = normalize(np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC)))
    np.testing.assert_allclose(pixels(processor, image), expected, rtol=0, atol=1e-5)
    # and it differs from the padded version
    assert not np.allclose(pixels(phi3_processor, image), expected, atol=1e-2)


def test_identity_size_is_exact(identity_processor):
    rgb = noise((24, 24, 3), seed=2)
    np.testing.assert_allclose(pixels(identity_processor, Image.fromarray(rgb)), normalize(rgb), rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------------- image modes
def rgb_of(array_hwc):
    return Image.fromarray(np.ascontiguousarray(array_hwc), "RGB")


def assert_same_as(processor, image, expected_rgb):
    """`image` must give exactly the pixel values of the RGB uint8 array `expected_rgb`."""
    got = pixels(processor, image)
    np.testing.assert_array_equal(got, pixels(processor, rgb_of(expected_rgb)))
    if expected_rgb.shape[:2] == (24, 24) and processor.image_processor.size["height"] == 24:
        np.testing.assert_allclose(got, normalize(expected_rgb), rtol=0, atol=1e-5)


def test_mode_L(identity_processor):
    grey = noise((24, 24), seed=3)
    assert_same_as(identity_processor, Image.fromarray(grey, "L"), np.stack([grey] * 3, -1))


def test_mode_LA_drops_alpha(identity_processor):
    grey, alpha = noise((24, 24), 4), noise((24, 24), 5)
    image = Image.fromarray(np.stack([grey, alpha], -1), "LA")
    assert image.mode == "LA"
    assert_same_as(identity_processor, image, np.stack([grey] * 3, -1))


def test_mode_RGBA_drops_alpha(identity_processor):
    rgba = noise((24, 24, 4), seed=6)
    rgba[:4, :, 3] = 0  # fully transparent rows keep their colour, as convert('RGB')
    image = Image.fromarray(rgba, "RGBA")
    assert_same_as(identity_processor, image, rgba[..., :3])


def test_mode_P_palette(identity_processor):
    palette = noise((256, 3), seed=7)
    index = noise((24, 24), seed=8)
    image = Image.frombytes("P", (24, 24), index.tobytes())
    image.putpalette(palette.reshape(-1).tolist())
    assert image.mode == "P"
    assert_same_as(identity_processor, image, palette[index])


def palette_with_transparency(height, width):
    palette = noise((256, 3), seed=9)
    index = noise((height, width), seed=10)
    image = Image.frombytes("P", (width, height), index.tobytes())
    image.putpalette(palette.reshape(-1).tolist())
    image.info["transparency"] = int(index[0, 0])
    return image, palette[index]


def rgb_png_with_colour_key(height, width):
    rgb = noise((height, width, 3), seed=41)
    rgb[: height // 4] = (10, 20, 30)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", transparency=(10, 20, 30))
    buffer.seek(0)
    image = Image.open(buffer)
    assert image.mode == "RGB" and image.info["transparency"] == (10, 20, 30)
    return image, rgb


@pytest.mark.parametrize(
    "make,shape",
    [
        pytest.param(palette_with_transparency, (24, 24), id="P-square"),
        pytest.param(palette_with_transparency, (16, 24), id="P-wide"),
        pytest.param(rgb_png_with_colour_key, (24, 24), id="RGB-tRNS-square"),
        pytest.param(rgb_png_with_colour_key, (24, 16), id="RGB-tRNS-tall"),
    ],
)
def test_transparency_key_ignored_like_original(identity_processor, make, shape):
    """The original converts with PIL convert('RGB') and never composites: the key colour stays as it is."""
    image, expected = make(*shape)
    assert_same_as(identity_processor, image, expected)


def test_mode_CMYK(identity_processor):
    cmy = noise((24, 24, 3), seed=11)
    k = np.zeros((24, 24), np.uint8)
    k[:6] = 255  # full black rows
    image = Image.fromarray(np.concatenate([cmy, k[..., None]], -1), "CMYK")
    expected = 255 - cmy  # with K=0: R = 255 - C, ...
    expected[:6] = 0
    assert_same_as(identity_processor, image, expected)


def test_mode_I16_rescaled(identity_processor):
    values = np.random.RandomState(12).randint(0, 65536, size=(24, 24)).astype(np.uint16)
    values[0, :4] = [0, 65535, 128, 129]
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    eight = np.round(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    assert eight[0, :4].tolist() == [0, 255, 0, 1]
    assert_same_as(identity_processor, image, np.stack([eight] * 3, -1))


def test_mode_I16_from_png_file(identity_processor, tmp_path):
    values = np.random.RandomState(13).randint(0, 65536, size=(24, 24)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    reopened = Image.open(path)
    assert reopened.mode.startswith("I")
    eight = np.round(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    assert_same_as(identity_processor, reopened, np.stack([eight] * 3, -1))


def test_mode_I16_png_by_path(identity_processor, tmp_path):
    values = np.random.RandomState(13).randint(0, 65536, size=(24, 24)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    eight = np.round(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    assert_same_as(identity_processor, str(path), np.stack([eight] * 3, -1))


def test_mode_I32_small_values_unchanged(identity_processor):
    values = noise((24, 24), 14).astype(np.int32)
    image = Image.fromarray(values)
    assert image.mode == "I"
    assert_same_as(identity_processor, image, np.stack([values.astype(np.uint8)] * 3, -1))


def test_I32_values_not_clipped_by_pil(identity_processor):
    """Values above 255 are rescaled, not clipped the way convert('RGB') would."""
    values = (noise((24, 24), 15).astype(np.int32) * 257)  # 0..65535
    out = pixels(identity_processor, Image.fromarray(values))
    eight = np.round(values * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_allclose(out, normalize(np.stack([eight] * 3, -1)), rtol=0, atol=1e-5)


ROTATIONS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}


def with_orientation(array, orientation, fmt):
    """(image reopened from the encoded bytes, the bytes)."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return Image.open(io.BytesIO(buffer.getvalue())), buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation(identity_processor, phi3_processor, fmt, orientation):
    array = noise((16, 24, 3), seed=orientation)  # 24 wide, 16 high
    image, encoded = with_orientation(array, orientation, fmt)
    assert image.getexif().get(ORIENTATION) == orientation
    stored = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))  # decoded, not rotated
    assert stored.shape == (16, 24, 3)
    upright = np.asarray(Image.fromarray(stored).transpose(ROTATIONS[orientation]))
    if fmt == "PNG":
        # lossless: the stored pixels are the array itself; hand-rotated with numpy
        np.testing.assert_array_equal(stored, array)
        turns = {3: 2, 6: -1, 8: 1}[orientation]  # np.rot90 turns anticlockwise
        np.testing.assert_array_equal(upright, np.rot90(array, turns))
    for processor in (identity_processor, phi3_processor):
        np.testing.assert_array_equal(pixels(processor, image), pixels(processor, rgb_of(upright)))
        if orientation != 3:  # a quarter turn changes the padding: the result must not be the unrotated one
            assert not np.array_equal(pixels(processor, image), pixels(processor, rgb_of(stored)))


def test_exif_orientation_from_path(identity_processor, tmp_path):
    array = noise((16, 24, 3), seed=21)
    _, encoded = with_orientation(array, 6, "PNG")
    path = tmp_path / "rotated.png"
    path.write_bytes(encoded)
    upright = np.rot90(array, -1)
    np.testing.assert_array_equal(pixels(identity_processor, str(path)), pixels(identity_processor, rgb_of(upright)))
    np.testing.assert_array_equal(
        pixels(identity_processor, str(path)), pixels(identity_processor, ImageOps.exif_transpose(Image.open(path)))
    )


# ------------------------------------------------------------------------------------------- arrays and tensors
@pytest.mark.parametrize("shape", [(24, 24, 3), (16, 24, 3), (3, 24, 3)])
def test_numpy_uint8_hwc(identity_processor, shape):
    rgb = noise(shape, seed=sum(shape))
    assert_same_as(identity_processor, rgb, rgb)


def test_numpy_uint8_chw_and_greyscale(identity_processor):
    rgb = noise((24, 24, 3), seed=30)
    assert_same_as(identity_processor, np.ascontiguousarray(rgb.transpose(2, 0, 1)), rgb)
    grey = noise((24, 24), seed=31)
    assert_same_as(identity_processor, grey, np.stack([grey] * 3, -1))
    assert_same_as(identity_processor, grey[..., None], np.stack([grey] * 3, -1))
    assert_same_as(identity_processor, grey[None], np.stack([grey] * 3, -1))


def test_numpy_rgba_array_drops_alpha(identity_processor):
    rgba = noise((24, 24, 4), seed=32)
    assert_same_as(identity_processor, rgba, rgba[..., :3])


@pytest.mark.parametrize("shape_hw", [(24, 24), (18, 24)])
def test_torch_float_chw_in_unit_range(identity_processor, shape_hw):
    rgb = noise((*shape_hw, 3), seed=33)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    assert tensor.shape == (3, *shape_hw) and tensor.max() <= 1.0
    assert_same_as(identity_processor, tensor, rgb)
    assert_same_as(identity_processor, tensor.double(), rgb)
    assert_same_as(identity_processor, tensor.permute(1, 2, 0).numpy(), rgb)  # float HWC numpy


def test_torch_uint8_and_float_0_255(identity_processor):
    rgb = noise((24, 24, 3), seed=34)
    assert_same_as(identity_processor, torch.from_numpy(rgb).permute(2, 0, 1), rgb)
    assert_same_as(identity_processor, torch.from_numpy(rgb).permute(2, 0, 1).float(), rgb)


def test_int32_array_small_values(identity_processor):
    rgb = noise((24, 24, 3), seed=35)
    assert_same_as(identity_processor, rgb.astype(np.int64), rgb)


def test_numpy_uint16_like_pil_I16(identity_processor):
    values = np.random.RandomState(36).randint(0, 65536, size=(24, 24)).astype(np.uint16)
    np.testing.assert_array_equal(pixels(identity_processor, values),
                                  pixels(identity_processor, Image.fromarray(values)))


def test_image_path_string(identity_processor, tmp_path):
    rgb = noise((24, 24, 3), seed=37)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    assert_same_as(identity_processor, str(path), rgb)


def test_image_pathlib_path(identity_processor, tmp_path):
    rgb = noise((24, 24, 3), seed=38)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    assert_same_as(identity_processor, path, rgb)


# ------------------------------------------------------------------------------------------------- image errors
@pytest.mark.parametrize(
    "image,match",
    [
        (Image.new("RGB", (0, 0)), r"Image 0 is empty \(0x0\)"),
        (Image.new("RGB", (0, 5)), r"Image 0 is empty \(0x5\)"),
        (np.zeros((5, 0, 3), np.uint8), r"Image 0 is empty"),
        (np.zeros((0, 5), np.float32), r"Image 0 is empty"),
    ],
)
def test_error_empty_image(phi3_processor, image, match):
    with pytest.raises(ValueError, match=match):
        phi3_processor(text="<image>", images=image)


def test_error_empty_second_image(phi3_processor):
    with pytest.raises(ValueError, match=r"Image 1 is empty \(7x0\)"):
        phi3_processor(text="<image><image>", images=[Image.new("RGB", (4, 4)), Image.new("RGB", (7, 0))])


def test_error_none_image(phi3_processor):
    with pytest.raises(ValueError, match="Image 1 is None"):
        phi3_processor(text="<image><image>", images=[Image.new("RGB", (4, 4)), None])


def test_error_unreadable_path(phi3_processor, tmp_path):
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"Image 0 could not be read from '.*missing\.png'"):
        phi3_processor(text="<image>", images=missing)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(ValueError, match=r"Image 0 could not be read from '.*notes\.png'"):
        phi3_processor(text="<image>", images=str(not_an_image))


def test_error_truncated_file(phi3_processor):
    buffer = io.BytesIO()
    Image.fromarray(noise((64, 64, 3), seed=40)).save(buffer, format="PNG")
    image = Image.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))
    with pytest.raises(ValueError, match="Image 0 could not be decoded"):
        phi3_processor(text="<image>", images=image)
