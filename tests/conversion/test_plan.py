"""The conversion's decisions, each with one home: embedding rows, the derived temporal table, the family facts a
source and a card take, the projector type the config accepts."""

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from florence_vl_hf.conversion import ConversionError, convert_checkpoint, open_source
from florence_vl_hf.conversion.card import render_model_card
from florence_vl_hf.conversion.convert import TEMPORAL_EMBEDDING_KEY, embedding_rows, temporal_embedding
from florence_vl_hf.conversion.source import check_llava_settings, llava_family
from florence_vl_hf.families import family
from florence_vl_hf.lab.fixture import make_fixture

STORED_TEMPORAL_KEY = "model.vision_tower.vision_tower.visual_temporal_embed.pos_idx_to_embed"


def quiet(*_):
    pass


def word_tokenizer(tokens: int) -> PreTrainedTokenizerFast:
    """A tokenizer of `tokens` tokens and no pad token."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, tokens)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]")


def main_tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


# ---- embedding rows -------------------------------------------------------------------------------------------------


def test_a_tokenizer_without_pad_token_counts_the_pad_the_processor_adds():
    """convert_checkpoint used to count len + '<image>' (127 + 1 = 128: fits 128 rows, and then the processor's
    '<pad>' did not), from_pretrained_parts len + '<image>' + '<pad>'. Both now count the prepared tokenizer:
    127 + '<pad>' + '<image>' = 129 tokens, padded to 3 x 64 = 192 rows."""
    for rows in (100, 128):
        tokenizer = word_tokenizer(127)
        assert tokenizer.pad_token is None and len(tokenizer) == 127
        assert embedding_rows(tokenizer, rows) == 192
        assert len(tokenizer) == 129 and tokenizer.pad_token == "<pad>"  # prepared, as build_processor needs it
    assert embedding_rows(word_tokenizer(127), 129) == 129  # the tokens fit: the source's rows are kept
    assert embedding_rows(word_tokenizer(126), 100) == 128  # 126 + 2 = 128, a multiple of 64 already


def test_a_llama_source_whose_tokenizer_has_no_pad_converts_with_a_pad_row(tmp_path):
    """The bundled Llama-3.1 tokenizer (128256 tokens, no pad token) over the 128257 rows of the checkpoint: with
    '<pad>' and '<image>' it needs 128258 rows, so the embedding grows to 128320 (it used to stay at 128257 and the
    processor refused the tokenizer)."""
    source = make_fixture(tmp_path / "src", "llama3", seed=2, shards=1)
    bundled = family("llama3").asset_dir
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(bundled / name, source / name)
    report = convert_checkpoint(source, tmp_path / "out", log=quiet)
    vocabulary = report["vocabulary"]
    assert vocabulary["source_embedding_rows"] == 128257 and vocabulary["original_vocab_size"] == 128256
    assert vocabulary["embedding_rows"] == 128320 and vocabulary["suppressed_token_ids"] == [128256, 128319]
    tokenizer_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] == "<pad>"
    assert report["verification"]["passed"]


# ---- the temporal table ---------------------------------------------------------------------------------------------


def test_the_temporal_table_from_transformers_is_the_buffer_florence2_saved(fixtures):
    stored = main_tensors(fixtures["phi3"])[STORED_TEMPORAL_KEY]
    derived = temporal_embedding(open_source(fixtures["phi3"]).florence2)
    assert derived.dtype == torch.float32 and derived.shape == stored.shape
    assert torch.equal(derived.to(stored.dtype), stored)


def test_a_source_without_the_temporal_buffer_gets_it_derived_bit_for_bit(tmp_path):
    source = make_fixture(tmp_path / "src", "phi3", seed=4, dtype="float32", shards=1)
    tensors = main_tensors(source)
    stored = tensors.pop(STORED_TEMPORAL_KEY)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    report = convert_checkpoint(source, tmp_path / "out", dtype="float32", log=quiet)
    assert report["tensors"]["derived"] == [TEMPORAL_EMBEDDING_KEY] and report["verification"]["passed"]
    assert torch.equal(main_tensors(tmp_path / "out")[TEMPORAL_EMBEDDING_KEY], stored)


# ---- family facts ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, name", [("llava_phi", "phi3"), ("llava_llama", "llama3")])
def test_a_source_s_family_comes_from_its_llava_model_type(model_type, name):
    assert llava_family({"model_type": model_type}) is family(name)


def test_an_unknown_llava_model_type_is_named():
    with pytest.raises(ConversionError, match=r"config.json has model_type 'llava_qwen'; expected one of "
                                              r"\['llava_llama', 'llava_phi'\]"):  # fmt: skip
        llava_family({"model_type": "llava_qwen"})


@pytest.mark.parametrize("name", ["phi3", "llama3"])
def test_the_card_names_the_family_s_llm_and_licence(converted, name):
    _, report = converted["phi3"]
    card = ModelCard(render_model_card(report, "me/x", name))
    assert card.data.license == family(name).licence and name in card.data.tags
    assert family(name).display_name in card.text


# ---- the projector type ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type", ["mlp0x_gelu", "linear", None, 3])
def test_projector_types_the_config_refuses_are_named_as_the_source_s_setting(projector_type):
    settings = {"mm_projector_type": projector_type, "mm_use_im_patch_token": False}
    with pytest.raises(ConversionError, match=rf"mm_projector_type={projector_type!r}; expected mlpNx_gelu"):
        check_llava_settings(settings, projection_dim=32)


def test_projector_types_the_config_accepts_pass():
    for projector_type in ("mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu"):
        check_llava_settings({"mm_projector_type": projector_type, "mm_use_im_patch_token": False}, projection_dim=32)
