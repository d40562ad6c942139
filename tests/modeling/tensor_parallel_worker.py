"""One rank of the tensor-parallel check (run by tests/modeling/test_tensor_parallel.py under torchrun):
loads FOLDER with DistributedConfig(tp_plan="auto"), runs one forward and a greedy generate on the saved inputs, rank 0 saves them."""

import sys

import torch

import florence_vl_hf  # noqa: F401  (registers the Auto classes)
from transformers import AutoModelForImageTextToText, DistributedConfig


def main():
    folder, inputs_file, out_file, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    distributed_config = DistributedConfig(tp_plan="auto")
    model = AutoModelForImageTextToText.from_pretrained(folder, distributed_config=distributed_config).eval()
    inputs = torch.load(inputs_file)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sharded = sorted(name for name, param in model.named_parameters() if type(param.data).__name__ == "DTensor")
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits, "generated": generated, "world_size": torch.distributed.get_world_size(),
                    "sharded": sharded}, out_file)  # fmt: skip
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
