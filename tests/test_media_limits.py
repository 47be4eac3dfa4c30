"""Every image / video a request sends costs bounded memory and time, checked from headers before any pixel is
decoded (issue 24: the audit's media payloads, scaled down so that they would blow up the old code but stay
small here)."""
from __future__ import annotations

import base64
import io
import re
import struct
import threading
import time
import tracemalloc
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import qwen36.image as image_mod
import qwen36.inputs as inputs_mod
from qwen36.image import (IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, MediaCancelled, MediaError,
                          VisionPreprocess, smart_resize)
from qwen36.inputs import ContextTooLong, MediaInputs, MediaPolicy, normalize_media_parts

TINY = VisionPreprocess(patch_size=4, merge_size=2, temporal_patch_size=2, image_min_pixels=64,
                        image_max_pixels=4096, video_min_pixels=64, video_max_pixels=8192, video_max_frames=16)
SERVER = MediaPolicy(allow_paths=False, clamp=True)
IMAGE_PART = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
VIDEO_PART = f"{VISION_START}{VIDEO_PAD}{VISION_END}"


class Tokenizer:
    """Special tokens are one id each, every other character one id."""
    special = {IMAGE_PAD: 1, VIDEO_PAD: 2, VISION_START: 3, VISION_END: 4}
    pattern = re.compile("|".join(map(re.escape, special)) + "|.", re.S)

    def encode(self, text):
        return [self.special.get(t, 100 + ord(t[0])) for t in self.pattern.findall(text)]

    encode_escaped = encode


class Tower:
    compute_dtype = torch.float32

    def __init__(self):
        self.calls = 0

    def encode(self, pixels, grids):
        self.calls += 1
        return [torch.zeros(t * h * w // 4, 8) for t, h, w in grids]


def media(pp=TINY):
    config = SimpleNamespace(image_token_id=1, video_token_id=2)
    return MediaInputs(config, Tower(), pp, Tokenizer(), "cpu")


def png(w, h, seed=0) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def png_header(w, h) -> bytes:
    """A PNG that claims w x h 1-bit pixels (its header alone; decoding it would fail)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(data: bytes, **opts) -> dict:
    return {"type": "image_url", "image_url": {"url": url(data)}, **opts}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "describe"}]}]


def text_for(messages) -> str:
    placeholders = {"image": IMAGE_PART, "video": VIDEO_PART}
    return "".join(placeholders[k] for _, k, _ in MediaInputs.parts(messages)) + "describe"


def no_decoding(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("decoded a pixel")
    for mod in (image_mod, inputs_mod):
        monkeypatch.setattr(mod, "decode_image", refuse)
    monkeypatch.setattr(image_mod, "_file_frames", refuse)


# ------------------------------------------------------------------------------------------- audit #1

def test_per_part_pixels_clamped_to_the_server_range():
    m = media()
    part = image_part(png(64, 64), min_pixels=1_000_000_000)
    (plan,) = m.plan([("p", "image", part)], SERVER)
    t, h, w = plan.grid
    assert t * h * w * 16 <= TINY.image_max_pixels            # the old code: 1e9 pixels
    tracemalloc.start()
    medium = m.decode(plan)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert medium.grid == plan.grid and peak < 5_000_000
    # Qwen's own settings: still at most the processor's 16.8 M pixels (a plan, nothing decoded)
    (plan,) = media(VisionPreprocess()).plan([("p", "image", part)], SERVER)
    assert plan.grid[1] * plan.grid[2] * 256 <= VisionPreprocess().image_max_pixels
    # the operator's --max-image-pixels caps per-part max_pixels too
    big = image_part(png(64, 64), max_pixels=10 ** 12)
    (plan,) = m.plan([("p", "image", big)], MediaPolicy(clamp=True, max_image_pixels=1024))
    assert plan.grid[1] * plan.grid[2] * 16 <= 1024


def test_min_never_wins_over_max():
    assert smart_resize(64, 64, 8, min_pixels=10 ** 9, max_pixels=4096) == (64, 64)
    # the Python API trusts per-part bounds, but a minimum above the maximum is lowered to it
    (plan,) = media().plan([("p", "image", image_part(png(16, 16), min_pixels=5000, max_pixels=256))])
    assert plan.grid[1] * plan.grid[2] * 16 <= 256
    # rounding up to the minimum never lands past the maximum
    h, w = smart_resize(10, 33, 8, min_pixels=1000, max_pixels=1000)
    assert h * w <= 1000


def test_frames_per_video_under_the_budget():
    frames = [url(png(16, 16, seed=i)) for i in range(200)]
    m = media()
    part = {"type": "video", "video": frames, "fps": 24, "max_frames": 10_000}
    (plan,) = m.plan([("p", "video", part)], SERVER)
    assert len(plan.video.indices) == TINY.video_max_frames       # per-part max_frames cannot raise it
    (plan,) = m.plan([("p", "video", {**part, "max_frames": 6})], MediaPolicy(clamp=True, max_frames=8))
    assert len(plan.video.indices) == 6                           # but may lower it
    (plan,) = m.plan([("p", "video", part)], MediaPolicy(clamp=True, max_frames=8))
    assert len(plan.video.indices) == 8


# ------------------------------------------------------------------------------------------- audit #2

def test_huge_images_refused_before_any_decoding(monkeypatch):
    no_decoding(monkeypatch)
    m = media()
    messages = user(*[image_part(png_header(8000, 8000)) for _ in range(4)])
    with pytest.raises(ContextTooLong):
        m.prompt_inputs(text_for(messages), messages, SERVER, max_len=100)
    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[1\].*decode 128,000,000 pixels"):
        m.prompt_inputs(text_for(messages), messages, MediaPolicy(clamp=True, max_decode_pixels=10 ** 8), 10 ** 6)
    assert m.count_tokens(text_for(messages), messages, SERVER) == 4 * (2 + 64) + len("describe")  # 4096 px = 64 tokens each


def test_limit_mm_per_prompt(monkeypatch):
    no_decoding(monkeypatch)
    messages = user(*[image_part(png_header(64, 64)) for _ in range(3)])
    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[2\]: at most 2 images.*--limit-mm-per-prompt"):
        media().prompt_inputs(text_for(messages), messages, MediaPolicy(clamp=True, limit_images=2), None)
    video = user({"type": "video", "video": [url(png(16, 16))] * 4})
    with pytest.raises(MediaError, match="at most 0 videos"):
        media().count_tokens(text_for(video), video, MediaPolicy(clamp=True, limit_videos=0))


def test_frame_list_decodes_only_the_sampled_frames(monkeypatch):
    calls = []
    real = image_mod.decode_image
    monkeypatch.setattr(image_mod, "decode_image", lambda h: calls.append(h) or real(h))
    good = url(png(16, 16))
    frames = [good if i in (0, 13, 26, 39) else "data:image/png;base64,AAAA" for i in range(40)]
    messages = user({"type": "video", "video": frames, "fps": 2})   # 40 frames at 24 fps: 4 sampled
    out = media().prompt_inputs(text_for(messages), messages, SERVER, None)
    assert len(calls) == 4 and out.mm is not None


def test_video_file_frames_resized_as_decoded(tmp_path):
    import av

    path = tmp_path / "v.mp4"
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=4)
        s.width, s.height, s.pix_fmt = 512, 512, "yuv420p"
        for _ in range(40):
            for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((512, 512, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    messages = user({"type": "video_url", "video_url": {"url": url(path.read_bytes(), "video/mp4")}})
    m = media()
    messages = normalize_media_parts(messages)
    tracemalloc.start()
    out = m.prompt_inputs(text_for(messages), messages, SERVER, None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # 16 frames kept (the frame budget): the old code held them all at 512x512 (12.6 MB) before resizing
    assert out.mm is not None and peak < 6_000_000


# ------------------------------------------------------------------------------------------- audit #3, #16

CONCAT = b"ffconcat version 1.0\nfile secret.nfo\nfile secret.nfo\n"
SDP = (b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 18940 RTP/AVP 96\n"
       b"a=rtpmap:96 H264/90000\n")


@pytest.mark.parametrize("payload", [CONCAT, SDP, SDP.replace(b"127.0.0.1", b"0.0.0.0"),
                                     b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nsecret.ts\n#EXT-X-ENDLIST\n"],
                         ids=["ffconcat", "sdp", "sdp-any", "hls"])
def test_video_payloads_that_reach_files_or_sockets_are_refused(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.nfo").write_text("TOP SECRET API_KEY=abcdef123456\n")
    messages = user({"type": "video_url", "video_url": {"url": url(payload, "video/mp4")}})
    m = media()
    messages = normalize_media_parts(messages)
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[0\].*not a readable video in an accepted"):
        m.prompt_inputs(text_for(messages), messages, SERVER, None)
    assert time.monotonic() - start < 2


def test_accepted_containers_still_open(tmp_path):
    import av

    from qwen36.image import load_video
    for name, fmt, codec, pix in [("a.mp4", "mp4", "libx264", "yuv420p"), ("a.mkv", "matroska", "ffv1", "bgr0"),
                                  ("a.webm", "webm", "libvpx-vp9", "yuv420p")]:
        with av.open(str(tmp_path / name), "w", format=fmt) as c:
            s = c.add_stream(codec, rate=10)
            s.width, s.height, s.pix_fmt = 32, 32, pix
            for i in range(6):
                for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 9, np.uint8), format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        for source in (tmp_path / name, (tmp_path / name).read_bytes()):
            assert load_video(source, TINY).frames.shape[1:] == (32, 32, 3), name


def test_only_allowed_image_formats():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for data, mime in ((eps, "image/eps"), (b"P6\n2 2\n255\n" + bytes(12), "image/x-portable-pixmap")):
        part = {"type": "image_url", "image_url": {"url": url(data, mime)}}
        with pytest.raises(MediaError, match="accepted format"):
            media().plan([("p", "image", part)], SERVER)


# ------------------------------------------------------------------------------------------- #20: cancel, counting

def test_cancel_stops_the_work(monkeypatch):
    messages = user(image_part(png(16, 16)), {"type": "video", "video": [url(png(16, 16, i)) for i in range(8)]})
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(MediaCancelled):
        media().prompt_inputs(text_for(messages), messages, SERVER, None, cancel=cancel)
    # set while the video's frames decode: no further frame is decoded and the tower never runs
    cancel = threading.Event()
    calls = []
    real = image_mod.decode_image

    def decode(h):
        calls.append(h)
        if len(calls) == 2:
            cancel.set()
        return real(h)
    monkeypatch.setattr(image_mod, "decode_image", decode)
    m = media()
    with pytest.raises(MediaCancelled):
        m.prompt_inputs(text_for(messages), messages, SERVER, None, cancel=cancel)
    assert len(calls) == 2 and m.tower.calls == 0


def test_count_tokens_from_headers_alone(monkeypatch):
    messages = user(image_part(png(40, 24)), {"type": "video", "video": [url(png(20, 12, i)) for i in range(9)]},
                    image_part(png(7, 50), max_pixels=600))
    m = media()
    text = text_for(messages)
    expected = len(m.prompt_inputs(text, messages, SERVER, None).ids)
    tower_calls = m.tower.calls
    no_decoding(monkeypatch)
    assert m.count_tokens(text, messages, SERVER) == expected
    assert m.tower.calls == tower_calls
