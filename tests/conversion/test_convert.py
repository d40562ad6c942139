"""`convert_checkpoint` on original-layout fixtures: the written folder, its tensors, its metadata, and verification."""

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from florence_vl_hf.conversion import ConversionError, convert_checkpoint
from florence_vl_hf.lab.fixture import make_fixture
from florence_vl_hf.conversion.card import validate_model_card
from florence_vl_hf.processing import load_chat_template



def quiet(*_):
    pass

EOS_TOKENS = {"phi3": ["<|end|>", "<|endoftext|>"], "llama": ["<|eot_id|>", "<|end_of_text|>"]}


def output_tensors(folder):
    """Every tensor of a converted folder, read straight from its safetensors files."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name in sorted(set(index.values())):
        with safe_open(str(folder / name), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    assert set(tensors) == set(index)
    return tensors


def source_tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    for path in sorted(folder.glob("pytorch_model*.bin")):
        tensors.update(torch.load(path, weights_only=True))
    return tensors


@pytest.mark.parametrize("llm", ["phi3", "llama"])
def test_conversion_verifies_bit_exact_against_the_independent_reference(converted, llm):
    _, report = converted[llm]
    verification = report["verification"]
    assert verification["passed"] and verification["lossless_weights"]
    assert verification["max_abs_diff"] == {"image_features": 0.0, "logits": 0.0}
    assert verification["greedy_tokens_agree"] and len(verification["greedy_tokens"]) > 0
    assert verification["reference"].endswith({"phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM"}[llm])


@pytest.mark.parametrize("llm", ["phi3", "llama"])
def test_output_folder_is_a_hub_ready_florence_vl_repository(converted, llm):
    folder, report = converted[llm]
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "configuration_florence_vl.py",
            "modeling_florence_vl.py", "processing_florence_vl.py", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "README.md", "conversion_report.json", "LICENSE"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded at --max-shard-size 5MB
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "florence_vl" and config["dtype"] == "bfloat16"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_florence_vl.FlorenceVLForConditionalGeneration"
    assert all(t.dtype == torch.bfloat16 for t in output_tensors(folder).values() if t.is_floating_point())
    template = {"phi3": "phi3", "llama": "llama3"}[llm]
    assert (folder / "chat_template.jinja").read_text() == load_chat_template(template)
    assert not list(folder.parent.glob(".*partial*"))  # no staging folder left behind


@pytest.mark.parametrize("llm", ["phi3", "llama"])
def test_tokenizer_and_generation_config(converted, llm):
    folder, report = converted[llm]
    processor = AutoProcessor.from_pretrained(str(folder))
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id == report["vocabulary"]["image_token_id"]
    config = json.loads((folder / "config.json").read_text())
    assert config["image_token_id"] == processor.image_token_id
    generation = json.loads((folder / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert {tokenizer.convert_tokens_to_ids(token) for token in EOS_TOKENS[llm]} <= set(eos)
    # The original resized the LLM to its tokenizer; ids it could not produce are suppressed, <image> included.
    original = {"phi3": 32011, "llama": 128257}[llm]
    rows = config["text_config"]["vocab_size"]
    assert rows == {"phi3": 32064, "llama": 128320}[llm] and rows % 64 == 0
    assert generation["suppress_tokens"] == list(range(original, rows))
    assert processor.image_token_id in generation["suppress_tokens"]


def test_tensors_equal_the_source_tensors_under_the_documented_names(fixtures, converted):
    source, output = source_tensors(fixtures["phi3"]), output_tensors(converted["phi3"][0])
    vision = "model.vision_tower.vision_tower."
    pairs = {
        "model.layers.1.self_attn.qkv_proj.weight": "model.language_model.layers.1.self_attn.qkv_proj.weight",
        "lm_head.weight": "lm_head.weight",
        "model.mm_projector.encoder_mlp.0.weight": "model.multi_modal_projector.linears.0.weight",
        "model.mm_projector.encoder_mlp.2.1.bias": "model.multi_modal_projector.linears.2.bias",
        vision + "vision_tower.blocks.1.0.channel_block.channel_attn.fn.qkv.weight":
            "model.vision_tower.backbone.blocks.1.0.channel_block.channel_attn.qkv.weight",
        vision + "language_model.model.encoder.layers.1.fc2.weight": "model.vision_tower.encoder.layers.1.fc2.weight",
        vision + "language_model.model.shared.weight": "model.vision_tower.encoder.embed_tokens.weight",
        vision + "visual_temporal_embed.pos_idx_to_embed":
            "model.vision_tower.image_projector.visual_temporal_embed.pos_idx_to_embed",
    }  # fmt: skip
    for source_key, output_key in pairs.items():
        assert torch.equal(output[output_key], source[source_key]), source_key
    # Microsoft's image_projection is [in, out], used as x @ P: the Linear weight is its transpose.
    assert torch.equal(output["model.vision_tower.image_projector.image_projection.weight"], source[vision + "image_projection"].t())
    assert not any("decoder" in key for key in output)


def test_report_lists_the_dropped_decoder_with_its_parameter_count(fixtures, converted):
    report = converted["phi3"][1]
    vision_config = json.loads((fixtures["phi3"] / "vision_tower" / "config.json").read_text())
    bart = vision_config["text_config"]
    d, ffn, layers = bart["d_model"], bart["decoder_ffn_dim"], bart["decoder_layers"]
    per_layer = 2 * (4 * (d * d + d)) + 3 * 2 * d + (d * ffn + ffn) + (ffn * d + d)  # 2 attentions, 3 norms, FFN
    positions = (bart["max_position_embeddings"] + 2) * d
    decoder = layers * per_layer + positions + 2 * d  # + layernorm_embedding
    tied_embedding = bart["vocab_size"] * d  # decoder.embed_tokens and lm_head, copies of the shared embedding
    dropped = report["tensors"]["dropped"]
    assert dropped["Florence-2 decoder (Florence-VL uses the encoder only)"]["parameters"] == decoder + tied_embedding
    assert dropped["Florence-2 LM head (tied to the shared embedding; decoder side)"]["parameters"] == tied_embedding
    assert dropped["Florence-2 LM head bias buffer (decoder side)"]["parameters"] == bart["vocab_size"]
    # vision_tower/ holds named_parameters() only: the decoder without its tied embedding
    assert dropped["Florence-2 decoder (Florence-VL uses the encoder only), copy in vision_tower/"]["parameters"] == decoder
    assert report["tensors"]["checked_duplicates"] > 0  # vision_tower/ copies compared with the main weights
    assert report["tensors"]["source"] == len(source_tensors(fixtures["phi3"])) + sum(
        1 for _ in torch.load(fixtures["phi3"] / "vision_tower" / "pytorch_model.bin", weights_only=True))


def test_model_card_metadata_and_provenance(converted):
    folder, report = converted["llama"]
    text = (folder / "README.md").read_text()
    card = validate_model_card(text)
    data = ModelCard(text).data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    assert data["license"] == "llama3.1" and data["language"] == ["en"] and "florence-vl" in data["tags"]
    content = data["widget"][0]["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("https://") and content[1]["text"].endswith("?")
    assert "base_model" not in data  # a local source is not a Hub model
    assert 'from_pretrained(\n    "someone/florence-vl-llama"' in card.text
    assert "florence-vl-llama" in text and f"`florence_vl_hf` {report['converter']['version']}" in text
    assert "greedy tokens identical" in text


def test_loads_cuda_ready_with_dtype_auto_and_device_map_auto(converted):
    folder, _ = converted["phi3"]
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype="auto", device_map="auto")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"  # "auto" on a machine without GPUs
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_lossy_dtype_cast_is_verified_with_a_dtype_aware_tolerance(tmp_path):
    source = make_fixture(tmp_path / "fp32-source", "phi3", seed=3, dtype="float32", shards=1)
    report = convert_checkpoint(source, tmp_path / "out", log=quiet)
    verification = report["verification"]
    assert report["tensors"]["changed_by_dtype_cast"] > 0 and not verification["lossless_weights"]
    assert verification["passed"] and verification["tolerance"] == pytest.approx(6e-2)
    assert 0 < verification["max_abs_diff"]["logits"] <= verification["tolerance"] * verification["scale"]["logits"]
    # Stored as float32 the same source converts without loss.
    exact = convert_checkpoint(source, tmp_path / "out32", dtype="float32", log=quiet)["verification"]
    assert exact["lossless_weights"] and exact["max_abs_diff"]["logits"] == 0.0


def test_deduplicated_tied_copies_and_no_vision_tower_weights(tmp_path):
    source = make_fixture(tmp_path / "src", "phi3", seed=4, tied_copies=False, shards=1)
    (source / "vision_tower" / "pytorch_model.bin").unlink()
    report = convert_checkpoint(source, tmp_path / "out", log=quiet)
    assert report["verification"]["passed"] and report["tensors"]["checked_duplicates"] == 0
    assert "Florence-2 LM head (tied to the shared embedding; decoder side)" not in report["tensors"]["dropped"]


def test_without_vision_tower_folder_the_florence2_config_comes_from_elsewhere(tmp_path):
    """train.py writes vision_tower/ only when the vision tower was trained: the main weights still hold Florence-2."""
    source = make_fixture(tmp_path / "src", "phi3", seed=4, shards=1)
    shutil.move(source / "vision_tower", tmp_path / "florence2")
    with pytest.raises(ConversionError, match="projection_dim is 1024"):  # the bundled Florence-2-large config
        convert_checkpoint(source, tmp_path / "out", log=quiet)
    report = convert_checkpoint(source, tmp_path / "out", florence2_config_dir=tmp_path / "florence2", log=quiet)
    assert report["verification"]["passed"] and report["source"]["florence2_config"] == str(tmp_path / "florence2")


def test_output_that_is_or_contains_the_source_is_refused(fixtures):
    for output in (fixtures["phi3"], fixtures["phi3"].parent):
        with pytest.raises(ConversionError, match="is the source folder or contains it"):
            convert_checkpoint(fixtures["phi3"], output, overwrite=True, log=quiet)
    assert (fixtures["phi3"] / "config.json").is_file()


def test_hub_repo_id_source_is_read_through_snapshot_download(fixtures, tmp_path, monkeypatch):
    """An offline Hub cache holding the fixture stands in for the Hub: the repo id resolves to a commit."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--jiuhai--florence-vl-tiny"
    shutil.copytree(fixtures["phi3"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    report = convert_checkpoint("jiuhai/florence-vl-tiny", tmp_path / "out", repo_id="me/florence-vl-tiny-hf", log=quiet)
    assert report["source"] == {**report["source"], "id": "jiuhai/florence-vl-tiny", "revision": commit}
    card = ModelCard((tmp_path / "out" / "README.md").read_text())
    assert card.data.base_model == "jiuhai/florence-vl-tiny"
    assert f"at revision `{commit}`" in card.text


def test_existing_output_is_refused_then_replaced_atomically_with_overwrite(fixtures, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_checkpoint(fixtures["phi3"], output, log=quiet)
    assert (output / "keep.txt").read_text() == "mine"
    convert_checkpoint(fixtures["phi3"], output, overwrite=True, verify=False, log=quiet)
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    report = json.loads((output / "conversion_report.json").read_text())
    assert report["verification"] == {"passed": False, "skipped": True}
