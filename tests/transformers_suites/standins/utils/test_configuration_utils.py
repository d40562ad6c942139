"""Stand-in for transformers' `tests/utils/test_configuration_utils.py`, which its sdist does not ship.

`test_configuration_common.ConfigTester.check_config_arguments_init` builds a config from `config_common_kwargs` and
checks that every attribute was set (`dtype` is compared with `torch.float16`). The values are the attributes that
`PreTrainedConfig` itself declares (transformers 5.23 / 5.24: `configuration_utils.PreTrainedConfig`), each set to a
value different from its default, so that an attribute a config drops or overwrites shows up. Parameters of
generation are left out: `PreTrainedConfig.__post_init__` pops them (they belong to `GenerationConfig`).

`ConfigTester` returns early for composite configs (those with `sub_configs`), such as `FlorenceVLConfig`;
tests/transformers_suites/test_modeling_suites.py checks these values against `PreTrainedConfig` directly.
"""

config_common_kwargs = {
    # declared fields of PreTrainedConfig (defaults: None, False, True, None, 0, False, None, None, None)
    "architectures": ["FlorenceVLForConditionalGeneration"],
    "output_hidden_states": True,
    "return_dict": False,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "is_encoder_decoder": True,
    "id2label": {0: "label_0", 1: "label_1", 2: "label_2"},
    "label2id": {"label_0": 0, "label_1": 1, "label_2": 2},
    "problem_type": "regression",
    # consumed by __post_init__ into properties (defaults: False, "")
    "output_attentions": True,
    "name_or_path": "florence-vl/config-common-kwargs",
}
