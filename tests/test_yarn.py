"""YaRN long context against transformers (qwen3_5_moe): rope tables bit-equal for the model card's block and
edge configurations, logits and greedy tokens at position offsets of 300,000 and 1,000,000 on a synthesized
checkpoint whose short original_max_position_embeddings puts short prompts across the whole ramp."""
from __future__ import annotations

import json
import os

import pytest
import torch

from qwen36 import EngineConfig, LLM
from qwen36.batch import SHORT
from qwen36.config import ConfigError, merge_rope_scaling, parse_text_config
from qwen36.layers.rotary import MRotary

from conftest import load_reference, rel_err

CARD = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=262144, rope_theta=10000000,
            mrope_section=[11, 11, 10], mrope_interleaved=True, partial_rotary_factor=0.25)
BASE_TC = dict(head_dim=256, max_position_embeddings=262144)
# positions up to YaRN's 4 x 262,144, with T, H, W apart as an image's are
POSITIONS = torch.tensor([0, 1, 77, 4095, 65537, 262143, 262144, 300000, 524287, 999999, 1000000, 1010000, 1048575])


def reference_tables(tc: dict, positions: torch.Tensor):
    from transformers import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTextRotaryEmbedding

    rope = Qwen3_5MoeTextRotaryEmbedding(Qwen3_5MoeTextConfig(**tc))
    cos, sin = rope(torch.zeros(1), positions[:, None, :])
    return rope, cos[0], sin[0]


TABLE_CASES = {
    "card": {"rope_parameters": CARD},
    "factor2": {"rope_parameters": {**CARD, "factor": 2.0}},
    "truncate-off": {"rope_parameters": {**CARD, "truncate": False}},
    "explicit-betas": {"rope_parameters": {**CARD, "beta_fast": 16, "beta_slow": 2}},
    "attention-factor": {"rope_parameters": {**CARD, "attention_factor": 1.25}},
    "mscale": {"rope_parameters": {**CARD, "mscale": 0.9, "mscale_all_dim": 0.5}},
    "short-original": {"rope_parameters": {**CARD, "original_max_position_embeddings": 64}},
    "no-original": {"rope_parameters": {k: v for k, v in CARD.items() if k != "original_max_position_embeddings"}},
    # the legacy key beside a top-level rope_theta (transformers keeps that theta)
    "legacy-key": {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144},
                   "rope_theta": 10000000, "partial_rotary_factor": 0.25},
    "no-yarn": {"rope_parameters": {k: CARD[k] for k in ("rope_theta", "mrope_section", "partial_rotary_factor")}},
}


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_rope_tables_equal_transformers(case):
    tc = {**BASE_TC, **TABLE_CASES[case]}
    positions = torch.stack([POSITIONS, POSITIONS + 5, POSITIONS + 11])
    ref, cos, sin = reference_tables(json.loads(json.dumps(tc)), positions)
    ours = MRotary(parse_text_config(tc), "cpu")
    assert ours.attention_scaling == ref.attention_scaling
    assert torch.equal(ours.inv_freq, ref.inv_freq)
    got_cos, got_sin = ours.cos_sin(positions, torch.float32)
    assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin), case


def test_yarn_changes_the_tables_where_the_card_says():
    """A check on the reference itself: the card's YaRN leaves the fast frequencies alone, divides the slow
    ones by 4 and scales cos/sin by 0.1 ln 4 + 1."""
    plain = MRotary(parse_text_config({**BASE_TC, **TABLE_CASES["no-yarn"]}), "cpu")
    yarn = MRotary(parse_text_config({**BASE_TC, **TABLE_CASES["card"]}), "cpu")
    assert yarn.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert torch.equal(yarn.inv_freq[:4], plain.inv_freq[:4])
    assert torch.allclose(yarn.inv_freq[-4:], plain.inv_freq[-4:] / 4)


def test_flag_merges_into_the_checkpoint_rope_parameters():
    tc = {**BASE_TC, "rope_parameters": TABLE_CASES["no-yarn"]["rope_parameters"]}
    merged = merge_rope_scaling(tc, '{"rope_type": "yarn", "factor": 4.0}')
    cfg = parse_text_config(merged)
    assert cfg.rope_theta == 1e7 and cfg.mrope_section == (11, 11, 10) and cfg.partial_rotary_factor == 0.25
    assert cfg.rope_scaling.original_max_position_embeddings == 262144 and cfg.max_context == 4 * 262144
    assert parse_text_config(merge_rope_scaling(merged, {"rope_type": "default"})).rope_scaling is None
    # both keys in one config: the legacy one's YaRN over rope_parameters, theta and M-RoPE kept (transformers
    # would take rope_scaling alone and fall back to theta 10,000)
    both = parse_text_config({**tc, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    assert both.rope_theta == 1e7 and both.rope_factor == 2.0 and both.max_context == 2 * 262144
    for bad, field in (('{"rope_type": "linear"}', "rope_type"), ('{"factor": "x", "rope_type": "yarn"}', "factor"),
                       ('{"fctor": 2}', "fctor"), ("yarn", "--yarn"), ('{"rope_type": "yarn"}', "factor"),
                       ('{"rope_type": "yarn", "factor": 1e308}', "fp32 positions"), ("[" * 100000, "JSON")):
        with pytest.raises(ConfigError, match=field):
            EngineConfig(rope_scaling=bad)


def yarn_checkpoint(checkpoint, tmp_path, **rope):
    """The ratio2 checkpoint with YaRN in its config.json: original_max_position_embeddings 64, so a prompt of
    a few dozen tokens already spans the ramp between kept and divided frequencies."""
    src = checkpoint("ratio2", seed=21)
    out = tmp_path / "yarn"
    out.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["rope_parameters"].update(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                                 **rope)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def reference_logits(ref, ids: list[int], offset: int) -> torch.Tensor:
    pos = torch.arange(offset, offset + len(ids))[None]
    with torch.no_grad():
        return ref(input_ids=torch.tensor([ids]), position_ids=pos.expand(3, 1, -1)).logits[0]


@pytest.mark.parametrize("offset", [0, 300_000, 1_000_000])
def test_logits_and_greedy_tokens_at_large_positions(checkpoint, tmp_path, offset):
    """Prefill (a long chunk), decode steps (the native short-chunk kernel) and a verification-sized chunk at
    positions offset.. against transformers given the same position ids."""
    path = yarn_checkpoint(checkpoint, tmp_path)
    ours, ref = LLM(path, quantization=None), load_reference(path)
    assert ours.config.text.rope_scaling is not None and ours.max_model_len <= 4 * 262144
    model = ours.model
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(offset % 97)).tolist()
    want = reference_logits(ref, ids, offset)
    cache = model.new_cache(1, 64)
    pos = lambda a, b: torch.arange(offset + a, offset + b).expand(3, -1)        # noqa: E731
    with torch.inference_mode():
        # the prompt in a long chunk, then SHORT-sized verification chunks and single-token steps
        n0 = 40 - SHORT - 3
        got = [model(model.embed(torch.tensor(ids[:n0])), cache.batch([0], [0], [n0], "all", pos(0, n0)), cache)]
        got.append(model(model.embed(torch.tensor(ids[n0:n0 + SHORT])),
                         cache.batch([0], [n0], [SHORT], "all", pos(n0, n0 + SHORT)), cache))
        for t in range(n0 + SHORT, 40):
            got.append(model(model.embed(torch.tensor(ids[t:t + 1])), cache.batch([0], [t], [1], "all", pos(t, t + 1)),
                             cache))
    assert rel_err(torch.cat(got), want) < 1e-4
    # greedy continuation: ours decoding step by step, the reference re-run on the whole sequence each time
    seq, mine = list(ids), []
    with torch.inference_mode():
        nxt = int(got[-1][-1].argmax())
        for t in range(40, 46):
            mine.append(nxt)
            logits = model(model.embed(torch.tensor([nxt])), cache.batch([0], [t], [1], "all", pos(t, t + 1)), cache)
            nxt = int(logits[-1].argmax())
    for _ in range(6):
        seq.append(int(reference_logits(ref, seq, offset)[-1].argmax()))
    assert mine == seq[40:]


def test_engine_serves_yarn_past_the_native_length(checkpoint, tmp_path):
    """--yarn's path (EngineConfig.rope_scaling) over a checkpoint without YaRN: the context limit moves to
    factor x native; without it a longer --max-model-len is refused, naming the way out."""
    src = checkpoint("ratio2", seed=21)
    native = json.loads((src / "config.json").read_text())["text_config"]["max_position_embeddings"]
    llm = LLM(src, quantization=None, rope_scaling={"rope_type": "yarn", "factor": 2.0}, kv_cache_memory=1 << 30,
              max_model_len=native + 1000, max_num_seqs=1)
    assert llm.max_model_len == native + 1000 and llm.config.text.max_context == 2 * native
    with pytest.raises(ValueError, match="--yarn"):
        LLM(src, quantization=None, kv_cache_memory=1 << 30, max_model_len=native + 1000, max_num_seqs=1)
