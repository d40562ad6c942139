"""The Hub model card (README.md) of a converted repository, rendered from the package's model_card.md template."""

from importlib import resources

from huggingface_hub import ModelCard, ModelCardData

from ..cards import check_card_metadata
from ..families import family
from .errors import ConversionError

EXAMPLE_IMAGE = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg"
EXAMPLE_QUESTION = "What is in the image?"


def template_text() -> str:
    return (resources.files("florence_vl_hf") / "model_card.md").read_text()


def widget_example(image_url: str = EXAMPLE_IMAGE, question: str = EXAMPLE_QUESTION) -> list[dict]:
    """The Hub's image-text-to-text widget: one chat message with an image URL and a question."""
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": question},
                    ],
                }
            ]
        }
    ]


def provenance_markdown(report: dict) -> str:
    source, verification = report["source"], report.get("verification", {})
    lines = [
        f"- Converted from `{source['id']}`"
        + (f" at revision `{source['revision']}`" if source.get("revision") else " (a local folder)")
        + f" ({source['model_type']}) by `florence_vl_hf` {report['converter']['version']}"
        + f" (`florence-vl convert`), stored as {report['output']['dtype']}.",
    ]
    tensors = report["tensors"]
    dropped = ", ".join(f"{why}: {d['tensors']} tensors, {d['parameters']:,} parameters" for why, d in tensors["dropped"].items())
    lines.append(f"- {tensors['mapped']} tensors mapped; dropped on purpose: {dropped or 'none'}.")
    if verification.get("passed"):
        lines.append(
            "- Verified against an independent forward from the source tensors (transformers' native Florence-2, the "
            "original's mlp projector, the source LLM's own class) in "
            f"{verification['compute_dtype']} on one image: max abs "
            f"difference {verification['max_abs_diff']['image_features']:.3g} on the fused image features and "
            f"{verification['max_abs_diff']['logits']:.3g} on the logits (tolerance "
            f"{verification['tolerance']:.3g} relative), greedy tokens "
            f"{'identical' if verification['greedy_tokens_agree'] else 'different'}."
        )
    else:
        lines.append("- Not verified.")
    return "\n".join(lines)


def render_model_card(report: dict, repo_id: str, template: str = "phi3", base_model: str | None = None) -> str:
    """README.md text: YAML metadata (license, library, pipeline tag, base model, tags, widget) and usage, for a
    model of the LLM family named `template`."""
    llm_family = family(template)
    vocabulary = report["vocabulary"]
    suppressed = vocabulary.get("suppressed_token_ids") or []
    card_data = ModelCardData(
        license=llm_family.licence,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        language=["en"],
        tags=["florence-vl", "florence-2", "vision-language", "image-text-to-text", "custom_code", template],
        widget=widget_example(),
    )
    card = ModelCard.from_template(
        card_data,
        template_str=template_text(),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        llm=llm_family.display_name,
        source_description=f"the Florence-VL checkpoint `{report['source']['id']}`",
        example_image=EXAMPLE_IMAGE,
        example_question=EXAMPLE_QUESTION,
        dtype=report["output"]["dtype"],
        image_tokens=report["image_tokens_per_image"],
        vocabulary_note=(
            f"The original resized the LLM's vocabulary to its tokenizer's {vocabulary['original_vocab_size']} tokens; "
            f"this repository keeps {vocabulary['embedding_rows']} embedding rows (one is the `<image>` placeholder) "
            f"and `generation_config.json` suppresses the {len(suppressed)} ids the original could not produce."
            if suppressed
            else ""
        ),
        provenance=provenance_markdown(report),
    )
    text = str(card)
    validate_model_card(text)
    return text


def validate_model_card(text: str) -> ModelCard:
    """Parse `text` with huggingface_hub and check the metadata the Hub needs; raises ConversionError if not."""
    try:
        card = check_card_metadata(text)
    except ValueError as error:
        raise ConversionError(f"The rendered model card is not valid: {error}") from error
    data = card.data.to_dict()
    widget = data.get("widget") or []
    contents = [part for example in widget for message in example.get("messages", []) for part in message["content"]]
    if not any(part.get("type") == "image_url" for part in contents) or not any(p.get("type") == "text" for p in contents):
        raise ConversionError("Model card widget needs an example with an image URL and a question")
    return card
