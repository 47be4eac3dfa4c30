"""Models by name: Hugging Face repo ids through the HF cache (laid out as huggingface_hub lays it out), ollama
names and GGUF refused with advice, the served name. Nothing here reaches the network."""
from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import huggingface_hub
from qwen36 import LLM
from qwen36.checkpoint import Checkpoint
from qwen36.config import GGUFError, load_config
from qwen36.hub import ModelNotFoundError, model_name, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(cache: Path, repo: str, src: Path, commit: str = COMMIT) -> Path:
    """Put checkpoint `src` into `cache` as huggingface_hub does: models--Owner--Name/blobs/<sha256> holding the
    bytes, snapshots/<commit>/<file> relative symlinks to them, refs/main naming the commit."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    blobs, snapshot = storage / "blobs", storage / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection is recorded (and fails)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_repo_id_resolves_to_the_cached_snapshot_and_loads(checkpoint, offline_cache, no_network):
    src = checkpoint("ratio2", seed=0)
    snapshot = hf_cache(offline_cache, "Owner/Name", src)
    assert snapshot.joinpath("config.json").is_symlink()
    for name in ("Owner/Name", "Owner/Name@main", f"Owner/Name@{COMMIT}", "https://huggingface.co/Owner/Name"):
        assert resolve_model(name) == snapshot, name
    assert load_config(snapshot).text.hidden_size == 64
    ids = list(range(1, 30))
    float32 = dict(dtype="float32", quantization=None)
    assert torch.equal(LLM(resolve_model("Owner/Name"), **float32).logits(ids), LLM(src, **float32).logits(ids))
    assert model_name("Owner/Name", snapshot) == "Name"
    assert model_name(str(snapshot), snapshot) == "Name"              # a snapshot path: the repo's name, not the hash
    assert no_network == []


def test_hf_home_is_honoured(checkpoint, tmp_path, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hf_cache(tmp_path / "home" / "hub", "Owner/Name", checkpoint("ratio2", seed=0))
    assert resolve_model("Owner/Name") == snapshot


def test_not_cached_is_a_clear_error_at_once_without_network(checkpoint, offline_cache, no_network):
    hf_cache(offline_cache, "Owner/Other", checkpoint("ratio2", seed=0))
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("Owner/Name")
    assert time.perf_counter() - start < 1.0
    msg = str(e.value)
    assert "no such local path" in msg and "hf download Owner/Name --local-dir DIR" in msg and "HF_HUB_OFFLINE" in msg
    assert no_network == []


def test_incomplete_snapshot_is_not_used(checkpoint, offline_cache, no_network):
    snapshot = hf_cache(offline_cache, "Owner/Name", checkpoint("ratio2", seed=0))
    next(snapshot.glob("model-*.safetensors")).unlink()                # an interrupted download
    with pytest.raises(ModelNotFoundError, match="not \\(completely\\) in the Hugging Face cache"):
        resolve_model("Owner/Name")


def test_download_when_the_hub_is_reachable(checkpoint, tmp_path, monkeypatch):
    """Online and not cached: the repo is downloaded into the cache (huggingface_hub's snapshot_download, faked
    here by laying the files out as it would) and the snapshot returned; a GGUF-only repo is refused before any
    download."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    src, calls = checkpoint("ratio2", seed=0), []
    files = {"Owner/Name": ["config.json", "model.safetensors.index.json"],
             "Owner/Name-GGUF": ["README.md", "Name-Q4_K_M.gguf", "Name-Q8_0.gguf"]}
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, revision=None: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=f) for f in files[repo]]))

    def download(repo, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None, **kw):
        calls.append((repo, revision, Path(cache_dir), local_files_only))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(hf_cache(Path(cache_dir), repo, src))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_model("Owner/Name@main") == cache / "models--Owner--Name" / "snapshots" / COMMIT
    assert calls == [("Owner/Name", "main", cache, False)]
    with pytest.raises(GGUFError) as e:
        resolve_model("Owner/Name-GGUF")
    assert "Qwen/Qwen3.6-35B-A3B-FP8" in str(e.value) and len(calls) == 1


@pytest.mark.parametrize("name", ["qwen3.6:35b", "qwen3.6:35b-a3b-q4_K_M", "hf.co/unsloth/Qwen3.6-35B-A3B-GGUF:Q4_K_M"])
def test_ollama_names_point_to_the_repo_id(name, offline_cache, no_network):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(name)
    assert "ollama" in str(e.value) and "Qwen/Qwen3.6-35B-A3B" in str(e.value)


def test_local_paths(checkpoint, tmp_path, offline_cache):
    src = checkpoint("ratio2", seed=0)
    assert resolve_model(str(src)) == src and resolve_model(src) == src
    assert model_name(str(src), src) == src.name
    with pytest.raises(ModelNotFoundError, match="no such local path"):
        resolve_model(str(tmp_path / "nothing" / "here"))
    gguf = tmp_path / "ggufs"
    gguf.mkdir()
    (gguf / "Qwen3.6-35B-A3B-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(60))
    for p in (gguf, gguf / "Qwen3.6-35B-A3B-Q4_K_M.gguf"):
        with pytest.raises(GGUFError, match="Qwen/Qwen3.6-35B-A3B-FP8"):
            resolve_model(p)
