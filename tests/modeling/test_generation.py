"""generate() against independent references: a greedy loop over full forwards without cache, samples run alone."""

import logging
from unittest import mock

import pytest
import torch

from florence_vl_hf.build import build_random_model
from florence_vl_hf.modeling.modeling_florence_vl import CACHE_KWARG
from florence_vl_hf.tiny import tiny_config


def chat(processor, images, question, answer=None):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    return messages


def greedy_without_cache(model, inputs, steps):
    """Argmax of a full forward over the whole sequence at every step (no cache, features recomputed)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        next_id = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_id)], dim=1)
    return ids


def test_greedy_generate_equals_a_loop_of_full_forwards(tiny, shapes_image):
    model, processor = tiny
    inputs = processor.apply_chat_template(
        chat(processor, [shapes_image], "What is here?"), add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt",
    )
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(out, greedy_without_cache(model, inputs, 6))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"do_sample": False},
        {"do_sample": True, "top_k": 5},
        {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "num_beams": 2},
    ],
)
def test_vision_features_are_computed_once_per_image(tiny_phi3, shapes_image, kwargs):
    model, processor = tiny_phi3
    inputs = processor.apply_chat_template(
        chat(processor, [shapes_image, shapes_image], "Compare them."), add_generation_prompt=True,
        tokenize=True, return_dict=True, return_tensors="pt",
    )
    tower = model.model.vision_tower
    with mock.patch.object(tower, "forward", wraps=tower.forward) as spy:
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **kwargs)
    assert spy.call_count == 1
    assert spy.call_args.args[0].shape[0] == 2  # both images in one call, not once per beam
    assert out.shape == (kwargs.get("num_return_sequences", 1), inputs["input_ids"].shape[1] + 4)


def test_beam_search_expands_features_per_sequence(tiny_phi3, shapes_image):
    model, processor = tiny_phi3
    inputs = processor.apply_chat_template(
        [chat(processor, [shapes_image], "One?"), chat(processor, [], "Two?")], add_generation_prompt=True,
        tokenize=True, return_dict=True, return_tensors="pt", padding=True,
    )
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert out.shape[0] == 4


def test_left_padded_batch_equals_each_sample_alone(tiny, shapes_image):
    model, processor = tiny
    gray = shapes_image.convert("L")
    conversations = [
        chat(processor, [shapes_image], "Describe the picture in detail, please."),
        chat(processor, [], "A text-only question?"),
        chat(processor, [gray, shapes_image], "Which is grey?"),
        chat(processor, [shapes_image], "Hi", answer="Shapes."),
    ]
    batch = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    assert processor.tokenizer.padding_side == "left"
    assert (batch["attention_mask"] == 0).any()
    batched = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for index, conversation in enumerate(conversations):
        alone = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        single = model.generate(**alone, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert batched[index, -5:].tolist() == single[0, -5:].tolist(), f"sample {index}"


def test_cached_chunked_forward_equals_one_full_forward(tiny, shapes_image):
    model, processor = tiny
    inputs = processor.apply_chat_template(
        chat(processor, [shapes_image], "What colour is the circle?"), add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt",
    )
    ids = inputs["input_ids"]
    with torch.no_grad():
        full = model(**inputs).logits
        cut = ids.shape[1] - 7  # the image and most of the text in the first chunk
        first = model(input_ids=ids[:, :cut], attention_mask=inputs["attention_mask"][:, :cut],
                      pixel_values=inputs["pixel_values"], task_prompt_ids=inputs["task_prompt_ids"], use_cache=True)
        cache = getattr(first, CACHE_KWARG)
        pieces = [first.logits]
        for start in range(cut, ids.shape[1], 3):
            end = min(start + 3, ids.shape[1])
            step = model(input_ids=ids[:, start:end], attention_mask=inputs["attention_mask"][:, :end],
                         cache=cache, use_cache=True)
            cache = getattr(step, CACHE_KWARG)
            pieces.append(step.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generation_stops_at_end_of_turn_tokens(tiny):
    model, processor = tiny
    eos = model.generation_config.eos_token_id
    expected = {"Phi3Config": [32007, 32001, 32000], "LlamaConfig": [128001, 128008, 128009]}
    assert eos == expected[type(model.config.text_config).__name__]
    tokens = processor.tokenizer.convert_ids_to_tokens(eos)
    assert {"<|end|>", "<|endoftext|>"} <= set(tokens) or {"<|eot_id|>", "<|end_of_text|>"} <= set(tokens)


def test_text_only_generation(tiny_phi3):
    model, processor = tiny_phi3
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "Count to three."}], add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt",
    )
    assert "pixel_values" not in inputs
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(out, greedy_without_cache(model, inputs, 4))


def test_several_images_in_later_turns(tiny_phi3, shapes_image):
    model, processor = tiny_phi3
    messages = [
        {"role": "user", "content": [{"type": "image", "image": shapes_image}, {"type": "text", "text": "A?"}]},
        {"role": "assistant", "content": "B."},
        {"role": "user", "content": [{"type": "image", "image": shapes_image.rotate(90)},
                                     {"type": "text", "text": "And this one?"}]},
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["pixel_values"].shape[0] == 2
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * model.config.num_image_tokens
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(out, greedy_without_cache(model, inputs, 3))


def test_llama_prompt_keeps_the_original_double_bos():
    model, processor = build_random_model(tiny_config("llama3"))
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert inputs["input_ids"][0][:2] == [128000, 128000]


def test_static_cache_generates_what_the_dynamic_cache_generates(tiny_phi3, shapes_image):
    model, processor = tiny_phi3
    inputs = processor.apply_chat_template(chat(processor, [shapes_image], "What is in the image?"),
                                           add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    dynamic = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    static = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                            cache_implementation="static")
    assert static.tolist() == dynamic.tolist()


def test_positions_past_the_language_model_s_limit_are_warned_about(tiny, shapes_image, caplog):
    model, processor = tiny
    inputs = processor.apply_chat_template(
        chat(processor, [shapes_image], "What is here?"), add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt",
    )
    prompt_length = inputs["input_ids"].shape[1]
    text_config = model.config.text_config
    limit = text_config.max_position_embeddings
    try:
        caplog.set_level(logging.WARNING)
        # 3 new tokens take 2 forwards past the prompt (the last token is never fed back): exactly the limit
        text_config.max_position_embeddings = prompt_length + 2
        model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
        assert "past the" not in caplog.text
        model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        assert f"Positions up to {prompt_length + 2}, past the {prompt_length + 2} positions" in caplog.text
        text_config.max_position_embeddings = prompt_length - 1
        model(**inputs)
        assert f"The prompt has {prompt_length} tokens, past the {prompt_length - 1} positions" in caplog.text
    finally:
        text_config.max_position_embeddings = limit
