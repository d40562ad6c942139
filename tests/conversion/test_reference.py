"""The original algorithm (conversion/reference.py) against the model on a tiny random model: both built from the same
native Florence-2 and LLM checkpoints, Florence-VL through `from_pretrained_parts`, the reference straight from them
with the projector's tensors. Both settings the reference supports: the original's tokens (with Florence-2's
average-image token) and the patch tokens only; and both groupings of its Florence-2 calls (the verification's, one
call per prompt, and the bench's, one call for all)."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, Florence2Config, Florence2ForConditionalGeneration

from florence_vl_hf.conversion.parts import from_pretrained_parts
from florence_vl_hf.conversion.reference import OriginalLLM, OriginalVision, florence2_image_tokens, mlp_projector
from florence_vl_hf.families import family
from florence_vl_hf.tiny import tiny_config

ATOL = 1e-5  # float32


@pytest.fixture(scope="module", params=["phi3", "llama3"])
def parts(request, tmp_path_factory):
    """Folders of a random native Florence-2 (one extra vocabulary row: its image placeholder) and a random LLM."""
    folder = tmp_path_factory.mktemp(f"parts-{request.param}")
    tiny = tiny_config(request.param)
    vocab = tiny.vision_config.text_config.vocab_size
    config = Florence2Config(vision_config=tiny.vision_config.vision_config.to_dict(),
                             text_config=dict(tiny.vision_config.text_config.to_dict(), vocab_size=vocab + 1),
                             image_token_id=vocab)  # fmt: skip
    torch.manual_seed(0)
    florence2 = Florence2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves LayerNorms at identity: move every tensor off its trivial value
        for parameter in florence2.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    florence2.save_pretrained(folder / "florence2")
    AutoModelForCausalLM.from_config(tiny.text_config).save_pretrained(folder / "llm")
    return request.param, folder


def build(parts, include_average_image_token, batch_prompts=False):
    llm, folder = parts
    model, processor = from_pretrained_parts(
        folder / "florence2", folder / "llm", tokenizer=AutoTokenizer.from_pretrained(str(family(llm).asset_dir)),
        template=llm, image_size=32, include_average_image_token=include_average_image_token, seed=1,
    )  # fmt: skip
    state = model.state_dict()
    prefix = "model.multi_modal_projector.linears."
    layers = [(state[f"{prefix}{i}.weight"], state[f"{prefix}{i}.bias"]) for i in range(model.config.projector_depth)]
    vision = OriginalVision(
        Florence2ForConditionalGeneration.from_pretrained(folder / "florence2").eval(), mlp_projector(layers),
        prompt_names=model.config.task_prompt_names, include_average_image_token=include_average_image_token,
        batch_prompts=batch_prompts,
    )  # fmt: skip
    language = OriginalLLM(AutoModelForCausalLM.from_pretrained(folder / "llm").eval(), model.config.image_token_id)
    return model.eval(), processor, vision, language


def chats(processor):
    images = [Image.fromarray((torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy())
              for i in range(2)]
    messages = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
                for image, question in zip(images, ("What is shown?", "Which colours are in the image, and where?"))]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding=True)  # fmt: skip


@pytest.mark.parametrize("batch_prompts", [False, True], ids=["call-per-prompt", "one-call"])
@pytest.mark.parametrize("include_average_image_token", [True, False], ids=["all-tokens", "patch-tokens"])
def test_the_reference_and_the_model_agree(parts, include_average_image_token, batch_prompts):
    model, processor, vision, language = build(parts, include_average_image_token, batch_prompts)
    inputs = chats(processor)
    pixel_values, prompts = inputs["pixel_values"], inputs["task_prompt_ids"]
    with torch.no_grad():
        ours = model.get_image_features(pixel_values, task_prompt_ids=prompts, return_source_features=True)
        features = vision(pixel_values, prompts)
        sources = vision.source_features(pixel_values, prompts)
        logits = model(**inputs).logits
        reference_logits = language.logits(inputs["input_ids"], inputs["attention_mask"], features)
        generation = model.generation_config
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        reference_tokens = language.generate(inputs["input_ids"], inputs["attention_mask"], features, max_new_tokens=4,
                                             eos_token_id=generation.eos_token_id, pad_token_id=generation.pad_token_id)

    tokens_per_source = model.config.num_image_tokens
    assert features.shape == (2, tokens_per_source, model.config.text_config.hidden_size)
    assert tokens_per_source == model.config.num_encoder_image_tokens - (0 if include_average_image_token else 1)
    torch.testing.assert_close(ours.pooler_output, features, atol=ATOL, rtol=0)
    assert list(ours.source_features) == list(sources) == ["depth", "caption", "ocr", "grounding"]
    for name, reference in sources.items():
        assert reference.shape[1] == tokens_per_source
        torch.testing.assert_close(ours.source_features[name], reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, reference_logits, atol=ATOL, rtol=0)
    assert torch.equal(tokens, reference_tokens)
    if not batch_prompts:  # DaViT over the same batch of images as the model: float32 results are bit-identical
        assert torch.equal(ours.pooler_output, features) and torch.equal(logits, reference_logits)


def test_the_projector_has_the_original_layout_and_computes_linear_gelu_linear():
    weights = [(torch.randn(6, 4), torch.randn(6)), *((torch.randn(6, 6), torch.randn(6)) for _ in range(2))]
    projector = mlp_projector(weights)
    assert list(projector.state_dict()) == ["0.weight", "0.bias", "1.1.weight", "1.1.bias", "2.1.weight", "2.1.bias"]
    x = torch.randn(2, 3, 4)
    expected = x @ weights[0][0].T + weights[0][1]
    for weight, bias in weights[1:]:
        expected = torch.nn.functional.gelu(expected) @ weight.T + bias
    torch.testing.assert_close(projector(x), expected)
    with pytest.raises(ValueError, match="at least one"):
        mlp_projector([])


def test_the_image_token_count_follows_the_davit_strides():
    config = tiny_config("phi3")
    native = Florence2Config(vision_config=config.vision_config.vision_config.to_dict())
    assert florence2_image_tokens(native, 32) == config.num_encoder_image_tokens == 17  # the average + a 4x4 grid
    assert florence2_image_tokens(native, 64) == 1 + 8 * 8


def test_placeholders_must_match_the_features():
    embeddings = torch.nn.Embedding(10, 4)
    llm = type("LLM", (), {"get_input_embeddings": lambda self: embeddings})()
    language = OriginalLLM(llm, image_token_id=12)  # past the vocabulary, as the original's may be
    input_ids = torch.tensor([[1, 12, 12, 3]])
    features = torch.randn(1, 2, 4)
    embeds = language.input_embeds(input_ids, features)
    assert torch.equal(embeds[0, 1:3], features[0]) and torch.equal(embeds[0, 3], embeddings.weight[3])
    with pytest.raises(ValueError, match="2 image placeholders in the input for 3 image feature tokens"):
        language.input_embeds(input_ids, torch.randn(1, 3, 4))
