import torch
from transformers import pipeline

from florence_vl_hf.build import save_hub_folder


def test_pipeline_chat_and_plain_modes_match_generate(tiny, shapes_image, tmp_path):
    model, processor = tiny
    save_hub_folder(model, processor, tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    assert type(pipe.model).__name__ == "FlorenceVLForConditionalGeneration"

    messages = [{"role": "user", "content": [{"type": "image", "image": shapes_image},
                                             {"type": "text", "text": "What shapes are there?"}]}]
    reply = pipe(text=messages, max_new_tokens=6)[0]["generated_text"]
    assert reply[:-1] == messages and reply[-1]["role"] == "assistant"
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6)
    expected = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    # As in plain mode below: the pipeline decodes prompt + answer and cuts the prompt off, which can leave the
    # space that a sentencepiece tokenizer's first answer token carries.
    assert reply[-1]["content"].lstrip() == expected.lstrip() and reply[-1]["content"].endswith(expected)

    prompt = "<image>\nWhat shapes are there?"
    plain = pipe(images=shapes_image, text=prompt, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    inputs = processor(images=shapes_image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6)
    expected = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    # The pipeline decodes prompt + answer together and cuts the prompt off, which can leave the space that a
    # sentencepiece tokenizer's first answer token carries.
    assert plain.lstrip() == expected.lstrip() and plain.endswith(expected)
