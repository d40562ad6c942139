"""A fake Hugging Face Hub for tests: a threaded stdlib HTTP server on 127.0.0.1 (ephemeral port).

It implements just the part of the Hub API that huggingface_hub 2.4's `HfApi.create_repo(exist_ok=True)`,
`HfApi.create_branch(exist_ok=True)` and `HfApi.upload_folder(...)` (to a branch or as a pull request) use, and it
RECORDS what it is asked: every request (method, path, query, whether it was authenticated), the repos created with
their creation payload (visibility / private flag), the branches and pull requests opened, and every commit with the
exact bytes of each committed file, its commit message and its flavour (`?create_pr=1` or not).

Endpoints (repo type "model"; `{repo}` is `namespace/name` or `name`; revisions are URL-quoted as the client sends
them, e.g. `refs%2Fpr%2F1`):

- `POST /api/repos/create`: creates the repo with an empty `main` branch, 409 if it already exists (what
  `create_repo(exist_ok=True)` expects).
- `POST /api/validate-yaml`: accepts any README.md metadata.
- `POST /api/models/{repo}/branch/{branch}`: creates a branch from `main` (or `startingPoint`), 409 if it exists.
- `POST /api/models/{repo}/discussions` and `GET /api/models/{repo}/discussions/{num}`: pull requests, as the client
  opens them explicitly (`create_pull_request`) in the hf_xet "pipelined" upload; each PR gets the ref `refs/pr/{num}`.
- `POST /api/models/{repo}/preupload/{revision}`: answers `uploadMode` "regular" for every file, or "lfs" for files of
  at least `lfs_threshold` bytes when the hub is built with one.
- `POST /{repo}.git/info/lfs/objects/batch`: git-LFS batch API, "basic" transfer only: the upload action points to
  `PUT /lfs-upload/{repo}/{oid}` on this server (the body's sha256 must match the oid) and the verify action to
  `POST /lfs-verify/{repo}/{oid}`. LFS storage is per repo; an object already stored gets no actions (not re-sent).
- `POST /api/models/{repo}/commit/{revision}[?create_pr=1]`: the ndjson commit (header, `file` with base64 content,
  `lfsFile` referencing an uploaded LFS object, `deletedFile` / `deletedFolder`). Committing to a revision that does not
  exist is a 404 RevisionNotFound, like the real Hub; `?create_pr=1` opens a new pull request against the revision.
- Xet (`/api/models/{repo}/xet-write-token/...`, `xet-read-token`) is NOT implemented: such requests are recorded in
  `xet_requests` and answered 501. The hub steers clients away from Xet by its answers: huggingface_hub only uses Xet
  for files the preupload endpoint calls "lfs", so a hub without `lfs_threshold` (everything "regular") is safe for a
  client with hf_xet enabled (the default "pipelined" upload_folder), while a hub with `lfs_threshold` must be used
  with `HF_HUB_DISABLE_XET=1` in the client, which then takes the legacy git-LFS route (batch + basic PUT + verify).
- Anything else is answered 404 and recorded in `unhandled`, so that tests can assert the client needed nothing more.

When the hub is built with `token=...`, every `/api/...` and LFS batch/verify request must carry
`Authorization: Bearer <token>` (401 otherwise); LFS object PUTs are unauthenticated, like presigned storage URLs.

Simplifications: preupload never reports a remote `oid` (so nothing is skipped as "unchanged"), new repos have no
initial `.gitattributes` commit, and there are no repo-info / tree / download endpoints.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_REPO_ACTION = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+(?:/[^/]+)??)"
    r"/(?P<action>preupload|commit|branch|discussions|xet-write-token|xet-read-token)(?:/(?P<rest>.*))?$"
)
_LFS_BATCH = re.compile(r"^/(?:(?:datasets|spaces)/)?(?P<repo>.+)\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/lfs-(?P<kind>upload|verify)/(?P<repo>.+)/(?P<oid>[0-9a-f]{64})$")


@dataclass
class RecordedRequest:
    method: str
    path: str  # URL path as sent (still quoted)
    query: dict  # name -> last value
    authorization: str | None
    body_size: int


@dataclass
class Commit:
    repo_id: str
    url_revision: str  # unquoted revision in the commit URL ("main", "dev", "refs/pr/1")
    revision: str  # ref the commit landed on (differs from url_revision with ?create_pr=1)
    create_pr: bool  # the `?create_pr=1` flavour of the commit endpoint
    summary: str
    description: str
    files: dict  # path_in_repo -> bytes, every added file (regular and LFS)
    lfs_paths: set  # the paths committed as `lfsFile`
    deleted: list
    oid: str
    pr_num: int | None


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    create_payload: dict
    branches: dict = field(default_factory=lambda: {"main": {}})  # ref -> {path: bytes}
    pull_requests: dict = field(default_factory=dict)  # num -> {"title", "description", "ref", "base"}

    @property
    def private(self) -> bool:
        return self.create_payload.get("visibility") == "private"


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **payload):
        super().__init__(message)
        self.status, self.message, self.code, self.payload = status, message, code, payload


class FakeHub:
    """Start with `with FakeHub() as hub:` (or start()/stop()); point HF_ENDPOINT at `hub.url`."""

    def __init__(self, *, token: str | None = None, lfs_threshold: int | None = None, user: str = "fake-user"):
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.user = user
        self.lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[RecordedRequest] = []
        self.xet_requests: list[RecordedRequest] = []
        self.crashes: list[str] = []  # exceptions inside the fake itself (answered 400)
        self.repos: dict[str, Repo] = {}
        self.create_repo_calls: list[dict] = []  # every create payload, including those answered 409
        self.branch_calls: list[tuple] = []  # (repo_id, branch, status)
        self.commits: list[Commit] = []
        self.lfs_objects: dict[tuple, bytes] = {}  # (repo_id, sha256 hex) -> content: LFS storage is per repo
        self.lfs_uploads: list[tuple] = []  # (repo_id, oid) of each LFS PUT, in order
        self._server = None
        self._thread = None
        self._commit_count = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries for tests

    def commits_for(self, repo_id: str) -> list[Commit]:
        with self.lock:
            return [commit for commit in self.commits if commit.repo_id == repo_id]

    def requests_for(self, repo_id: str) -> list[RecordedRequest]:
        """Requests whose path names `repo_id` (repo API, LFS); repo creations are in `create_repo_calls`."""
        with self.lock:
            return [r for r in self.requests if f"/{repo_id}/" in r.path or f"/{repo_id}.git/" in r.path]

    # ------------------------------------------------------------------ request handling (called by the handler)

    def _record(self, request: RecordedRequest) -> None:
        with self.lock:
            self.requests.append(request)

    def _check_auth(self, authorization: str | None) -> None:
        if self.token is not None and authorization != f"Bearer {self.token}":
            raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _HTTPError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _ref(self, repo: Repo, revision: str) -> dict:
        revision = revision.removeprefix("refs/heads/")
        if revision not in repo.branches:
            raise _HTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.branches[revision]

    def _open_pr(self, repo: Repo, title: str, description: str, base: str) -> int:
        num = len(repo.pull_requests) + 1
        ref = f"refs/pr/{num}"
        repo.pull_requests[num] = {"title": title, "description": description, "ref": ref, "base": base}
        repo.branches[ref] = dict(self._ref(repo, base))
        return num

    def handle(self, method: str, raw_path: str, query: dict, headers, body: bytes):
        """Returns (status, json-able body or None, extra headers)."""
        authorization = headers.get("Authorization")
        request = RecordedRequest(method, raw_path, query, authorization, len(body))
        self._record(request)
        path = raw_path

        if match := _LFS_OBJECT.match(path):
            repo_id, oid = unquote(match["repo"]), match["oid"]
            if match["kind"] == "upload" and method == "PUT":
                return self._lfs_put(repo_id, oid, body)
            if match["kind"] == "verify" and method == "POST":
                self._check_auth(authorization)
                return self._lfs_verify(repo_id, oid, json.loads(body or b"{}"))
        elif match := _LFS_BATCH.match(path):
            if method == "POST":
                self._check_auth(authorization)
                return self._lfs_batch(unquote(match["repo"]), json.loads(body))
        elif path == "/api/repos/create" and method == "POST":
            self._check_auth(authorization)
            return self._create_repo(json.loads(body))
        elif path == "/api/validate-yaml" and method == "POST":
            self._check_auth(authorization)
            return 200, {"errors": [], "warnings": []}, {}
        elif match := _REPO_ACTION.match(path):
            self._check_auth(authorization)
            repo_id, action, rest = unquote(match["repo"]), match["action"], match["rest"]
            if action.startswith("xet-"):
                with self.lock:
                    self.xet_requests.append(request)
                raise _HTTPError(501, "this fake Hub does not implement Xet storage")
            with self.lock:
                repo = self._repo(repo_id)
                if action == "preupload" and method == "POST" and rest:
                    return self._preupload(repo, unquote(rest), json.loads(body))
                if action == "commit" and method == "POST" and rest:
                    return self._commit(repo, unquote(rest), query.get("create_pr") == "1", body)
                if action == "branch" and method == "POST" and rest:
                    return self._create_branch(repo, unquote(rest), json.loads(body or b"{}"))
                if action == "discussions" and method == "POST" and not rest:
                    return self._create_discussion(repo, json.loads(body))
                if action == "discussions" and method == "GET" and rest and rest.isdigit():
                    return self._discussion_details(repo, int(rest))
        with self.lock:
            self.unhandled.append(request)
        raise _HTTPError(404, f"fake Hub: no route for {method} {path}")

    def _create_repo(self, payload: dict):
        name, organization = payload["name"], payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else name
        with self.lock:
            self.create_repo_calls.append(dict(payload))
            if repo_id in self.repos:
                # the real Hub's 409 carries the repo url too: create_repo(exist_ok=True) returns it
                raise _HTTPError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
            self.repos[repo_id] = Repo(repo_id, payload.get("type") or "model", dict(payload))
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def _create_branch(self, repo: Repo, branch: str, payload: dict):
        if branch in repo.branches:
            self.branch_calls.append((repo.repo_id, branch, 409))
            raise _HTTPError(409, f"Branch {branch} already exists")
        repo.branches[branch] = dict(self._ref(repo, payload.get("startingPoint") or "main"))
        self.branch_calls.append((repo.repo_id, branch, 200))
        return 200, None, {}

    def _preupload(self, repo: Repo, revision: str, payload: dict):
        self._ref(repo, revision)
        files = []
        for entry in payload["files"]:
            lfs = self.lfs_threshold is not None and entry["size"] >= self.lfs_threshold
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {"files": files}, {}

    def _lfs_batch(self, repo_id: str, payload: dict):
        with self.lock:
            self._repo(repo_id)
            objects = []
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                answer = {"oid": oid, "size": size, "authenticated": True}
                if (repo_id, oid) not in self.lfs_objects:  # else already stored: no actions, nothing to upload
                    answer["actions"] = {
                        "upload": {"href": f"{self.url}/lfs-upload/{repo_id}/{oid}", "expires_in": 3600},
                        "verify": {"href": f"{self.url}/lfs-verify/{repo_id}/{oid}", "expires_in": 3600},
                    }
                objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}

    def _lfs_put(self, repo_id: str, oid: str, body: bytes):
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HTTPError(400, f"LFS object {oid}: content does not match its sha256")
        with self.lock:
            self.lfs_objects[repo_id, oid] = body
            self.lfs_uploads.append((repo_id, oid))
        return 200, None, {"ETag": f'"{oid[:32]}"'}

    def _lfs_verify(self, repo_id: str, oid: str, payload: dict):
        with self.lock:
            content = self.lfs_objects.get((repo_id, oid))
        if content is None or payload.get("oid") != oid or payload.get("size") != len(content):
            raise _HTTPError(404, f"LFS object {oid} not found or of another size")
        return 200, {"message": "verified"}, {}

    def _create_discussion(self, repo: Repo, payload: dict):
        if not payload.get("pullRequest"):
            raise _HTTPError(400, "fake Hub: only pull requests can be opened")
        num = self._open_pr(repo, payload["title"], payload.get("description", ""), "main")
        return 200, {"num": num, "pullRequest": True, "url": f"{self.url}/{repo.repo_id}/discussions/{num}"}, {}

    def _discussion_details(self, repo: Repo, num: int):
        pr = repo.pull_requests.get(num)
        if pr is None:
            raise _HTTPError(404, f"Discussion {num} not found")
        details = {
            "num": num,
            "title": pr["title"],
            "author": {"name": self.user},
            "createdAt": "2024-01-01T00:00:00.000Z",
            "status": "draft",
            "repo": {"name": repo.repo_id, "type": repo.repo_type},
            "isPullRequest": True,
            "events": [],
            "changes": {"base": f"refs/heads/{pr['base']}"},
            "filesWithConflicts": [],
            "diff": "",
        }
        return 200, details, {}

    def _commit(self, repo: Repo, url_revision: str, create_pr: bool, body: bytes):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        self._ref(repo, url_revision)  # 404 RevisionNotFound for a branch that was never created
        files, lfs_paths, deleted = {}, set(), []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HTTPError(400, f"unsupported encoding for {value['path']}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                content = self.lfs_objects.get((repo.repo_id, value["oid"]))
                if value.get("algo") != "sha256" or content is None:
                    raise _HTTPError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                if "size" in value and value["size"] != len(content):
                    raise _HTTPError(400, f"LFS object {value['oid']}: wrong size")
                files[value["path"]] = content
                lfs_paths.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise _HTTPError(400, f"fake Hub: unsupported commit operation {key!r}")

        pr_num = None
        if create_pr:
            pr_num = self._open_pr(repo, header["summary"], header.get("description", ""), url_revision)
            target = f"refs/pr/{pr_num}"
        else:
            target = url_revision.removeprefix("refs/heads/")
        tree = repo.branches[target]
        for path in deleted:
            for existing in [p for p in tree if p == path or p.startswith(path.rstrip("/") + "/")]:
                del tree[existing]
        tree.update(files)

        self._commit_count += 1
        oid = hashlib.sha1(f"{repo.repo_id}:{target}:{self._commit_count}".encode()).hexdigest()
        self.commits.append(
            Commit(repo.repo_id, url_revision, target, create_pr, header["summary"], header.get("description", ""),
                   files, lfs_paths, deleted, oid, pr_num)
        )
        answer = {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}",
            "pullRequestUrl": f"{self.url}/{repo.repo_id}/discussions/{pr_num}" if pr_num else None,
        }
        return 200, answer, {}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub = None
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self):
        parts = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        body = self._read_body()
        try:
            status, payload, extra = self.hub.handle(self.command, parts.path, query, self.headers, body)
        except _HTTPError as error:
            status, payload = error.status, {"error": error.message, **error.payload}
            extra = {"X-Error-Message": error.message}
            if error.code:
                extra["X-Error-Code"] = error.code
        except Exception as error:  # a bug in the fake: answer 400 (never 5xx, which the client would retry)
            message = f"fake Hub crashed: {type(error).__name__}: {error}"
            with self.hub.lock:
                self.hub.crashes.append(message)
            status, payload, extra = 400, {"error": message}, {"X-Error-Message": message}
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve
