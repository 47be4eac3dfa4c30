"""The server's /metrics, through prometheus_client: counters and fixed-bucket histograms (memory does not grow
with the number of requests), the engine's gauges read from the snapshot the engine thread publishes (a scrape
never waits for a step), and the process collector (`process_resident_memory_bytes`, CPU seconds, open fds).

Requests are counted by the route they matched (its template), never by the raw path: a client cannot create a
new series or inject a line with the URL it sends (paths no route matched count as "unmatched")."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# (name, kind, help, key in the engine snapshot); vLLM's names where it has the same counter
_ENGINE = [
    ("qwen36_num_requests_running", "gauge", "Requests holding a slot.", "running"),
    ("qwen36_num_requests_waiting", "gauge", "Requests queued for a slot or cache.", "waiting"),
    ("qwen36_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks reserved.", "cache_usage"),
    ("qwen36_prompt_tokens_computed", "counter", "Prompt tokens run through the model.", "prompt_tokens_computed"),
    ("qwen36_num_preemptions", "counter",
     "Sequences preempted when the KV cache ran out (recomputed when readmitted).", "preemptions"),
    ("qwen36_engine_failed_passes", "counter",
     "Batched passes that failed (their sequences were recomputed; see Engine.step).", "failed_passes"),
    ("qwen36_engine_failed_requests", "counter", "Requests ended with finish_reason error by a failure of "
     "their own.", "failed_requests"),
    ("qwen36_prompt_tokens_cached", "counter", "Prompt tokens taken from the prefix cache.", "prompt_tokens_cached"),
    ("qwen36_prefix_cache_hits", "counter", "Requests that started from a cached prefix.", "prefix_hits"),
    ("qwen36_prefix_cache_snapshots", "gauge", "State snapshots held.", "snapshots"),
    ("qwen36_prefix_cache_bytes", "gauge", "Bytes held by the prefix cache: snapshots and KV blocks no request uses.",
     "prefix_cache_bytes"),
    ("qwen36_prefix_cache_snapshots_saved", "counter", "State snapshots saved.", "snapshots_saved"),
    ("qwen36_prefix_cache_evictions", "counter", "Snapshots evicted.", "evictions"),
    ("qwen36_spec_decode_num_drafts", "counter", "Verification steps with drafts.", "spec_steps"),
    ("qwen36_spec_decode_num_draft_tokens", "counter", "Draft tokens verified.", "spec_draft_tokens"),
    ("qwen36_spec_decode_num_accepted_tokens", "counter", "Draft tokens accepted.", "spec_accepted_tokens"),
]


class _EngineCollector:
    """The engine snapshot's numbers as metrics (what the snapshot lacks, e.g. no prefix cache, is left out)."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        load = self.snapshot()
        for name, kind, help_, key in _ENGINE:
            if key in load:
                family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                yield family(name, help_, value=load[key])
        bg = CounterMetricFamily("qwen36_background_prefills", "Idle-time prefills of the next turn's history.",
                                 labels=["state"])
        for state in ("started", "finished", "preempted"):
            bg.add_metric([state], load.get("background_" + state, 0))
        yield bg


class Metrics:
    """One server's metrics, in a registry of its own (several apps in one process do not share counts)."""

    def __init__(self, snapshot=lambda: {}):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qwen36_requests", "HTTP requests by route template and status.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("qwen36_prompt_tokens", "Prompt tokens accepted.", registry=r)
        self.generation_tokens = Counter("qwen36_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("qwen36_time_to_first_token_seconds", "Time from request to first token.",
                              buckets=BUCKETS, registry=r)
        self.tpot = Histogram("qwen36_time_per_output_token_seconds", "Mean time per token after the first.",
                              buckets=BUCKETS, registry=r)
        self.rejected = Counter("qwen36_requests_rejected", "Requests refused because the server was full.",
                                ["reason"], registry=r)
        ProcessCollector(registry=r)
        r.register(_EngineCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
