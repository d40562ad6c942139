import json

import pytest
import torch
from PIL import Image

from florence_vl_hf.build import build_random_model
from florence_vl_hf.tiny import tiny_config

def write_samples(folder, samples):
    path = folder / "data.json"
    path.write_text(json.dumps(samples))
    return path


@pytest.fixture
def data_folder(tmp_path, shapes_image):
    """A small LLaVA-format folder: image samples, a text-only one, and the image they share."""
    shapes_image.save(tmp_path / "shapes.png")
    Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / "green.png")
    samples = [
        {"id": "caption-1", "image": "shapes.png",
         "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                           {"from": "gpt", "value": "A red circle and a blue square."}]},
        {"id": "qa-1", "image": "green.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "green"},
                           {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "text-1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
    ]  # fmt: skip
    return tmp_path, samples


@pytest.fixture
def fresh_phi3():
    """A new tiny random model for tests that train it."""
    return build_random_model(tiny_config("phi3"), seed=0)
