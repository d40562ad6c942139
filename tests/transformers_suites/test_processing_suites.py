"""transformers' ProcessorTesterMixin run against FlorenceVLProcessor, as for a processor inside transformers.

One test class per bundled LLM tokenizer (Phi-3.5, Llama-3.1; src/florence_vl_hf/assets/), following transformers'
tests/models/llava/test_processing_llava.py. The mixin builds the processor from its components
(`_setup_<attribute>` hooks) and `prepare_processor_dict()`; here they are the parts and the arguments of the
processor that `florence_vl_hf.build_processor` makes for the tiny config of that LLM (florence_vl_hf.tiny), so the
processor under test is the one the package builds (a 32-px image processor, 17 image tokens per image). The suite
comes from the sdist of the installed transformers (common_suites.py).
"""

import contextlib
import json
import unittest
from pathlib import Path

import numpy as np
import torch
from parameterized import parameterized

from florence_vl_hf import FlorenceVLProcessor, build_processor
from florence_vl_hf.tiny import tiny_config

import common_suites

processing_common = common_suites.suite("processing")
ProcessorTesterMixin = processing_common.ProcessorTesterMixin
MODALITY_INPUT_DATA = processing_common.MODALITY_INPUT_DATA

# FlorenceVLProcessor.__init__ arguments that build_processor sets (besides the two components).
PROCESSOR_ARGUMENTS = (
    "chat_template",
    "image_token",
    "num_image_tokens",
    "task_prompt_names",
    "task_prompt_texts",
    "task_prompt_ids",
    "sentencepiece_leading_space",
)
_BUILT = {}


def built_processor(llm: str) -> FlorenceVLProcessor:
    """The processor build_processor makes for tiny_config(llm), built once per LLM."""
    if llm not in _BUILT:
        _BUILT[llm] = build_processor(tiny_config(llm))
    return _BUILT[llm]


class _FlorenceVLProcessorTest(ProcessorTesterMixin):
    """The common part of the per-LLM test classes below (not collected: no unittest.TestCase)."""

    processor_class = FlorenceVLProcessor
    llm = None

    @classmethod
    def _setup_image_processor(cls):
        return built_processor(cls.llm).image_processor

    @classmethod
    def _setup_tokenizer(cls):
        return built_processor(cls.llm).tokenizer

    @classmethod
    def prepare_processor_dict(cls):
        processor = built_processor(cls.llm)
        return {name: getattr(processor, name) for name in PROCESSOR_ARGUMENTS}

    # ---------------------------------------------------------------------------------------------------------------
    # Overrides (the two deliberate departures from transformers' processors; everything else runs as the mixin has it)

    @contextlib.contextmanager
    def _auto_map_not_kept_by_saved_processor(self):
        """`save_pretrained` of a processor class registered with `register_for_auto_class` (florence_vl_hf/__init__.py,
        for trust_remote_code folders) writes `auto_map` into processor_config.json and, through transformers'
        `custom_object_save`, sets it on the saved processor object, while `from_pretrained` drops it: a saved
        processor's `to_dict()` then has an `auto_map` its reloaded copy lacks. Within this context the saved
        object forgets it again after each save (the file keeps it, which is checked)."""
        original = FlorenceVLProcessor.save_pretrained

        def save_pretrained(processor, save_directory, *args, **kwargs):
            had_auto_map = "auto_map" in vars(processor)
            saved = original(processor, save_directory, *args, **kwargs)
            written = json.loads((Path(save_directory) / "processor_config.json").read_text())
            self.assertEqual(written.get("auto_map"), {"AutoProcessor": "processing_florence_vl.FlorenceVLProcessor"})
            if not had_auto_map:
                vars(processor).pop("auto_map", None)
            return saved

        FlorenceVLProcessor.save_pretrained = save_pretrained
        try:
            yield
        finally:
            FlorenceVLProcessor.save_pretrained = original

    def test_processor_from_and_save_pretrained(self):
        """Overridden, deliberately: `auto_map` on the saved processor (see `_auto_map_not_kept_by_saved_processor`);
        the mixin's test runs unchanged otherwise."""
        with self._auto_map_not_kept_by_saved_processor():
            super().test_processor_from_and_save_pretrained()

    def test_processor_from_and_save_pretrained_as_nested_dict(self):
        """Overridden, deliberately: `auto_map` on the saved processor (see `_auto_map_not_kept_by_saved_processor`);
        the mixin's test runs unchanged otherwise."""
        with self._auto_map_not_kept_by_saved_processor():
            super().test_processor_from_and_save_pretrained_as_nested_dict()

    # ---------------------------------------------------------------------------------------------------------------

    def test_processor_is_the_built_one(self):
        """The processor the mixin assembles and saves is the one build_processor makes (same dict, same ids)."""
        reference = built_processor(self.llm)
        processor = self.get_processor()
        loaded = json.loads(processor.to_json_string())
        expected = json.loads(reference.to_json_string())
        self.assertEqual(loaded, expected)
        text = "<image>\nWhat is shown?"
        image = self.prepare_images_inputs()
        self.assertEqual(
            processor(text=text, images=image)["input_ids"], reference(text=text, images=image)["input_ids"]
        )


class FlorenceVLPhi35ProcessorTest(_FlorenceVLProcessorTest, unittest.TestCase):
    """Phi-3.5-mini-instruct's tokenizer, the phi3 chat template, slow-sentencepiece ids."""

    llm = "phi3"

    # The mixin's chat-template test runs unchanged: the saved tokenizer itself gives the slow sentencepiece ids
    # (a lone "▁" before "<|system|>", no "▁" after added tokens) that the original fed Phi-3.5.


class FlorenceVLLlama31ProcessorTest(_FlorenceVLProcessorTest, unittest.TestCase):
    """Llama-3.1-8B-Instruct's tokenizer with `<pad>` added, the llama3 chat template."""

    llm = "llama3"

    @staticmethod
    def expected_chat_ids(processor, rendered):
        # The template starts with <|begin_of_text|> and the tokenizer adds its own BOS: two BOS tokens.
        bos = processor.tokenizer.bos_token_id
        return [bos, *processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]]

    @parameterized.expand([(1, "pt"), (2, "pt")])
    def test_apply_chat_template_image(self, batch_size: int, return_tensors: str):
        """Overridden, deliberately: the mixin's `_test_apply_chat_template` requires `apply_chat_template(tokenize=True)`
        to give the ids of `processor.tokenizer(rendered prompt)`. FlorenceVLProcessor gives the ids the original
        Florence-VL code fed its LLM, which the checkpoints were trained on (docs/usage.md, "Processor"): for Llama-3.1 two
        BOS tokens. Here the ids must be those of
        `expected_chat_ids` (the processor's own tokenization of the rendered prompt); the mixin's other checks of
        that test are made as well, in this project's words: batch rendering, processor_kwargs padding/truncation,
        return_dict, image inputs from URLs, tensor types, continue_final_message."""
        processor = self.get_processor()
        system = {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}
        user = {"role": "user", "content": [{"type": "text", "text": "Describe this."}]}
        conversations = [[system, dict(user)] for _ in range(batch_size)]

        rendered = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
        self.assertEqual(len(rendered), batch_size)

        ids = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_tensors=return_tensors
        )
        self.assertListEqual(ids.tolist(), [self.expected_chat_ids(processor, text) for text in rendered])
        tokenizer_ids = processor.tokenizer(rendered[0], add_special_tokens=False)["input_ids"]
        self.assertNotEqual(ids[0].tolist(), tokenizer_ids, "the deliberate difference is gone: drop this override")

        padded = processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_tensors=return_tensors,
            processor_kwargs={"padding": "max_length", "truncation": True, "max_length": self.chat_template_max_length},
        )
        self.assertEqual(len(padded[0]), self.chat_template_max_length)

        text_only = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors=return_tensors
        )
        for key in ("input_ids", "attention_mask"):
            self.assertEqual(len(text_only[key]), batch_size)

        for conversation, url in zip(conversations, MODALITY_INPUT_DATA["images"]):
            conversation[1] = {"role": "user", "content": [*user["content"], {"type": "image", "url": url}]}
        with_images = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors=return_tensors
        )
        self.assertEqual(len(with_images[self.images_input_name]), batch_size)
        for key in ("input_ids", "attention_mask"):
            self.assertEqual(len(with_images[key]), batch_size)
        tensor_type = {"pt": torch.Tensor, "np": np.ndarray}[return_tensors]
        for key, value in with_images.items():
            if key not in processor.skip_tensor_conversion:
                self.assertIsInstance(value, tensor_type, key)

        assistant = {"role": "assistant", "content": [{"type": "text", "text": "It is the sound of"}]}
        continued = processor.apply_chat_template(
            [conversation + [assistant] for conversation in conversations], continue_final_message=True, tokenize=False
        )
        for prompt in continued:
            self.assertTrue(prompt.endswith("It is the sound of"), prompt)
