"""The supported transformers range is one fact: setup.cfg, both payload files and the lock agree on it."""

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from florence_vl_hf.modeling import configuration_florence_vl
from florence_vl_hf.processing import processing_florence_vl

ROOT = Path(__file__).resolve().parents[1]


def declared(name):
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    return next(Requirement(line) for line in lines if canonicalize_name(Requirement(line).name) == name)


def test_payload_files_state_the_range_setup_cfg_declares():
    transformers = declared("transformers")
    assert Requirement(configuration_florence_vl.TRANSFORMERS_REQUIREMENT) == transformers
    assert Requirement(processing_florence_vl.TRANSFORMERS_REQUIREMENT) == transformers


def test_lock_pins_versions_inside_the_declared_ranges():
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (pin,) = requirement.specifier
            assert pin.operator == "==", line
            pins[canonicalize_name(requirement.name)] = pin.version
    for name in ("transformers", "safetensors", "huggingface-hub", "peft", "tokenizers", "pillow"):
        assert name in pins, f"{name} is not locked"
        assert declared(name).specifier.contains(pins[name]), f"{name}=={pins[name]} is outside setup.cfg's range"
