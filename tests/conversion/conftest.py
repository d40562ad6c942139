import pytest

from florence_vl_hf.conversion import convert_checkpoint


def quiet(*_):
    pass


@pytest.fixture(scope="session")
def converted(fixtures, tmp_path_factory):
    """{llm: (output folder, report)} converted with default settings and a small shard size."""
    root = tmp_path_factory.mktemp("converted")
    result = {}
    for llm, source in fixtures.items():
        output = root / f"{llm}-hf"
        report = convert_checkpoint(source, output, max_shard_size="5MB", repo_id=f"someone/florence-vl-{llm}", log=quiet)
        result[llm] = (output, report)
    return result
