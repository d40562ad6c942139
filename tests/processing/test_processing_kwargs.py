"""FlorenceVLProcessor's call options, as transformers' processors take them (ProcessingKwargs), and what serving
engines and training read from it: offsets, multimodal token types, text replacement offsets, assistant masks.

References: the tokenizer itself (padding, offsets of text-only Llama prompts), the prompt text (every token's
span must be the text it stands for), and hand-computed spans of the expanded text.
"""

import re

import pytest
from PIL import Image

SPIECE_UNDERLINE = "\u2581"
IMAGE = Image.new("RGB", (40, 24), (200, 30, 30))


def expanded(processor, text):
    return text.replace(processor.image_token, processor.image_token * processor.num_image_tokens)


@pytest.mark.parametrize("name", ["phi3_processor", "llama_processor"])
def test_nested_flat_and_common_options_give_the_same_batch(request, name):
    processor = request.getfixturevalue(name)
    texts = ["<image>\nWhat is it?", "<image>\nAnd this one, a longer question?"]
    flat = processor(text=texts, images=[IMAGE, IMAGE], padding="max_length", max_length=60, return_tensors="pt")
    nested = processor(
        text=texts, images=[IMAGE, IMAGE], text_kwargs={"padding": "max_length", "max_length": 60},
        common_kwargs={"return_tensors": "pt"},
    )
    assert flat.keys() == nested.keys()
    for key in flat:
        assert flat[key].tolist() == nested[key].tolist(), key
    assert flat["input_ids"].shape[1] == 60
    assert flat["attention_mask"][:, 0].tolist() == [0, 0]  # the tokenizer's side: left


def test_padding_side_and_pad_to_multiple_of_pad_like_the_tokenizer(llama_processor):
    texts = ["Hello there", "Hi"]
    for options in ({"padding": True, "padding_side": "right"}, {"padding": True, "pad_to_multiple_of": 8},
                    {"padding": "max_length", "max_length": 9}):
        ours = llama_processor(text=texts, **options)
        reference = llama_processor.tokenizer(texts, **options)
        assert len({len(row) for row in ours["input_ids"]}) == 1
        assert ours["input_ids"] == reference["input_ids"], options
        assert ours["attention_mask"] == reference["attention_mask"], options


def test_tokenizer_init_settings_are_the_defaults(llama_processor):
    tokenizer = llama_processor.tokenizer
    saved = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        out = llama_processor(text=["Hello there", "Hi"], padding=True)
    finally:
        tokenizer.padding_side = saved
    assert out["attention_mask"][1][-1] == 0


def test_an_option_given_twice_or_invalid_is_refused(phi3_processor):
    with pytest.raises(ValueError, match="padding was passed two times"):
        phi3_processor(text="a", padding=True, text_kwargs={"padding": True})
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        phi3_processor(text=["a", "bb"], padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="max_length must be a positive integer, got -5"):
        phi3_processor(text="a", truncation=True, max_length=-5)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer"):
        phi3_processor(text="a", padding=True, pad_to_multiple_of="8")


@pytest.mark.parametrize("option", [{"return_token_type_ids": True}, {"return_overflowing_tokens": True},
                                    {"text_pair": "b"}, {"is_split_into_words": True}])
def test_tokenizer_options_it_cannot_honour_are_refused(phi3_processor, option):
    with pytest.raises(ValueError, match=f"does not support {next(iter(option))}"):
        phi3_processor(text="a", **option)


@pytest.mark.parametrize("modality", ["videos", "audio"])
def test_videos_and_audio_are_refused(phi3_processor, modality):
    with pytest.raises(ValueError, match=f"images and text only, not {modality}"):
        phi3_processor(text="a", **{modality: [[0.0] * 10]})


def test_padding_side_at_init_is_deprecated_and_moves_to_the_tokenizer(phi3_processor):
    tokenizer = phi3_processor.tokenizer
    saved = tokenizer.padding_side, tokenizer.init_kwargs.get("padding_side")
    arguments = {name: getattr(phi3_processor, name) for name in (
        "chat_template", "image_token", "num_image_tokens", "task_prompt_names", "task_prompt_texts",
        "task_prompt_ids", "sentencepiece_leading_space")}
    try:
        with pytest.warns(FutureWarning, match="padding_side"):
            processor = type(phi3_processor)(phi3_processor.image_processor, tokenizer, padding_side="right",
                                             **arguments)
        assert processor.tokenizer.padding_side == "right"
        assert processor(text=["a", "a b c d"], padding=True)["attention_mask"][0][-1] == 0
    finally:
        tokenizer.padding_side, tokenizer.init_kwargs["padding_side"] = saved


# --------------------------------------------------------------------------------------------------------- offsets
def spans_of(processor, text, **options):
    out = processor(text=text, images=[IMAGE] * text.count("<image>") or None, return_offsets_mapping=True,
                    **options)
    return out["input_ids"][0], out["offset_mapping"][0]


def test_offsets_of_text_only_llama_prompts_are_the_tokenizers(llama_processor):
    for text in ["Hello wörld 😀, how are you?", "<|start_header_id|>user<|end_header_id|>\n\nHi"]:
        ids, offsets = spans_of(llama_processor, text)
        reference = llama_processor.tokenizer(text, return_offsets_mapping=True)
        assert ids == reference["input_ids"]
        assert [tuple(span) for span in offsets] == [tuple(span) for span in reference["offset_mapping"]]


@pytest.mark.parametrize("name", ["phi3_processor", "llama_processor"])
@pytest.mark.parametrize("text", [
    "<|system|>\nYou are helpful.<|end|>\n<|user|>\n<image>\nWhat is wörld 😀 here?<|end|>\n<|assistant|>\n",
    "<image><image> two images, then text",
    "plain text with  two spaces",
])
def test_every_token_spans_the_text_it_stands_for_in_the_expanded_prompt(request, name, text):
    """In the prompt with each `<image>` replaced by `num_image_tokens` of them: image ids span one `<image>` each,
    other tokens the characters they encode (a sentencepiece '▁' is a space; byte pieces of one character share its
    span; the '▁' that starts a piece spans nothing), in order and without gaps but for spaces an added token
    absorbs."""
    processor = request.getfixturevalue(name)
    ids, offsets = spans_of(processor, text)
    full = expanded(processor, text)
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    added = {token.content for token in processor.tokenizer.added_tokens_decoder.values()}
    cursor = 0
    for token_id, token, (start, end) in zip(ids, tokens, offsets):
        if start == end:
            assert (start, end) == (0, 0)
            continue
        assert full[cursor:start].strip(" ") == "", (token, full[cursor:start])
        covered = full[start:end]
        if token_id == processor.image_token_id:
            assert covered == processor.image_token
        elif token in added:
            assert covered.strip() == token
        elif not re.fullmatch(r"<0x[0-9A-F]{2}>", token):  # byte pieces: part of one character
            readable = {token.replace(SPIECE_UNDERLINE, " "), processor.tokenizer.convert_tokens_to_string([token])}
            if not any("\ufffd" in r for r in readable):  # a byte-level token holding part of a character
                assert any(r.endswith(covered) or r.strip() == covered.strip() for r in readable), (token, covered)
        cursor = max(cursor, end)
    assert cursor == len(full)


def test_mm_token_types_and_replacement_offsets_locate_the_images(phi3_processor):
    text = "Look: <image> and <image>!"
    out = phi3_processor(text=text, images=[IMAGE, IMAGE], return_mm_token_type_ids=True,
                         return_text_replacement_offsets=True)
    n, marker = phi3_processor.num_image_tokens, phi3_processor.image_token
    types = out["mm_token_type_ids"][0]
    assert types == [int(i == phi3_processor.image_token_id) for i in out["input_ids"][0]]
    assert sum(types) == 2 * n == sum(phi3_processor._get_num_multimodal_tokens(image_sizes=[(24, 40)] * 2)[
        "num_image_tokens"])
    first, second = out["text_replacement_offsets"][0]
    assert first["span"] == (6, 13) and second["span"] == (18, 25)
    assert first["new_span"] == (6, 6 + n * len(marker))
    assert second["new_span"] == (18 + (n - 1) * len(marker), 18 + (n - 1) * len(marker) + n * len(marker))
    assert first["replacement"] == second["replacement"] == marker * n


@pytest.mark.parametrize("name", ["phi3_processor", "llama_processor"])
def test_assistant_masks_mark_the_assistant_replies(request, name):
    """`return_assistant_tokens_mask` with a template that marks replies with `{% generation %}`: the masked ids are
    the reply's, found by tokenizing the reply on its own, for a conversation with an image."""
    processor = request.getfixturevalue(name)
    template = (
        "{% for message in messages %}{{ '#' + message['role'] + ':\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'][0]['text'] }}"
        "{% endgeneration %}{% else %}{% for part in message['content'] %}"
        "{{ '<image>' if part['type'] == 'image' else part['text'] }}{% endfor %}{% endif %}{{ '\n' }}{% endfor %}"
    )
    reply = "It is a red box."
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": reply}]},
    ]
    out = processor.apply_chat_template(
        conversation, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    masked = [i for i, keep in zip(out["input_ids"][0], out["assistant_masks"][0]) if keep]
    text = processor.tokenizer.decode(masked)
    assert text.strip() == reply
