import logging

import pytest
import torch
from conftest import write_samples

from florence_vl_hf.families import family_of
from florence_vl_hf.training import (
    IGNORE_INDEX,
    ConversationDataset,
    FlorenceVLDataCollator,
    ImageCache,
    load_conversations,
)


def supervised_text(processor, labels):
    return processor.tokenizer.decode([label for label in labels if label != IGNORE_INDEX])


def test_examples_carry_ids_labels_and_the_processors_pixels(tiny_phi3, data_folder, shapes_image):
    _, processor = tiny_phi3
    folder, samples = data_folder
    dataset = ConversationDataset(write_samples(folder, samples), processor, "phi3", image_folder=folder)
    caption, qa, text_only = dataset[0], dataset[1], dataset[2]
    expected_pixels = processor(images=shapes_image, text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(caption["pixel_values"], expected_pixels, rtol=0, atol=0)
    assert caption["input_ids"].count(processor.image_token_id) == processor.num_image_tokens
    assert supervised_text(processor, caption["labels"]) == "A red circle and a blue square.<|end|>"
    assert supervised_text(processor, qa["labels"]) == "green<|end|>Yes.<|end|>"
    assert text_only["pixel_values"] is None and processor.image_token_id not in text_only["input_ids"]
    assert supervised_text(processor, text_only["labels"]) == "Hi!<|end|>"


def test_plain_template_supervises_the_caption_and_newline_only(tiny, data_folder):
    _, processor = tiny
    folder, samples = data_folder
    example = ConversationDataset(samples[:1], processor, "plain", image_folder=folder)[0]
    image_end = max(i for i, t in enumerate(example["input_ids"]) if t == processor.image_token_id) + 1
    assert set(example["labels"][:image_end]) == {IGNORE_INDEX}
    assert example["labels"][image_end:] == example["input_ids"][image_end:]
    assert processor.tokenizer.decode(example["input_ids"][image_end:]).strip() == "A red circle and a blue square."


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"image": "missing.png"}, "not found"),
        ({"image": "garbage.png"}, "could not be used"),
        ({"conversations": [{"from": "human", "value": "<image>\n<image>\nTwo?"}, {"from": "gpt", "value": "x"}]},
         "2 <image> markers"),
        ({"image": None}, "no 'image'"),
        ({"conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "human", "value": "Q again"}]},
         "must alternate"),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<image> A"}]}, "gpt turn"),
        ({"conversations": "not a list"}, "no 'conversations' list"),
        ({"image": 123}, "'image' must be a file name, got int 123"),
        ({"image": ["shapes.png"]}, "'image' must be a file name, got list"),
        ({"image": {"path": "shapes.png"}}, "'image' must be a file name, got dict"),
        ({"conversations": [{"from": "gpt", "value": "<image>\nAn answer."}]}, "has only a gpt turn"),
        ({"conversations": [{"from": "human", "value": "<image>\nQ\ud800?"}, {"from": "gpt", "value": "x"}]},
         "turn 0 is not valid Unicode (position 9)"),
        ({"conversations": [{"from": "human", "value": "<image>\nDescribe it."}]}, "has no gpt reply to train on"),
    ],
)  # fmt: skip
def test_bad_samples_are_reported_by_id_and_skipped(tiny_phi3, data_folder, bad, reason, caplog):
    _, processor = tiny_phi3
    folder, samples = data_folder
    (folder / "garbage.png").write_bytes(b"not an image at all")
    broken = {**samples[0], "id": "broken-7", **bad}
    dataset = ConversationDataset([broken, samples[2]], processor, "phi3", image_folder=folder)
    with caplog.at_level(logging.WARNING):
        example = dataset[0]
    assert supervised_text(processor, example["labels"]) == "Hi!<|end|>"  # the next usable sample
    assert list(dataset.skipped) == ["broken-7"] and reason in dataset.skipped["broken-7"]
    assert "broken-7" in caplog.text


@pytest.mark.parametrize("bad_id", [{"a": 1}, ["x"], 4.5])
def test_a_sample_whose_id_is_unusable_is_reported_by_its_position(tiny_phi3, data_folder, bad_id):
    _, processor = tiny_phi3
    folder, samples = data_folder
    dataset = ConversationDataset([samples[2], {**samples[0], "id": bad_id, "image": 7}], processor, "phi3",
                                  image_folder=folder)  # fmt: skip
    assert supervised_text(processor, dataset[1]["labels"]) == "Hi!<|end|>"
    assert dataset.skipped == {"sample #1": "'image' must be a file name, got int 7"}


def test_a_dataset_without_usable_samples_says_so(tiny_phi3, data_folder):
    _, processor = tiny_phi3
    folder, samples = data_folder
    dataset = ConversationDataset([{**samples[0], "image": "missing.png"}], processor, "phi3", image_folder=folder)
    with pytest.raises(RuntimeError, match="None of the 1 samples can be used"):
        dataset[0]


def test_truncation_keeps_image_tokens_whole_or_drops_the_sample(tiny_phi3, data_folder):
    _, processor = tiny_phi3
    folder, samples = data_folder
    full = ConversationDataset(samples[:1], processor, "phi3", image_folder=folder)[0]
    image_end = max(i for i, t in enumerate(full["input_ids"]) if t == processor.image_token_id) + 1
    keep = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX) + 2  # two reply tokens
    cut = ConversationDataset(samples[:1], processor, "phi3", image_folder=folder, model_max_length=keep)[0]
    assert cut["input_ids"] == full["input_ids"][:keep]
    assert cut["labels"] == full["labels"][:keep]
    short = ConversationDataset([samples[0], samples[2]], processor, "phi3", image_folder=folder, model_max_length=image_end - 1)
    short[0]
    assert "would cut its image" in short.skipped["caption-1"]
    reply_cut = ConversationDataset([samples[0], samples[2]], processor, "phi3", image_folder=folder,
                                    model_max_length=image_end + 1)  # fmt: skip
    assert supervised_text(processor, reply_cut[0]["labels"]) == "Hi!<|end|>"
    assert reply_cut.skipped == {"caption-1": f"no reply tokens left after truncation to model_max_length={image_end + 1}"}


def test_collator_pads_right_and_stacks_only_real_images(tiny_phi3, data_folder):
    model, processor = tiny_phi3
    folder, samples = data_folder
    dataset = ConversationDataset(samples, processor, "phi3", image_folder=folder)
    examples = [dataset[2], dataset[0], dataset[1]]
    batch = FlorenceVLDataCollator(processor)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, example in enumerate(examples):
        n = lengths[row]
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][row, n:].eq(processor.tokenizer.pad_token_id).all()
    assert batch["pixel_values"].shape[0] == 2
    assert batch["task_prompt_ids"].tolist() == [processor.task_prompt_ids] * 2

    # The text-only row in a mixed batch computes what it computes alone.
    with torch.no_grad():
        mixed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, : lengths[0]]
        alone = model(input_ids=torch.tensor([examples[0]["input_ids"]])).logits[0]
    torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-4)


def test_load_conversations_reads_json_and_json_lines(tmp_path):
    samples = [{"id": 1, "conversations": []}, {"id": 2, "conversations": []}]
    (tmp_path / "a.json").write_text(__import__("json").dumps(samples))
    (tmp_path / "b.jsonl").write_text("\n".join(__import__("json").dumps(s) for s in samples) + "\n")
    assert load_conversations(tmp_path / "a.json") == samples == load_conversations(tmp_path / "b.jsonl")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match="neither a JSON list nor JSON lines"):
        load_conversations(tmp_path / "c.json")
    (tmp_path / "d.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="must hold a list of samples"):
        load_conversations(tmp_path / "d.json")


def test_cached_examples_equal_uncached_ones_and_skip_the_image_work(tiny_phi3, data_folder, monkeypatch):
    _, processor = tiny_phi3
    folder, samples = data_folder
    samples.append({**samples[0], "id": "caption-2"})  # a second sample of the same image
    path = write_samples(folder, samples)
    plain = ConversationDataset(path, processor, "phi3", image_folder=folder)
    expected = [plain[index] for index in range(len(samples))]

    calls = {"images": 0, "renders": 0}
    preprocess, render = processor.preprocess_images, processor.apply_chat_template

    def counting_preprocess(*args, **kwargs):
        calls["images"] += 1
        return preprocess(*args, **kwargs)

    def counting_render(*args, **kwargs):
        calls["renders"] += 1
        return render(*args, **kwargs)

    monkeypatch.setattr(processor, "preprocess_images", counting_preprocess)
    monkeypatch.setattr(processor, "apply_chat_template", counting_render)
    cache = ImageCache(max_images=8)
    first = ConversationDataset(path, processor, "phi3", image_folder=folder, image_cache=cache, cache_tokens=True)
    renders = []
    for _ in range(2):  # two epochs
        for index, example in enumerate(expected):
            got = first[index]
            assert got["input_ids"] == example["input_ids"] and got["labels"] == example["labels"]
            if example["pixel_values"] is None:
                assert got["pixel_values"] is None
            else:
                assert torch.equal(got["pixel_values"], example["pixel_values"])
        renders.append(calls["renders"])
    assert calls["images"] == 2  # shapes.png once for both of its samples, green.png once
    assert renders[0] > 0 and renders[1] == renders[0]  # the second epoch tokenizes nothing
    second = ConversationDataset(path, processor, "plain", image_folder=folder, image_cache=cache)
    assert torch.equal(second[0]["pixel_values"], expected[0]["pixel_values"]) and calls["images"] == 2


def test_image_cache_drops_the_least_recently_used_image():
    cache = ImageCache(max_images=2)
    a, b, c = (torch.full((1,), float(value)) for value in range(3))
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # "b" is now the least recently used
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    with pytest.raises(ValueError, match="max_images"):
        ImageCache(0)


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_collated_batch_equals_a_batch_padded_by_hand(tiny, data_folder, pad_to_multiple_of):
    model, processor = tiny
    folder, samples = data_folder
    template = family_of(model.config.text_config).name
    dataset = ConversationDataset(samples, processor, template, image_folder=folder, original_masking=False)
    examples = [dataset[1], dataset[2], dataset[0]]  # two rounds with an image, text only, a caption
    batch = FlorenceVLDataCollator(processor, pad_to_multiple_of=pad_to_multiple_of)(examples)

    longest = max(len(example["input_ids"]) for example in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    pad = processor.tokenizer.pad_token_id
    expected = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in examples:
        missing = longest - len(example["input_ids"])
        expected["input_ids"].append(example["input_ids"] + [pad] * missing)
        expected["attention_mask"].append([1] * len(example["input_ids"]) + [0] * missing)
        expected["labels"].append(example["labels"] + [IGNORE_INDEX] * missing)
    assert list(batch) == ["input_ids", "attention_mask", "labels", "pixel_values", "task_prompt_ids"]
    for key, rows in expected.items():
        assert batch[key].dtype == torch.long and torch.equal(batch[key], torch.tensor(rows)), key
    assert torch.equal(batch["pixel_values"], torch.cat([examples[0]["pixel_values"], examples[2]["pixel_values"]]))
    assert torch.equal(batch["task_prompt_ids"], torch.tensor([processor.task_prompt_ids] * 2))


def test_the_image_cache_and_the_vision_feature_cache_share_one_lru():
    from florence_vl_hf import FlorenceVLVisionFeatureCache
    from florence_vl_hf.modeling.modeling_florence_vl import LRUCache

    assert issubclass(ImageCache, LRUCache) and issubclass(FlorenceVLVisionFeatureCache, LRUCache)
    assert "put" not in vars(ImageCache) and "get" not in vars(ImageCache)
