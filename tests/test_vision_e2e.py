"""Chat messages with images and videos, end to end, against transformers' Qwen3_5MoeForConditionalGeneration.

Ours: LLM.encode_chat (load, resize, patchify, expand the prompt, our tower, positions) -> logits / tokens.
Reference: the same prompt ids, pixels from transformers' own image processor (PIL backend) for images, and
transformers' tower, merge and get_rope_index. Video pixels are ours on both sides (transformers' video
processor needs torchvision; tests/test_image.py compares our video pixels with it separately).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwen36 import LLM, SamplingParams
from qwen36.inputs import normalize_media_parts
from qwen36.image import VisionPreprocess

from conftest import load_reference, rel_err


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(checkpoint):
    path = checkpoint("vision")
    return path, load_reference(path), LLM(path, quantization=None)


def _hf_image_inputs(path, images):
    from transformers import Qwen2VLImageProcessorPil

    pp = VisionPreprocess.from_checkpoint(path)
    proc = Qwen2VLImageProcessorPil(patch_size=pp.patch_size, merge_size=pp.merge_size,
                                    temporal_patch_size=pp.temporal_patch_size, image_mean=list(pp.image_mean),
                                    image_std=list(pp.image_std),
                                    size={"shortest_edge": pp.image_min_pixels, "longest_edge": pp.image_max_pixels})
    out = proc(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def _reference_kwargs(ref, llm, inputs, hf_media):
    ids = torch.tensor([inputs.ids])
    cfg = llm.config
    types = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
    return {"input_ids": ids, "mm_token_type_ids": types, "attention_mask": torch.ones_like(ids), **hf_media}


def _video_media(llm, inputs):
    """The video pixels and grids our pipeline made, for the reference (see the module docstring)."""
    media = [m for m in llm._last_media if m.kind == "video"]
    return {"pixel_values_videos": torch.cat([m.pixel_values for m in media]),
            "video_grid_thw": torch.tensor([m.grid for m in media])}


def _encode(llm, messages):
    llm._last_media = llm.media.media_of(normalize_media_parts(messages))
    return llm.encode_chat(messages)


IMAGES = [_image(90, 60, 0), _image(40, 130, 1)]          # wide and tall; upscaled to the minimum pixel budget
FRAMES = [_image(48, 40, 10 + k) for k in range(6)]


def _messages(kind):
    if kind == "image":
        return [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    if kind == "two images, two turns":
        return [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "A?"}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": IMAGES[1]}]}]
    if kind == "video":
        return [{"role": "user", "content": [{"type": "video", "video": FRAMES, "fps": 4},
                                             {"type": "text", "text": "What happens?"}]}]
    return [{"role": "user", "content": [{"type": "image", "image": IMAGES[1]}, {"type": "video", "video": FRAMES},
                                         {"type": "text", "text": "Compare them."}]}]


def _hf_media(path, llm, kind, inputs):
    media = {}
    images = {"image": [IMAGES[0]], "two images, two turns": IMAGES, "video": [], "image and video": [IMAGES[1]]}[kind]
    if images:
        media.update(_hf_image_inputs(path, images))
    if "video" in kind:
        media.update(_video_media(llm, inputs))
    return media


@pytest.mark.parametrize("kind", ["image", "two images, two turns", "video", "image and video"])
def test_chat_logits_match_reference(setup, kind):
    path, ref, llm = setup
    inputs = _encode(llm, _messages(kind))
    assert inputs.mm is not None and inputs.mm.delta < 0
    kw = _reference_kwargs(ref, llm, inputs, _hf_media(path, llm, kind, inputs))
    if "pixel_values" in kw:   # our image pixels equal the reference processor's (also in test_image.py)
        ours = torch.cat([m.pixel_values for m in llm._last_media if m.kind == "image"])
        assert torch.equal(ours, kw["pixel_values"])
    with torch.no_grad():
        want = ref(**kw).logits[0]
    got = llm.logits(inputs.ids, mm=inputs.mm)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("kind", ["two images, two turns", "image and video"])
def test_chat_greedy_matches_reference(setup, kind):
    path, ref, llm = setup
    inputs = _encode(llm, _messages(kind))
    kw = _reference_kwargs(ref, llm, inputs, _hf_media(path, llm, kind, inputs))
    with torch.no_grad():
        want = ref.generate(**kw, max_new_tokens=10, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(inputs.ids):].tolist()
    got = llm.generate(inputs, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)).token_ids
    assert got == want


def test_image_sources_give_the_same_prompt(setup, tmp_path):
    """A path, bytes, a PIL image, a data: URL and a file:// URL are the same image."""
    import base64
    import io

    _, _, llm = setup
    buf = io.BytesIO()
    IMAGES[0].save(buf, format="PNG")
    data = buf.getvalue()
    file = tmp_path / "a.png"
    file.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    parts = [{"type": "image", "image": IMAGES[0]}, {"type": "image", "image": data},
             {"type": "image", "image": str(file)}, {"type": "image_url", "image_url": {"url": url}},
             {"type": "image_url", "image_url": {"url": f"file://{file}"}}]
    results = [_encode(llm, [{"role": "user", "content": [p, {"type": "text", "text": "?"}]}]) for p in parts]
    for r in results[1:]:
        assert r.ids == results[0].ids
        assert torch.equal(r.mm.embeds, results[0].mm.embeds)


def test_generate_with_multi_modal_data_equals_chat(setup):
    """vLLM's prompt form: text with placeholders + multi_modal_data."""
    _, _, llm = setup
    messages = _messages("image and video")
    chat = _encode(llm, messages)
    text = llm.chat_template.render(normalize_media_parts(messages), add_generation_prompt=True)
    inputs = llm.encode_prompt({"prompt": text, "multi_modal_data": {"image": IMAGES[1], "video": FRAMES}})
    assert inputs.ids == chat.ids and torch.equal(inputs.mm.positions, chat.mm.positions)
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert llm.generate(inputs, p).token_ids == llm.generate(chat, p).token_ids


def test_media_errors_are_clear(setup):
    _, _, llm = setup
    bad = [({"type": "image", "image": b"not an image"}, "image"),
           ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "network"),
           ({"type": "image"}, "needs 'image'"),
           ({"type": "video", "video": [IMAGES[0]]}, "frame")]
    for part, words in bad:
        with pytest.raises(ValueError, match=words) as e:
            llm.chat([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}])
        assert "messages[0].content[0]" in str(e.value)
    with pytest.raises(ValueError, match="placeholder|pad"):      # one placeholder, no image given
        llm.encode_prompt({"prompt": "<|vision_start|><|image_pad|><|vision_end|>hi", "multi_modal_data": {}})


def test_text_only_checkpoint_refuses_images(checkpoint):
    path = checkpoint("vision", vision=None)
    llm = LLM(path, quantization=None)
    assert llm.vision is None
    with pytest.raises(ValueError, match="no vision tower"):
        llm.chat([{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "?"}]}])


def test_encoder_cache_skips_repeated_images(checkpoint):
    """A chat sends its past images every turn: they are encoded once, with identical embeddings."""
    llm = LLM(checkpoint("vision"), quantization=None)
    calls = []
    encode = llm.vision.encode
    llm.vision.encode = lambda pixels, grids: calls.append(len(grids)) or encode(pixels, grids)
    first = _encode(llm, _messages("image"))
    both = _encode(llm, _messages("two images, two turns"))        # IMAGES[0] again, IMAGES[1] new
    assert calls == [1, 1]
    assert torch.equal(both.mm.embeds[:len(first.mm.embeds)], first.mm.embeds)
    fresh = LLM(checkpoint("vision"), quantization=None).encode_chat(_messages("two images, two turns"))
    assert torch.equal(both.mm.embeds, fresh.mm.embeds)


def test_encoder_cache_evicts_least_recently_used():
    from qwen36.inputs import EncoderCache

    cache = EncoderCache(capacity=3 * 4 * 10)                        # three [10] fp32 tensors
    for k in "abc":
        cache.put(k, torch.zeros(10))
    cache.get("a")                                                   # a is now the most recent
    cache.put("d", torch.zeros(10))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.used == 120
    cache.put("huge", torch.zeros(1000))                             # larger than the cache: not kept
    assert cache.get("huge") is None and cache.used == 120
