"""from_pretrained_parts: a new Florence-VL from a Florence-2 checkpoint (native or Microsoft layout) and a causal LM."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Florence2Config,
    Florence2ForConditionalGeneration,
)

from florence_vl_hf import FlorenceVLForConditionalGeneration, from_pretrained_parts
from florence_vl_hf.conversion import ConversionError, convert_checkpoint
from florence_vl_hf.lab.fixture import make_fixture
from florence_vl_hf.processing import asset_dir, florence2_image_processor
from florence_vl_hf.tiny import tiny_config


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny native Florence-2 and tiny Phi-3 / Llama LMs saved with save_pretrained, with their real tokenizers."""
    root = tmp_path_factory.mktemp("parts")
    tiny = tiny_config("phi3")
    torch.manual_seed(0)
    florence2 = Florence2ForConditionalGeneration(Florence2Config(
        vision_config=tiny.vision_config.vision_config.to_dict(), text_config=tiny.vision_config.text_config.to_dict()))
    with torch.no_grad():
        for parameter in florence2.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    florence2.save_pretrained(root / "florence2")
    florence2_image_processor(32).save_pretrained(root / "florence2")
    llms = {}
    for llm, asset in (("phi3", "phi-3.5-mini-instruct"), ("llama3", "llama-3.1-8b-instruct")):
        text = tiny_config(llm).text_config
        text.vocab_size = {"phi3": 32064, "llama3": 128256}[llm]
        model = AutoModelForCausalLM.from_config(text)
        model.save_pretrained(root / llm)
        AutoTokenizer.from_pretrained(str(asset_dir(asset))).save_pretrained(root / llm)
        llms[llm] = root / llm
    return root / "florence2", llms


@pytest.mark.parametrize("llm", ["phi3", "llama3"])
def test_parts_compute_what_each_part_computes(parts, llm, shapes_image):
    florence2_dir, llms = parts
    model, processor = from_pretrained_parts(florence2_dir, llms[llm])
    model.eval()
    native = Florence2ForConditionalGeneration.from_pretrained(florence2_dir).eval()
    reference_llm = AutoModelForCausalLM.from_pretrained(llms[llm]).eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        depth = model.get_image_features(pixel_values).last_hidden_state
        torch.testing.assert_close(depth, native.model.get_image_features(pixel_values).pooler_output, atol=1e-6, rtol=0)
        ids = torch.tensor([[5, 17, 300, 2000, 9]])
        ours = model(input_ids=ids).logits
        theirs = reference_llm(input_ids=ids).logits
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, atol=1e-5, rtol=0)

    # The vocabulary grows only when the tokenizer (with <image>, and <pad> where missing) does not fit.
    rows = model.config.text_config.vocab_size
    assert rows == {"phi3": 32064, "llama3": 128320}[llm] and len(processor.tokenizer) <= rows
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    messages = [{"role": "user", "content": [{"type": "image", "image": shapes_image}, {"type": "text", "text": "Hi?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_projector_is_freshly_initialised_like_a_linear_layer_and_seeded(parts):
    florence2_dir, llms = parts
    first, _ = from_pretrained_parts(florence2_dir, llms["phi3"], seed=1)
    again, _ = from_pretrained_parts(florence2_dir, llms["phi3"], seed=1)
    other, _ = from_pretrained_parts(florence2_dir, llms["phi3"], seed=2)
    for linear, same, different in zip(first.model.multi_modal_projector.linears, again.model.multi_modal_projector.linears,
                                       other.model.multi_modal_projector.linears):  # fmt: skip
        bound = linear.in_features**-0.5  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
        assert linear.bias.abs().max() <= bound and linear.bias.abs().max() > 0
        assert torch.equal(linear.weight, same.weight) and not torch.equal(linear.weight, different.weight)


def test_microsoft_layout_florence2_gives_the_vision_tower_the_conversion_gives(tmp_path):
    """The vision_tower/ folder of an original checkpoint is a Microsoft-layout Florence-2: assembled from it, the
    vision tower equals the converted model's (whose conversion was verified against native Florence-2)."""
    source = make_fixture(tmp_path / "src", "phi3", seed=7, dtype="float32", shards=1)
    convert_checkpoint(source, tmp_path / "converted", dtype="float32", log=quiet)
    converted = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path / "converted")
    llm_dir = tmp_path / "llm"
    AutoModelForCausalLM.from_config(converted.config.text_config).save_pretrained(llm_dir)
    AutoTokenizer.from_pretrained(str(asset_dir("phi-3.5-mini-instruct"))).save_pretrained(llm_dir)
    model, _ = from_pretrained_parts(source / "vision_tower", llm_dir)
    ours, theirs = model.model.vision_tower.state_dict(), converted.model.vision_tower.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_parts_that_do_not_fit_are_refused(parts, tmp_path):
    florence2_dir, llms = parts
    with pytest.raises(ConversionError, match="fusion must be one of"):
        from_pretrained_parts(florence2_dir, llms["phi3"], fusion="blend")
