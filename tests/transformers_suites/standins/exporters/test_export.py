"""Stand-in for transformers' `tests/exporters/test_export.py`, which its sdist does not ship.

`ModelTesterMixin` derives from `ExportTesterMixin`, whose tests export models with `torch.export` / ExecuTorch /
ONNX. Florence-VL's export is not part of what this project supports or tests, so the mixin here adds no tests: it
only lets `test_modeling_common.py` import.
"""


class ExportTesterMixin:
    """No export tests (see the module docstring)."""
