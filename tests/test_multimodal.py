"""Image/video tokens in the text model: mRoPE positions, embedding merge, decode offset — against transformers.

The vision embeddings here come from the reference's own tower, so these tests check the merge and the
positions alone; tests/test_vision.py checks our tower, tests/test_vision_e2e.py the two together.
"""
from __future__ import annotations

import pytest
import torch

from qwen36 import LLM, SamplingParams
from qwen36.multimodal import MultimodalPrompt, mrope_positions
from qwen36.synth import SPECIAL_IDS

from conftest import load_reference, rel_err

IMG, VID = SPECIAL_IDS["image_token_id"], SPECIAL_IDS["video_token_id"]
VS, VE = SPECIAL_IDS["vision_start_token_id"], SPECIAL_IDS["vision_end_token_id"]
MERGE = 2


def _text(n, seed):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt(parts):
    """parts: ints (n text tokens), ("image", grid) or ("video", grid) -> ids, image grids, video grids.
    A video is written as the processor writes it: per frame group, text (the timestamp) then the pad run."""
    ids, images, videos = [], [], []
    for k, part in enumerate(parts):
        if isinstance(part, int):
            ids += _text(part, k)
            continue
        kind, (t, h, w) = part
        n = (h // MERGE) * (w // MERGE)
        if kind == "image":
            images.append((t, h, w))
            ids += [VS] + [IMG] * (t * n) + [VE]
        else:
            videos.append((t, h, w))
            for f in range(t):
                ids += _text(3, 100 + f) + [VS] + [VID] * n + [VE]
    return ids, images, videos


def _type_ids(ids):
    t = torch.tensor(ids)
    return ((t == IMG).int() + 2 * (t == VID).int())[None]


PROMPTS = {
    "one image": [5, ("image", (1, 4, 6)), 7],
    "two images, tall and wide": [3, ("image", (1, 8, 4)), 2, ("image", (1, 4, 10)), 4],
    "video": [4, ("video", (3, 4, 4)), 5],
    "image then video": [2, ("image", (1, 6, 6)), 3, ("video", (2, 8, 4)), 6],
    "starts with an image": [("image", (1, 4, 4)), 5],
}


@pytest.fixture(scope="module")
def setup(checkpoint):
    path = checkpoint("demo")
    return path, load_reference(path), LLM(path, quantization=None)


def _reference_inputs(ref, ids, images, videos, seed=0):
    """Random pixels for each grid; -> HF forward kwargs and the reference tower's embeddings per pad token."""
    g = torch.Generator().manual_seed(seed)
    vc = ref.config.vision_config
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    kw = {"input_ids": torch.tensor([ids]), "mm_token_type_ids": _type_ids(ids)}
    embeds = torch.zeros(len(ids), ref.config.text_config.hidden_size)
    for kind, grids, pad in (("image", images, IMG), ("video", videos, VID)):
        if not grids:
            continue
        thw = torch.tensor(grids)
        pixels = torch.randn(int(thw.prod(-1).sum()), width, generator=g)
        kw.update({"pixel_values": pixels, "image_grid_thw": thw} if kind == "image"
                  else {"pixel_values_videos": pixels, "video_grid_thw": thw})
        with torch.no_grad():
            feats = torch.cat(ref.model.get_image_features(pixels, thw).pooler_output)
        embeds[torch.tensor(ids) == pad] = feats
    return kw, embeds


def _mm(ids, images, videos, embeds):
    positions, delta = mrope_positions(ids, images, videos, IMG, VID, MERGE)
    rows = torch.nonzero((torch.tensor(ids) == IMG) | (torch.tensor(ids) == VID)).flatten()
    return MultimodalPrompt(positions, delta, rows, embeds[rows])


@pytest.mark.parametrize("name", list(PROMPTS))
def test_positions_match_get_rope_index(setup, name):
    _, ref, _ = setup
    ids, images, videos = _prompt(PROMPTS[name])
    want, want_delta = ref.model.get_rope_index(
        torch.tensor([ids]), _type_ids(ids), torch.tensor(images) if images else None,
        torch.tensor(videos) if videos else None)
    got, delta = mrope_positions(ids, images, videos, IMG, VID, MERGE)
    assert torch.equal(got, want[:, 0])
    assert delta == int(want_delta) and delta < 0


def test_positions_reject_mismatched_media():
    ids, images, videos = _prompt([3, ("image", (1, 4, 6)), 2])
    with pytest.raises(ValueError, match="1 image"):
        mrope_positions(ids, images + [(1, 4, 4)], videos, IMG, VID, MERGE)
    with pytest.raises(ValueError, match="needs 8 pad tokens"):
        mrope_positions(ids, [(1, 4, 8)], videos, IMG, VID, MERGE)
    with pytest.raises(ValueError, match="more image pad runs"):
        mrope_positions(ids, [], videos, IMG, VID, MERGE)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_match_reference(setup, name):
    _, ref, llm = setup
    ids, images, videos = _prompt(PROMPTS[name])
    kw, embeds = _reference_inputs(ref, ids, images, videos)
    with torch.no_grad():
        want = ref(**kw).logits[0]
    got = llm.logits(ids, mm=_mm(ids, images, videos, embeds))
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("name", ["two images, tall and wide", "image then video"])
def test_greedy_continuation_matches_reference(setup, name):
    """Decode after the prompt uses position = index + delta on all three axes."""
    _, ref, llm = setup
    ids, images, videos = _prompt(PROMPTS[name])
    kw, embeds = _reference_inputs(ref, ids, images, videos, seed=1)
    with torch.no_grad():
        want = ref.generate(**kw, attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=12,
                            do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    engine = llm.engine()
    rid = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                             mm=_mm(ids, images, videos, embeds))
    got = []
    while engine.has_work():
        for out in engine.step():
            assert out.request_id == rid
            got += out.token_ids
    assert got == want


def test_batched_with_text_and_chunked_prefill_equals_alone(checkpoint):
    """An image request prefilled in chunks beside a text request gives the tokens it gives alone."""
    path = checkpoint("demo")
    ref = load_reference(path)
    ids, images, videos = _prompt(PROMPTS["image then video"])
    _, embeds = _reference_inputs(ref, ids, images, videos, seed=2)
    mm = _mm(ids, images, videos, embeds)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(llm, with_text):
        engine = llm.engine()
        rid = engine.add_request(ids, params, mm=mm)
        if with_text:
            engine.add_request(_text(40, 7), params)
        got = []
        while engine.has_work():
            got += [t for out in engine.step() if out.request_id == rid for t in out.token_ids]
        return got

    alone = run(LLM(path, quantization=None), False)
    chunked = LLM(path, quantization=None)
    chunked.engine().scheduler.max_num_batched_tokens = 16       # the image's pads are split across steps
    assert run(chunked, True) == alone
