"""Every kind of image input the processor takes gives the pixels of the equivalent 8-bit RGB PIL image, and every
input it cannot take gets a ValueError or TypeError naming the problem (examples, then a property-based test)."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import florence_vl_hf
from florence_vl_hf.processing.processing_florence_vl import MAX_PADDED_SIDE
from transformers import AutoProcessor

MODES_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(florence_vl_hf.tiny_model_dir())


def pixels(processor, image):
    return processor(text="<image>", images=image, return_tensors="pt")["pixel_values"]


def reference(base: np.ndarray):
    """The equivalent image built by PIL alone: uint8 H×W×C with C channels, converted to RGB by PIL."""
    return PIL.Image.fromarray(base if base.shape[-1] > 1 else base[..., 0], MODES_BY_CHANNELS[base.shape[-1]])


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_the_silently_wrong_cases_of_the_campaign_give_the_equivalent_pixels(processor):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 9, 1), dtype=np.uint8)
    mask = base > 127
    expected_mask = pixels(processor, reference((mask * 255).astype(np.uint8)))
    torch.testing.assert_close(pixels(processor, mask[..., 0]), expected_mask, rtol=0, atol=0)  # was black
    torch.testing.assert_close(pixels(processor, torch.from_numpy(mask[..., 0])), expected_mask, rtol=0, atol=0)
    ones = np.ones((6, 9), np.float32)
    white = pixels(processor, reference(np.full((6, 9, 1), 255, np.uint8)))
    for image in (ones, PIL.Image.fromarray(ones, "F")):  # a mode-"F" image of 1.0 is a float array of 1.0
        torch.testing.assert_close(pixels(processor, image), white, rtol=0, atol=0)
    grey_alpha = rng.integers(0, 256, (3, 9, 2), dtype=np.uint8)  # H×W×C with H=3: was read as C×H×W
    torch.testing.assert_close(pixels(processor, grey_alpha), pixels(processor, reference(grey_alpha)), rtol=0, atol=0)


def test_encoded_bytes_file_objects_and_big_endian_arrays_are_images(processor):
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8))
    expected = pixels(processor, image)
    for source in (png_bytes(image), bytearray(png_bytes(image)), io.BytesIO(png_bytes(image))):
        torch.testing.assert_close(pixels(processor, source), expected, rtol=0, atol=0)
    wide = np.random.default_rng(2).integers(0, 65536, (7, 5), dtype=np.uint16)
    torch.testing.assert_close(pixels(processor, wide.astype(">u2")), pixels(processor, wide), rtol=0, atol=0)


@pytest.mark.parametrize(
    "image, error, problem",
    [
        (np.zeros((1, 8, 8, 3), np.uint8), ValueError, r"shape \(1, 8, 8, 3\): an array image is H×W"),
        (np.array(5), ValueError, r"shape \(\): an array image"),
        (5, TypeError, "Image 0 must be a PIL image, .* got int"),
        ({"pixels": 1}, TypeError, "got dict"),
        (np.zeros((5, 6, 7), np.uint8), ValueError, "needs 1 to 4 channels"),
        (np.zeros((0, 4), np.uint8), ValueError, "Image 0 is empty"),
        (np.full((4, 4), np.nan, np.float32), ValueError, "NaN or infinite"),
        (np.zeros((4, 4), np.complex64), TypeError, "complex64 is not an image"),
        (b"not an image", ValueError, "Image 0 could not be decoded"),
        (io.BytesIO(b""), ValueError, "Image 0 could not be decoded"),
    ],
)
def test_inputs_that_are_not_images_get_an_error_naming_the_problem(processor, image, error, problem):
    with pytest.raises(error, match=problem):
        processor(text="<image>", images=image)


def test_a_padded_square_past_the_limit_is_refused_before_the_pixels_are_read(processor, tmp_path):
    strip = PIL.Image.new("L", (200000, 1), 255)
    path = tmp_path / "strip.png"
    strip.save(path)
    assert path.stat().st_size < 100_000  # a small file that would decode into a 200000² canvas
    for source in (str(path), path.read_bytes()):
        with pytest.raises(ValueError, match=f"200000 px square; the limit is {MAX_PADDED_SIDE} px per side"):
            processor(text="<image>", images=source)
    # the limit is far above real photographs and scans, and does not apply without padding
    assert MAX_PADDED_SIDE >= 14032  # a 1200-dpi A4 scan's longer side
    square = AutoProcessor.from_pretrained(florence_vl_hf.tiny_model_dir(), image_aspect_ratio="square")
    wide = pixels(square, PIL.Image.new("RGB", (20000, 2), (5, 6, 7)))
    assert wide.shape == pixels(processor, PIL.Image.new("RGB", (9, 9))).shape


@pytest.mark.parametrize(
    "text, problem",
    [(5, "got int"), ([], "empty list"), ({"t": "x"}, "got dict"), (["a", 3], "non-strings"),
     ("a\ud800b", r"Prompt 0 is not valid Unicode: a lone surrogate '\\ud800' at position 1")],
)  # fmt: skip
def test_text_that_is_not_prompts_gets_an_error(processor, text, problem):
    with pytest.raises(ValueError, match=problem):
        processor(text=text)


@pytest.mark.parametrize(
    "conversation, problem",
    [([], "the conversation must be a non-empty list"), ([{"content": "hi"}], "message 0 .* needs a `role`"),
     ([{"role": "user"}], "needs a `content`"), ([[{"role": "user", "content": "a"}], []], "conversation 1 must be")],
)  # fmt: skip
def test_chats_without_messages_or_roles_get_an_error(processor, conversation, problem):
    with pytest.raises(ValueError, match=problem):
        processor.apply_chat_template(conversation, tokenize=False)


# ---- property-based: sizes, PIL modes, array dtypes and layouts ----


def variants(base: np.ndarray):
    """Inputs equivalent to the uint8 H×W×C image `base`, each with the reason it is equivalent."""
    channels_last = base if base.shape[-1] > 1 else base[..., 0]
    bright = base.copy()
    bright.flat[0] = 255  # so that a float array is read on the 0-255 scale, not 0-1
    yield "uint8 channels last", channels_last, base
    if base.shape[0] > 4 and base.shape[1] > 4:  # C×H×W is recognised when the last axis cannot be channels
        yield "uint8 channels first tensor", torch.from_numpy(np.ascontiguousarray(base.transpose(2, 0, 1))), base
    yield "float32 in [0, 1]", channels_last.astype(np.float32) / 255, base
    yield "float64 in [0, 255]", (bright if base.shape[-1] > 1 else bright[..., 0]).astype(np.float64), bright
    yield "uint16 (x257)", channels_last.astype(np.uint16) * 257, base
    yield "big-endian uint16", (channels_last.astype(np.uint16) * 257).astype(">u2"), base
    yield "int32", channels_last.astype(np.int32), base
    yield "bool", channels_last > 127, ((base > 127) * 255).astype(np.uint8)
    if base.shape[-1] == 1:
        yield "PIL F in [0, 1]", PIL.Image.fromarray(base[..., 0].astype(np.float32) / 255, "F"), base
        yield "PIL I;16 (x257)", PIL.Image.fromarray(base[..., 0].astype(np.uint16) * 257), base
    if base.shape[-1] == 3:
        yield "PNG bytes", png_bytes(reference(base)), base
        yield "PIL P (adaptive palette)", reference(base).convert("P"), None  # compared with PIL's own RGB


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    height=st.integers(1, 24), width=st.integers(1, 24), channels=st.sampled_from([1, 2, 3, 4]),
    seed=st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_every_equivalent_input_gives_the_pixels_of_the_rgb_uint8_image(processor, height, width, channels, seed):
    base = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    for name, image, equivalent in variants(base):
        expected = pixels(processor, image.convert("RGB") if equivalent is None else reference(equivalent))
        torch.testing.assert_close(pixels(processor, image), expected, rtol=0, atol=0, msg=name)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=5),
    dtype=st.sampled_from(["uint8", "int8", "int16", "uint16", ">u2", "int64", "float16", "float32", "float64", "bool",
                           "complex64", "object"]),
    fill=st.sampled_from([0, 1, 0.5, 300, -7, float("inf"), float("nan")]),
)  # fmt: skip
def test_any_array_is_an_image_or_a_clear_error(processor, shape, dtype, fill):
    try:
        with np.errstate(all="ignore"):
            array = np.full(shape, fill, dtype=dtype)
    except (ValueError, OverflowError, TypeError):
        return  # numpy itself refuses the value for the dtype
    try:
        result = pixels(processor, array)
    except (ValueError, TypeError) as error:
        assert str(error).startswith("Image 0"), error
    else:
        assert result.shape[0] == 1 and torch.isfinite(result).all()
