"""transformers' common test suites run against Florence-VL (see common_suites.py)."""

from pathlib import Path

import common_suites

# The stand-ins are copied into the suites' cache by common_suites; they are no tests of their own.
collect_ignore = ["standins"]


def pytest_report_header(config):
    try:
        common_suites.load()
    except common_suites.SuitesUnavailable as error:
        return f"transformers common suites: UNAVAILABLE ({str(error).splitlines()[0]})"
    return common_suites.describe()


def pytest_terminal_summary(terminalreporter):
    # The header is only printed when pytest loads this conftest at start-up (a run of this folder); a run of the
    # whole tests/ folder loads it while collecting, so the version is repeated here.
    if common_suites.loaded_info() is not None:
        terminalreporter.write_line(common_suites.describe())


# Marks that transformers' suites put on their tests (registered by transformers' own conftest.py, which is not in the
# sdist); registered here so that pytest does not warn about unknown marks.
SUITE_MARKERS = {
    "accelerate_tests": "tests that need accelerate (device_map, offloading)",
    "flash_attn_test": "tests of flash-attention 2",
    "flash_attn_3_test": "tests of flash-attention 3",
    "flash_attn_4_test": "tests of flash-attention 4",
    "torch_compile_test": "tests that run torch.compile",
}


def pytest_configure(config):
    for name, description in SUITE_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description} (transformers' common suites)")


# setup.cfg turns FutureWarning into an error. A few tests of transformers' suites call a deprecated API on purpose
# and assert, inside `warnings.catch_warnings(record=True)`, that it warns; under the "error" filter the warning is
# raised instead of recorded. For those tests only, and only for that message, the warning is let through (to be
# recorded and checked by the test).
EXPECTED_WARNINGS = {
    # test_modeling_common.py: ModelTesterMixin.test_bc_cache_name_forward passes `past_key_values=` and checks that
    # "`past_key_values` is deprecated" is warned (transformers >= 5.24, where the cache argument is named `cache`).
    "test_bc_cache_name_forward": "always:`past_key_values` is deprecated:FutureWarning",
}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        if item.path.parent == Path(__file__).parent and name in EXPECTED_WARNINGS:
            item.add_marker(pytest.mark.filterwarnings(EXPECTED_WARNINGS[name]))
