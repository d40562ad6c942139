"""Deprecations are test errors while they are still warnings: setup.cfg's filters and conftest's logger check."""

import configparser
import logging
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def filters() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return [line.strip() for line in config["tool:pytest"]["filterwarnings"].splitlines() if line.strip()]


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
def test_deprecation_warnings_are_errors(category):
    assert f"error::{category.__name__}" in filters()
    with pytest.raises(category):
        warnings.warn("`old` is deprecated, use `new`", category)


def test_third_party_filters_are_narrow():
    ignored = [line for line in filters() if line.startswith("ignore")]
    for line in ignored:
        _, message, category, module = (line.split(":", 4) + [""])[:4]
        assert message and category and module, f"{line!r} must name a message, a category and a module"
    # The one filter hides transformers' warning about PEFT reading `is_gradient_checkpointing`; our code must not
    # read it, or the filter would hide our own deprecation.
    sources = [p for p in (ROOT / "src").rglob("*.py") if "is_gradient_checkpointing" in p.read_text(encoding="utf-8")]
    assert sources == []


def test_a_logged_library_deprecation_is_caught(no_logged_deprecation):
    logging.getLogger("transformers.models.fake").warning("`cache_position` is deprecated and will be removed")
    logging.getLogger("transformers.models.fake").warning("an ordinary warning")
    logging.getLogger("huggingface_hub.fake").info("`foo` is deprecated (info level, not caught)")
    caught = list(no_logged_deprecation.messages)
    no_logged_deprecation.messages.clear()  # so that this test itself passes
    assert caught == ["transformers.models.fake: `cache_position` is deprecated and will be removed"]
