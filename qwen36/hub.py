"""Where a model comes from: a local directory, or a Hugging Face repo id resolved through the HF cache.

    resolve_model("path/to/Qwen3.6-35B-A3B")        -> that path (refused at once if it is GGUF)
    resolve_model("Qwen/Qwen3.6-35B-A3B")           -> the snapshot in the HF cache, downloaded first if need be
    resolve_model("Qwen/Qwen3.6-35B-A3B@<revision>")   a branch, tag or commit
    model_name(name_or_path, resolved)              -> "Qwen3.6-35B-A3B" (the name a server serves it as)

The cache is huggingface_hub's ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), read at
call time; with HF_HUB_OFFLINE=1 nothing touches the network. Anything that cannot be resolved raises
ModelNotFoundError (a ValueError) saying what was looked for and how to get it; a GGUF file or repo raises
config.GGUFError (also a ValueError) saying what qwen36 reads instead.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .config import OFFICIAL_REPOS, READ_INSTEAD, GGUFError, check_not_gguf, gguf_advice

# owner/name as the Hub allows them (letters, digits, '-', '_', '.'; no '--' or '..'), optionally @revision
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]+))?$")
HF_URL = re.compile(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/")
# what a checkpoint directory needs from a repo (the weights, configs, tokenizer, chat template)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
TRUE = ("1", "ON", "YES", "TRUE")


class ModelNotFoundError(ValueError):
    """The model given is neither a local checkpoint nor a Hugging Face repo qwen36 can get."""


def how_to_get(repo: str = OFFICIAL_REPOS[0]) -> str:
    also = f" (or {OFFICIAL_REPOS[1]}, the FP8 one)" if repo == OFFICIAL_REPOS[0] else ""
    return (f"download it with `hf download {repo} --local-dir DIR` and give DIR, or give the repo id {repo}{also} "
            f"with the Hub reachable")


def parse_repo_id(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `name` is shaped like a Hugging Face repo id (also as an hf.co URL)."""
    m = REPO_ID.match(HF_URL.sub("", name).removesuffix("/"))
    if m is None or "--" in m.group("repo") or ".." in m.group("repo"):
        return None
    return m.group("repo"), m.group("rev")


def resolve_model(name_or_path: str | os.PathLike, progress: bool = True) -> Path:
    """A checkpoint directory for `name_or_path`: an existing local path as it is (a GGUF file, or a directory of
    .gguf files without config.json, raises GGUFError at once); else a repo id `owner/name[@revision]`: its
    snapshot in the HF cache if complete there, else downloaded into it (huggingface_hub's progress bars
    unless progress=False) where the Hub is reachable and HF_HUB_OFFLINE is not set. Raises
    ModelNotFoundError (a ValueError) when neither works, saying how to get the model."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        check_not_gguf(path)
        return path
    if text.lower().endswith(".gguf"):
        raise ModelNotFoundError(f"{text}: no such file; and GGUF (llama.cpp's format) is not what qwen36 reads. "
                                 f"{READ_INSTEAD}")
    parsed = parse_repo_id(text)
    if parsed is None:
        raise ModelNotFoundError(_not_a_name(text))
    repo, revision = parsed
    snapshot = _cached_snapshot(repo, revision)
    if snapshot is not None:
        check_not_gguf(snapshot)
        return snapshot
    if _offline():
        raise ModelNotFoundError(
            f"{text}: no such local path, and {repo} is not (completely) in the Hugging Face cache ({_cache_dir()}); "
            f"downloads are off (HF_HUB_OFFLINE is set). To get it, {how_to_get(repo)}.")
    return _download(text, repo, revision, progress)


def model_name(name_or_path: str | os.PathLike, resolved: str | os.PathLike) -> str:
    """The model's name to serve it as: a repo id's last part ("Qwen/Qwen3.6-35B-A3B@main" -> "Qwen3.6-35B-A3B"),
    else the directory's name, where an HF cache snapshot (.../models--Owner--Name/snapshots/<hash>) is "Name"."""
    text = os.fspath(name_or_path)
    if not Path(text).expanduser().exists() and (parsed := parse_repo_id(text)) is not None:
        return parsed[0].split("/")[-1]
    path = Path(os.path.abspath(Path(resolved).expanduser()))
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--", 2)[-1]
    return path.name or str(path)


# ----------------------------------------------------------------------------------------------- cache
def _cache_dir() -> Path:
    """huggingface_hub's cache, by the environment as it is now (its own constants are read at import)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The repo's snapshot in the cache if it is there and complete enough to load (config.json and every
    weight file its index names), without touching the network."""
    storage = _cache_dir() / ("models--" + repo.replace("/", "--"))
    if not storage.is_dir():
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo, revision=revision, cache_dir=_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):     # not cached, or cached incompletely
        return None
    return snapshot if _complete(snapshot) else None


def _complete(snapshot: Path) -> bool:
    if any(snapshot.glob("*.gguf")) and not (snapshot / "config.json").exists():
        return True                                   # a GGUF repo: the caller says what to use instead
    if not (snapshot / "config.json").is_file():
        return False
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return True                               # loading will name what is wrong with it
        return all((snapshot / f).is_file() for f in files)
    return (snapshot / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------- download
def _download(text: str, repo: str, revision: str | None, progress: bool) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"{text}: no such local path, and {repo} is not (completely) in the Hugging Face cache ({_cache_dir()})"
    try:
        files = [s.rfilename for s in (HfApi().model_info(repo, revision=revision).siblings or [])]
        if "config.json" not in files:
            ggufs = sorted(f for f in files if f.endswith(".gguf"))
            if ggufs:
                raise GGUFError(gguf_advice(f"{repo} holds GGUF files ({ggufs[0]}, ...) and no config.json: it"))
            raise ModelNotFoundError(f"{repo} has no config.json: it is not a Hugging Face checkpoint qwen36 can "
                                     f"read. To get one, {how_to_get()}.")
        bars = _progress_bars(progress)
        try:
            return Path(snapshot_download(repo, revision=revision, cache_dir=_cache_dir(),
                                          allow_patterns=ALLOW_PATTERNS))
        finally:
            bars()
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise ModelNotFoundError(f"{where}, and the Hub does not give it ({type(e).__name__}: the repo does not "
                                 f"exist, or it is private or gated and needs `hf auth login`). To get it, "
                                 f"{how_to_get()}.") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{where}, and {repo} has no revision {revision!r}.") from None
    except (GGUFError, ModelNotFoundError):
        raise
    except Exception as e:          # no network (httpx's errors), the Hub down, a disk full, ...
        raise ModelNotFoundError(f"{where}, and the Hub could not be reached to download it ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}). To get it, {how_to_get(repo)}.") from None


def _progress_bars(on: bool):
    """progress=False turns huggingface_hub's tqdm bars off for one download (on: left as the user set them,
    HF_HUB_DISABLE_PROGRESS_BARS included); returns the function that restores them."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if on or are_progress_bars_disabled():
        return lambda: None
    disable_progress_bars()
    return enable_progress_bars


# ----------------------------------------------------------------------------------------------- names
def _not_a_name(text: str) -> str:
    """The message for something that is neither an existing path nor a repo id."""
    if ":" in text and "://" not in text:            # qwen3.6:35b, hf.co/owner/name-GGUF:Q4_K_M
        base = text.split(":", 1)[0].rsplit("/", 1)[-1].lower()
        suggestion = OFFICIAL_REPOS[0] if base.startswith(("qwen3.6", "qwen3.5", "qwen3")) else None
        return (f"{text!r} looks like an ollama model name; qwen36 does not read ollama's store (GGUF). Give a "
                f"local checkpoint directory or a Hugging Face repo id"
                + (f", here {suggestion} (or {OFFICIAL_REPOS[1]})" if suggestion else f" such as {OFFICIAL_REPOS[0]}")
                + f". To get it, {how_to_get(suggestion or OFFICIAL_REPOS[0])}.")
    return (f"{text}: no such local path, and not a Hugging Face repo id (owner/name, e.g. {OFFICIAL_REPOS[0]}). "
            f"To get the model, {how_to_get()}.")
