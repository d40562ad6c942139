"""The saved folder alone, through trust_remote_code, in a process where florence_vl_hf cannot be imported."""

import ast
import json
import sys

import pytest
import torch

from florence_vl_hf.build import save_hub_folder
from florence_vl_hf.isolation import run_without_package
from florence_vl_hf.processing import asset_dir

PAYLOAD = ("configuration_florence_vl.py", "modeling_florence_vl.py", "processing_florence_vl.py")
ALLOWED_TOP_LEVEL = {"torch", "transformers", "PIL"} | set(sys.stdlib_module_names)
QUESTION = "What shapes are in the image?"

REMOTE = """
import json, torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, pipeline
folder, image = {folder!r}, Image.open({image!r}).convert("RGB")
try:
    AutoConfig.from_pretrained(folder, trust_remote_code=False)
    refused = False
except Exception:
    refused = True
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": {question!r}}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
ids = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8)
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
answer = pipe(text=messages, max_new_tokens=8)[0]["generated_text"][-1]["content"]
print(json.dumps({{"model_module": type(model).__module__, "processor_module": type(processor).__module__,
                  "refused_without_trust": refused, "input_ids": inputs["input_ids"].tolist(),
                  "generated": ids.tolist(), "answer": answer}}))
"""


def test_payload_imports_only_torch_transformers_pil_stdlib_and_siblings(tiny_phi3, tmp_path):
    model, processor = tiny_phi3
    save_hub_folder(model, processor, tmp_path)
    for name in PAYLOAD:
        tree = ast.parse((tmp_path / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and node.module in {p[:-3] for p in PAYLOAD}, f"{name}: {node.module}"
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= ALLOWED_TOP_LEVEL, f"{name} imports {roots - ALLOWED_TOP_LEVEL}"


@pytest.mark.slow
def test_trust_remote_code_in_a_process_without_the_package(tiny, shapes_image, tmp_path):
    model, processor = tiny
    save_hub_folder(model, processor, tmp_path)
    image_path = tmp_path.parent / "image.png"
    shapes_image.save(image_path)
    result = run_without_package(REMOTE.format(folder=str(tmp_path), image=str(image_path), question=QUESTION))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout + result.stderr
    remote = json.loads(lines[-1])

    assert remote["refused_without_trust"]
    assert remote["model_module"].startswith("transformers_modules.")
    assert remote["processor_module"].startswith("transformers_modules.")
    messages = [{"role": "user", "content": [{"type": "image", "image": shapes_image},
                                             {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8)
    assert remote["input_ids"] == inputs["input_ids"].tolist()
    assert remote["generated"] == generated.tolist()
    new_tokens = generated[0, inputs["input_ids"].shape[1]:]
    answer = processor.decode(new_tokens, skip_special_tokens=True)
    # The pipeline decodes prompt + answer and cuts the prompt off, which can leave the space that a sentencepiece
    # tokenizer's first answer token carries (the ids are equal, checked above).
    assert remote["answer"].lstrip() == answer.lstrip() and remote["answer"].endswith(answer)


def test_bundled_image_exists():
    assert (asset_dir("phi-3.5-mini-instruct").parent / "shapes.png").is_file()
