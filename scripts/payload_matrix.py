"""The trust_remote_code payload on another transformers release, against what the package computes.

    python scripts/payload_matrix.py prepare DIR   # with florence_vl_hf installed: writes the folders + expected.json
    python scripts/payload_matrix.py check DIR     # in a venv without florence_vl_hf: loads them, compares

`prepare` saves two Hub folders (the bundled florence-vl-tiny, and a tiny random Llama-3.1-shaped Florence-VL) with
`save_pretrained`, which writes `auto_map` and the flat payload files, and records the package's own answers: the
chat prompt's token ids, pixel values, greedy tokens of `generate`, and the answer of `pipeline(...)` in chat mode.
`check` runs where only torch, transformers and Pillow are installed, loads each folder with
`trust_remote_code=True` and requires the same ids, the same greedy tokens and the same answer. `check
--expect-refusal` instead requires that loading fails with the payload's one clear version error.
`scripts/payload_matrix.sh` runs `check` on every transformers minor release of the supported range.
"""

import argparse
import json
import sys
from pathlib import Path

QUESTION = "What color is the circle?"
NEW_TOKENS = 6


def chat(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def answers(model, processor, folder, image, pipeline_kwargs):
    import torch
    from transformers import pipeline

    inputs = processor.apply_chat_template(chat(image), add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    pipe = pipeline("image-text-to-text", model=str(folder), **pipeline_kwargs)
    reply = pipe(text=chat(image), max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"][-1]["content"]
    return {
        "input_ids": inputs["input_ids"].tolist(),
        "pixel_sum": float(inputs["pixel_values"].double().sum()),
        "generated": generated[0, inputs["input_ids"].shape[1]:].tolist(),
        "pipeline_answer": reply,
    }


def prepare(out: Path):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import florence_vl_hf
    from florence_vl_hf.build import build_random_model, save_hub_folder
    from florence_vl_hf.tiny import tiny_config

    image_path = Path(florence_vl_hf.__file__).parent / "assets" / "shapes_vqa_example.png"
    image = Image.open(image_path).convert("RGB")
    tiny = florence_vl_hf.tiny_model_dir()
    llama_model, llama_processor = build_random_model(tiny_config("llama3"), seed=0)
    models = {
        "florence-vl-tiny": (AutoModelForImageTextToText.from_pretrained(tiny), AutoProcessor.from_pretrained(tiny)),
        "random-llama": (llama_model, llama_processor),
    }
    expected = {"image": str(image_path), "folders": {}}
    for name, (model, processor) in models.items():
        folder = out / name
        save_hub_folder(model.eval(), processor, folder)
        model.generation_config.save_pretrained(folder)
        torch.manual_seed(0)
        expected["folders"][name] = answers(model, processor, folder, image, {})
    (out / "expected.json").write_text(json.dumps(expected, indent=1))
    print(f"prepared {', '.join(models)} in {out}")


def check(out: Path, expect_refusal: bool):
    import transformers
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        import florence_vl_hf  # noqa: F401
    except ImportError:
        pass
    else:
        sys.exit("check must run where florence_vl_hf is not installed: the payload alone is under test")
    version = transformers.__version__
    expected = json.loads((out / "expected.json").read_text())
    image = Image.open(expected["image"]).convert("RGB")
    failures = []
    for name, want in expected["folders"].items():
        folder = out / name
        if expect_refusal:
            try:
                AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
            except ImportError as error:
                if "is required" not in str(error) or version not in str(error):
                    failures.append(f"{name}: the refusal does not name the versions: {error}")
                else:
                    print(f"{name}: refused as it should be: {str(error).splitlines()[0]}")
            else:
                failures.append(f"{name}: loaded on transformers {version}, which the payload does not support")
            continue
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        if not type(model).__module__.startswith("transformers_modules."):
            failures.append(f"{name}: the model class came from {type(model).__module__}, not the folder's code")
        got = answers(model, processor, folder, image, {"trust_remote_code": True})
        for key, value in want.items():
            if key == "pixel_sum":
                if abs(got[key] - value) > 1e-6 * max(1.0, abs(value)):
                    failures.append(f"{name}: pixel values differ (sum {got[key]} against {value})")
            elif got[key] != value:
                failures.append(f"{name}: {key} differs: {got[key]!r} against the package's {value!r}")
        print(f"{name}: ids, greedy tokens {got['generated']} and pipeline answer {got['pipeline_answer']!r} "
              "equal the package's" if not failures else f"{name}: checked")
    if failures:
        sys.exit(f"payload on transformers {version}: FAILED\n" + "\n".join(failures))
    print(f"payload on transformers {version}: ok")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "check"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--expect-refusal", action="store_true",
                        help="check that an unsupported transformers refuses the payload with the version error")
    args = parser.parse_args()
    if args.command == "prepare":
        args.dir.mkdir(parents=True, exist_ok=True)
        prepare(args.dir)
    else:
        check(args.dir, args.expect_refusal)


if __name__ == "__main__":
    main()
