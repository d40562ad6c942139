"""florence-vl-tiny, the trained model that ships in the package."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import florence_vl_hf
from florence_vl_hf.cli import main
from florence_vl_hf.lab.shapes import QUESTION_TYPES, make_shapes_data
from florence_vl_hf.lab.evaluate import evaluate_shapes


@pytest.fixture(scope="module")
def tiny():
    folder = florence_vl_hf.tiny_model_dir()
    return folder, AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def test_it_ships_in_bf16_within_the_size_budget_and_loads_with_the_auto_classes(tiny):
    folder, model, processor = tiny
    assert (folder / "model.safetensors").stat().st_size <= 25_000_000
    assert type(model) is florence_vl_hf.FlorenceVLForConditionalGeneration
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert type(processor) is florence_vl_hf.FlorenceVLProcessor
    assert processor.tokenizer.vocab_size == 32000  # the real Phi-3.5 tokenizer
    assert (folder / "LICENSE-phi-3.5-tokenizer").is_file()


@pytest.fixture(scope="module")
def fresh_accuracy(tiny, tmp_path_factory):
    # a generator seed used neither for the training split (1) nor for the recipe's held-out split (2)
    fresh = tmp_path_factory.mktemp("fresh")
    make_shapes_data(fresh, 300, seed=20261123, split_name="test", overwrite=True)
    _, model, processor = tiny
    return evaluate_shapes(model, processor, fresh)


def test_it_meets_the_accuracy_bar_on_freshly_generated_images(fresh_accuracy):
    assert set(fresh_accuracy["per_type"]) == set(QUESTION_TYPES)
    assert fresh_accuracy["accuracy"] >= 0.90, fresh_accuracy
    for kind in QUESTION_TYPES:
        assert fresh_accuracy["per_type"][kind]["accuracy"] >= 0.80, fresh_accuracy["per_type"]


def test_demo_tiny_answers_the_bundled_image_through_the_pipeline(capsys):
    assert main(["demo-tiny"]) == 0
    out = capsys.readouterr().out
    example = json.loads((florence_vl_hf.tiny_model_dir().parent / "assets" / "shapes_vqa_example.json").read_text())
    lines = [line for line in out.splitlines() if "->" in line]
    assert len(lines) == len(example["questions"])
    for line, item in zip(lines, example["questions"]):
        asked, reply = line.split("->")
        assert asked.strip() == item["question"]
        assert reply.strip().split("'")[1] == item["answer"], line  # the generator's answer
