"""The table of LLM families (florence_vl_hf.families) against facts it does not hold: the bundled assets, the
tokenizers and chat templates, and the code that takes a family by name."""

import json

import pytest
from transformers import AutoTokenizer

from florence_vl_hf.families import (
    FAMILIES,
    FAMILY_NAMES,
    family,
    family_of,
    family_of_llava,
    padded_rows,
)
from florence_vl_hf.modeling import FlorenceVLConfig
from florence_vl_hf.processing import build_processor, load_chat_template, prepare_tokenizer
from florence_vl_hf.tiny import tiny_config
from florence_vl_hf.training.data import TEMPLATES
from florence_vl_hf.training.stages import PAPER_RECIPES, STAGES, paper_recipe


def bundled_tokenizer(llm_family):
    return AutoTokenizer.from_pretrained(str(llm_family.asset_dir))


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def llm_family(request):
    return family(request.param)


def test_names_are_the_table_keys_and_the_chat_template_names():
    assert FAMILY_NAMES == ("phi3", "llama3")
    assert all(FAMILIES[name].name == name for name in FAMILY_NAMES)


def test_bundled_assets_exist_and_name_the_familys_model_type(llm_family):
    folder = llm_family.asset_dir
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 *llm_family.licence_files):  # fmt: skip
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["model_type"] == llm_family.model_type
    # The original tokenized Phi-3.5 with the slow sentencepiece tokenizer, whose model file is bundled with it.
    assert (folder / "tokenizer.model").is_file() == llm_family.sentencepiece_leading_space


def test_released_embedding_rows_hold_the_tokenizer_with_the_originals_pad(llm_family):
    tokenizer = bundled_tokenizer(llm_family)
    with_pad = len(tokenizer) + (tokenizer.pad_token is None)  # the original's llama3 training added '<pad>'
    # Llama-3.1: exactly 128256 + '<pad>'; Phi-3.5: its 32011 tokens padded to a multiple of 64 rows.
    assert llm_family.checkpoint_vocab_size in (with_pad, padded_rows(with_pad))


def test_image_and_special_token_ids_are_the_bundled_tokenizers(llm_family):
    tokenizer = bundled_tokenizer(llm_family)
    assert llm_family.pad_token_id == tokenizer.pad_token_id
    prepare_tokenizer(tokenizer)
    assert llm_family.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == len(tokenizer) - 1
    config = json.loads((llm_family.asset_dir / "config.json").read_text())
    assert llm_family.bos_token_id == config["bos_token_id"] == tokenizer.bos_token_id
    eos = config["eos_token_id"]
    assert llm_family.eos_token_id in (eos if isinstance(eos, list) else [eos])
    if llm_family.name == "llama3":
        assert llm_family.eos_token_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    else:
        assert llm_family.eos_token_id == config["pad_token_id"]


def test_each_chat_template_holds_its_own_assistant_marker_only(llm_family):
    for other in FAMILIES.values():
        assert (other.assistant_marker in load_chat_template(llm_family.name)) == (other is llm_family)


def test_tiny_configs_belong_to_their_family(llm_family):
    config = tiny_config(llm_family.name)
    assert family_of(config.text_config) is llm_family
    assert family_of(llm_family.model_type) is llm_family
    assert family_of_llava(llm_family.llava_model_type) is llm_family
    assert config.image_token_id == llm_family.image_token_id
    assert config.text_config.vocab_size % 64 == 0
    assert build_processor(config).image_token_id == config.image_token_id


def test_the_configs_defaults_are_phi3s():
    """The Hub payload cannot import the table: its default LLM and <image> id are Phi-3.5's, written out."""
    config = FlorenceVLConfig()
    assert family_of(config.text_config) is family("phi3")
    assert config.image_token_id == family("phi3").image_token_id
    assert config.text_config.vocab_size == family("phi3").checkpoint_vocab_size


def test_training_recipes_and_templates_cover_every_family():
    assert TEMPLATES == ("plain", *FAMILY_NAMES)
    assert set(PAPER_RECIPES) == {(name, stage) for name in FAMILY_NAMES for stage in STAGES}
    for name in FAMILY_NAMES:
        assert paper_recipe(name, "pretrain").template == "plain"
        assert paper_recipe(name, "finetune").template == name


@pytest.mark.parametrize("name", ["llama", "phi-3.5", "qwen2", ""])
def test_unknown_names_are_refused(name):
    with pytest.raises(ValueError, match="Unknown LLM family"):
        family(name)
    with pytest.raises(ValueError, match="Unknown LLM family"):
        tiny_config(name)
    with pytest.raises(ValueError, match="Unknown LLM family"):
        load_chat_template(name)
    with pytest.raises(ValueError, match="Unknown LLM family"):
        build_processor(tiny_config("phi3"), template=name)
    with pytest.raises(ValueError, match="No paper recipe"):
        paper_recipe(name, "finetune")


def test_llms_of_no_family_are_named():
    with pytest.raises(ValueError, match="'qwen2' is not the LLM of a Florence-VL family"):
        family_of("qwen2")
    with pytest.raises(ValueError, match="pass template= one of"):
        build_processor(FlorenceVLConfig(text_config={"model_type": "qwen2", "vocab_size": 32064}))
    with pytest.raises(ValueError, match="not an original Florence-VL model_type"):
        family_of_llava("llava_qwen")
