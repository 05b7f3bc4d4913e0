"""A loopback, in-memory Hugging Face Hub for tests (standard library only).

Serves the subset of the Hub HTTP API that `huggingface_hub` (2.4, and 0.36 as paired with transformers 4.57)
uses to create repos and branches, commit files, list them and download them, on 127.0.0.1 with an OS-assigned
port. Every commit gets its own sha and a full snapshot of the branch, so reading a branch or a commit sha gives
exactly the files committed there. Nothing touches the disk: state lives in the server object.

Usage in a test::

    with serve_hub() as hub, use_hub_endpoint(hub.endpoint, tmp_path / "hf-cache"):
        HfApi().create_repo("user/repo")
        HfApi().upload_folder(repo_id="user/repo", folder_path=folder)
        AutoConfig.from_pretrained("user/repo", revision="stage-1")
    hub.assert_all_handled()

or the `loopback_hub` fixture below (server + in-process patch + temporary cache), which a conftest can expose
with ``from hub_server import loopback_hub  # noqa: F401``.

Pointing clients at the server
------------------------------
`huggingface_hub` reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` once, at import time, and several objects keep the
value they saw, so setting the environment variables inside a test is not enough. Two ways work:

* In process: `use_hub_endpoint(endpoint, cache_dir)` patches, and restores on exit,
  `huggingface_hub.constants` (`ENDPOINT`, `HUGGINGFACE_CO_URL_TEMPLATE`, `HF_HUB_OFFLINE`, `HF_HUB_CACHE`,
  telemetry, agent-registry cache path), the module-level `huggingface_hub.hf_api.api` whose bound methods back
  `huggingface_hub.create_repo` & co., 0.36's copy of the URL template in `file_download`, and transformers'
  caches (5.x's shared `HfApi` in `transformers.utils.hub._hf_api`, 4.57's `_is_offline_mode` and endpoint
  strings). Verified for `HfApi`, `hf_hub_download`, `snapshot_download` and `AutoConfig.from_pretrained`.
  It also sets `HF_ENDPOINT` and clears the offline variables in `os.environ` for child processes.
  Not covered: `HfFileSystem` instances cached by fsspec, and `HF_MODULES_CACHE` (remote code of
  `trust_remote_code` models is still written under the real `HF_HOME`): use a subprocess for those.
* In a subprocess: `hub.client_env(hf_home)` returns an environment with `HF_ENDPOINT` set, `HF_HOME` and
  `HF_HUB_CACHE` in a temporary folder, and `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` / `HF_DATASETS_OFFLINE`
  removed (CI runs with `HF_HUB_OFFLINE=1`; the loopback Hub is the one place the clients may go online). This is
  the robust way, and the one to use for the other virtualenv (`.venv457` or `.venv-tf4`: huggingface_hub 0.36).

Limits, on purpose: every file is uploaded as a "regular" (base64 in the commit payload) file, never LFS/Xet, so
keep test checkpoints small; no pull requests, auth, pagination or gated repos. Requests the server does not know
answer 404 with a JSON error, are logged, and are listed in `hub.unhandled` (see `assert_all_handled`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

logger = logging.getLogger(__name__)

DEFAULT_USER = "user"
DEFAULT_BRANCH = "main"
# Content of the first commit of a repo created on the real Hub (shortened): clients see one file in a new repo.
INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
REPO_TYPE_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as ETag and `oid` for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubError(Exception):
    """An error answered to the client; `code` becomes `X-Error-Code`, which huggingface_hub maps to exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, bytes]  # full snapshot of the tree at this commit
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """Branch, tag or full commit sha -> commit, as the Hub does (no short shas)."""
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and _SHA_RE.match(revision) and revision in self.commits:
            sha = revision
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]


class HubStore:
    """All repos of one server. Every public method takes the lock: handler threads run concurrently."""

    def __init__(self, default_user: str = DEFAULT_USER) -> None:
        self.default_user = default_user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.unhandled: list[str] = []
        self.lock = threading.RLock()
        self._counter = 0

    def get(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> tuple[Repo, bool]:
        """Returns (repo, created). A new repo holds one commit with `.gitattributes`, like on the Hub."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return self.repos[(repo_type, repo_id)], False
            repo = Repo(repo_type, repo_id, private, _iso_now())
            self.repos[(repo_type, repo_id)] = repo
            commit = self._new_commit(repo, None, {".gitattributes": INITIAL_GITATTRIBUTES}, "initial commit", "")
            repo.branches[DEFAULT_BRANCH] = commit.sha
            return repo, True

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.get(repo_type, repo_id)
            del self.repos[(repo_type, repo_id)]

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], title: str, message: str) -> Commit:
        # The counter makes shas distinct even for identical trees (e.g. the same upload to two branches).
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{self._counter}\0{title}".encode())
        for path in sorted(files):
            digest.update(f"\0{path}\0{git_blob_sha(files[path])}".encode())
        commit = Commit(digest.hexdigest(), parent, files, title, message, _iso_now())
        repo.commits[commit.sha] = commit
        return commit

    def commit(self, repo_type: str, repo_id: str, branch: str, lines: list[dict[str, Any]]) -> Commit:
        """Apply an NDJSON commit payload (header, file, deletedFile, deletedFolder) on top of `branch`."""
        with self.lock:
            repo = self.get(repo_type, repo_id)
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to existing branches)", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            header = next((line["value"] for line in lines if line.get("key") == "header"), {})
            parent = header.get("parentCommit")
            if parent is not None and parent != head.sha:
                raise HubError(412, f"parentCommit {parent} is not the head of {branch} ({head.sha})")
            files = dict(head.files)
            for line in lines:
                _apply_operation(files, line.get("key"), line.get("value", {}))
            commit = self._new_commit(repo, head.sha, files, header.get("summary", ""), header.get("description", ""))
            repo.branches[branch] = commit.sha
            return commit

    def create_ref(self, repo_type: str, repo_id: str, kind: str, name: str, start: str | None) -> None:
        """Create a branch or tag at `start` (default: head of main); 409 if it exists."""
        with self.lock:
            repo = self.get(repo_type, repo_id)
            refs = repo.branches if kind == "branch" else repo.tags
            if name in refs:
                raise HubError(409, f"{kind} {name} already exists")
            refs[name] = repo.resolve(start or DEFAULT_BRANCH).sha

    def delete_branch(self, repo_type: str, repo_id: str, name: str) -> None:
        with self.lock:
            repo = self.get(repo_type, repo_id)
            if name not in repo.branches or name == DEFAULT_BRANCH:
                raise HubError(404 if name not in repo.branches else 403, f"Cannot delete branch {name}")
            del repo.branches[name]

    def snapshot(self, repo_type: str, repo_id: str, revision: str) -> tuple[Repo, Commit]:
        with self.lock:
            repo = self.get(repo_type, repo_id)
            return repo, repo.resolve(revision)


def _apply_operation(files: dict[str, bytes], key: str | None, value: dict[str, Any]) -> None:
    path = value.get("path", "")
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            raise HubError(400, f"Unsupported encoding {value.get('encoding')}")
        files[path] = base64.b64decode(value["content"])
    elif key == "deletedFile":
        if files.pop(path, None) is None:
            raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
    elif key == "deletedFolder":
        prefix = path.rstrip("/") + "/"
        for name in [name for name in files if name.startswith(prefix)]:
            del files[name]
    elif key != "header":
        # lfsFile (and anything newer) can't happen: preupload always answers "regular".
        raise HubError(400, f"Loopback hub does not support commit operation {key!r}")


def _tree_entries(files: Mapping[str, bytes], folder: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries of `folder` ('' = root) as the tree API lists them: files, then directories."""
    prefix = f"{folder}/" if folder else ""
    below = sorted(path for path in files if path.startswith(prefix))
    if folder and not below:
        raise HubError(404, f"Folder {folder} not found", "EntryNotFound")
    entries, dirs = [], set()
    for path in below:
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            dirs.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append({"type": "file", "path": path, "size": len(files[path]), "oid": git_blob_sha(files[path])})
    for path in sorted(dirs):
        oid = hashlib.sha1("\0".join(p for p in below if p.startswith(path + "/")).encode()).hexdigest()
        entries.append({"type": "directory", "path": path, "oid": oid, "size": 0})
    return entries


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


_TYPES = r"(?P<type>model|dataset|space)s"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"  # clients quote revisions with safe="" ("refs/pr/1" -> one segment)
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), handler)
    for method, pattern, handler in [
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("DELETE", r"^/api/repos/delete$", "delete_repo"),
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("GET", r"^/api/agent-harnesses$", "agent_harnesses"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("GET", rf"^/api/{_TYPES}/{_REPO}$", "repo_info"),
        ("GET", rf"^/api/{_TYPES}/{_REPO}/revision/{_REV}$", "repo_info"),
        ("GET", rf"^/api/{_TYPES}/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?$", "tree"),
        ("POST", rf"^/api/{_TYPES}/{_REPO}/paths-info/{_REV}$", "paths_info"),
        ("GET", rf"^/api/{_TYPES}/{_REPO}/refs$", "refs"),
        ("GET", rf"^/api/{_TYPES}/{_REPO}/commits/{_REV}$", "commits"),
        ("POST", rf"^/api/{_TYPES}/{_REPO}/preupload/{_REV}$", "preupload"),
        ("POST", rf"^/api/{_TYPES}/{_REPO}/commit/{_REV}$", "commit"),
        ("POST", rf"^/api/{_TYPES}/{_REPO}/branch/{_REV}$", "create_branch"),
        ("DELETE", rf"^/api/{_TYPES}/{_REPO}/branch/{_REV}$", "delete_branch"),
        ("POST", rf"^/api/{_TYPES}/{_REPO}/tag/{_REV}$", "create_tag"),
        ("GET", rf"^/(?:(?P<type>dataset|space)s/)?{_REPO}/resolve/{_REV}/(?P<path>.+)$", "resolve"),
    ]
]


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes a request to `HubApi`; HTTP/1.0 so that every connection closes and shutdown never waits on one."""

    server: HubHTTPServer
    timeout = 30  # seconds a silent client may hold a handler thread
    max_body_bytes = 512 * 1024 * 1024

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("loopback hub: " + format, *args)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        try:
            body = self._read_body()
            response = self._route(method, url.path, parse_qs(url.query), body)
        except HubError as err:
            response = _error_response(err)
        except Exception as err:  # a server bug must reach the client as a visible error, not a hang
            logger.exception("loopback hub: %s %s failed", method, self.path)
            self._record(f"ERROR {method} {self.path}: {err!r}")
            response = _error_response(HubError(500, f"Loopback hub internal error: {err!r}"))
        if method == "GET" and "Accept-Ranges" in response.headers:
            response = _apply_range(response, self.headers.get("Range"))
        self._send(method, response)

    def _record(self, problem: str) -> None:
        with self.server.store.lock:
            self.server.store.unhandled.append(problem)

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Response:
        route_method = "GET" if method == "HEAD" else method
        for allowed, pattern, name in _ROUTES:
            match = pattern.match(path) if allowed == route_method else None
            if match:
                params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                params.setdefault("type", "model")
                return getattr(HubApi(self.server.store, self.server.endpoint), name)(params, query, body)
        message = f"Loopback hub: unsupported endpoint {method} {self.path}"
        logger.warning(message)
        self._record(f"{method} {self.path}")
        return json_response({"error": message}, 404, {"X-Error-Message": message})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.max_body_bytes:
            raise HubError(413, f"Request body of {length} bytes exceeds the loopback limit")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:  # bounded: each chunk is counted against max_body_bytes
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return b"".join(chunks)
            total += size
            if total > self.max_body_bytes:
                raise HubError(413, "Chunked request body exceeds the loopback limit")
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _send(self, method: str, response: Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            # Headers are latin-1 on the wire; a non-ASCII file name in an error message must not crash the reply.
            self.send_header(name, value.encode("ascii", "replace").decode().replace("\n", " "))
        if "Content-Length" not in response.headers:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)


def _apply_range(response: Response, range_header: str | None) -> Response:
    """Serve `Range: bytes=start-[end]` (resumed downloads) with a 206; anything else gets the whole body."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", (range_header or "").strip())
    if response.status != 200 or match is None:
        return response
    size = len(response.body)
    start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
    if start > end:
        return Response(416, b"", {"Content-Range": f"bytes */{size}"})
    headers = response.headers | {"Content-Range": f"bytes {start}-{end}/{size}"}
    return Response(206, response.body[start : end + 1], headers)


def _error_response(err: HubError) -> Response:
    headers = {"X-Error-Message": err.message}
    if err.code:
        headers["X-Error-Code"] = err.code
    if err.commit:  # lets hf_hub_download cache "this file does not exist at this commit"
        headers["X-Repo-Commit"] = err.commit
    return json_response({"error": err.message}, err.status, headers)


class HubApi:
    """Endpoint implementations. Each takes the route's path parameters, the query and the raw body."""

    def __init__(self, store: HubStore, endpoint: str) -> None:
        self.store, self.endpoint = store, endpoint

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{REPO_TYPE_PREFIXES[repo_type]}{repo_id}"

    def create_repo(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.store.default_user}/{payload['name']}"
        private = payload.get("private") or payload.get("visibility") == "private"
        _, created = self.store.create_repo(repo_type, repo_id, bool(private))
        url = self._repo_url(repo_type, repo_id)
        if not created:
            return json_response({"error": "You already created this repo", "url": url}, 409)
        return json_response({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def delete_repo(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.store.default_user}/{payload['name']}"
        self.store.delete_repo(payload.get("type") or "model", repo_id)
        return json_response({})

    def whoami(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        user = self.store.default_user
        auth = {"accessToken": {"displayName": "loopback", "role": "write"}}
        return json_response({"type": "user", "name": user, "fullname": user, "orgs": [], "auth": auth})

    def agent_harnesses(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        return json_response({"standardEnvVars": [], "harnesses": {}})

    def validate_yaml(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        return json_response({"errors": [], "warnings": []})

    def repo_info(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        repo, commit = self.store.snapshot(params["type"], params["repo"], params.get("rev", DEFAULT_BRANCH))
        files = sorted(commit.files.items())
        siblings = [{"rfilename": path, "size": len(data), "blobId": git_blob_sha(data)} for path, data in files]
        author = repo.repo_id.split("/")[0]
        info = {"_id": repo.repo_id, "id": repo.repo_id, "author": author, "sha": commit.sha, "private": repo.private}
        info |= {"lastModified": commit.date, "createdAt": repo.created_at, "siblings": siblings, "tags": []}
        info |= {"disabled": False, "gated": False, "downloads": 0, "likes": 0}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return json_response(info)

    def tree(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        _, commit = self.store.snapshot(params["type"], params["repo"], params["rev"])
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        return json_response(_tree_entries(commit.files, params.get("path", "").strip("/"), recursive))

    def paths_info(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        _, commit = self.store.snapshot(params["type"], params["repo"], params["rev"])
        wanted = parse_qs(body.decode()).get("paths", [])
        entries = {entry["path"]: entry for entry in _tree_entries(commit.files, "", recursive=True)}
        return json_response([entries[path] for path in wanted if path in entries])

    def refs(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        with self.store.lock:
            repo = self.store.get(params["type"], params["repo"])

            def refs_of(kind: str, refs: dict[str, str]) -> list[dict[str, str]]:
                return [{"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha} for name, sha in refs.items()]

            data = {"branches": refs_of("heads", repo.branches), "tags": refs_of("tags", repo.tags), "converts": []}
        return json_response(data | {"pullRequests": []})

    def commits(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        with self.store.lock:
            repo, commit = self.store.snapshot(params["type"], params["repo"], params["rev"])
            history: list[Commit] = [commit]
            while history[-1].parent is not None:
                history.append(repo.commits[history[-1].parent])
        authors = [{"user": repo.repo_id.split("/")[0]}]
        items = [{"id": c.sha, "title": c.title, "message": c.message, "date": c.date} for c in history]
        return json_response([item | {"authors": authors} for item in items])

    def preupload(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        if query.get("create_pr"):
            raise HubError(400, "Loopback hub does not support create_pr")
        _, commit = self.store.snapshot(params["type"], params["repo"], params["rev"])
        files = json.loads(body or b"{}").get("files", [])

        def mode(path: str) -> dict[str, Any]:
            # `oid` of the current file lets the client skip unchanged files, as on the Hub.
            data = commit.files.get(path)
            oid = git_blob_sha(data) if data is not None else None
            return {"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid}

        return json_response({"files": [mode(item["path"]) for item in files], "commitOid": commit.sha})

    def commit(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        if query.get("create_pr"):
            raise HubError(400, "Loopback hub does not support create_pr")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        commit = self.store.commit(params["type"], params["repo"], params["rev"], lines)
        url = f"{self._repo_url(params['type'], params['repo'])}/commit/{commit.sha}"
        return json_response({"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None})

    def create_branch(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        start = json.loads(body or b"{}").get("startingPoint")
        self.store.create_ref(params["type"], params["repo"], "branch", params["rev"], start)
        return json_response({})

    def delete_branch(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        self.store.delete_branch(params["type"], params["repo"], params["rev"])
        return json_response({})

    def create_tag(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        tag = json.loads(body or b"{}")["tag"]
        self.store.create_ref(params["type"], params["repo"], "tag", tag, params["rev"])
        return json_response({})

    def resolve(self, params: dict[str, str], query: dict[str, list[str]], body: bytes) -> Response:
        _, commit = self.store.snapshot(params["type"], params["repo"], params["rev"])
        data = commit.files.get(params["path"])
        if data is None:
            raise HubError(404, f"Entry not found: {params['path']}", "EntryNotFound", commit=commit.sha)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha(data)}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
        }
        return Response(200, data, headers)


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # handler threads never keep the test process alive
    store: HubStore
    endpoint: str


@dataclass
class LoopbackHub:
    """A running server: its `endpoint` (http://127.0.0.1:PORT) and its in-memory `store`."""

    endpoint: str
    store: HubStore

    @property
    def unhandled(self) -> list[str]:
        with self.store.lock:
            return list(self.store.unhandled)

    def assert_all_handled(self) -> None:
        """Fail if a client called an endpoint the loopback Hub does not implement, or one that crashed."""
        assert not self.unhandled, f"Loopback hub got unsupported requests: {self.unhandled}"

    def client_env(self, hf_home: str | os.PathLike[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a client subprocess: online, pointed at this server, with its own HF_HOME."""
        return hub_client_env(self.endpoint, hf_home, base)

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> dict[str, bytes]:
        """Server-side view of a revision, for asserting what a client pushed."""
        _, commit = self.store.snapshot(repo_type, repo_id, revision)
        return dict(commit.files)


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_client_env(
    endpoint: str, hf_home: str | os.PathLike[str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Copy of `base` (default os.environ) for a subprocess that talks to `endpoint` only."""
    env = {key: value for key, value in (os.environ if base is None else base).items() if key not in _OFFLINE_VARS}
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_CACHE", "HF_HUB_CACHE"):
        env.pop(key, None)  # a cache or token elsewhere would leak between the test and the user's setup
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(Path(hf_home) / "hub")}
    return env | {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextlib.contextmanager
def serve_hub(max_lifetime_s: float = 600.0, default_user: str = DEFAULT_USER) -> Iterator[LoopbackHub]:
    """Run a loopback Hub in a daemon thread; it stops on exit, or by itself after `max_lifetime_s`."""
    server = HubHTTPServer(("127.0.0.1", 0), HubRequestHandler)
    server.store = HubStore(default_user)
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    # A forgotten server (e.g. a test killed mid-way under xdist) must not serve forever.
    watchdog = threading.Timer(max_lifetime_s, _stop, args=(server,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield LoopbackHub(server.endpoint, server.store)
    finally:
        watchdog.cancel()
        _stop(server)
        thread.join(timeout=5)


def _stop(server: HubHTTPServer) -> None:
    """Stop serving and close the listening socket, so that clients get "connection refused", not a hang."""
    server.shutdown()
    server.server_close()


def _hub_targets(endpoint: str, cache_dir: Path) -> list[tuple[Any, str, Any]]:
    """(object, attribute, value) for every place in huggingface_hub that keeps import-time settings."""
    from huggingface_hub import constants, file_download, hf_api

    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    return [
        (constants, "ENDPOINT", endpoint),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", template),
        (constants, "HF_HUB_OFFLINE", False),
        (constants, "HF_HUB_CACHE", str(cache_dir)),
        (constants, "HF_HUB_DISABLE_TELEMETRY", True),
        (constants, "AGENT_HARNESSES_PATH", str(cache_dir / ".agent_harnesses.json")),
        (file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template),  # 0.36 binds its own copy
        (hf_api.api, "endpoint", endpoint),  # backs huggingface_hub.create_repo, upload_folder, ...
    ]


def _transformers_targets(module: Any, endpoint: str, offline: bool) -> list[tuple[Any, str, Any]]:
    """The same for `transformers.utils.hub` (5.x shares one HfApi; 4.57 copies the endpoint and offline flag)."""
    return [
        (module, "_hf_api", None),  # rebuilt lazily from the current constants.ENDPOINT
        (module, "_is_offline_mode", offline),
        (module, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", endpoint),
        (module, "HUGGINGFACE_CO_PREFIX", endpoint + "/{model_id}/resolve/{revision}/{filename}"),
    ]


def _apply(targets: list[tuple[Any, str, Any]]) -> None:
    for obj, name, value in targets:
        if hasattr(obj, name):  # attributes differ between versions: patch what exists
            setattr(obj, name, value)


@contextlib.contextmanager
def use_hub_endpoint(endpoint: str, cache_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Point this process's huggingface_hub / transformers at `endpoint`, online, caching under `cache_dir`."""
    from huggingface_hub import constants

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    saved_env = {key: os.environ.get(key) for key in (*_OFFLINE_VARS, "HF_ENDPOINT")}
    transformers_hub = sys.modules.get("transformers.utils.hub")
    targets = _hub_targets(endpoint, cache)
    if transformers_hub is not None:
        targets += _transformers_targets(transformers_hub, endpoint, offline=False)
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets if hasattr(obj, name)]
    try:
        for key in _OFFLINE_VARS:
            os.environ.pop(key, None)
        os.environ["HF_ENDPOINT"] = endpoint
        _apply(targets)
        _reset_hub_sessions()
        yield
    finally:
        _apply(list(reversed(saved)))
        _restore_env(saved_env)
        _reset_hub_sessions()
        late = sys.modules.get("transformers.utils.hub")
        if transformers_hub is None and late is not None:
            # transformers was first imported inside: give it the settings it would have had outside.
            _apply(_transformers_targets(late, constants.ENDPOINT, constants.HF_HUB_OFFLINE))


def _reset_hub_sessions() -> None:
    """huggingface_hub 0.x (transformers 4.x's) caches its HTTP sessions, and one made offline keeps refusing every
    request: new ones are made with the settings of the moment."""
    from huggingface_hub import utils

    getattr(utils, "reset_sessions", lambda: None)()


def _restore_env(saved: Mapping[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def loopback_hub(tmp_path: Path) -> Iterator[LoopbackHub]:
    """A fresh loopback Hub with this process pointed at it (cache in tmp_path); fails on unsupported requests."""
    with serve_hub() as hub, use_hub_endpoint(hub.endpoint, tmp_path / "hf-cache"):
        yield hub
    hub.assert_all_handled()


__all__ = [
    "HubStore",
    "LoopbackHub",
    "git_blob_sha",
    "hub_client_env",
    "loopback_hub",
    "serve_hub",
    "use_hub_endpoint",
]
