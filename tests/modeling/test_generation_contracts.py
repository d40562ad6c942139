"""generate()'s contracts (the ones transformers' GenerationTesterMixin checks, which its sdist does not ship), each
against an independent reference: the bare LLM (transformers' own Phi3ForCausalLM / LlamaForCausalLM, sharing the
weights) generating from the same input embeddings, built here by hand, or greedy decoding itself (assisted
decoding must reproduce it exactly)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from florence_vl_hf.build import build_random_model
from florence_vl_hf.modeling.modeling_florence_vl import CACHE_KWARG
from florence_vl_hf.tiny import tiny_config


def bare_llm(model):
    """The LLM of `model` as transformers' own causal LM class, sharing its modules."""
    llm = AutoModelForCausalLM.from_config(model.config.text_config)
    llm.model = model.model.language_model
    llm.lm_head = model.lm_head
    llm.generation_config = model.generation_config
    return llm.eval()


def embeddings(model, inputs):
    """Token embeddings with the image features written at the image-token positions, one image after the other."""
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids).clone()
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["task_prompt_ids"]).pooler_output
    rows, columns = (ids == model.config.image_token_id).nonzero(as_tuple=True)
    embeds[rows, columns] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    return embeds


def prompt(processor, image, question="What is in the image?", batch=1):
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(
        [conversation] * batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True},
    )


def new_tokens(out, inputs):
    return out[:, inputs["input_ids"].shape[1]:]


GENERATION_MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
    "beam": {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
    "beam_sample": {"do_sample": True, "num_beams": 2},
}


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_generate_equals_the_bare_llm_on_the_same_embeddings(tiny, shapes_image, mode):
    model, processor = tiny
    inputs = prompt(processor, shapes_image)
    kwargs = dict(GENERATION_MODES[mode], max_new_tokens=6, min_new_tokens=6)
    llm, embeds = bare_llm(model), embeddings(model, inputs)  # building them draws random numbers
    torch.manual_seed(0)
    ours = model.generate(**inputs, **kwargs)
    torch.manual_seed(0)
    reference = llm.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **kwargs)
    assert new_tokens(ours, inputs).tolist() == reference.tolist()


# transformers' AssistedCandidateGenerator calls the assistant's generate() with a generation_config and generation
# arguments together, which transformers itself logs as deprecated (a plain LlamaForCausalLM assisting itself logs
# it too); that one message from that module is not our call.
ASSISTANT_INTERNAL_DEPRECATION = "transformers.generation.utils: Passing `generation_config` together with generation"


@pytest.mark.parametrize("assistance", ["assistant_model", "prompt_lookup"])
def test_assisted_decoding_reproduces_greedy_decoding(tiny, shapes_image, assistance, no_logged_deprecation):
    """Assisted decoding verifies candidate tokens with the main model, which it calls without pixel_values after
    the prefill (the images are in the cache by then); greedy assisted decoding must give greedy's tokens."""
    model, processor = tiny
    inputs = prompt(processor, shapes_image)
    greedy = model.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    extra = {"assistant_model": model} if assistance == "assistant_model" else {"prompt_lookup_num_tokens": 3}
    assisted = model.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8, **extra)
    assert assisted.tolist() == greedy.tolist()
    no_logged_deprecation.messages[:] = [
        message for message in no_logged_deprecation.messages if not message.startswith(ASSISTANT_INTERNAL_DEPRECATION)
    ]


def test_generate_returns_scores_logits_hidden_states_and_attentions_like_the_bare_llm(shapes_image):
    model, processor = build_random_model(tiny_config("phi3"), seed=3)
    model.set_attn_implementation("eager")
    inputs = prompt(processor, shapes_image)
    flags = dict(
        do_sample=False, max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True, output_scores=True,
        output_logits=True, output_hidden_states=True, output_attentions=True,
    )
    ours = model.generate(**inputs, **flags)
    reference = bare_llm(model).generate(
        inputs_embeds=embeddings(model, inputs), attention_mask=inputs["attention_mask"], **flags
    )
    assert new_tokens(ours.sequences, inputs).tolist() == reference.sequences.tolist()
    layers = model.config.text_config.num_hidden_layers
    for name in ("scores", "logits"):
        assert len(getattr(ours, name)) == 4
        for step, (a, b) in enumerate(zip(getattr(ours, name), getattr(reference, name))):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} at step {step}")
    for name in ("hidden_states", "attentions"):
        steps = getattr(ours, name)
        assert len(steps) == 4 and all(len(step) == layers + (name == "hidden_states") for step in steps)
        for step, (a, b) in enumerate(zip(steps, getattr(reference, name))):
            for layer, (x, y) in enumerate(zip(a, b)):
                torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{name} at step {step}, layer {layer}")
    prompt_length = inputs["input_ids"].shape[1]
    assert ours.attentions[0][0].shape[-2:] == (prompt_length, prompt_length)  # prefill attends over the images


def test_a_cache_reused_across_generate_calls_gives_what_a_fresh_start_gives(tiny, shapes_image):
    """A second question about the same image continues from the first call's cache: the image is in it, so the
    second call passes no pixel_values, and must generate what one call over the whole conversation does."""
    model, processor = tiny
    first = prompt(processor, shapes_image)
    cache = DynamicCache(config=model.config.text_config)
    answer = model.generate(**first, do_sample=False, max_new_tokens=5, min_new_tokens=5, **{CACHE_KWARG: cache})
    follow_up = processor.tokenize_prompt("\nAnd its colour?", add_special_tokens=False)
    ids = torch.cat([answer, torch.tensor([follow_up])], dim=1)
    mask = torch.ones_like(ids)
    continued = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5, min_new_tokens=5,
        **{CACHE_KWARG: cache},
    )
    fresh = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=first["pixel_values"],
        task_prompt_ids=first["task_prompt_ids"], do_sample=False, max_new_tokens=5, min_new_tokens=5,
    )
    assert continued.tolist() == fresh.tolist()
