"""Images over HTTP: a real `qwen36 serve` process, the openai client sending image_url parts."""
from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from qwen36 import LLM, SamplingParams

from test_image import png_header
from test_server import launch, stop


def _png(w=50, h=40, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("vision")
    media = tmp_path_factory.mktemp("media")
    (media / "a.png").write_bytes(_png())
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc, base = launch(path, log, "--max-model-len", "1024", "--allowed-local-media-path", str(media),
                        "--max-image-pixels", "8192", "--limit-mm-per-prompt", "image=3,video=1")
    yield {"base": base, "path": path, "proc": proc, "log": log, "media": media}
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="none", max_retries=0, timeout=120)


def _messages(url: str, text="What is in the picture?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _post(server, messages, **extra):
    return httpx.post(server["base"] + "/v1/chat/completions",
                      json={"messages": messages, "max_tokens": 4, **extra}, timeout=60)


def test_data_url_image_matches_offline(server, client):
    url = _data_url(_png())
    got = client.chat.completions.create(model="m", messages=_messages(url), max_tokens=12, temperature=0)
    want = LLM(server["path"], quantization=None).chat(_messages(url), SamplingParams(temperature=0, max_tokens=12))
    msg = got.choices[0].message
    assert (msg.content, getattr(msg, "reasoning_content", None)) == (want.content, want.reasoning_content)
    assert got.usage.prompt_tokens > 30                         # the image's pad tokens count as prompt


def test_stream_with_image_equals_whole(client):
    url = _data_url(_png(seed=1))
    whole = client.chat.completions.create(model="m", messages=_messages(url), max_tokens=10, temperature=0,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    parts = client.chat.completions.create(model="m", messages=_messages(url), max_tokens=10, temperature=0,
                                           stream=True,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text == whole.choices[0].message.content


def test_file_url_only_inside_allowed_dir(server, client, tmp_path):
    inside = f"file://{server['media'] / 'a.png'}"
    r = client.chat.completions.create(model="m", messages=_messages(inside), max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"
    outside = tmp_path / "b.png"
    outside.write_bytes(_png())
    r = _post(server, _messages(f"file://{outside}"))
    assert r.status_code == 400 and "allowed" in r.json()["error"]["message"]
    r = _post(server, [{"role": "user", "content": [{"type": "image", "image": str(server["media"] / "a.png")}]}])
    assert r.status_code == 400                                 # plain paths: never over HTTP


BAD = [
    (_data_url(b"this is not an image"), "image"),
    (_data_url(_png()[:60]), "truncated"),
    (_data_url(b""), "no image data"),
    (_data_url(png_header(20000, 20000)), "too large"),                 # header only
    (_data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "image/eps"), "accepted format"),
    ("data:image/png;base64,@@@not-base64@@@", "base64"),
    ("https://example.com/cat.png", "network"),
    ("ftp://example.com/cat.png", "scheme"),
]


@pytest.mark.parametrize("url,needle", BAD, ids=[n for _, n in BAD])
def test_bad_images_are_400_naming_the_problem(server, url, needle):
    r = _post(server, _messages(url))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"].lower() and "messages[0].content[0]" in err["message"]


def test_placeholder_quoted_in_text_is_text(server):
    """A message quoting the image placeholder (source code about images does) has no image to match: it
    is text, not a placeholder (this used to be a 400)."""
    r = _post(server, [{"role": "user", "content": "look: <|vision_start|><|image_pad|><|vision_end|>"}])
    assert r.status_code == 200, r.text


def test_bad_images_do_not_disturb_others(server, client):
    url = _data_url(_png(seed=2))
    result = {}

    def good():
        result["text"] = client.chat.completions.create(
            model="m", messages=_messages(url), max_tokens=16, temperature=0).choices[0].message.reasoning_content
    t = threading.Thread(target=good)
    t.start()
    for bad, _ in BAD:
        assert _post(server, _messages(bad)).status_code == 400
    t.join()
    again = client.chat.completions.create(model="m", messages=_messages(url), max_tokens=16, temperature=0)
    assert result["text"] == again.choices[0].message.reasoning_content
    assert server["proc"].poll() is None
    assert "Traceback" not in server["log"].read_text()


def test_video_url_data_matches_offline(server, client, tmp_path):
    """A video sent as an OpenAI-style video_url part with a data: URL: same answer as offline LLM.chat."""
    from test_image import write_video

    path = write_video(tmp_path / "clip.mkv", n=20, fps=10, w=32, h=32)
    url = "data:video/x-matroska;base64," + base64.b64encode(path.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    got = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
    want = LLM(server["path"], quantization=None).chat(messages, SamplingParams(temperature=0, max_tokens=8))
    assert getattr(got.choices[0].message, "reasoning_content", None) == want.reasoning_content
    assert got.usage.prompt_tokens > 40


def test_max_image_pixels_caps_the_budget(server, client):
    """--max-image-pixels 8192: a 200x200 image (625 tokens offline with patch 4) costs at most 8192 / 64."""
    messages = _messages(_data_url(_png(200, 200, seed=3)))
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=1, temperature=0)
    offline = LLM(server["path"], quantization=None).encode_chat(messages)
    assert len(offline.ids) - 600 > 0 and r.usage.prompt_tokens <= len(offline.ids) - 625 + 8192 // 64
    r = _post(server, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": messages[0]["content"][0]["image_url"]["url"]}, "max_pixels": 10 ** 9}]}])
    assert r.status_code == 200                                  # a larger per-part budget is capped, not refused
    r = _post(server, [{"role": "user", "content": [{**messages[0]["content"][0], "max_pixels": "lots"}]}])
    assert r.status_code == 400 and "max_pixels must be a positive integer" in r.json()["error"]["message"]


def _video_part(payload: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(payload).decode()}}


@pytest.mark.parametrize("payload", [
    b"ffconcat version 1.0\nfile secret.nfo\nfile secret.nfo\n",                 # reads files in the server's cwd
    b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 0.0.0.0\nt=0 0\nm=video 18940 RTP/AVP 96\n"
    b"a=rtpmap:96 H264/90000\n",                                                   # opens UDP ports (SDP)
    b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nsecret.ts\n#EXT-X-ENDLIST\n",  # HLS playlist
], ids=["ffconcat", "sdp", "hls"])
def test_video_payloads_that_name_files_or_sockets_are_refused(server, payload):
    """The audit's local-file read and UDP listener through a video data URL: refused at once, and the answer
    says nothing of whether the file exists."""
    t0 = time.time()
    r = _post(server, [{"role": "user", "content": [_video_part(payload), {"type": "text", "text": "transcribe"}]}])
    assert r.status_code == 400 and time.time() - t0 < 5, r.text
    assert "no such file" not in r.text.lower() and "secret" not in r.text


def test_media_per_request_are_limited_before_decoding(server):
    """--limit-mm-per-prompt image=3: a fourth image is refused naming the flag (before any is decoded)."""
    parts = [{"type": "image_url", "image_url": {"url": _data_url(_png(seed=i))}} for i in range(4)]
    r = _post(server, [{"role": "user", "content": parts + [{"type": "text", "text": "x"}]}])
    assert r.status_code == 400 and "--limit-mm-per-prompt" in r.json()["error"]["message"], r.text


def test_per_part_pixel_options_stay_inside_the_servers_range(server):
    """A 64x64 PNG asking for min_pixels 1e9 (the audit's 300-byte OOM) is sized within --max-image-pixels."""
    part = {"type": "image_url", "image_url": {"url": _data_url(_png(64, 64))}, "min_pixels": 10 ** 9,
            "max_pixels": 10 ** 12}
    r = _post(server, [{"role": "user", "content": [part, {"type": "text", "text": "x"}]}])
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] <= 8192 // 64 + 20        # patch 4: at most 128 pads + the text


def test_count_tokens_counts_images_without_the_tower(server):
    """Anthropic's count_tokens: the same count /v1/messages uses, media sized from headers."""
    import anthropic

    claude = anthropic.Anthropic(base_url=server["base"], api_key="none", max_retries=0)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(_png(seed=5)).decode()}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]
    counted = claude.messages.count_tokens(model="m", messages=messages).input_tokens
    used = claude.messages.create(model="m", max_tokens=2, messages=messages).usage.input_tokens
    assert counted == used > 10
