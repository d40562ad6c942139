"""Publishing a converted, verified folder to the Hugging Face Hub (huggingface_hub's create_repo + upload_folder)."""

import json
from pathlib import Path

from huggingface_hub import HfApi, constants

from .errors import PushError

REPORT_NAME = "conversion_report.json"


# The trust_remote_code modules the package writes into a folder (the Hub payload).
PAYLOAD_MODULES = ("configuration_florence_vl", "modeling_florence_vl", "processing_florence_vl")


def foreign_auto_map_entries(folder) -> list[str]:
    """`file: Auto class -> reference` for every auto_map entry in `folder`'s JSON files that does not name one of the
    package's payload modules, present in the folder: remote code a source could smuggle into a published repo."""
    foreign = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(content, dict):
            continue
        for holder in (content, *(value for value in content.values() if isinstance(value, dict))):
            auto_map = holder.get("auto_map")
            if auto_map is None:
                continue
            entries = auto_map.items() if isinstance(auto_map, dict) else [("?", auto_map)]
            for auto_class, references in entries:
                for reference in references if isinstance(references, (list, tuple)) else [references]:
                    if reference is None:
                        continue
                    module = reference.rsplit(".", 1)[0] if isinstance(reference, str) else None
                    if module not in PAYLOAD_MODULES or not (Path(folder) / f"{module}.py").is_file():
                        foreign.append(f"{path.name}: {auto_class} -> {reference!r}")
    return foreign


def verified(folder: Path) -> bool:
    """Whether `folder` holds a conversion report whose verification passed."""
    try:
        report = json.loads((Path(folder) / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return False
    return bool(report.get("verification", {}).get("passed"))


def push_folder(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create `repo_id` (if needed) and upload every file of `folder` in one commit; returns the commit URL.

    Refuses a folder whose conversion report does not show a passed verification. The token comes from `token`, else
    from the usual huggingface_hub login / HF_TOKEN; the endpoint from `endpoint`, else HF_ENDPOINT.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder")
    if not verified(folder):
        raise PushError(
            f"{folder} has no {REPORT_NAME} with a passed verification: only verified conversions are pushed"
        )
    foreign = foreign_auto_map_entries(folder)
    if foreign:
        raise PushError(
            f"{folder} has auto_map entries naming code the package did not write (trust_remote_code users would run "
            f"it): {foreign[:3]}"
        )
    if revision and create_pr:
        raise PushError("--revision and --create-pr cannot be combined: a pull request always targets main")
    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set: unset it to push to the Hub")
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{api.endpoint}/{repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload Florence-VL converted by florence_vl_hf ({folder.name})",
        )
    except Exception as error:  # network, HTTP and auth errors all end here; the folder is untouched
        raise PushError(
            f"Pushing {folder} to {where} failed: {type(error).__name__}: {error}. The converted folder is intact: "
            f"retry with `florence-vl push {folder} {repo_id}`"
        ) from error
    return commit.pr_url if create_pr and commit.pr_url else commit.commit_url
