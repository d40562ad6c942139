"""Stand-in for transformers' `tests/generation/test_utils.py`, which its sdist does not ship.

`test_modeling_common.py` imports `GenerationTesterMixin` from it, and `ModelTesterMixin.test_generation_tester_mixin_inheritance`
checks that a test class of a model that can generate derives from it. transformers' real mixin (hundreds of
`generate` tests) is not available here. Florence-VL's generation contracts are tested by this project's own
tests against independent references: tests/modeling/test_generation_contracts.py (greedy, sampling, beam search
and beam sampling against transformers' bare LLM on the same input embeddings; assisted decoding and prompt lookup
against greedy decoding; scores, logits, hidden states and attentions with `return_dict_in_generate`; a cache reused
across generate calls) and tests/modeling/test_generation.py (a loop of full forwards, image features computed once
before prefill, left padding, several images per sample, static cache). This class therefore adds no tests.
"""


class GenerationTesterMixin:
    """No generation tests (see the module docstring); marks a test class as covering a model that can generate."""
