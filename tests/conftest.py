import atexit
import logging
import os
import re
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="florence_vl_test_modules_")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import florence_vl_hf  # noqa: E402,F401  (registers the Auto classes)
from florence_vl_hf.build import build_random_model  # noqa: E402
from florence_vl_hf.processing import sample_image_path  # noqa: E402
from florence_vl_hf.lab.fixture import make_fixture  # noqa: E402
from florence_vl_hf.tiny import tiny_config  # noqa: E402

torch.set_num_threads(2)

# transformers and huggingface_hub announce many deprecations through their loggers (`logger.warning_once`), not
# through `warnings`, so setup.cfg's `error::` filters do not see them.
DEPRECATION_MESSAGE = re.compile(r"deprecat|will be removed|no longer supported", re.IGNORECASE)
LIBRARY_LOGGERS = ("transformers", "huggingface_hub")


class _DeprecationRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if DEPRECATION_MESSAGE.search(message):
            self.messages.append(f"{record.name}: {message}")


@pytest.fixture(autouse=True)
def no_logged_deprecation():
    """Fail a test whose calls make transformers or huggingface_hub log a deprecation."""
    handler = _DeprecationRecords()
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)
    if handler.messages:
        pytest.fail("deprecation logged by a library:\n" + "\n".join(handler.messages), pytrace=False)


@pytest.fixture(scope="session")
def shapes_image():
    return Image.open(sample_image_path()).convert("RGB")


@pytest.fixture(scope="session", params=["phi3", "llama3"])
def tiny(request):
    """(model, processor) with random weights, for each LLM family."""
    return build_random_model(tiny_config(request.param), seed=0)


@pytest.fixture(scope="session")
def tiny_phi3():
    return build_random_model(tiny_config("phi3"), seed=0)


@pytest.fixture
def one_thread():
    """One torch thread for tests that train: small models run faster, and results don't depend on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    """Original-layout checkpoints: {llm: folder}. Phi-3.5 as sharded safetensors, Llama-3.1 as sharded .bin."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "phi3": make_fixture(root / "florence-vl-phi3", "phi3", seed=1),
        "llama": make_fixture(root / "florence-vl-llama", "llama3", seed=2, weights_format="bin", shards=3),
    }
