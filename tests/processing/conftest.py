"""Fixtures for the processor tests: processors are cheap to build (no model weights)."""

import json
from pathlib import Path

import pytest

from florence_vl_hf.families import family
from florence_vl_hf.modeling import FlorenceVLConfig
from florence_vl_hf.processing import build_processor
from florence_vl_hf.tiny import tiny_config

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def chat_data():
    return json.loads((DATA / "original_chat_prompts.json").read_text())


@pytest.fixture(scope="session")
def pixel_data():
    return json.loads((DATA / "original_pixel_values.json").read_text())


@pytest.fixture(scope="session")
def phi3_processor():
    """Tiny config: 32 px images, 17 image tokens, the real Phi-3.5 tokenizer."""
    return build_processor(tiny_config("phi3"))


@pytest.fixture(scope="session")
def llama_processor():
    """Tiny config: 32 px images, 17 image tokens, the real Llama-3.1 tokenizer."""
    return build_processor(tiny_config("llama3"))


@pytest.fixture(scope="session")
def processors(phi3_processor, llama_processor):
    """By chat template name, as in original_chat_prompts.json."""
    return {"phi3": phi3_processor, "llama3": llama_processor}


@pytest.fixture(scope="session")
def full_phi3_processor():
    """Full-size config: 768 px images, 577 image tokens."""
    return build_processor(FlorenceVLConfig(text_config={"model_type": "phi3"}))


@pytest.fixture(scope="session")
def full_llama_processor():
    llama = family("llama3")
    return build_processor(FlorenceVLConfig(text_config={"model_type": llama.model_type, "vocab_size": 128320},
                                             image_token_id=llama.image_token_id))
