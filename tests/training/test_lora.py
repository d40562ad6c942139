import re

import pytest
import torch
from conftest import write_samples
from peft import PeftModel

from florence_vl_hf.build import build_random_model
from florence_vl_hf.families import family
from florence_vl_hf.tiny import tiny_config
from florence_vl_hf.training import (
    ConversationDataset,
    FlorenceVLDataCollator,
    apply_lora,
    lora_target_modules,
    train,
    training_arguments,
)


@pytest.mark.parametrize("llm", ["phi3", "llama3"])
def test_default_targets_are_the_llm_linear_layers_only(llm):
    model, _ = build_random_model(tiny_config(llm), seed=0)
    pattern = re.compile(lora_target_modules(model.config.text_config))
    matched = {name for name, _ in model.named_modules() if pattern.fullmatch(name)}
    expected = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model.layers.")
    }
    assert matched == expected and len(expected) == len(family(llm).lora_targets) * model.config.text_config.num_hidden_layers


def test_lora_trains_adapters_and_projector_and_round_trips(data_folder, tmp_path):
    model, processor = build_random_model(tiny_config("phi3"), seed=0)
    folder, samples = data_folder
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    args = training_arguments(tmp_path / "lora", "finetune", "phi3", per_device_train_batch_size=3,
                              global_batch_size=3, max_steps=4, learning_rate=5e-3, warmup_steps=0,
                              save_strategy="no", disable_tqdm=True)  # fmt: skip
    result = train(model, processor, write_samples(folder, samples), stage="finetune", args=args,
                   image_folder=folder, lora={"r": 4, "alpha": 8, "dropout": 0.0})  # fmt: skip
    peft_model = result.trainer.model
    assert isinstance(peft_model, PeftModel)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    saved = tmp_path / "lora"
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()

    batch = FlorenceVLDataCollator(processor)(
        [ConversationDataset(samples, processor, "phi3", image_folder=folder)[i] for i in range(3)]
    )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**inputs).logits

        # The adapter loaded onto a fresh copy of the base model computes the same logits.
        base, _ = build_random_model(tiny_config("phi3"), seed=0)
        reloaded = PeftModel.from_pretrained(base, saved).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)

        # Training left the base weights alone: only adapters and the projector's trainable copy changed.
        for name, value in peft_model.get_base_model().state_dict().items():
            if "lora_" not in name and "multi_modal_projector" not in name:
                torch.testing.assert_close(value, base_state[name.replace(".base_layer", "")], msg=name)

        # Merging the adapter into the weights gives the same logits as the adapter model.
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-4, atol=1e-4)
        assert not any("lora_" in name for name in merged.state_dict())
