"""End-to-end checks of the loopback Hub (tests/hub_server.py) with the real huggingface_hub and transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import other_major_python
from hub_server import LoopbackHub, git_blob_sha, loopback_hub, serve_hub, use_hub_endpoint
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

hub = loopback_hub  # the fixture, under a short name

REPO = "user/repo"
MAIN_FILES = {"config.json": '{"value": "main"}', "sub/notes.txt": "shared notes"}
STAGE_CONFIG = '{"value": "stage-1"}'


@dataclass
class TwoBranchRepo:
    main_sha: str
    stage_sha: str


def _write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _read(path: str) -> str:
    return Path(path).read_text()


@pytest.fixture
def two_branch_repo(hub: LoopbackHub, tmp_path: Path) -> TwoBranchRepo:
    """`main` holds MAIN_FILES; `stage-1` branches from it and changes config.json only."""
    api = HfApi()
    api.create_repo(REPO)
    main = api.upload_folder(repo_id=REPO, folder_path=_write(tmp_path / "main", MAIN_FILES))
    api.create_branch(REPO, branch="stage-1")
    stage_folder = _write(tmp_path / "stage", {"config.json": STAGE_CONFIG})
    stage = api.upload_folder(repo_id=REPO, folder_path=stage_folder, revision="stage-1")
    return TwoBranchRepo(main.oid, stage.oid)


def test_each_revision_serves_its_own_files(two_branch_repo: TwoBranchRepo) -> None:
    assert two_branch_repo.main_sha != two_branch_repo.stage_sha
    assert _read(hf_hub_download(REPO, "config.json")) == MAIN_FILES["config.json"]
    assert _read(hf_hub_download(REPO, "config.json", revision="stage-1")) == STAGE_CONFIG
    # The branch inherits the untouched file, and a commit sha pins the old content.
    assert _read(hf_hub_download(REPO, "sub/notes.txt", revision="stage-1")) == MAIN_FILES["sub/notes.txt"]
    assert _read(hf_hub_download(REPO, "config.json", revision=two_branch_repo.main_sha)) == MAIN_FILES["config.json"]

    snapshot = Path(snapshot_download(REPO, revision="stage-1"))
    assert snapshot.name == two_branch_repo.stage_sha
    assert (snapshot / "config.json").read_text() == STAGE_CONFIG
    assert (snapshot / "sub" / "notes.txt").read_text() == MAIN_FILES["sub/notes.txt"]


def test_listing_files_refs_and_info(hub: LoopbackHub, two_branch_repo: TwoBranchRepo) -> None:
    api = HfApi()
    expected = [".gitattributes", "config.json", "sub/notes.txt"]  # a new Hub repo starts with .gitattributes
    assert sorted(api.list_repo_files(REPO)) == expected
    assert sorted(api.list_repo_files(REPO, revision="stage-1")) == expected

    branches = {ref.name: ref.target_commit for ref in api.list_repo_refs(REPO).branches}
    assert branches == {"main": two_branch_repo.main_sha, "stage-1": two_branch_repo.stage_sha}

    info = api.model_info(REPO, revision="stage-1")
    assert info.sha == two_branch_repo.stage_sha
    assert sorted(s.rfilename for s in info.siblings or []) == expected
    top_level = {entry.path for entry in api.list_repo_tree(REPO, revision="stage-1")}
    assert top_level == {".gitattributes", "config.json", "sub"}
    assert hub.files(REPO, "stage-1")["config.json"] == STAGE_CONFIG.encode()


def test_missing_entries_raise_hub_errors(two_branch_repo: TwoBranchRepo) -> None:
    api = HfApi()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json", revision="stage-1")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="no-such-folder"))
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/no-such-repo")


def test_deleting_on_a_branch_leaves_main_alone(hub: LoopbackHub, two_branch_repo: TwoBranchRepo) -> None:
    HfApi().delete_file("sub/notes.txt", repo_id=REPO, revision="stage-1")
    assert "sub/notes.txt" not in hub.files(REPO, "stage-1")
    assert hub.files(REPO, "main")["sub/notes.txt"] == MAIN_FILES["sub/notes.txt"].encode()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "sub/notes.txt", revision="stage-1")


def test_create_is_idempotent_only_with_exist_ok(two_branch_repo: TwoBranchRepo) -> None:
    api = HfApi()
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(REPO)
    assert error.value.response.status_code == 409
    api.create_branch(REPO, branch="stage-1", exist_ok=True)
    with pytest.raises(HfHubHTTPError):
        api.create_branch(REPO, branch="stage-1")


def test_unchanged_upload_makes_no_commit(two_branch_repo: TwoBranchRepo, tmp_path: Path) -> None:
    # The preupload answer carries the remote blob ids, so the client skips files that did not change.
    again = HfApi().upload_folder(repo_id=REPO, folder_path=_write(tmp_path / "again", MAIN_FILES))
    assert again.oid == two_branch_repo.main_sha


def test_raw_http_contract(hub: LoopbackHub, two_branch_repo: TwoBranchRepo) -> None:
    url = f"{hub.endpoint}/{REPO}/resolve/stage-1/config.json"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5) as response:
        assert response.headers["X-Repo-Commit"] == two_branch_repo.stage_sha
        assert response.headers["ETag"] == f'"{git_blob_sha(STAGE_CONFIG.encode())}"'
        assert int(response.headers["Content-Length"]) == len(STAGE_CONFIG)
    ranged = urllib.request.Request(url, headers={"Range": "bytes=2-"})  # a resumed download
    with urllib.request.urlopen(ranged, timeout=5) as response:
        assert (response.status, response.read()) == (206, STAGE_CONFIG[2:].encode())
    with urllib.request.urlopen(f"{hub.endpoint}/api/agent-harnesses", timeout=5) as response:
        assert json.load(response) == {"standardEnvVars": [], "harnesses": {}}


def test_unknown_endpoint_is_a_visible_404() -> None:
    with serve_hub() as server:
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{server.endpoint}/api/not-a-route?x=1", timeout=5)
        assert error.value.code == 404
        assert "unsupported endpoint" in json.load(error.value)["error"]
        assert server.unhandled == ["GET /api/not-a-route?x=1"]
        with pytest.raises(AssertionError):
            server.assert_all_handled()


def test_auto_config_reads_the_requested_branch(hub: LoopbackHub, tmp_path: Path) -> None:
    from transformers import AutoConfig, GPT2Config

    api = HfApi()
    api.create_repo(REPO)
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "main")
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "main")
    # transformers' own push_to_hub creates the branch and commits to it.
    GPT2Config(n_layer=3, n_embd=48, n_head=4).push_to_hub(REPO, revision="stage-1")

    staged = AutoConfig.from_pretrained(REPO, revision="stage-1")
    assert (type(staged).__name__, staged.n_layer, staged.n_embd, staged.n_head) == ("GPT2Config", 3, 48, 4)
    assert AutoConfig.from_pretrained(REPO).n_layer == 2
    assert json.loads(hub.files(REPO, "stage-1")["config.json"])["n_layer"] == 3


def test_patch_is_restored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from transformers.utils import hub as transformers_hub

    # Simulate CI, where HF_HUB_OFFLINE=1 was read at import time, and transformers' import-time copies of it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers_hub, "_is_offline_mode", True, raising=False)  # 4.57 copies the flag
    shared_api = HfApi(endpoint="https://huggingface.co")
    monkeypatch.setattr(transformers_hub, "_hf_api", shared_api, raising=False)  # 5.x shares one HfApi
    before = constants.ENDPOINT
    with serve_hub() as server, use_hub_endpoint(server.endpoint, tmp_path / "cache"):
        assert server.endpoint == constants.ENDPOINT
        assert constants.HF_HUB_OFFLINE is False
        assert transformers_hub.is_offline_mode() is False
        assert "HF_HUB_OFFLINE" not in os.environ
        if hasattr(transformers_hub, "hf_api"):
            assert transformers_hub.hf_api().endpoint == server.endpoint
        assert HfApi().create_repo(REPO).repo_id == REPO
    assert (constants.ENDPOINT, constants.HF_HUB_OFFLINE, os.environ["HF_HUB_OFFLINE"]) == (before, True, "1")
    assert transformers_hub.is_offline_mode() is True
    assert transformers_hub._hf_api is shared_api


_CLIENT_SCRIPT = textwrap.dedent(
    """
    from pathlib import Path
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    api.create_repo("user/sub", exist_ok=True)
    api.create_branch("user/sub", branch="stage-1", exist_ok=True)
    api.upload_file(path_or_fileobj=b"from a subprocess", path_in_repo="x.txt", repo_id="user/sub", revision="stage-1")
    print(Path(hf_hub_download("user/sub", "x.txt", revision="stage-1")).read_text())
    """
)


def _run_client(python: str, hub: LoopbackHub, hf_home: Path) -> str:
    # CI's HF_HUB_OFFLINE=1 must not reach the client: client_env removes it.
    env = hub.client_env(hf_home, base={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = subprocess.run([python, "-c", _CLIENT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_subprocess_client_uses_hf_endpoint(tmp_path: Path) -> None:
    with serve_hub() as server:
        assert _run_client(sys.executable, server, tmp_path / "hf-home") == "from a subprocess"
        assert server.files("user/sub", "stage-1")["x.txt"] == b"from a subprocess"
        server.assert_all_handled()


def test_huggingface_hub_036_client(tmp_path: Path) -> None:
    """The transformers 4.57 environment pairs with huggingface_hub 0.36."""
    with serve_hub() as server:
        assert _run_client(str(other_major_python()), server, tmp_path / "hf-home") == "from a subprocess"
        server.assert_all_handled()


def test_server_stops_by_itself() -> None:
    with serve_hub(max_lifetime_s=0.2) as server:
        time.sleep(0.6)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{server.endpoint}/api/agent-harnesses", timeout=2)
