import pytest

from florence_vl_hf.conversion import convert_checkpoint, make_fixture


def quiet(*_):
    pass


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    """Original-layout checkpoints: {llm: folder}. Phi-3.5 as sharded safetensors, Llama-3.1 as sharded .bin."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "phi3": make_fixture(root / "florence-vl-phi3", "phi3", seed=1),
        "llama": make_fixture(root / "florence-vl-llama", "llama", seed=2, weights_format="bin", shards=3),
    }


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
