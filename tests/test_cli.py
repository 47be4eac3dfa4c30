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
    assert r.stderr.startswith("qwen36: error:") and "no such local path" in r.stderr and "Traceback" not in r.stderr


def test_bench_runs_on_a_checkpoint(checkpoint):
    """The model benchmark end to end on a small checkpoint, quantized at load (figures are in README)."""
    import json

    r = qwen36("bench", str(checkpoint("demo")), "--quantization", "int4", "--prompt-len", "32",
               "--decode-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("prefill_tok_s", "decode_tok_s_batch1", "decode_tok_s_batch8", "peak_rss_gb",
                "weight_bytes_per_token", "achieved_gbs", "memory_bandwidth_gbs"):
        assert out[key] > 0, key


def test_bench_against_transformers_on_a_checkpoint(checkpoint):
    """--vs-transformers times transformers, ours in fp32 and ours in int4 on the same checkpoint and prompt,
    decode timed from the first new token to the last (prefill apart), and reports the ratios."""
    from qwen36.tools.bench import run

    r = run(str(checkpoint("ratio2")), quantization=None, prompt_len=24, decode_tokens=5, vs_transformers=True,
            image=False)
    for engine in ("transformers", "ours_fp32", "ours_int4"):
        assert r[engine]["prefill_s"] > 0 and r[engine]["decode_tok_s"] > 0, engine
    for tag in ("fp32", "int4"):
        assert r[f"speedup_decode_{tag}"] == round(r[f"ours_{tag}"]["decode_tok_s"] / r["transformers"]["decode_tok_s"], 2)
        assert r[f"speedup_prefill_{tag}"] == round(r["transformers"]["prefill_s"] / r[f"ours_{tag}"]["prefill_s"], 2)


def test_make_demo_real_geometry_quantized(tmp_path):
    """--geometry real writes Qwen3.6's widths directly in int4 (one layer here, to stay small)."""
    import json

    out = tmp_path / "real"
    r = qwen36("make-demo", str(out), "--geometry", "real", "--layers", "1")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    t = cfg["text_config"]
    assert (t["hidden_size"], t["num_experts"], t["vocab_size"], t["num_hidden_layers"]) == (2048, 256, 248320, 1)
    assert cfg["quantization_config"] == {"quant_method": "qwen36", "bits": 4, "group_size": 128}
    r = qwen36("generate", str(out), "Hello", "--max-tokens", "2", "--temperature", "0")
    assert r.returncode == 0, r.stderr


def test_gpu_options_on_the_command_line(checkpoint):
    """--cpu-experts (the CPU standing in for the GPU here) and --cuda-graphs, as a user types them."""
    path = str(checkpoint("demo"))
    r = qwen36("generate", path, "Once", "--max-tokens", "3", "--temperature", "0", "--cpu-experts", "2")
    assert r.returncode == 0 and r.stdout.strip() != "", r.stderr
    r = qwen36("generate", path, "Once", "--cpu-experts", "many")
    assert r.returncode != 0 and "--cpu-experts 'many'" in r.stderr
    r = qwen36("generate", path, "Once", "--cpu-experts", "99")
    assert r.returncode == 2 and r.stderr.startswith("qwen36: error: cpu_experts=99")
    r = qwen36("generate", path, "Once", "--cuda-graphs")
    assert r.returncode == 2 and "cuda_graphs=True needs a CUDA device" in r.stderr
