"""The server under hostile HTTP (the security audit's classes that live in the HTTP layer), against a real
`qwen36 serve` with no API key on loopback: Host/Origin, Content-Type, metrics labels, the bounded line (429),
disconnects of non-streaming requests, header and body read timeouts, and everyone else answered promptly."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from test_server import launch, stop

MSG = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path = checkpoint("demo")
    log = tmp_path_factory.mktemp("limits") / "server.log"
    proc, base = launch(path, log, "--max-model-len", "2048", "--max-num-seqs", "2", "--max-waiting-requests", "2",
                        "--request-timeout", "2")
    yield {"base": base, "proc": proc, "log": log, "port": int(base.rsplit(":", 1)[1])}
    stop(proc)


def metrics(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server["base"] + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def chat(server, timeout=60, **extra) -> httpx.Response:
    return httpx.post(server["base"] + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, **extra},
                      timeout=timeout)


def test_keyless_loopback_server_answers_loopback_hosts_and_origins_only(server):
    """DNS rebinding (a foreign Host) and cross-site pages (a foreign Origin) get 403; loopback names pass."""
    port = server["port"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(server["base"] + "/health", headers={"Host": host}).status_code == 200
    r = httpx.post(server["base"] + "/v1/chat/completions", headers={"Host": f"attacker.example:{port}"},
                   json={"messages": MSG, "max_tokens": 2})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    r = httpx.post(server["base"] + "/v1/chat/completions", headers={"Origin": "http://attacker.example"},
                   json={"messages": MSG, "max_tokens": 2})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = httpx.post(server["base"] + "/v1/chat/completions", headers={"Origin": f"http://localhost:{port}"},
                   json={"messages": MSG, "max_tokens": 2})
    assert r.status_code == 200


def test_json_routes_need_a_json_content_type(server):
    """A browser's cross-site "simple" POST is text/plain: refused before anything runs (415, naming it)."""
    raw = json.dumps({"messages": MSG, "max_tokens": 2})
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        r = httpx.post(server["base"] + "/v1/chat/completions", content=raw,
                       headers={"Content-Type": kind} if kind else {})
        assert r.status_code == 415 and "Content-Type" in r.json()["error"]["message"], (kind, r.text)
    r = httpx.post(server["base"] + "/v1/messages", content=raw, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["type"] == "error"            # Anthropic's shape on its route
    r = httpx.post(server["base"] + "/v1/chat/completions", content=raw,
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_metrics_are_labelled_by_route_template_never_by_raw_path(server):
    for path in ("/zz%22%7D%201%0Afake_metric%7Bx%3D%22", "/a", "/b", "/c"):
        assert httpx.get(server["base"] + path).status_code == 404
    assert chat(server).status_code == 200
    text = httpx.get(server["base"] + "/metrics").text
    assert not any(line.startswith("fake_metric") for line in text.splitlines())
    m = metrics(server)
    assert m['qwen36_requests_total{route="unmatched",status="404"}'] >= 4
    assert m['qwen36_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert not any("/zz" in k or 'route="/a"' in k for k in m)
    assert m["process_resident_memory_bytes"] > 0 and m["qwen36_time_to_first_token_seconds_count"] >= 1


def test_line_is_bounded_with_429_and_retry_after(server):
    """2 slots + 2 waiting: a completion asking for 5 engine requests is refused whole, before anything runs;
    one for 4 fits."""
    body = {"prompt": "Once", "max_tokens": 2}
    r = httpx.post(server["base"] + "/v1/completions", json={**body, "n": 5}, timeout=60)
    assert r.status_code == 429 and r.headers["Retry-After"].isdigit(), r.text
    assert "--max-waiting-requests" in r.json()["error"]["message"]
    r = httpx.post(server["base"] + "/v1/completions", json={**body, "n": 4}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    assert metrics(server)['qwen36_requests_rejected_total{reason="queue_full"}'] >= 1


def test_non_streaming_request_stops_when_its_client_leaves(server):
    """The audit's case: a non-streaming request kept generating to max_tokens after its client dropped."""
    before = metrics(server)["qwen36_generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        chat(server, timeout=1.5, max_tokens=1800, ignore_eos=True)
    deadline = time.time() + 10
    while time.time() < deadline and metrics(server)["qwen36_num_requests_running"] > 0:
        time.sleep(0.1)
    m = metrics(server)
    assert m["qwen36_num_requests_running"] == 0 and m["qwen36_kv_cache_usage_ratio"] == 0
    generated = m["qwen36_generation_tokens_total"] - before
    time.sleep(1)
    assert metrics(server)["qwen36_generation_tokens_total"] - before == generated < 1800


def test_slow_headers_and_bodies_are_cut_off(server):
    """Slowloris: headers trickled, or a body trickled after a large Content-Length, end at the read timeout
    (2 s here) instead of holding a connection for ever."""
    with socket.create_connection(("127.0.0.1", server["port"])) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        s.settimeout(10)
        t0 = time.time()
        assert s.recv(1024) == b"" and time.time() - t0 < 8             # closed by the server
    with socket.create_connection(("127.0.0.1", server["port"])) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 30000\r\n\r\n{\"messages\":")
        s.settimeout(10)
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]


def test_others_answer_promptly_while_a_large_request_is_prepared(server):
    """The audit's amplification: many prompts and a long conversation of system reminders are prepared off
    the event loop; /health and another user's chat answer meanwhile."""
    pairs = [{"role": "user", "content": "x"}, {"role": "system", "content": "x"}] * 8000
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(
        server["base"] + "/v1/chat/completions", json={"messages": pairs, "max_tokens": 1}, timeout=120)))
    t.start()
    time.sleep(0.2)
    t0 = time.time()
    assert httpx.get(server["base"] + "/health", timeout=10).status_code == 200
    assert time.time() - t0 < 1.0
    t.join()
    assert result["r"].status_code in (200, 400), result["r"].text          # 400: longer than the context
    assert server["proc"].poll() is None and "Traceback" not in server["log"].read_text()


def test_cache_salt_keeps_tenants_apart(server):
    """vLLM's cache_salt: cached_tokens cannot confirm another tenant's prompt; the same tenant still hits."""
    messages = [{"role": "user", "content": "A prompt long enough to be cached across two requests: " + "x " * 80}]

    def cached(salt):
        r = chat(server, messages=messages, cache_salt=salt, max_tokens=1)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached("tenant-a") == 0 and cached("tenant-a") > 0
    assert cached("tenant-b") == 0
    r = chat(server, cache_salt="")
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
