"""Model cards of the folders the package writes (conversions are checked in tests/conversion)."""

import pytest
from huggingface_hub import ModelCard

import florence_vl_hf
from florence_vl_hf.build import build_random_model, save_hub_folder
from florence_vl_hf.cards import check_card_metadata, hub_base_model
from florence_vl_hf.tiny import tiny_config


def test_the_bundled_tiny_model_card_has_hub_metadata():
    card = check_card_metadata((florence_vl_hf.tiny_model_dir() / "README.md").read_text())
    assert card.data.license == "mit"  # the weights are the package's, the tokenizer Phi-3.5's (MIT)
    assert "custom_code" in card.data.tags and "florence-vl" in card.data.tags


@pytest.mark.parametrize("llm, license", [("phi3", "mit"), ("llama3", "llama3.1")])
def test_save_hub_folder_writes_a_card_with_the_llms_licence(llm, license, tmp_path):
    model, processor = build_random_model(tiny_config(llm), seed=0)
    folder = save_hub_folder(model, processor, tmp_path / "my-model", description="Random weights.")
    text = (folder / "README.md").read_text()
    card = check_card_metadata(text)
    assert (card.data.license, card.data.library_name, card.data.base_model) == (license, "transformers", None)
    assert 'pipeline("image-text-to-text", model="my-model", trust_remote_code=True)' in text
    assert "Random weights." in text
    assert not [path.name for path in folder.iterdir() if path.name.startswith(".")]  # the atomic write's temp file


def test_base_model_is_named_only_for_hub_repo_ids(tmp_path):
    assert hub_base_model("jiuhai/florence-vl-3b-sft") == "jiuhai/florence-vl-3b-sft"
    for local in (str(tmp_path), "", None, "/abs/path", "./rel/path", "a/b/c"):
        assert hub_base_model(local) is None, local


@pytest.mark.parametrize(
    "text, problem",
    [
        ("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n---\n# x", "no license"),
        ("---\nlicense: mit\npipeline_tag: image-text-to-text\n---\n# x", "library_name is None"),
        ("---\nlicense: mit\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n", "pipeline_tag is"),
        ("---\n[unclosed\n---\n# x", "does not parse"),
    ],
)
def test_check_card_metadata_names_what_is_missing(text, problem):
    with pytest.raises(ValueError, match=problem):
        check_card_metadata(text)
    assert isinstance(check_card_metadata(VALID), ModelCard)


VALID = "---\nlicense: mit\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n---\n# x"
