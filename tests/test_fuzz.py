"""qwen36.tools.fuzz's hostile request classes, its soak and verdict, without a model: the generators' requests are
well-formed HTTP of the stated sizes, and the soak / hostile runner judge a small fake server correctly."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from qwen36.tools import fuzz
from qwen36.tools.fuzz import HOSTILE, Conn, Probe, Sizes

SMALL_BODY_LIMIT = 4 * 2 ** 20          # "a few MB at most" per request at the default sizes


def _balanced(body: bytes) -> bool:
    """Brackets balance outside strings (JSON too deep for Python's own parser)."""
    depth, in_str, esc = 0, False, False
    for c in body.decode("utf-8", "surrogatepass"):
        if in_str:
            esc, in_str = (False, in_str) if esc else (c == "\\", c != '"')
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and not in_str


def _json(probe: Probe):
    return json.loads(probe.body, parse_int=str)      # > 4,300-digit integers stay strings


def _data_urls(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _data_urls(v)
    elif isinstance(value, list):
        for v in value:
            yield from _data_urls(v)
    elif isinstance(value, str) and value.startswith("data:"):
        yield value


@pytest.mark.parametrize("name", list(HOSTILE))
def test_every_class_makes_well_formed_requests_under_a_few_mb(name):
    items = fuzz.generate(name)
    assert items
    for item in items:
        if isinstance(item, Conn):
            assert item.kind in ("disconnect", "slow-headers", "slow-body") and item.route.startswith("/v1/")
            if item.kind == "disconnect":
                assert isinstance(json.loads(item.body), dict)
            continue
        method, route, headers, body = item                 # a 4-tuple, as the brief of the class API says
        assert method in ("GET", "POST") and route.startswith("/") and " " not in route
        assert isinstance(headers, dict) and isinstance(body, bytes) and len(body) <= SMALL_BODY_LIMIT
        assert item.expect in (None, "4xx", "4xx-or-200", "no-5xx")
        if method == "POST" and headers.get("Content-Type", "").startswith(("application/json", "text/plain")):
            try:
                _json(item)
            except RecursionError:
                assert name in ("deep_json", "deep_count_tokens", "deep_schemas") and _balanced(body)


def test_audit_payloads_at_full_size():
    full = Sizes.full()
    blow = [_json(p) for p in fuzz.media_blowup(full)]
    assert blow[0]["messages"][0]["content"][0]["min_pixels"] == "1000000000"
    assert any(p["messages"][0]["content"][0].get("min_pixels") == "1000000000000" for p in blow)

    first = fuzz.decode_large(full)[0]
    urls = list(_data_urls(_json(first)))
    assert len(urls) == 4 and len(first.body) < 100_000           # the audit's 4 x 8000^2 in < 100 KB
    img = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert img.size == (8000, 8000) and img.mode == "1"

    frames = _json(fuzz.frame_lists(full)[0])["messages"][0]["content"][0]["video"]
    assert len(frames) == 6
    assert Image.open(io.BytesIO(base64.b64decode(frames[0].split(",", 1)[1]))).size == (4000, 4000)

    amp = _json(fuzz.amplification(full)[0])
    assert amp["prompt"] == [["1"]] * 300 and amp["n"] == "16" and len(fuzz.amplification(full)[0].body) < 2000
    assert len(_json(fuzz.many_messages(full)[0])["messages"]) == 40_000

    concat = list(_data_urls(_json(fuzz.ffconcat(full)[0])))[0]
    assert base64.b64decode(concat.split(",", 1)[1]) == b"ffconcat version 1.0\nfile secret.nfo\nfile secret.nfo\n"
    sdp = base64.b64decode(list(_data_urls(_json(fuzz.sdp(full)[0])))[0].split(",", 1)[1]).decode()
    assert "m=video 18940 RTP/AVP 96" in sdp and "c=IN IP4 127.0.0.1" in sdp
    assert base64.b64decode(list(_data_urls(_json(fuzz.hls(full)[0])))[0].split(",", 1)[1]).startswith(b"#EXTM3U")
    assert fuzz.metrics_injection(full)[0] == ("GET", "/zz%22%7D%201%0Afake_metric%7Bx%3D%22", {"Authorization": ""},
                                               b"")
    assert len(fuzz.metrics_injection(full)) > 500
    assert fuzz.deep_json(full)[0].body == b"[" * 1000 + b"1" + b"]" * 1000
    assert re.search(rb'"seed":9{4301}}', fuzz.big_integers(full)[0].body)
    schema = fuzz.deep_schemas(full)[0].body
    assert schema.count(b'"properties"') == 1000 and _balanced(schema)
    bad = [_json(p)["tools"][0]["function"]["parameters"] for p in fuzz.bad_schemas(full)[:5]]
    assert bad[0]["properties"]["a"]["minLength"] == float("inf") and bad[2]["properties"] == ["1"]
    assert bad[3]["required"] == "5" and bad[4] == {"anyOf": "5"}
    fields = [_json(p) for p in fuzz.bad_fields(full)]
    assert {"effort": []} in [f.get("reasoning") for f in fields]
    assert any(f.get("output_config") == "x" for f in fields)
    slow = fuzz.slowloris(full)
    assert [c.kind for c in slow] == ["slow-headers", "slow-body"] and slow[1].content_length == 30_000_000
    assert slow[0].sockets == 20 and slow[0].interval_s == 10


def test_list_sizes_follow_the_sizes_given():
    sz = dataclasses.replace(Sizes(), stops=7, logit_bias=11, stop_token_ids=13, pairs=3, prompts=5, n=2, depth=50)
    assert len(_json(fuzz.huge_stop(sz)[0])["stop"]) == 7
    assert len(_json(fuzz.full_logit_bias(sz)[0])["logit_bias"]) == 11
    assert len(_json(fuzz.huge_stop_token_ids(sz)[0])["stop_token_ids"]) == 13
    assert len(_json(fuzz.many_messages(sz)[0])["messages"]) == 6
    assert len(_json(fuzz.amplification(sz)[0])["prompt"]) == 5
    assert fuzz.deep_json(sz)[0].body == b"[" * 50 + b"1" + b"]" * 50
    # the defaults stay small: no per-part min_pixels above a few million, no image above 1000^2
    d = Sizes()
    assert d.min_pixels <= 4_000_000 and d.big_side <= 1000 and d.frame_side <= 1000


def test_judge():
    strict, lenient, host = HOSTILE["deep_json"], HOSTILE["huge_stop"], HOSTILE["foreign_host"]
    assert fuzz.judge(strict, 400, 0.1) == (True, "")
    assert not fuzz.judge(strict, 500, 0.1)[0]
    assert not fuzz.judge(strict, 200, 0.1)[0]                       # must be refused
    assert fuzz.judge(lenient, 200, 0.1)[0] and fuzz.judge(lenient, 413, 0.1)[0]
    assert not fuzz.judge(lenient, 200, 0.1, '{"finish_reason":"error"}')[0]
    assert not fuzz.judge(lenient, 200, lenient.bound_s + 1)[0]      # too slow
    assert not fuzz.judge(lenient, "timeout", 0.0)[0]
    assert fuzz.judge(strict, 200, 0.1, expect="4xx-or-200")[0]      # a probe's own expectation wins
    assert not fuzz.judge(HOSTILE["ffconcat"], 400, 0.1, "ffmpeg: secret.nfo: No such file or directory")[0]
    assert fuzz.judge(HOSTILE["ffconcat"], 400, 0.1, "unsupported video container")[0]
    assert not fuzz.judge(host, 200, 0.1)[0] and fuzz.judge(host, 200, 0.1, keyed=True)[0]


def _phase(name, lat, rss=(1000.0, 1000.0), **kw):
    return {"phase": name, "p99_s": fuzz.percentile(lat, 0.99), "5xx": 0, "hangs": 0, "errors": 0,
            "rss": {"start_mb": rss[0], "end_mb": rss[1]} if rss else None, **kw}


def test_verdict_on_synthetic_phases():
    base = _phase("baseline", [0.10] * 99 + [0.20])
    assert fuzz.percentile([0.10] * 99 + [0.20], 0.99) == 0.10 and fuzz.percentile([1, 2, 3, 4], 0.5) == 2
    assert fuzz.percentile([], 0.5) is None
    ok = fuzz.verdict(base, _phase("hostile", [0.2] * 100, hostile={"x": {"failures": []}}))
    assert ok["pass"] and ok["reasons"] == []
    assert not fuzz.verdict(base, _phase("hostile", [0.26] * 100))["pass"]      # > 2 x 0.10 + 0.05
    tiny = _phase("baseline", [0.001] * 100)
    assert fuzz.verdict(tiny, _phase("hostile", [0.04] * 100))["pass"]         # the floor absorbs noise
    v = fuzz.verdict(base, _phase("hostile", [0.1] * 100, **{"5xx": 1}))
    assert not v["pass"] and v["checks"]["no_5xx"] is False
    assert not fuzz.verdict(base, _phase("hostile", [0.1] * 100, hostile_hangs=1))["checks"]["no_hang"]
    grew = fuzz.verdict(base, _phase("hostile", [0.1] * 100, rss=(1000.0, 1300.0)))
    assert not grew["pass"] and grew["checks"]["rss_flat"] is False
    assert fuzz.verdict(base, _phase("hostile", [0.1] * 100, rss=(3000.0, 3250.0)))["pass"]   # within 10%
    assert fuzz.verdict(base, _phase("hostile", [0.1] * 100, rss=(500.0, 690.0)))["pass"]     # within 200 MB
    unknown = fuzz.verdict(_phase("baseline", [0.1], rss=None), _phase("hostile", [0.1], rss=None))
    assert unknown["pass"] and unknown["checks"]["rss_flat"] is None
    failed = fuzz.verdict(base, _phase("hostile", [0.1] * 100, hostile={"sdp": {"failures": [{"reason": "slow"}]}}))
    assert not failed["pass"] and failed["checks"]["hostile_expectations"] is False
    assert not fuzz.verdict(base, _phase("hostile", []))["pass"]                 # nothing succeeded


class _Fake(BaseHTTPRequestHandler):
    """A stand-in server: chat answers in ~5 ms (SSE when asked), a 500 for deeply nested bodies, 404 elsewhere;
    /metrics has a clean exposition with a resident-memory gauge."""
    protocol_version = "HTTP/1.1"
    timeout = None                       # per-connection socket timeout: set on a subclass for slowloris

    def log_message(self, *args):
        pass

    def _send(self, status, body=b"", ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/metrics":
            self._send(200, b"qwen36_num_requests_running 0\nprocess_resident_memory_bytes 104857600\n", "text/plain")
        elif self.path in ("/health", "/v1/models"):
            self._send(200, b'{"status":"ok","data":[{"max_model_len":512}]}')
        else:
            self._send(404, b'{"error":"not found"}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.path.startswith("/v1/"):
            return self._send(404, b'{"error":"not found"}')
        if b"[[[[[[[[" in body:
            return self._send(500, b"Internal Server Error", "text/plain")
        time.sleep(0.005)
        if b'"stream":true' in body.replace(b" ", b""):
            return self._send(200, b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'
                                   b"data: [DONE]\n\n", "text/event-stream")
        self._send(200, b'{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}]}')


@pytest.fixture
def fake():
    servers = []

    def start(handler=_Fake):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_soak_reports_phases_and_catches_a_5xx(fake):
    url = fake()
    t0 = time.monotonic()
    report = fuzz.soak(url, clients=2, minutes=0.06, hostile_every_s=0.3, classes=["deep_json", "metrics_injection"],
                       rss_every_s=0.5)
    assert time.monotonic() - t0 < 15
    base, hot = report["phases"]
    assert base["normal_sent"] > 10 and base["normal_ok"] == base["normal_sent"] and base["5xx"] == 0
    assert hot["normal_ok"] > 10 and "hostile" not in base
    assert base["rss"]["start_mb"] == 100.0 and report["rss_source"].startswith("/metrics")
    assert hot["hostile"]["deep_json"]["sent"] >= 1 and hot["hostile_5xx"] >= 1
    assert hot["hostile"]["metrics_injection"]["failures"] == []          # a 404 and a clean /metrics
    v = report["verdict"]
    assert not v["pass"] and v["checks"]["no_5xx"] is False and v["checks"]["hostile_expectations"] is False
    assert v["checks"]["p99_within"] is not None and report["health_after"]


def test_hostile_run_sees_slowloris_cut_off_or_left_open(fake):
    class Timed(_Fake):
        timeout = 0.5                    # the server drops a connection idle for 0.5 s

    sz = dataclasses.replace(Sizes(), slow_interval_s=1.0, slow_bound_s=2.5, slow_sockets=2)
    cut = fuzz.run_hostile(fake(Timed), ["slowloris"], sz)["classes"]["slowloris"]
    assert cut["pass"] and cut["status"] == {"closed": 2}
    sz = dataclasses.replace(sz, slow_interval_s=0.3, slow_bound_s=1.5)
    left = fuzz.run_hostile(fake(), ["slowloris"], sz)["classes"]["slowloris"]
    assert not left["pass"] and "still open" in left["failures"][0]["reason"]
