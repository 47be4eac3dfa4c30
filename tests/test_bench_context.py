"""`qwen36 bench --context` / `--kv-error` (qwen36/tools/bench_context.py): the depth parser, the depth bench's
figures on a tiny checkpoint, decode at depth from a cache it did not prefill, the KV-error logits, and the
parsers of llama.cpp's outputs."""
from __future__ import annotations

import json

import pytest
import torch

from qwen36 import LLM, SamplingParams
from qwen36.batch import ForwardBatch
from qwen36.chat import render_chat
from qwen36.cli import main
from qwen36.tokenizer import Tokenizer
from qwen36.tools import bench_agent
from qwen36.tools import bench_context as bc


def test_parse_depths():
    assert bc.parse_depths("8K,32K,128K") == [8192, 32768, 131072]
    assert bc.parse_depths(" 1024, 2k ,1.5K,1M") == [1024, 2048, 1536, 1 << 20]
    for bad in ("", "8X", "0", "-1K", "0.3K", "8K,,32K", "K"):
        with pytest.raises(ValueError):
            bc.parse_depths(bad)
    assert [bc.label(d) for d in (8192, 131072, 1000)] == ["8K", "128K", "1000"]


def test_depth_bench_fields(checkpoint):
    """Both depths through the engine in steps of 32 tokens: the window is the last step's 32 tokens, decode
    gives its 4 tokens, the KV cache holds int8 rows, and every figure is there."""
    r = bc.depth_bench(str(checkpoint("ratio2")), [96, 160], quantization=None, decode_tokens=4, window=32,
                       kv_cache_dtype="int8", max_num_batched_tokens=32)
    assert r["mode"] == "prefill" and r["kv_storage"] == "int8" and r["max_num_batched_tokens"] == 32
    for row, depth in zip(r["depths"], (96, 160)):
        assert row["depth"] == depth and row["prefill_steps"] == depth // 32
        assert row["prefill_last_tokens"] == 32 and row["decode_tokens"] == 4
        for key in ("prefill_s", "prefill_tok_s", "prefill_tok_s_last", "decode_tok_s", "decode_tok_s_filled",
                    "peak_rss_gb"):
            assert row[key] > 0, key
        assert row["prefill_tok_s"] == pytest.approx(depth / row["prefill_s"], rel=1e-2)
        assert row["kv_cache_gb"] == pytest.approx(depth * r["kv_bytes_per_token"] / 1e9, abs=1e-3)


def test_bench_context_command_filled(checkpoint, capsys):
    """`qwen36 bench MODEL --context 128 --filled --json`: decode at depth only, labelled, in the KV form asked."""
    assert main(["bench", str(checkpoint("ratio2")), "--context", "128", "--filled", "--kv-cache-dtype",
                 "bfloat16", "--decode-tokens", "4", "--quantization", "none", "--json"]) == 0
    filled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert filled["mode"] == "filled" and filled["kv_storage"] == "bfloat16" and "random values" in filled["note"]
    assert set(filled["depths"][0]) == {"depth", "kv_cache_gb", "decode_tok_s_filled", "peak_rss_gb"}
    assert filled["depths"][0]["depth"] == 128 and filled["depths"][0]["decode_tok_s_filled"] > 0
    assert main(["bench", "--synthetic", "--context", "8K", "--kv-error", "8K"]) == 2       # one or the other


@pytest.mark.parametrize("kv", ["float32", "int8"])
def test_decode_at_depth_is_the_engines_decode(checkpoint, kv):
    """decode_at_depth from a cache filled by a prefill of the prompt (not by the engine) picks the tokens the
    engine's own greedy generation picks after that prompt: same rows, positions and forward."""
    llm = LLM(checkpoint("ratio2"), quantization=None, kv_cache_dtype=kv, max_model_len=128, max_num_seqs=1,
              enable_prefix_caching=False)
    prompt = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)).token_ids
    model, cache = llm.model, llm.engine().cache
    blocks = bc.block_table(llm, len(prompt) + 6)
    cache.reset(0)
    with torch.inference_mode():
        model(model.embed(torch.tensor(prompt)), ForwardBatch.build([0], [0], [70], [blocks], cache.block_size),
              cache)
    got, rate = bc.decode_at_depth(llm, 70, want[0], 6, warm=0)
    assert got == want[1:] and rate > 0
    bc.fill_random(llm, 70)                 # random rows and states: decoding still runs and stays finite
    got, _ = bc.decode_at_depth(llm, 70, want[0], 3)
    assert len(got) == 3 and all(0 <= t < 512 for t in got)


def test_kv_error_logits(checkpoint):
    """logits_at_depth with float32 KV equals one full forward's last rows; the bf16 / int8 figures compare
    against it (KL >= 0, from log-softmax as torch's kl_div computes it)."""
    llm = LLM(checkpoint("ratio2"), quantization=None, kv_cache_dtype="float32", max_model_len=128,
              enable_prefix_caching=False)
    prompt = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = bc.logits_at_depth(llm.model, prompt, "float32", 16, chunk=32)
    full = llm.logits(prompt)[-16:]
    assert (ref - full).abs().max() <= 1e-4 * full.abs().max()
    for kv in ("bfloat16", "int8"):
        other = bc.logits_at_depth(llm.model, prompt, kv, 16, chunk=32)
        e = bc.compare_logits(ref, other)
        want = torch.nn.functional.kl_div(torch.log_softmax(other.double(), -1), torch.log_softmax(ref.double(), -1),
                                          log_target=True, reduction="none").sum(-1)
        assert e["kl_mean"] == pytest.approx(float(want.mean()), rel=1e-6, abs=1e-15)
        assert e["kl_max"] == pytest.approx(float(want.max()), rel=1e-6, abs=1e-15)
        assert 0 < e["kl_mean"] < 1e-2 and e["positions"] == 16
    assert bc.compare_logits(ref, ref)["kl_max"] == 0 and bc.compare_logits(ref, ref)["top1_agreement"] == 1


def test_llamacpp_output_parsers():
    """llama-bench's JSON and --progress lines, llama-perplexity's KL statistics (their printf formats)."""
    stdout = ('[{"build_commit": "0c1e570", "n_prompt": 512, "n_gen": 0, "n_depth": 8192, "avg_ts": 101.5},'
              ' {"build_commit": "0c1e570", "n_prompt": 0, "n_gen": 32, "n_depth": 8192, "avg_ts": 20.25}]')
    lines = [(0.5, "llama-bench: benchmark 1/2: starting"), (1.0, "llama-bench: benchmark 1/2: warmup prompt run"),
             (3.0, "llama-bench: benchmark 1/2: depth run 1/1"), (43.0, "llama-bench: benchmark 1/2: prompt run 1/1"),
             (50.0, "llama-bench: benchmark 2/2: depth run 1/1 (cached)"),
             (50.1, "llama-bench: benchmark 2/2: generation run 1/1")]
    r = bc.parse_llamabench(stdout, lines, 8192)
    assert r["pp_tok_s"] == 101.5 and r["tg_tok_s"] == 20.25 and r["prefill_s"] == 40.0
    assert r["prefill_tok_s"] == pytest.approx(8192 / 40, abs=0.01)
    log = ("====== KL divergence statistics ======\nMean    KLD:   0.000095 ±   0.000003\n"
           "Maximum KLD:   0.000475\n99.9%   KLD:   0.000400\n====== Token probability statistics ======\n"
           "Same top p: 98.630 ± 0.516 %\n")
    assert bc.parse_kl_log(log) == {"kl_mean": 9.5e-05, "kl_max": 0.000475, "top1_agreement": pytest.approx(0.9863)}


def test_long_agent_session_passes_100k_tokens(tokenizer_files):
    """The --long-session preset's last request is past 100K tokens (real tokenizer, default template, the six
    tools), with and without preserved thinking, and fits the context its server is started with."""
    tok = Tokenizer.from_pretrained(tokenizer_files)
    last = bench_agent.requests_of(bench_agent.transcript(**bench_agent.LONG_SESSION))[-1][0]
    for preserve in (True, False):
        n = len(tok.encode_text(render_chat(last, bench_agent.TOOLS, preserve_thinking=preserve)))
        assert 100_000 <= n < bench_agent.LONG_SESSION_CONTEXT - 1, (preserve, n)
