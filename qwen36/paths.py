"""Where qwen36 keeps what it makes once (the demo checkpoint, derived tokenizer files)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$QWEN36_CACHE, else $XDG_CACHE_HOME/qwen36, else ~/.cache/qwen36."""
    env = os.environ.get("QWEN36_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen36"
