"""`lull up --model PATH|ID` (controller/assembly/local_model.py, workers/model_fetch.py): a
local folder is used where it is; a Hugging Face id is found in Hugging Face's cache or in
Lull's, or downloaded once before anything starts; offline, the error names the fix and the
token never shows. No test reaches the Hub: HF_HUB_OFFLINE stands in for the network this
machine does not have, and the caches are folders built here in their real layouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.assembly.local_model import local_model, model_reference
from controller.cli.main import build_parser
from controller.cli.platform import overrides_of
from proto.config import ConfigError
from tests.k8s_validation import ROOT
from workers.model_fetch import ModelFetchError

TOKEN = "hf_do-not-print-me-42"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No Hub and empty caches: huggingface_hub reads these settings when imported, so they
    are set on its constants too."""
    from huggingface_hub import constants

    hub = tmp_path / "hf-hub"
    for name, value in {"HF_HUB_OFFLINE": True, "HF_HUB_CACHE": str(hub)}.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("LULL_MODEL_CACHE", str(tmp_path / "lull-models"))
    return tmp_path


def model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0")
    return folder


def test_a_local_folder_is_used_where_it_is(offline, monkeypatch):
    folder = model_folder(offline / "my-model")
    monkeypatch.chdir(offline)
    assert model_reference("my-model") == str(folder)  # relative: made absolute for every Ray worker
    assert local_model(model_reference("my-model"), echo=pytest.fail) == str(folder)
    with pytest.raises(ConfigError, match="no config.json"):
        local_model(str(offline))
    with pytest.raises(ConfigError, match="pvc:// models are the Helm chart's"):
        local_model("pvc://store/model")


def test_the_model_flag_takes_a_folder_or_a_hugging_face_id():
    def given(text: str) -> dict:
        return overrides_of(build_parser().parse_args(["up", "--model", text]))

    assert given("Qwen/Qwen2.5-0.5B-Instruct") == {"model": {"path": "hf://Qwen/Qwen2.5-0.5B-Instruct"}}
    assert given("hf://Qwen/Qwen2.5-0.5B-Instruct@v2") == {"model": {"path": "hf://Qwen/Qwen2.5-0.5B-Instruct@v2"}}
    assert given("org/name@abc123") == {"model": {"path": "hf://org/name@abc123"}}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--model", "not a model"])


def test_offline_an_hf_id_fails_before_anything_starts_naming_the_fix(offline, capsys):
    with pytest.raises(ModelFetchError) as failed:
        local_model("hf://org/missing@main")
    message = str(failed.value)
    assert "cannot download hf://org/missing@main" in message and "HF_HUB_OFFLINE is set" in message
    assert "lull up --model /path/to/model" in message and "unset HF_HUB_OFFLINE" in message
    assert TOKEN not in message + capsys.readouterr().out
    assert not (offline / "lull-models" / "hf" / "org" / "missing" / "main" / ".lull-complete").exists()


def test_without_a_network_the_error_says_the_hub_cannot_be_reached(offline, monkeypatch):
    """No network here to lose: the listing fails as httpx fails on a name it cannot resolve."""
    import httpx
    import huggingface_hub

    class Api:
        def list_repo_files(self, repo, revision):
            raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with pytest.raises(ModelFetchError, match=r"huggingface.co cannot be reached \(\[Errno -2\].*To fix: let it reach"):
        local_model("hf://org/missing")


def test_lull_up_offline_exits_with_the_fix_and_starts_nothing(tmp_path):
    """The whole command, as a user runs it (a child process: huggingface_hub reads
    HF_HUB_OFFLINE from its environment)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_TOKEN": TOKEN, "LULL_MODEL_CACHE": str(tmp_path / "models"), "LULL_STATE_DIR": str(tmp_path / "state")}
    run = subprocess.run([sys.executable, "-c", "import sys; from controller.cli.main import main; sys.exit(main())",
                          "up", "--model", "org/missing"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "lull up: error: cannot download hf://org/missing@main" in run.stderr
    assert "To fix:" in run.stderr and "lull up --model /path/to/model" in run.stderr
    assert "downloading hf://org/missing@main" in run.stdout  # progress before the attempt
    assert TOKEN not in run.stdout + run.stderr
    assert not (tmp_path / "state").exists()  # no Ray, no Redis, no state file


def test_a_model_in_lulls_cache_is_used_without_download(offline, capsys):
    folder = model_folder(offline / "lull-models" / "hf" / "org" / "name" / "v1")
    (folder / ".lull-complete").touch()
    assert local_model("hf://org/name@v1") == str(folder)
    assert f"model already in {folder}" in capsys.readouterr().out


def test_a_model_in_the_hugging_face_cache_is_used_without_download(offline, capsys):
    """huggingface_hub's cache layout: refs/REVISION names the commit whose snapshot holds the files."""
    repo = offline / "hf-hub" / "models--org--name"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = model_folder(repo / "snapshots" / commit)
    assert Path(local_model("hf://org/name")) == snapshot
    assert "found in the Hugging Face cache" in capsys.readouterr().out
    assert not (offline / "lull-models").exists()
    (snapshot / "model.safetensors").unlink()  # a snapshot without weights is no model: download
    with pytest.raises(ModelFetchError):
        local_model("hf://org/name")


def test_a_download_lands_once_with_its_marker(offline, monkeypatch, capsys):
    """The Hub is faked (no network here): a listing and a snapshot_download that writes it."""
    import huggingface_hub

    calls = []

    class Api:
        def list_repo_files(self, repo, revision):
            return ["config.json", "model.safetensors"]

    def snapshot_download(repo, *, revision, local_dir, allow_patterns):
        calls.append((repo, revision))
        model_folder(Path(local_dir))
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr("controller.assembly.local_model._in_hf_cache", lambda repo, revision: None)
    folder = Path(local_model("hf://org/name@r1"))
    assert folder == offline / "lull-models" / "hf" / "org" / "name" / "r1" and (folder / ".lull-complete").exists()
    assert local_model("hf://org/name@r1") == str(folder) and calls == [("org/name", "r1")]
    out = capsys.readouterr().out
    assert "downloading hf://org/name@r1" in out and f"model downloaded into {folder}" in out and TOKEN not in out
