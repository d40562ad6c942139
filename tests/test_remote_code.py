"""The saved folder alone, through trust_remote_code, in a process where florence_vl_hf cannot be imported."""

import ast
import json
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

import florence_vl_hf
from florence_vl_hf.build import save_hub_folder
from florence_vl_hf.isolation import run_without_package
from florence_vl_hf.processing import asset_dir
from florence_vl_hf.lab.bundle import payload_sources

PAYLOAD = ("configuration_florence_vl.py", "modeling_florence_vl.py", "processing_florence_vl.py")
ALLOWED_TOP_LEVEL = {"torch", "transformers", "PIL"} | set(sys.stdlib_module_names)
QUESTION = "What shapes are in the image?"
AUTO_MAP = {
    "AutoConfig": "configuration_florence_vl.FlorenceVLConfig",
    "AutoModel": "modeling_florence_vl.FlorenceVLModel",
    "AutoModelForImageTextToText": "modeling_florence_vl.FlorenceVLForConditionalGeneration",
}

REMOTE = """
import json, torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
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
base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()  # what serving engines build
with torch.no_grad():
    hidden = base(**inputs).last_hidden_state[0, -1, :8].tolist()
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
answer = pipe(text=messages, max_new_tokens=8)[0]["generated_text"][-1]["content"]
print(json.dumps({{"model_module": type(model).__module__, "processor_module": type(processor).__module__,
                  "refused_without_trust": refused, "input_ids": inputs["input_ids"].tolist(),
                  "generated": ids.tolist(), "answer": answer, "base_class": type(base).__name__,
                  "base_module": type(base).__module__, "base_hidden": hidden}}))
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


def check_remote_answers(folder, model, processor, image, tmp_path):
    """`folder` through trust_remote_code in a process without the package gives `model`'s and `processor`'s ids,
    greedy tokens, pipeline answer and bare-model hidden states."""
    image_path = tmp_path / "image.png"
    image.save(image_path)
    result = run_without_package(REMOTE.format(folder=str(folder), image=str(image_path), question=QUESTION))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout + result.stderr
    remote = json.loads(lines[-1])

    assert remote["refused_without_trust"]
    assert remote["model_module"].startswith("transformers_modules.")
    assert remote["processor_module"].startswith("transformers_modules.")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8)
    assert remote["input_ids"] == inputs["input_ids"].tolist()
    assert remote["generated"] == generated.tolist()
    assert remote["base_class"] == "FlorenceVLModel" and remote["base_module"].startswith("transformers_modules.")
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state[0, -1, :8]
    torch.testing.assert_close(torch.tensor(remote["base_hidden"]), hidden.float(), rtol=0, atol=1e-6)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    assert remote["answer"] == pipe(text=messages, max_new_tokens=8)[0]["generated_text"][-1]["content"]


@pytest.mark.slow
def test_trust_remote_code_in_a_process_without_the_package(tiny, shapes_image, tmp_path):
    model, processor = tiny
    folder = save_hub_folder(model, processor, tmp_path / "folder")
    check_remote_answers(folder, model, processor, shapes_image, tmp_path)


@pytest.mark.slow
def test_the_bundled_tiny_model_loads_through_trust_remote_code_alone(shapes_image, tmp_path):
    folder = florence_vl_hf.tiny_model_dir()
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    check_remote_answers(folder, model, processor, shapes_image, tmp_path)


def test_the_bundled_tiny_model_ships_the_current_payload():
    """The bundle's payload files are links to the package's own sources (one copy of the code), and its config maps
    every auto class to them."""
    folder = florence_vl_hf.tiny_model_dir()
    for name, source in payload_sources().items():
        assert (folder / name).is_symlink() and (folder / name).resolve() == source.resolve(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_florence_vl.FlorenceVLProcessor"}


def test_bundled_image_exists():
    assert (asset_dir("phi-3.5-mini-instruct").parent / "shapes.png").is_file()
