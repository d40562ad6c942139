"""`florence-vl push` / `florence_vl_hf.conversion.hub.push_folder` against a fake Hub (tests/conversion/fake_hub.py).

The pushes run as `python -m florence_vl_hf.cli push ...` subprocesses (this test process has HF_HUB_OFFLINE=1 and a
real endpoint baked into huggingface_hub's constants), with HF_ENDPOINT pointing at a local fake Hub. The module's five
pushes are started at once by one fixture, so that their interpreter start-ups (torch + transformers) overlap.
Refusals of unverified folders happen before any request and are tested in-process.

Two fake Hubs cover both upload routes of huggingface_hub 2.4's `upload_folder`:
- `regular` answers "regular" for every file: the client keeps its default route (the hf_xet "pipelined" upload when
  hf_xet is installed, where a pull request is opened through the discussions API and committed to `refs/pr/N`) and
  never needs Xet storage, which the fake does not implement;
- `lfs` answers "lfs" for files of 1 MiB and more and is used with HF_HUB_DISABLE_XET=1: the client takes the git-LFS
  route (batch API, basic PUT of model.safetensors, verify) and `create_commit` with `?create_pr=1` for pull requests.
"""

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pytest

from florence_vl_hf.cli import main
from florence_vl_hf.lab.fixture import make_fixture
from florence_vl_hf.conversion.errors import PushError
from florence_vl_hf.conversion.hub import push_folder, verified

try:  # tests/conversion is not a package (rootdir conftest, "prepend" import mode): fake_hub is a sibling module
    from .fake_hub import FakeHub
except ImportError:
    from fake_hub import FakeHub

TOKEN = "hf_fake_token_for_tests"
MESSAGE = "Florence-VL 3B, converted and verified"
LFS_THRESHOLD = 1 << 20
HF_XET_INSTALLED = find_spec("hf_xet") is not None


def make_folder(folder: Path, report: str | None = "passed") -> Path:
    """A converted folder: small JSON/text files, a 6 MiB random model.safetensors and (optionally) the report."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "florence_vl", "image_size": 64}, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    (folder / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# Florence-VL\n")
    (folder / "model.safetensors").write_bytes(random.Random(folder.name).randbytes(6 * 2**20 + 123))
    reports = {
        "passed": json.dumps({"verification": {"passed": True, "max_abs_diff": 0.0}}),
        "failed": json.dumps({"verification": {"passed": False, "max_abs_diff": 3.5}}),
        "no-verification": json.dumps({"conversion": {"keys": 123}}),
        "not-json": "{verification: passed",
    }
    if report is not None:
        (folder / "conversion_report.json").write_text(reports[report])
    return folder


def snapshot(folder: Path) -> dict:
    """relative path -> sha256 of every file under `folder`."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def closed_port_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connections are refused


@dataclass
class Push:
    name: str
    folder: Path
    repo_id: str
    hub: FakeHub | None
    before: dict  # snapshot of the folder before the push
    returncode: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return f"push {self.name!r}: rc={self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


# name -> (hub: "regular" | "lfs" | None for a closed port, report, CLI options)
RUNS = {
    "main": ("regular", "passed", ["--private", "--commit-message", MESSAGE]),
    "branch": ("lfs", "passed", ["--revision", "dev"]),
    "pr": ("regular", "passed", ["--create-pr"]),
    "lfs-pr": ("lfs", "passed", ["--create-pr", "--commit-message", MESSAGE]),
    "network": (None, "passed", []),
    "convert": ("regular", None, []),  # `florence-vl convert FIXTURE FOLDER --push-to-hub REPO_ID`
}


@pytest.fixture(scope="module")
def hubs():
    with FakeHub(token=TOKEN) as regular, FakeHub(token=TOKEN, lfs_threshold=LFS_THRESHOLD) as lfs:
        yield {"regular": regular, "lfs": lfs}


@pytest.fixture(scope="module")
def pushes(hubs, tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    base_env = {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy")
        and key not in ("HF_HUB_DISABLE_XET", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HF_XET_CACHE", "HUGGING_FACE_HUB_TOKEN")
    }
    started = {}
    for name, (hub_name, report, options) in RUNS.items():
        repo_id = f"tester/florence-vl-{name}"
        if name == "convert":
            source = make_fixture(root / "original", "phi3", seed=8, shards=1)
            folder = root / f"florence-vl-{name}-hf"
            command = [sys.executable, "-m", "florence_vl_hf.cli", "convert", str(source), str(folder),
                       "--push-to-hub", repo_id]  # fmt: skip
        else:
            folder = make_folder(root / f"florence-vl-{name}-hf", report)
            command = [sys.executable, "-m", "florence_vl_hf.cli", "push", str(folder), repo_id, *options]
        hub = hubs[hub_name] if hub_name else None
        env = dict(
            base_env,
            HF_ENDPOINT=hub.url if hub else closed_port_endpoint(),
            HF_HUB_OFFLINE="0",
            HF_TOKEN=TOKEN,
            HF_HOME=str(root / f"hf-home-{name}"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            NO_PROXY="127.0.0.1,localhost",
        )
        if hub_name == "lfs":
            env["HF_HUB_DISABLE_XET"] = "1"
        out, err = root / f"{name}.out", root / f"{name}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = subprocess.Popen(command, env=env, cwd=root, stdout=stdout, stderr=stderr)
        started[name] = (process, folder, repo_id, hub, snapshot(folder) if folder.exists() else None, out, err)
    results = {}
    for name, (process, folder, repo_id, hub, before, out, err) in started.items():
        try:
            returncode = process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        before = snapshot(folder) if before is None else before  # written by the process itself
        results[name] = Push(name, folder, repo_id, hub, before, returncode, out.read_text(), err.read_text())
    return results


def assert_whole_folder_committed(commit, push: Push):
    uploaded = {path: hashlib.sha256(content).hexdigest() for path, content in commit.files.items()}
    assert uploaded == push.before  # every file (conversion_report.json included), byte for byte
    assert "conversion_report.json" in uploaded and "model.safetensors" in uploaded


def assert_hub_clean(hub: FakeHub):
    assert hub.unhandled == [] and hub.xet_requests == [] and hub.crashes == []


def one_commit(push: Push):
    commits = push.hub.commits_for(push.repo_id)
    assert len(commits) == 1, commits
    return commits[0]


@pytest.mark.slow
def test_push_creates_a_private_repo_and_commits_every_file(pushes):
    push = pushes["main"]
    assert push.returncode == 0, push.explain()
    hub, commit = push.hub, one_commit(push)
    repo = hub.repos[push.repo_id]
    assert repo.private and repo.create_payload["visibility"] == "private"
    assert repo.create_payload["type"] == "model"
    assert (commit.url_revision, commit.revision, commit.create_pr) == ("main", "main", False)
    assert commit.summary == MESSAGE
    assert_whole_folder_committed(commit, push)
    assert commit.lfs_paths == set()  # this hub answers "regular" for every file: the client never needs Xet
    assert repo.branches["main"] == commit.files
    assert not repo.pull_requests and not [call for call in hub.branch_calls if call[0] == push.repo_id]
    assert all(request.authorization == f"Bearer {TOKEN}" for request in hub.requests_for(push.repo_id))
    assert f"pushed {push.folder} to {hub.url}/{push.repo_id}/commit/{commit.oid}" in push.stdout
    assert snapshot(push.folder) == push.before
    assert_hub_clean(hub)


@pytest.mark.slow
def test_push_to_a_revision_creates_the_branch_and_uploads_the_weights_through_lfs(pushes):
    push = pushes["branch"]
    assert push.returncode == 0, push.explain()
    hub, commit = push.hub, one_commit(push)
    repo = hub.repos[push.repo_id]
    assert not repo.private and repo.create_payload["visibility"] == "public"
    assert (push.repo_id, "dev", 200) in hub.branch_calls
    assert (commit.url_revision, commit.revision, commit.create_pr) == ("dev", "dev", False)
    assert repo.branches["main"] == {}  # main untouched
    assert repo.branches["dev"] == commit.files
    assert_whole_folder_committed(commit, push)
    assert commit.lfs_paths == {"model.safetensors"}  # the 6 MiB file went through the LFS batch API + basic PUT
    lfs_uploads = [upload for upload in hub.lfs_uploads if upload[0] == push.repo_id]
    assert lfs_uploads == [(push.repo_id, push.before["model.safetensors"])]  # sha256 checked by the fake on PUT
    assert push.folder.name in commit.summary  # push_folder's default commit message names the folder
    assert f"{hub.url}/{push.repo_id}/commit/{commit.oid}" in push.stdout
    assert_hub_clean(hub)


@pytest.mark.slow
def test_create_pr_opens_a_pull_request_on_the_default_route(pushes):
    push = pushes["pr"]
    assert push.returncode == 0, push.explain()
    hub, commit = push.hub, one_commit(push)
    repo = hub.repos[push.repo_id]
    assert commit.revision == "refs/pr/1" and list(repo.pull_requests) == [1]
    assert repo.branches["main"] == {}  # a pull request, not a commit to main
    assert repo.branches["refs/pr/1"] == commit.files
    assert_whole_folder_committed(commit, push)
    assert not [call for call in hub.branch_calls if call[0] == push.repo_id]  # --create-pr alone: no branch
    if HF_XET_INSTALLED:  # pipelined upload_folder: explicit PR (discussions API), then a commit to its ref
        assert commit.url_revision == "refs/pr/1" and not commit.create_pr
        assert [r.method for r in hub.requests_for(push.repo_id) if r.path.endswith("/discussions")] == ["POST"]
    else:  # create_commit with ?create_pr=1
        assert commit.url_revision == "main" and commit.create_pr
    assert f"pushed {push.folder} to {hub.url}/{push.repo_id}/discussions/1" in push.stdout
    assert_hub_clean(hub)


@pytest.mark.slow
def test_create_pr_reaches_the_pr_flavour_of_the_commit_endpoint(pushes):
    push = pushes["lfs-pr"]
    assert push.returncode == 0, push.explain()
    hub, commit = push.hub, one_commit(push)
    repo = hub.repos[push.repo_id]
    commit_requests = [r for r in hub.requests_for(push.repo_id) if "/commit/" in r.path]
    assert [(r.path, r.query) for r in commit_requests] == [
        (f"/api/models/{push.repo_id}/commit/main", {"create_pr": "1"})
    ]
    assert (commit.url_revision, commit.revision, commit.create_pr, commit.pr_num) == ("main", "refs/pr/1", True, 1)
    assert commit.summary == MESSAGE
    assert repo.branches["main"] == {}
    assert_whole_folder_committed(commit, push)
    assert commit.lfs_paths == {"model.safetensors"}
    assert f"pushed {push.folder} to {hub.url}/{push.repo_id}/discussions/1" in push.stdout
    assert_hub_clean(hub)


@pytest.mark.slow
def test_push_network_failure_says_retry_and_leaves_the_folder_intact(pushes):
    push = pushes["network"]
    assert push.returncode != 0, push.explain()
    assert "failed" in push.stderr and "retry" in push.stderr and str(push.folder) in push.stderr, push.explain()
    assert "Traceback" not in push.stderr  # a PushError message, not a crash
    assert snapshot(push.folder) == push.before


@pytest.mark.parametrize("report", [None, "failed", "no-verification", "not-json"])
def test_unverified_folders_are_refused_before_any_request(tmp_path, capsys, report):
    # In-process: the refusal comes before huggingface_hub's offline check (a refusal for being offline would not
    # mention the verification), and a live fake Hub shows that nothing at all was sent.
    folder = make_folder(tmp_path / "converted", report)
    before = snapshot(folder)
    assert not verified(folder)
    assert main(["push", str(folder), "tester/florence-vl"]) == 1
    err = capsys.readouterr().err
    assert "verification" in err and str(folder) in err
    with FakeHub(token=TOKEN) as hub:
        with pytest.raises(PushError, match="verification"):
            push_folder(folder, "tester/florence-vl", endpoint=hub.url, token=TOKEN)
        assert hub.requests == [] and hub.repos == {} and hub.commits == []
    assert snapshot(folder) == before


def test_a_passed_report_is_verified_and_a_missing_folder_refused(tmp_path):
    assert verified(make_folder(tmp_path / "converted"))
    with pytest.raises(PushError, match="is not a folder"):
        push_folder(tmp_path / "missing", "tester/florence-vl")


@pytest.mark.slow
def test_convert_with_push_to_hub_uploads_the_verified_folder(pushes):
    push = pushes["convert"]
    assert push.returncode == 0, push.explain()
    commit = one_commit(push)
    assert_whole_folder_committed(commit, push)
    assert json.loads(commit.files["conversion_report.json"])["verification"]["passed"]
    assert f'"{push.repo_id}"' in commit.files["README.md"].decode()  # the card's usage code names the pushed repo
    assert "PASSED" in push.stdout and f"pushed {push.folder} to" in push.stdout
    assert_hub_clean(push.hub)


def test_push_to_hub_without_verification_is_refused_before_converting(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "none"), str(tmp_path / "out"), "--no-verify", "--push-to-hub", "a/b"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --push-to-hub cannot be combined with --no-verify: only verified conversions are pushed"
    ]
    assert not (tmp_path / "out").exists()
