"""The optional vision feature cache: a second question about the same image skips the vision tower and gives
exactly what an uncached model gives."""

import copy

import pytest
import torch
from PIL import Image

from florence_vl_hf import FlorenceVLVisionFeatureCache


@pytest.fixture
def model_and_processor(tiny_phi3):
    model, processor = tiny_phi3
    model = copy.deepcopy(model)
    calls = []
    model.model.vision_tower.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return model, processor, calls


def chat(processor, images, question):
    messages = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
                for image in images]  # fmt: skip
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding=True)  # fmt: skip


def test_second_question_about_the_same_image_skips_the_vision_tower(model_and_processor, tiny_phi3, shapes_image):
    model, processor, calls = model_and_processor
    uncached, _ = tiny_phi3
    cache = model.enable_vision_feature_cache()
    for question in ("What is shown?", "How many shapes are there?"):
        inputs = chat(processor, [shapes_image], question)
        expected = uncached.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), expected)
    assert calls == [1]
    assert (cache.hits, cache.misses) == (1, 1)

    other = Image.new("RGB", (50, 40), (10, 200, 30))
    inputs = chat(processor, [other], "What is shown?")
    features = model.get_image_features(inputs["pixel_values"], inputs["task_prompt_ids"]).pooler_output
    assert calls == [1, 1]
    with torch.no_grad():
        assert torch.equal(features, uncached.get_image_features(inputs["pixel_values"], inputs["task_prompt_ids"]).pooler_output)


def test_a_batch_computes_only_the_images_not_yet_cached(model_and_processor, tiny_phi3, shapes_image):
    model, processor, calls = model_and_processor
    uncached, _ = tiny_phi3
    model.enable_vision_feature_cache()
    other = Image.new("RGB", (50, 40), (10, 200, 30))
    inputs = chat(processor, [other, shapes_image, other], "Hi?")
    with torch.no_grad():
        model.get_image_features(chat(processor, [shapes_image], "Hi?")["pixel_values"])
        features = model.get_image_features(inputs["pixel_values"], inputs["task_prompt_ids"]).pooler_output
        expected = uncached.get_image_features(inputs["pixel_values"], inputs["task_prompt_ids"]).pooler_output
    assert calls == [1, 1]  # the new image once, though it appears twice; the cached one not at all
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=0)  # batch composition changes kernel order only


def test_cache_keys_hold_image_content_and_prompts_and_evict_least_recently_used(model_and_processor):
    model, processor, calls = model_and_processor
    cache = model.enable_vision_feature_cache(max_images=1)
    pixels = torch.zeros(1, 3, 32, 32)
    prompts = torch.tensor(model.config.task_prompt_ids).unsqueeze(0)
    torch.set_grad_enabled(False)
    model.get_image_features(pixels, prompts)
    model.get_image_features(pixels + 1, prompts)  # another image evicts the first
    model.get_image_features(pixels, prompts)
    model.get_image_features(pixels, prompts.flip(1))  # same image, other prompts: a different entry
    torch.set_grad_enabled(True)
    assert calls == [1, 1, 1, 1] and len(cache.entries) == 1
    assert FlorenceVLVisionFeatureCache.key(pixels[0], prompts[0]) != FlorenceVLVisionFeatureCache.key(
        pixels[0].double(), prompts[0])  # fmt: skip
    model.disable_vision_feature_cache()
    model.get_image_features(pixels, prompts)
    assert len(calls) == 5
    with pytest.raises(ValueError, match="max_images"):
        model.enable_vision_feature_cache(max_images=0)


def test_training_with_gradients_bypasses_the_cache(model_and_processor):
    model, _, calls = model_and_processor
    cache = model.enable_vision_feature_cache()
    model.train()
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model.get_image_features(pixels).pooler_output.sum().backward()
    assert calls == [1, 1] and not cache.entries
    first = next(model.model.vision_tower.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def uncached_features(model, pixels):
    with torch.no_grad():
        cache, model.model.vision_feature_cache = model.model.vision_feature_cache, None
        features = model.get_image_features(pixels).pooler_output
        model.model.vision_feature_cache = cache
    return features


def nudge_in_place(model):
    with torch.no_grad():
        next(model.model.multi_modal_projector.parameters()).mul_(1.5)


def load_other_weights(model):
    model.load_state_dict({name: value + 0.01 for name, value in model.state_dict().items()})


def optimizer_step(model):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.get_image_features(torch.rand(1, 3, 32, 32)).pooler_output.sum().backward()
    optimizer.step()
    model.eval()


def cast_to_double(model):
    model.double()


@pytest.mark.parametrize("change", [nudge_in_place, load_other_weights, optimizer_step, cast_to_double])
def test_features_follow_the_weights_after_they_change(model_and_processor, change):
    model, _, calls = model_and_processor
    model.eval()
    cache = model.enable_vision_feature_cache()
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.get_image_features(pixels).pooler_output
    change(model)
    pixels = pixels.to(next(model.parameters()).dtype)
    with torch.no_grad():
        after = model.get_image_features(pixels).pooler_output
        again = model.get_image_features(pixels).pooler_output
    assert not torch.equal(after.double(), before.double())
    assert torch.equal(after, uncached_features(model, pixels))
    assert torch.equal(again, after) and cache.hits == 1  # the new weights' entry is reused


def test_with_gradients_on_the_cache_is_neither_used_nor_filled(model_and_processor):
    model, _, calls = model_and_processor
    model.eval()
    cache = model.enable_vision_feature_cache()
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    features = model.get_image_features(pixels).pooler_output
    assert features.grad_fn is not None and not cache.entries
    with torch.no_grad():
        cached = model.get_image_features(pixels).pooler_output
    assert all(tensor.grad_fn is None and not tensor.requires_grad for entry in cache.entries.values() for tensor in entry)
    assert torch.equal(cached, features.detach())
    again = model.get_image_features(pixels).pooler_output  # gradients on: computed again, with its graph
    assert again.grad_fn is not None and len(calls) == 3
