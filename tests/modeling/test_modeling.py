import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from florence_vl_hf import FlorenceVLForConditionalGeneration
from florence_vl_hf.build import build_random_model, save_hub_folder
from florence_vl_hf.tiny import tiny_config


def chat_inputs(processor, image, question="What is in the image?"):
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def test_submodules_follow_llava_names(tiny):
    model, _ = tiny
    assert {name for name, _ in model.named_children()} == {"model", "lm_head"}
    assert {name for name, _ in model.model.named_children()} == {
        "vision_tower",
        "multi_modal_projector",
        "language_model",
    }
    assert type(model.model.language_model).__name__ in ("Phi3Model", "LlamaModel")
    # No Florence-2 decoder or LM head is built.
    assert not any("decoder" in name for name, _ in model.named_parameters())


def test_image_features_replace_the_placeholder_embeddings(tiny, shapes_image):
    model, processor = tiny
    inputs = chat_inputs(processor, shapes_image)
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
        features = model.get_image_features(inputs["pixel_values"], inputs["task_prompt_ids"]).pooler_output
    hook.remove()
    ids = inputs["input_ids"][0]
    is_image = ids == model.config.image_token_id
    assert int(is_image.sum()) == model.config.num_image_tokens
    torch.testing.assert_close(seen["embeds"][0, is_image], features[0])
    text_embeds = model.get_input_embeddings().weight[ids[~is_image]]
    torch.testing.assert_close(seen["embeds"][0, ~is_image], text_embeds)


def test_loss_is_the_shifted_cross_entropy_over_supervised_tokens(tiny, shapes_image):
    model, processor = tiny
    inputs = chat_inputs(processor, shapes_image)
    labels = inputs["input_ids"].clone()
    labels[:, : labels.shape[1] - 5] = -100  # supervise only the last 5 tokens, as LLaVA masks prompt and image
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    logits, targets = out.logits[0, :-1], labels[0, 1:]
    keep = targets != -100
    expected = F.cross_entropy(logits[keep].float(), targets[keep])
    torch.testing.assert_close(out.loss, expected)


def test_text_only_forward(tiny):
    model, processor = tiny
    inputs = processor(text="Hello there", return_tensors="pt")
    assert "pixel_values" not in inputs
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_hidden_states is None
    assert out.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)


def test_bad_inputs_get_clear_errors(tiny_phi3, shapes_image):
    model, processor = tiny_phi3
    inputs = chat_inputs(processor, shapes_image)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    first = int((ids[0] == model.config.image_token_id).nonzero()[0])
    short = torch.cat([ids[:, :first], ids[:, first + 1 :]], dim=1)  # one image token fewer
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=short, pixel_values=pixels)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 32, 32\)"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="task_prompt_ids must have shape"):
        model(input_ids=ids, pixel_values=pixels, task_prompt_ids=inputs["task_prompt_ids"][:, :2])
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(pixel_values=pixels)


def test_save_and_reload_is_exact_and_safetensors_only(tiny, tmp_path, shapes_image):
    model, processor = tiny
    save_hub_folder(model, processor, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"configuration_florence_vl.py", "modeling_florence_vl.py", "processing_florence_vl.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_florence_vl.FlorenceVLConfig",
        "AutoModel": "modeling_florence_vl.FlorenceVLModel",
        "AutoModelForImageTextToText": "modeling_florence_vl.FlorenceVLForConditionalGeneration",
    }
    processor_map = json.loads((tmp_path / "processor_config.json").read_text())["auto_map"]
    assert processor_map == {"AutoProcessor": "processing_florence_vl.FlorenceVLProcessor"}

    on_disk = load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    assert set(on_disk) == set(state)
    assert all(torch.equal(on_disk[k], state[k]) for k in state)

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, FlorenceVLForConditionalGeneration)
    reloaded_state = reloaded.state_dict()
    assert all(torch.equal(reloaded_state[k], state[k]) for k in state)
    inputs = chat_inputs(processor, shapes_image)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(tiny_phi3, shapes_image, tmp_path, dtype):
    model, processor = tiny_phi3
    save_hub_folder(model, processor, tmp_path)
    half = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=dtype).eval()
    assert half.dtype == dtype
    inputs = chat_inputs(processor, shapes_image)
    with torch.no_grad():
        reference = model(**inputs).logits
        logits = half(**inputs.to(dtype)).logits
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_eager_and_sdpa_attention_agree(tiny, tmp_path, shapes_image):
    model, processor = tiny
    save_hub_folder(model, processor, tmp_path)
    inputs = chat_inputs(processor, shapes_image)
    logits = {}
    default = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert default.model.language_model.config._attn_implementation == "sdpa"  # SDPA unless asked otherwise
    assert default.model.vision_tower.encoder.config._attn_implementation == "sdpa"
    for implementation in ("eager", "sdpa"):
        loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.model.language_model.config._attn_implementation == implementation
        assert loaded.model.vision_tower.encoder.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = loaded(**inputs).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(shapes_image):
    from florence_vl_hf.build import build_random_model

    no_dropout = dict(attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    config = tiny_config("phi3")
    for key, value in no_dropout.items():
        setattr(config.text_config, key, value)
    for key in ("dropout", "attention_dropout", "activation_dropout"):
        setattr(config.vision_config.text_config, key, 0.0)
    model, processor = build_random_model(config, seed=0)
    inputs = chat_inputs(processor, shapes_image)
    labels = inputs["input_ids"].clone()

    def gradients():
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.model.language_model.gradient_checkpointing
    checkpointed = gradients()
    model.activation_checkpointing_disable()
    assert plain.keys() == checkpointed.keys()
    assert any("vision_tower" in name for name in plain)  # the whole model trains (stage 1)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_device_map_auto_keeps_blocks_whole(tiny_phi3, tmp_path):
    from accelerate import infer_auto_device_map

    model, processor = tiny_phi3
    no_split = set(model._no_split_modules)
    assert {"Florence2VisionBlock", "BartEncoderLayer", "Phi3DecoderLayer"} <= no_split
    # A GPU budget of a fraction of the model forces a split; each block must land on one device.
    budget = sum(p.numel() * p.element_size() for p in model.parameters()) // 2
    device_map = infer_auto_device_map(model, max_memory={0: budget, "cpu": 10**10}, no_split_module_classes=no_split)
    assert len(set(device_map.values())) > 1
    blocks = [name for name, module in model.named_modules() if type(module).__name__ in no_split]
    for key in device_map:
        assert not any(key.startswith(block + ".") for block in blocks), f"{key} splits a block"

    save_hub_folder(model, processor, tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto")
    state = model.state_dict()
    assert all(torch.equal(v.cpu(), state[k]) for k, v in loaded.state_dict().items())


def test_any_causal_lm_config_works(shapes_image):
    """A third LLM family (Qwen2) through AutoModel.from_config, with the Phi-3.5 tokenizer and template."""
    from transformers import AutoModel

    from florence_vl_hf.build import build_random_model
    from florence_vl_hf.tiny import tiny_config

    config = tiny_config("phi3")
    qwen = {"model_type": "qwen2", "vocab_size": 32064, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = type(config)(vision_config=config.vision_config.to_dict(), text_config=qwen, image_size=32)
    model, processor = build_random_model(config, template="phi3")
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    inputs = chat_inputs(processor, shapes_image)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert type(AutoModel.from_config(config)).__name__ == "FlorenceVLModel"


def test_random_projector_uses_pytorchs_default_linear_init():
    """The original builds the projector from plain nn.Linear layers; a 0.02 normal init would shrink the image
    features ~100x through three layers (and a tiny model trained from scratch then ignores the image)."""
    model, _ = build_random_model(tiny_config("phi3"), seed=0)
    for linear in model.model.multi_modal_projector.linears:
        bound = 1 / linear.in_features**0.5
        assert linear.weight.abs().max() <= bound and linear.bias.abs().max() <= bound
        assert abs(linear.weight.std().item() - bound / 3**0.5) < 0.1 * bound
    assert abs(model.model.language_model.layers[0].mlp.down_proj.weight.std().item() - 0.02) < 0.002


def test_image_ids_without_pixel_values_are_embedded_as_text(tiny_phi3, shapes_image):
    """As in transformers' LLaVA: without pixels, `<image>` ids are ordinary tokens (assisted decoding and decoding
    steps call the model that way), so the logits are the LLM's own on those ids."""
    model, processor = tiny_phi3
    ids = chat_inputs(processor, shapes_image)["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        hidden = model.model.language_model(input_ids=ids).last_hidden_state
        reference = model.lm_head(hidden)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_return_dict_false_gives_the_same_values_as_a_tuple(tiny_phi3, shapes_image):
    model, processor = tiny_phi3
    inputs = chat_inputs(processor, shapes_image)
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        features = model.get_image_features(inputs["pixel_values"], return_dict=False)
        base = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(features, tuple) and isinstance(base, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits, rtol=0, atol=0)
    torch.testing.assert_close(features[1], as_dict.image_hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head(base[0]), as_dict.logits, rtol=0, atol=0)


def test_image_features_carry_the_florence2_encoder_hidden_states_and_attentions(tiny_phi3, shapes_image):
    model, processor = tiny_phi3
    pixels = chat_inputs(processor, shapes_image)["pixel_values"]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.get_image_features(pixels, output_hidden_states=True, output_attentions=True)
            prompts = torch.tensor(model.config.task_prompt_ids).unsqueeze(0)
            depth = out.last_hidden_state
            prompt_embeds = model.model.vision_tower.encoder.embed_tokens(prompts[0])
            sequences = torch.cat([depth.expand(prompts.shape[1], -1, -1), prompt_embeds], dim=1)
            reference = model.model.vision_tower.encoder(inputs_embeds=sequences, output_hidden_states=True,
                                                         output_attentions=True)  # fmt: skip
    finally:
        model.set_attn_implementation("sdpa")
    layers = model.config.vision_config.text_config.encoder_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    for ours, theirs in zip(out.hidden_states + out.attentions, reference.hidden_states + reference.attentions):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert model.get_image_features(pixels).hidden_states is None
