"""florence_vl_hf.precision: bf16 against float32 on the bundled, trained florence-vl-tiny (converted checkpoints:
tests/conversion/test_precision_converted.py)."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import florence_vl_hf
from florence_vl_hf.precision import dtype_agreement, max_relative_difference, token_agreement
from florence_vl_hf.lab.shapes import COUNT_QUESTION

# bf16 keeps 8 significant bits (one rounding: up to 2^-8 = 0.39 % of the value); the bounds allow 8 roundings' worth
BOUND = 2**-5


def test_max_relative_difference_by_hand():
    reference = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    value = torch.tensor([[1.0, -2.5], [0.5, 4.0]], dtype=torch.bfloat16)
    assert max_relative_difference(value, reference) == 0.5 / 4.0
    assert max_relative_difference(torch.zeros(3), torch.zeros(3)) == 0.0
    assert max_relative_difference(torch.ones(3), torch.zeros(3)) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        max_relative_difference(torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize(
    "tokens, reference, expected",
    [
        ([1, 2, 3], [1, 2, 3], (1.0, None, 3)),
        ([1, 5, 3], [1, 2, 3], (2 / 3, 1, 3)),
        ([1, 2], [1, 2, 3], (2 / 3, 2, 3)),  # one answer stopped early: its missing position disagrees
        ([1, 2, 3, 4], [1, 2], (0.5, 2, 4)),
        ([9, 2, 3], [1, 2, 3], (2 / 3, 0, 3)),  # later positions can agree again (a shifted answer does not)
        ([], [], (1.0, None, 0)),
    ],
)
def test_token_agreement_by_hand(tokens, reference, expected):
    assert token_agreement(tokens, reference) == expected


@pytest.fixture(scope="module")
def tiny_folder():
    return florence_vl_hf.tiny_model_dir()


@pytest.fixture(scope="module")
def tiny_processor(tiny_folder):
    return AutoProcessor.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def measured(tiny_folder, tiny_processor):
    """question -> dtype_agreement of the tiny folder, 8 new tokens at most (each question measured once)."""
    results = {}

    def measure(question):
        if question not in results:
            results[question] = dtype_agreement(tiny_folder, tiny_processor, question=question, max_new_tokens=8)
        return results[question]

    return measure


@pytest.mark.parametrize(
    "question",
    [COUNT_QUESTION, "What color is the circle?", "Is the blue square left or right of the red circle?"],
)
def test_tiny_model_in_bf16_agrees_with_float32(measured, question):
    """Measured on shapes.png (AMD EPYC, avx512_bf16, torch 2.13), for these three and four more ShapesVQA questions:
    image features 0.0061 max relative difference, logits 0.0041-0.0063, both greedy answers identical (answer and
    <|end|>: agreement 1.0, no divergence), teacher-forced agreement 1.0, all 88-95 positions of the forward 98.9 %.
    The answers are decided by margins of 8.8-16.6 logits against max|bf16 - fp32| <= 0.06 on the logits, so the
    agreement holds with a ~70x margin."""
    result = measured(question)
    assert result["stored_dtype"] == result["dtype"] == "bfloat16" and result["reference_dtype"] == "float32"
    assert result["image_features_max_rel_diff"] < BOUND
    assert result["logits_max_rel_diff"] < BOUND
    assert result["token_agreement"] == 1.0 and result["first_divergence"] is None
    assert result["tokens"] == result["reference_tokens"] and result["positions"] == len(result["tokens"]) >= 2
    assert result["teacher_forced_agreement"] == 1.0
    assert min(result["reference_margins"]) > 10 * 2 * result["logits_max_abs_diff"]
    assert result["all_positions_agreement"] >= 0.95


def test_a_loaded_model_gives_what_its_folder_gives(tiny_folder, tiny_processor, measured):
    """The loaded-model path (a float32 copy of a bf16 model) measures exactly what loading the folder twice does,
    and leaves the model it was given in bf16."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_folder)
    from_model = dtype_agreement(model, tiny_processor, max_new_tokens=8)
    assert model.dtype == torch.bfloat16
    assert from_model == measured(COUNT_QUESTION)  # the default question
    with pytest.raises(ValueError, match="pass the processor"):
        dtype_agreement(model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dtype_agreement(tiny_folder, tiny_processor, max_new_tokens=0)
