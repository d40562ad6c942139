"""`from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))` under torchrun: two CPU processes
(gloo) give the logits and greedy tokens of one process, with tied and with untied embeddings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from florence_vl_hf.build import build_random_model, save_hub_folder
from florence_vl_hf.tiny import tiny_config

NEW_TOKENS = 5
WORKER = Path(__file__).with_name("tensor_parallel_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_two_process_tensor_parallel_equals_one_process(tied, tmp_path, shapes_image):
    config = tiny_config("phi3", tie_word_embeddings=tied)
    model, processor = build_random_model(config, seed=0)
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
    folder = save_hub_folder(model, processor, tmp_path / "model")
    model.generation_config.save_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is here?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(text=[prompt, "<image>\nAnd here?"], images=[shapes_image, shapes_image], padding=True,
                            return_tensors="pt"))  # fmt: skip
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    torchrun = Path(sys.executable).with_name("torchrun")
    # deprecations are errors in the ranks too, as in the suite
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error::DeprecationWarning,error::FutureWarning"}
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), str(folder),
         str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"), str(NEW_TOKENS)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["world_size"] == 2
    assert any(name.startswith("model.language_model.") for name in out["sharded"]), out["sharded"]
    torch.testing.assert_close(out["logits"], logits, atol=1e-5, rtol=1e-5)
    assert out["generated"].tolist() == generated.tolist()
