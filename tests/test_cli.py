"""The command line, run as a user would (subprocesses)."""
from __future__ import annotations

import os
import subprocess
import sys


def qwen36(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "qwen36.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_make_demo_then_generate(tmp_path):
    out = tmp_path / "demo"
    r = qwen36("make-demo", str(out), "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    r = qwen36("generate", str(out), "Once upon a time", "--max-tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() != ""


def test_demo_makes_cache_once_and_states_random_weights(tmp_path):
    env = {"QWEN36_CACHE": str(tmp_path / "cache")}
    first = qwen36("demo", "--max-tokens", "6", env=env)
    assert first.returncode == 0, first.stderr
    assert "RANDOM weights" in first.stdout and "reasoning_content: " in first.stdout
    assert "finish_reason: length (greedy, max_tokens=6)" in first.stdout
    assert "making the demo checkpoint" in first.stderr
    second = qwen36("demo", "--max-tokens", "6", env=env)
    assert second.returncode == 0 and "making the demo checkpoint" not in second.stderr
    assert first.stdout.splitlines()[4:6] == second.stdout.splitlines()[4:6]  # same greedy turn


def test_errors_are_one_clear_line(tmp_path):
    r = qwen36("generate", str(tmp_path / "nope"), "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("qwen36: error:") and "no config.json" in r.stderr and "Traceback" not in r.stderr
