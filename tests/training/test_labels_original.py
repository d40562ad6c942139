"""Token ids and label masks of the training data against the original preprocess_plain / preprocess_phi3 /
preprocess_llama3 (tests/data/original_training_labels.json, produced by the original code on transformers 4.43)."""

import json
from pathlib import Path

import pytest

from florence_vl_hf import build_processor
from florence_vl_hf.families import FAMILY_NAMES
from florence_vl_hf.tiny import tiny_config
from florence_vl_hf.training import IGNORE_INDEX, SampleError, tokenize_sample

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "original_training_labels.json").read_text())
ORIGINAL_IMAGE = GOLDEN["provenance"]["image_token_index"]
MAX_LENGTH = 2048


@pytest.fixture(scope="module")
def processors():
    return {name: build_processor(tiny_config(name)) for name in FAMILY_NAMES}


def collapse_image(ids, labels, image_token_id, num_image_tokens):
    """Our ids/labels with each run of image tokens replaced by the original's single -200 placeholder."""
    out_ids, out_labels, index = [], [], 0
    while index < len(ids):
        if ids[index] == image_token_id:
            assert ids[index : index + num_image_tokens] == [image_token_id] * num_image_tokens
            assert set(labels[index : index + num_image_tokens]) == {IGNORE_INDEX}
            out_ids.append(ORIGINAL_IMAGE)
            out_labels.append(IGNORE_INDEX)
            index += num_image_tokens
        else:
            out_ids.append(ids[index])
            out_labels.append(labels[index])
            index += 1
    return out_ids, out_labels


def comparable(case):
    # Over-long samples are truncated or dropped by ConversationDataset (tested separately); an empty reply is
    # skipped where the original masks the whole sample.
    return len(case["input_ids"]) < MAX_LENGTH and not any(
        turn["from"] == "gpt" and turn["value"] == "" for turn in case["sample"]["conversations"]
    )


CASES = [case for case in GOLDEN["cases"] if comparable(case)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['template']}-{c['tokenizer']}-{c['id']}" for c in CASES])
def test_ids_and_labels_equal_the_original(case, processors):
    processor = processors[case["tokenizer"]]
    ids, labels = tokenize_sample(case["sample"], processor, case["template"])
    ids, labels = collapse_image(ids, labels, processor.image_token_id, processor.num_image_tokens)
    assert ids == case["input_ids"]
    assert labels == case["labels"]
    assert (set(labels) == {IGNORE_INDEX}) == case["mismatch_warning"]


def test_the_golden_data_covers_what_it_must():
    templates = {(case["template"], case["tokenizer"]) for case in CASES}
    assert templates == {("plain", "phi3"), ("plain", "llama3"), ("phi3", "phi3"), ("llama3", "llama3")}
    assert len(CASES) >= 45
    assert any(case["mismatch_warning"] for case in CASES)
    assert any("image" not in case["sample"] for case in CASES)


@pytest.mark.parametrize("template", ["phi3", "llama3"])
def test_empty_reply_is_an_error_naming_the_sample(template, processors):
    case = next(c for c in GOLDEN["cases"] if c["template"] == template and c["id"] == "answer_empty_string")
    assert set(case["labels"]) == {IGNORE_INDEX}  # what the original trains on: nothing
    with pytest.raises(SampleError, match="answer_empty_string.*empty reply"):
        tokenize_sample(case["sample"], processors[template], template)


def test_llama3_multi_round_can_supervise_every_reply(processors):
    processor = processors["llama3"]
    case = next(c for c in CASES if c["template"] == "llama3" and c["id"] == "two_rounds_image")
    ids, labels = tokenize_sample(case["sample"], processor, "llama3", original_masking=False)
    supervised = processor.tokenizer.decode([label for label in labels if label != IGNORE_INDEX])
    assert supervised == "A dog.<|eot_id|>It looks like a golden retriever.<|eot_id|>"
    phi3 = next(c for c in CASES if c["template"] == "phi3" and c["id"] == "two_rounds_image")
    original = processors["phi3"].tokenizer.decode([label for label in phi3["labels"] if label != IGNORE_INDEX])
    assert original == "A dog.<|end|>It looks like a golden retriever.<|end|>"
