"""`qwen36 bench --serve`: a bounded load test of a real `qwen36 serve` process on 127.0.0.1.

N client threads send streaming chat completions back to back for a fixed time; we report requests/s,
output tokens/s, time to first token and time per output token percentiles, errors, and the server's RSS
before and after (it must not grow beyond the cache it preallocates).
"""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def _one_request(port: int, body: bytes, timeout: float) -> tuple[float, float | None, int]:
    """Stream one chat completion; returns (time to first token, time per later token, tokens).
    Raises on any error."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    first = last = None
    tokens = 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
        if delta.get("content") or delta.get("reasoning_content"):
            last = time.perf_counter()
            first = first or last
    conn.close()
    if first is None or tokens == 0:
        raise RuntimeError("no tokens streamed")
    return first - t0, (last - first) / (tokens - 1) if tokens > 1 else None, tokens


def start_server(model: str, args: list[str], timeout: float = 600) -> tuple[subprocess.Popen, int]:
    """`qwen36 serve model *args` on a free port of 127.0.0.1, once /health answers."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "qwen36.cli", "serve", model, "--port", str(port), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return server, port
        except OSError:
            pass
        if time.time() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.3)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()


def run(model: str, clients: int = 8, duration: float = 30.0, max_tokens: int = 32, max_num_seqs: int = 8) -> dict:
    server, port = start_server(model, ["--max-num-seqs", str(max_num_seqs), "--max-model-len", "2048"], 120)
    try:
        body = json.dumps({"model": "bench", "max_tokens": max_tokens, "temperature": 0.7, "stream": True,
                           "stream_options": {"include_usage": True},
                           "messages": [{"role": "user", "content": "Write a short poem about the sea."}]}).encode()
        _one_request(port, body, 60)                           # warm-up
        rss_before = _rss_mb(server.pid)
        ttft, tpot, errors, done, tokens = [], [], [], [0], [0]
        lock = threading.Lock()
        stop_at = time.perf_counter() + duration

        def client():
            while time.perf_counter() < stop_at:
                try:
                    first, per_token, n = _one_request(port, body, 120)
                    with lock:
                        ttft.append(first)
                        tpot.extend([per_token] if per_token is not None else [])
                        done[0] += 1
                        tokens[0] += n
                except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        errors.append(repr(e))
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        rss_after = _rss_mb(server.pid)
    finally:
        stop_server(server)
    return {
        "clients": clients, "duration_s": round(elapsed, 1), "requests": done[0], "errors": len(errors),
        "error_examples": errors[:3], "requests_per_s": round(done[0] / elapsed, 2),
        "output_tokens_per_s": round(tokens[0] / elapsed, 1),
        "ttft_ms": {q: round(1000 * _pct(ttft, p), 1) for q, p in (("p50", .5), ("p90", .9), ("p99", .99))},
        "tpot_ms": {q: round(1000 * _pct(tpot, p), 1) for q, p in (("p50", .5), ("p90", .9), ("p99", .99))},
        "server_rss_mb": {"before": round(rss_before), "after": round(rss_after)},
    }
