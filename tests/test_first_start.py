"""What a new user meets with no flags: `qwen36 serve DIR`, the weight form and cache sizes chosen for the machine,
the converted copy kept in the cache, and the command line's basics."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from qwen36 import LLM
from qwen36.checkpoint import Checkpoint
from qwen36.config import load_config
from qwen36.engine import Engine
from qwen36.export import quantize_checkpoint
from qwen36.plan import plan_kv, GiB, InsufficientMemory, WeightsPlan, check_fits, plan_caches, plan_weights
from qwen36.sampling import SamplingParams

from test_server import free_port


def qwen36(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "qwen36", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def short_context_copy(src, out, positions: int):
    """The checkpoint with a short native context, so a request without max_tokens ends soon (at the context)."""
    shutil.copytree(src, out, symlinks=True)
    cfg = json.loads((out / "config.json").read_text())
    (cfg.get("text_config") or cfg)["max_position_embeddings"] = positions
    (out / "config.json").write_text(json.dumps(cfg))
    return out


# ------------------------------------------------------------------------------------------- the plan
def test_weight_form_defaults(checkpoint, tmp_path):
    path = checkpoint("ratio2")
    cfg, ckpt = load_config(path), Checkpoint(path)
    cpu = plan_weights(cfg, ckpt, "cpu")
    assert (cpu.quantization, cpu.dtype, cpu.stored) == ("int4", "bfloat16", "bfloat16")   # bf16 read, fp32 compute
    assert (plan_weights(cfg, ckpt, "cuda:0").quantization, plan_weights(cfg, ckpt, "cuda:0").dtype) == (None, "bfloat16")
    exact = plan_weights(cfg, ckpt, "cpu", quantization=None)
    assert (exact.quantization, exact.dtype) == (None, "float32") and exact.bytes > 3 * cpu.bytes
    out = quantize_checkpoint(path, tmp_path / "q8", "int8", 128)
    stored = plan_weights(load_config(out), Checkpoint(out), "cpu", quantization=None)
    assert (stored.quantization, stored.stored) == ("int8", "int8")            # as stored, whatever was asked


def test_the_int4_estimate_is_what_loading_takes(checkpoint):
    """What the memory check counts from the headers before loading (nothing read) is what the loaded model
    holds: int4 parts, float32 small weights, the embedding and the vision tower as stored, the MTP head."""
    from qwen36.export import quantized_tensors

    path = checkpoint("wide")
    plan = plan_weights(load_config(path), Checkpoint(path), "cpu", mtp=True)
    llm = LLM(path, convert_cache=False, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    held = [*quantized_tensors(llm.model).values(), *(llm.vision.state_dict().values() if llm.vision else ())]
    loaded = sum(t.numel() * t.element_size() for t in held)
    assert abs(plan.bytes - loaded) / loaded < 0.05, (plan.bytes, loaded)


def test_a_model_too_big_for_the_machine_is_refused_with_the_options():
    fp32 = WeightsPlan("float32", None, "bfloat16", 140 * GiB, "as asked")
    with pytest.raises(InsufficientMemory, match=r"(?s)~140\.0 GB as float32.*--quantization int4.*--max-ram"):
        check_fits(fp32, "cpu", 23 * GiB)
    int4 = WeightsPlan("float32", "int4", "bfloat16", 20 * GiB, "the CPU default")
    with pytest.raises(InsufficientMemory, match="--max-ram 12G"):
        check_fits(int4, "cpu", 15 * GiB)
    check_fits(int4, "cpu", 15 * GiB, max_ram=12 * GiB)                        # paging asked for: no refusal
    check_fits(int4, "cpu", 23 * GiB)


def test_kv_cache_and_context_from_the_memory_left():
    kv = 40 * 1024                                                               # fp32 KV of a real-geometry token
    p = plan_caches(23 * GiB, 19 * GiB, "cpu", kv, GiB // 2, 262144, 8)
    assert p.prefix_cache_memory <= GiB and p.kv_cache_memory > 0
    assert p.max_model_len == p.kv_cache_memory // kv // 64 * 64 < 262144         # what the cache's blocks hold
    roomy = plan_caches(200 * GiB, 19 * GiB, "cpu", kv, GiB // 2, 262144, 1)
    assert roomy.max_model_len == 262144 and roomy.kv_cache_memory == 262144 * kv   # no more than one context
    with pytest.raises(InsufficientMemory, match="--max-model-len 65536 needs"):
        plan_caches(23 * GiB, 19 * GiB, "cpu", kv, GiB // 2, 262144, 8, kv_cache_memory=GiB, max_model_len=65536)
    with pytest.raises(InsufficientMemory, match="KV cache would hold"):
        plan_caches(20 * GiB, 19 * GiB, "cpu", kv, GiB // 2, 262144, 8)
    odd = plan_caches(200 * GiB, 19 * GiB, "cpu", kv, GiB // 2, 262144, 2, max_model_len=2060)   # not whole blocks
    assert odd.max_model_len == 2060 and odd.kv_cache_memory == 2 * 2112 * kv


def test_kv_dtype_auto_picks_the_first_form_that_holds_the_context():
    """kv_cache_dtype "auto" on a CPU: float32 (exact) while one sequence's whole context fits the memory left,
    else bfloat16, else int8 (which holds the most); on a GPU the compute dtype; an asked dtype is kept."""
    per_token = {"float32": 40 * 1024, "bfloat16": 20 * 1024, "int8": 10 * 1024 + 80}    # real geometry's KV

    def plan_on(gib: int, context: int = 262144, asked: str = "auto", device: str = "cpu"):
        return plan_kv(asked, device, "float32" if device == "cpu" else "bfloat16", per_token, context,
                       lambda dtype, kv: plan_caches(gib * GiB, 19 * GiB, "cpu", kv, GiB // 2, context, 1,
                                                     kv_cache_dtype=dtype))
    chosen = {gib: plan_on(gib) for gib in (40, 28, 24)}
    assert [chosen[g].kv_cache_dtype for g in (40, 28, 24)] == ["float32", "bfloat16", "int8"]
    assert chosen[40].longest_context == chosen[28].longest_context == 262144
    assert chosen[24].longest_context < 262144                              # the most any form holds here
    assert chosen[24].longest_context == chosen[24].kv_cache_memory // per_token["int8"] // 64 * 64   # whole blocks
    assert plan_on(24, asked="float32").kv_cache_dtype == "float32"
    assert plan_on(40, device="cuda:0").kv_cache_dtype == "bfloat16"
    assert plan_on(40, context=4 * 262144).kv_cache_dtype == "int8"         # YaRN's 1M: only int8 comes close
    sized = plan_kv("auto", "cpu", "float32", per_token, 262144, lambda dtype, kv: plan_caches(
        24 * GiB, 19 * GiB, "cpu", kv, GiB // 2, 262144, 1, kv_cache_memory=GiB, kv_cache_dtype=dtype),
        memory_given=True)
    assert sized.kv_cache_dtype == "float32"                                # a KV size given: auto stays exact


def test_the_default_context_fits_the_kv_cache(checkpoint):
    """max_model_len left out: what the KV cache's whole blocks hold, so a request that may run to the end of
    the context (the servers' default without max_tokens) is accepted."""
    path = checkpoint("ratio2")
    per_token = LLM(path, quantization=None).engine().cache.bytes_per_block() // 64
    llm = LLM(path, quantization=None, kv_cache_memory=per_token * 1000 + 17, max_num_seqs=2)
    assert llm.max_model_len == 960 and llm.engine().max_model_len == 960
    llm.engine().add_request([1, 2, 3], SamplingParams(max_tokens=957))


def test_llm_defaults_convert_once_into_the_cache(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN36_CACHE", str(tmp_path / "cache"))
    path = checkpoint("ratio2", seed=5)
    first = LLM(path)
    assert first.plan.quantization == "int4" and first.weights_source != path
    assert first.weights_source.parent == tmp_path / "cache" / "converted"
    files = {f: f.stat().st_mtime_ns for f in first.weights_source.iterdir()}
    second = LLM(path)
    assert second.weights_source == first.weights_source
    assert {f: f.stat().st_mtime_ns for f in second.weights_source.iterdir()} == files     # mapped, not rewritten
    ids = list(range(5, 30))
    assert (first.logits(ids) == second.logits(ids)).all()
    at_load = LLM(path, convert_cache=False)                                      # quantized at load instead
    assert at_load.weights_source == path and (at_load.logits(ids) == first.logits(ids)).all()


def test_a_short_request_is_not_held_behind_a_long_one(checkpoint):
    """KV for one whole context: a request that may run to its end (no max_tokens) and a short one that
    arrives after it. Blocks are taken as sequences grow, so the short one finishes first."""
    llm = LLM(checkpoint("ratio2"), quantization=None)
    per_block = llm.engine().cache.bytes_per_block()
    engine = Engine(llm.model, None, max_num_seqs=2, max_model_len=256, kv_cache_memory=per_block * 4)
    long = engine.add_request(list(range(3, 13)), SamplingParams(temperature=0, max_tokens=246))
    short = engine.add_request(list(range(20, 30)), SamplingParams(temperature=0, max_tokens=4))
    done = []
    while engine.has_work():
        done += [o.request_id for o in engine.step() if o.finished]
    assert done == [short, long]


# --------------------------------------------------------------------------------------- the server
def test_serve_with_no_flags(tmp_path):
    """`qwen36 serve DIR`: /health 503 while loading then 200; a request without max_tokens (the SDKs' default)
    answered 200, running to the end of the context; the converted weights reused on the next start."""
    from qwen36.demo import demo_checkpoint

    from qwen36.paths import cache_dir

    path = short_context_copy(demo_checkpoint(), tmp_path / "Qwen-demo", 160)
    (tmp_path / "cache").mkdir()
    if (cache_dir() / "build").exists():             # the compiled kernels, not built again for this cache
        (tmp_path / "cache" / "build").symlink_to(cache_dir() / "build")
    env = {**os.environ, "QWEN36_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}

    def start(log):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "qwen36", "serve", str(path), "--port", str(port)],
                                stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        seen, deadline = [], time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                seen.append((r.status_code, r.json()["status"]))
                if r.status_code == 200:
                    return proc, port, seen
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        proc.kill()
        pytest.fail(f"server not ready: {log.read_text()}")

    proc, port, seen = start(tmp_path / "first.log")
    try:
        assert (503, "loading") in seen and seen[-1] == (200, "ok")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        r = client.chat.completions.create(model="Qwen-demo", messages=[{"role": "user", "content": "Hello"}])
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens + r.usage.completion_tokens == 160
        assert client.models.list().data[0].id == "Qwen-demo"
    finally:
        proc.terminate()
        proc.wait(30)
    log = (tmp_path / "first.log").read_text()
    assert "converting" in log and "weights int4" in log and "max context 160 tokens" in log
    assert "req-0: prompt" in log and "finish length" in log                    # the per-request line
    proc, port, _ = start(tmp_path / "second.log")
    proc.terminate()
    proc.wait(30)
    assert "converting" not in (tmp_path / "second.log").read_text()
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1


def test_serve_checks_the_port_and_flags_before_loading(tmp_path):
    from qwen36.demo import demo_checkpoint

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        t = time.time()
        r = qwen36("serve", str(demo_checkpoint()), "--port", str(taken.getsockname()[1]))
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and "serving" not in r.stderr
    assert time.time() - t < 30 and "loading" not in r.stderr
    r = qwen36("serve", str(demo_checkpoint()), "--log-level", "verbose")
    assert r.returncode == 2 and "invalid choice: 'verbose'" in r.stderr
    r = qwen36("serve", str(demo_checkpoint()), "--ctx-size", "4096")
    assert r.returncode == 2 and "usage: qwen36 serve" in r.stderr and "--ctx-size -> --max-model-len" in r.stderr


def test_version_module_and_help():
    r = qwen36("--version")
    assert r.returncode == 0 and r.stdout.startswith("qwen36 ")
    help = " ".join(qwen36("serve", "--help").stdout.split())
    assert "(default: 127.0.0.1)" in help and "(default: auto)" in help and "(default: None)" not in help


def test_make_demo_never_deletes_a_directory_it_did_not_make(tmp_path):
    mine = tmp_path / "work"
    (mine / "project").mkdir(parents=True)
    (mine / "project" / "notes.txt").write_text("keep me")
    r = qwen36("make-demo", str(mine))
    assert r.returncode == 2 and "was not made by make-demo" in r.stderr
    assert (mine / "project" / "notes.txt").read_text() == "keep me" and not (tmp_path / "work.partial").exists()
    demo = tmp_path / "demo"
    assert qwen36("make-demo", str(demo)).returncode == 0
    assert qwen36("make-demo", str(demo), "--seed", "2").returncode == 0          # its own: replaced
    assert (demo / "config.json").exists()
