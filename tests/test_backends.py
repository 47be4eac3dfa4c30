"""Every compute backend's fp32 logits against transformers, on geometries and prompt lengths drawn at random.

The parity tests (test_reference_parity.py) run three hand-picked geometries on the default backend. Here a
seeded draw of small geometries (widths, head counts and dims, experts, layer patterns, conv width) and prompt
lengths goes through each backend the machine can resolve (ComputeConfig: native kernels on or off, the
AVX-512 build, the fused MoE call and the decode plan): a prefill of n - 1 tokens (logits at every position)
and one decode step, against transformers' logits of the n tokens, within 1e-4 (max |diff| / max |logit|).
The draw's lengths put the prefill on both sides of PREFILL_ROWS and below SHORT, so prefill, the short
native path and the decode kernels are all compared.

PINNED is a case such a draw found where the native backend's prefill left transformers by more than 1e-4:
random models this small can amplify a last-bit difference a thousandfold (on one, noise of 1e-7 of the
embeddings' scale moved transformers' own logits by 2e-4; transformers' fp32 logits are up to 2e-4 from the
float64 answer), so a large step must round as transformers' tensor ops do, and the check there is tight.

The seed is printed; a failure names the seed, the case and the backend. QWEN36_BACKENDS_SEED=<n> draws
another set.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from qwen36.loader import load_model
from qwen36.ops.backend import Backend, ComputeConfig, resolve_backend
from qwen36.synth import write_checkpoint

from conftest import load_reference, rel_err

SEED = int(os.environ.get("QWEN36_BACKENDS_SEED", "2026"))
GEOMETRIES = 5
VOCAB = 512

# the compute configs to compare; configs the machine resolves alike are run once
CONFIGS = {
    "default": ComputeConfig(),
    "no-native": ComputeConfig(native=False),
    "no-avx512": ComputeConfig(avx512=False),
    "no-fused-moe": ComputeConfig(fused_moe=False),
    "no-decode-plan": ComputeConfig(decode_plan=False),
}

# (geometry, checkpoint seed, prompt seed, prompt length): a 70-token prefill on which the native backend's
# expert GEMMs (f32_linear on each expert's share of the step) left transformers by 1.9e-4 (and the float64
# answer by 2.4e-4) where the tensor-op backend is 2.8e-5 from transformers
PINNED = (dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
               head_dim=64, linear_num_key_heads=2, linear_key_head_dim=12, linear_num_value_heads=8,
               linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=3,
               moe_intermediate_size=32, shared_expert_intermediate_size=16, full_attention_interval=3),
          120, 1, 71)


def draw_geometry(rng: random.Random) -> dict:
    """A small qwen3_5_moe text geometry: any layer pattern with a full-attention layer, GQA, value/key head
    ratios 1-4, widths that are not multiples of 8 or 16 where the format allows."""
    layers = rng.randint(1, 4)
    types = [rng.choice(["linear_attention", "full_attention"]) for _ in range(layers)]
    types[rng.randrange(layers)] = "full_attention"
    n_kv = rng.choice([1, 2])
    n_k = rng.choice([1, 2, 3])
    experts = rng.choice([2, 4, 6, 8, 16])
    return dict(vocab_size=VOCAB, hidden_size=rng.choice([32, 48, 64, 80, 96, 128, 192, 256]),
                num_hidden_layers=layers, layer_types=types, num_key_value_heads=n_kv,
                num_attention_heads=n_kv * rng.choice([1, 2, 3, 4]), head_dim=rng.choice([8, 16, 24, 32, 64]),
                linear_num_key_heads=n_k, linear_key_head_dim=rng.choice([8, 12, 16, 32]),
                linear_num_value_heads=n_k * rng.choice([1, 2, 3, 4]),
                linear_value_head_dim=rng.choice([8, 10, 16, 24, 32]), linear_conv_kernel_dim=rng.choice([2, 3, 4]),
                num_experts=experts, num_experts_per_tok=rng.randint(1, min(4, experts)),
                moe_intermediate_size=rng.choice([8, 12, 16, 20, 32, 64]),
                shared_expert_intermediate_size=rng.choice([8, 16, 28, 48]))


def draw_cases(seed: int) -> list[tuple[dict, int, int, int]]:
    """(geometry, checkpoint seed, prompt seed, prompt length): per geometry one prompt whose prefill is
    decode-sized (up to PREFILL_ROWS tokens, some up to SHORT) and one beyond it."""
    rng = random.Random(seed)
    cases = []
    for i in range(GEOMETRIES):
        geometry = draw_geometry(rng)
        for n in (rng.randint(2, 65), rng.randint(66, 150)):
            cases.append((geometry, rng.randrange(1 << 16), rng.randrange(1 << 16), n))
    return cases


def distinct_backends() -> dict[str, Backend]:
    """CONFIGS resolved on this machine, one name per distinct set of routes."""
    seen, out = set(), {}
    for name, compute in CONFIGS.items():
        b = resolve_backend(compute, "cpu")
        routes = (b.native is not None, b.native512 is not None, b.act8, b.fused_moe, b.decode_plan)
        if routes not in seen:
            seen.add(routes)
            out[name] = b
    return out


def prefill_then_decode(model, ids: list[int]) -> torch.Tensor:
    """Logits [n, vocab]: a prefill of ids[:-1] (every position), then one decode step for ids[-1]."""
    n = len(ids)
    cache = model.new_cache(1, n)
    x = model.embed(torch.tensor(ids))
    with torch.inference_mode():
        prefill = model(x[:n - 1], cache.batch([0], [0], [n - 1], logits="all"), cache)
        decode = model(x[n - 1:], cache.batch([0], [n - 1], [1], logits="all"), cache)
    return torch.cat([prefill, decode])


_loaded: dict = {}


def reference_and_model(tmp_path_factory, geometry: dict, ckpt_seed: int):
    """transformers' model and ours (fp32) of one drawn checkpoint, written and loaded once per session."""
    key = (repr(sorted(geometry.items())), ckpt_seed)
    if key not in _loaded:
        path = write_checkpoint(tmp_path_factory.mktemp("backends"), geometry, seed=ckpt_seed, vision=None, mtp=False,
                                text_only=True, shards=1)
        _loaded[key] = (load_reference(path, text_only=True), load_model(path)[1])
    return _loaded[key]


CASES = [pytest.param(*case, id=f"case{c}-n{case[3]}") for c, case in enumerate(draw_cases(SEED))] + \
    [pytest.param(*PINNED, id=f"pinned-n{PINNED[3]}")]


@pytest.mark.parametrize("geometry,ckpt_seed,prompt_seed,n", CASES)
def test_every_backend_matches_transformers(tmp_path_factory, geometry, ckpt_seed, prompt_seed, n):
    print(f"\nQWEN36_BACKENDS_SEED={SEED}: geometry {geometry}, checkpoint seed {ckpt_seed}, prompt seed "
          f"{prompt_seed}, n={n}")
    ref, model = reference_and_model(tmp_path_factory, geometry, ckpt_seed)
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(prompt_seed)).tolist()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
    errors = {}
    for name, backend in distinct_backends().items():
        model.set_backend(backend)
        errors[name] = rel_err(prefill_then_decode(model, ids), want)
    print("  " + ", ".join(f"{name} {err:.2e}" for name, err in errors.items()))
    assert all(err < 1e-4 for err in errors.values()), f"QWEN36_BACKENDS_SEED={SEED}: {errors}"
