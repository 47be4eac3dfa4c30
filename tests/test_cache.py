"""Hybrid-cache invariants: full prefill == chunked prefill (any chunk size) == token-by-token decode,
and a batch of sequences == each sequence alone."""
from __future__ import annotations

import pytest
import torch

from qwen36 import LLM

from conftest import rel_err


def run_in_pieces(llm: LLM, ids: list[int], piece: int) -> torch.Tensor:
    """Feed `ids` through the cache `piece` tokens at a time; logits of every token."""
    m = llm.model
    cache = m.new_cache(1, len(ids))
    out = []
    for s in range(0, len(ids), piece):
        chunk = ids[s:s + piece]
        batch = cache.batch([0], [s], [len(chunk)], logits="all")
        out.append(m(m.embed(torch.tensor(chunk)), batch, cache))
    return torch.cat(out)


@pytest.mark.parametrize("name", ["ratio2", "ratio4-irregular"])
def test_prefill_chunked_decode_agree(checkpoint, name):
    llm = LLM(checkpoint(name, seed=11), quantization=None)
    ids = torch.randint(0, 512, (140,), generator=torch.Generator().manual_seed(0)).tolist()
    full = llm.logits(ids)
    for piece in (1, 5, 63, 64, 65, 100):
        assert rel_err(run_in_pieces(llm, ids, piece), full) < 1e-4, f"piece {piece}"


def test_batch_equals_alone(checkpoint):
    """Mixed step: one sequence prefilling while two others decode, in one forward, in arbitrary slots."""
    llm = LLM(checkpoint("ratio2", seed=11), quantization=None)
    m = llm.model
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (30, 7, 66)]
    alone = [llm.logits(s) for s in seqs]

    cache = m.new_cache(4, 80)
    slots = (3, 0, 2)
    # step 1: prefill all but the last token of sequences 0 and 1, the first 40 of sequence 2
    lens1 = (29, 6, 40)
    b = cache.batch(slots, (0, 0, 0), lens1, logits="all")
    x = torch.cat([torch.tensor(s[:n]) for s, n in zip(seqs, lens1)])
    out1 = m(m.embed(x), b, cache)
    # step 2: sequences 0 and 1 decode one token each while sequence 2 prefills the rest
    lens2 = (1, 1, 26)
    b = cache.batch(slots, lens1, lens2, logits="all")
    x = torch.cat([torch.tensor(s[a:a + n]) for s, a, n in zip(seqs, lens1, lens2)])
    out2 = m(m.embed(x), b, cache)
    # step 3: pure decode batch (the batched recurrent path) for sequences 0 and 2 only, after new tokens
    extra = [5, 9]
    b = cache.batch((3, 2), (30, 66), (1, 1), logits="all")
    out3 = m(m.embed(torch.tensor(extra)), b, cache)

    cu1 = [0, 29, 35, 75]
    cu2 = [0, 1, 2, 28]
    for i, s in enumerate(seqs):
        got = torch.cat([out1[cu1[i]:cu1[i + 1]], out2[cu2[i]:cu2[i + 1]]])
        assert rel_err(got, alone[i]) < 1e-4
    assert rel_err(out3[0], llm.logits(seqs[0] + [5])[-1]) < 1e-4
    assert rel_err(out3[1], llm.logits(seqs[2] + [9])[-1]) < 1e-4


def test_reset_slot_starts_fresh(checkpoint):
    llm = LLM(checkpoint("ratio2", seed=11), quantization=None)
    m = llm.model
    cache = m.new_cache(1, 32)
    a, b = [1, 2, 3, 4, 5], [9, 8, 7]
    m(m.embed(torch.tensor(a)), cache.batch([0], [0], [5]), cache)
    cache.reset(0)
    got = m(m.embed(torch.tensor(b)), cache.batch([0], [0], [3], logits="all"), cache)
    assert rel_err(got, llm.logits(b)) < 1e-5
