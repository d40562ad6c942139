"""transformers' ModelTesterMixin and ConfigTester run against Florence-VL, as for a model inside transformers.

The test classes follow transformers' tests/models/llava/test_modeling_llava.py: a model tester builds a tiny config
and inputs (`pixel_values`, `input_ids` starting with one image's `<image>` tokens, `attention_mask`, and the
`task_prompt_ids` that the processor sends), and one `unittest.TestCase` per LLM family derives from
`ModelTesterMixin` and `GenerationTesterMixin` (a stand-in here: see standins/generation/test_utils.py). The suites
come from the sdist of the installed transformers (common_suites.py).

A model inside transformers is listed in the name mappings of `transformers.models.auto.modeling_auto`
(`MODEL_MAPPING_NAMES`, `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`); `ModelTesterMixin` decides from them which
class is a bare model and which one computes a loss (labels for `test_training`, `test_get_image_features_pooler_output`,
...). `AutoModel.register` does not write there, so each test of this module lists "florence_vl" in them, for its
own duration only (`setUp`).
"""

import unittest
from unittest import mock

import pytest
import torch
from transformers import PreTrainedConfig
from transformers.models.auto import modeling_auto

import common_suites
from florence_vl_hf import FlorenceVLConfig, FlorenceVLForConditionalGeneration, FlorenceVLModel
from florence_vl_hf.modeling.configuration_florence_vl import DEFAULT_TASK_PROMPT_IDS, DEFAULT_TASK_PROMPTS
from florence_vl_hf.tiny import tiny_config

modeling_common = common_suites.suite("modeling")
configuration_common = common_suites.suite("configuration")
ModelTesterMixin = modeling_common.ModelTesterMixin
GenerationTesterMixin = modeling_common.GenerationTesterMixin
ConfigTester = configuration_common.ConfigTester
floats_tensor = modeling_common.floats_tensor
ids_tensor = modeling_common.ids_tensor

# transformers' own models list their classes here (modeling_auto.py); see the module docstring.
AUTO_MAPPING_ENTRIES = {
    "MODEL_MAPPING_NAMES": FlorenceVLModel.__name__,
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": FlorenceVLForConditionalGeneration.__name__,
}


class FlorenceVLModelTester:
    """Tiny Florence-VL configs (florence_vl_hf.tiny.tiny_config) and inputs for transformers' mixins.

    `tiny_config` keeps the real vocabularies so that the real tokenizers fit: 32064 / 128320 LLM rows, and
    Florence-2's 51289 rows in the BART encoder (1.64M parameters at width 32, over `test_model_is_small`'s 1M).
    Here both get `vocab_size` 99: the LLM's special ids are moved inside it, and the three default task prompts
    keep their shape and padding (BART's bos 0 / pad 1 / eos 2) with their other ids folded into 3..98. The `<image>`
    id is 3, low like LLaVA's tester's 0, so that `test_resize_tokens_embeddings`' clamp to a smaller vocabulary
    keeps it.
    """

    def __init__(
        self,
        parent,
        llm="llama3",
        batch_size=3,
        text_seq_length=7,
        vocab_size=99,
        image_token_id=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        is_training=True,
    ):
        self.parent = parent
        self.llm = llm
        self.batch_size = batch_size
        self.image_token_id = image_token_id
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.is_training = is_training

        config = self.get_config()
        self.text_config = config.text_config.to_dict()
        self.vision_config = config.vision_config.to_dict()
        self.image_size = config.image_size
        self.num_channels = 3
        self.num_image_tokens = config.num_image_tokens
        self.seq_length = text_seq_length + self.num_image_tokens
        self.encoder_seq_length = self.seq_length
        self.num_hidden_layers = config.text_config.num_hidden_layers
        self.hidden_size = config.text_config.hidden_size
        self.num_attention_heads = config.text_config.num_attention_heads

    def task_prompt_ids(self):
        """The default task prompts' ids inside a `vocab_size` vocabulary (special ids 0, 1, 2 unchanged)."""
        fold = self.vocab_size - 3
        return [[i if i < 3 else 3 + i % fold for i in row] for row in DEFAULT_TASK_PROMPT_IDS]

    def get_config(self):
        config = tiny_config(
            self.llm,
            image_token_id=self.image_token_id,
            task_prompt_names=list(DEFAULT_TASK_PROMPTS),
            task_prompt_ids=self.task_prompt_ids(),
        )
        config.vision_config.text_config.vocab_size = self.vocab_size
        config.text_config.update(
            {
                "vocab_size": self.vocab_size,
                "pad_token_id": self.pad_token_id,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
            }
        )
        return config

    def prepare_config_and_inputs(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return config, pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_ids[input_ids == self.image_token_id] = self.pad_token_id
        input_ids[:, : self.num_image_tokens] = self.image_token_id
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        # What FlorenceVLProcessor returns next to pixel_values: one row of task prompts per image.
        prompts = torch.tensor(config.task_prompt_ids, dtype=torch.long, device=input_ids.device)
        task_prompt_ids = prompts.unsqueeze(0).repeat(self.batch_size, 1, 1)
        inputs_dict = {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "task_prompt_ids": task_prompt_ids,
        }
        return config, inputs_dict


class _FlorenceVLModelTest(ModelTesterMixin, GenerationTesterMixin):
    """The common part of the per-LLM test classes below (not collected: no unittest.TestCase)."""

    llm = None
    all_model_classes = (FlorenceVLModel, FlorenceVLForConditionalGeneration)
    _is_composite = True
    # `test_can_init_all_missing_weights` dates a model by the "# Copyright <year>" line of its configuration file and
    # skips those before 2023 unless they opt in; configuration_florence_vl.py has no such line. Florence-VL is from
    # 2024, so it is tested as a model added then would be.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        for mapping, class_name in AUTO_MAPPING_ENTRIES.items():
            patcher = mock.patch.dict(getattr(modeling_auto, mapping), {FlorenceVLConfig.model_type: class_name})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = FlorenceVLModelTester(self, llm=self.llm)
        self.config_tester = ConfigTester(
            self,
            config_class=FlorenceVLConfig,
            has_text_modality=False,
            common_properties=["image_token_id", "image_size", "num_image_tokens", "projector_input_dim"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()


class FlorenceVLLlamaModelTest(_FlorenceVLModelTest, unittest.TestCase):
    """Florence-VL with a Llama text model (the Llama-3.1 checkpoints' family)."""

    llm = "llama3"


class FlorenceVLPhi3ModelTest(_FlorenceVLModelTest, unittest.TestCase):
    """Florence-VL with a Phi-3 text model (the Phi-3.5 checkpoints' family)."""

    llm = "phi3"


def test_standin_config_common_kwargs_are_non_default_base_attributes():
    """`ConfigTester.check_config_arguments_init` returns early for composite configs such as FlorenceVLConfig, so
    the stand-in `config_common_kwargs` is checked here against PreTrainedConfig: each value is taken, and differs
    from the default."""
    kwargs = configuration_common.config_common_kwargs
    config, default = PreTrainedConfig(**kwargs), PreTrainedConfig()
    for key, value in kwargs.items():
        expected = torch.float16 if key == "dtype" else value
        assert getattr(config, key) == expected, key
        assert getattr(default, key) != expected, key


@pytest.mark.parametrize("suite_name", sorted(common_suites.SUITE_FILES))
def test_suites_come_from_the_installed_release(suite_name):
    import transformers

    module = common_suites.suite(suite_name)
    assert common_suites.loaded_version() == transformers.__version__
    assert module.__file__.startswith(common_suites.loaded_info()["cache"])
