"""Greedy generation with vLLM's Transformers backend on a Florence-VL folder; run with the python of the venv that
scripts/vllm_env.sh builds (vLLM installed, florence_vl_hf not: the folder's trust_remote_code payload alone runs).

    python scripts/vllm_generate.py JOB.json OUT.json

JOB.json: {"folder", "max_model_len", "max_tokens", "prompts": [{"prompt": str, "images": [png paths]}],
           "chats": [{"messages": [OpenAI-style messages], "add_special_tokens": bool}]}
OUT.json: {"vllm", "transformers", "seconds", "generate": [{"prompt_token_ids", "token_ids"}], "chat": [...]}
`prompts` go through `LLM.generate` (vLLM tokenizes the prompt text with the saved tokenizer), `chats` through
`LLM.chat` (vLLM renders the folder's chat template with its default content-format detection).
"""

import json
import sys
import time


def main():
    from PIL import Image
    from vllm import LLM, SamplingParams

    import transformers
    import vllm

    job = json.loads(open(sys.argv[1]).read())
    llm = LLM(
        model=job["folder"],
        model_impl="transformers",
        trust_remote_code=True,
        dtype="float32",
        max_model_len=job["max_model_len"],
        enforce_eager=True,
        limit_mm_per_prompt={"image": job.get("max_images", 2)},
        seed=0,
    )
    greedy = SamplingParams(temperature=0, max_tokens=job["max_tokens"], min_tokens=job["max_tokens"])
    result = {"vllm": vllm.__version__, "transformers": transformers.__version__}
    started = time.perf_counter()
    requests = [
        {"prompt": item["prompt"], "multi_modal_data": {"image": [Image.open(p).convert("RGB") for p in item["images"]]}}
        if item["images"]
        else {"prompt": item["prompt"]}
        for item in job.get("prompts", [])
    ]
    outputs = llm.generate(requests, greedy, use_tqdm=False) if requests else []
    result["seconds"] = time.perf_counter() - started
    result["generate"] = [
        {"prompt_token_ids": list(out.prompt_token_ids), "token_ids": list(out.outputs[0].token_ids)} for out in outputs
    ]
    result["chat"] = []
    for chat in job.get("chats", []):
        (out,) = llm.chat(
            chat["messages"],
            greedy,
            use_tqdm=False,
            tokenization_kwargs={"add_special_tokens": chat.get("add_special_tokens", False)},
        )
        result["chat"].append(
            {"prompt_token_ids": list(out.prompt_token_ids), "token_ids": list(out.outputs[0].token_ids)}
        )
    with open(sys.argv[2], "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main()
