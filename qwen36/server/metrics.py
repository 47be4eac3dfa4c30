"""Prometheus text exposition of the server's counters (no client library needed)."""
from __future__ import annotations

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _histogram(name: str, help_: str, values: list[float]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for b in BUCKETS:
        lines.append(f'{name}_bucket{{le="{b}"}} {sum(v <= b for v in values)}')
    lines += [f'{name}_bucket{{le="+Inf"}} {len(values)}', f"{name}_sum {sum(values):.6f}", f"{name}_count {len(values)}"]
    return lines


def render_metrics(stats, load: dict[str, float]) -> str:
    lines = ["# HELP qwen36_requests_total HTTP requests by route and status.", "# TYPE qwen36_requests_total counter"]
    for (route, status), n in sorted(stats.requests.items()):
        lines.append(f'qwen36_requests_total{{route="{route}",status="{status}"}} {n}')
    lines += ["# HELP qwen36_prompt_tokens_total Prompt tokens accepted.", "# TYPE qwen36_prompt_tokens_total counter",
              f"qwen36_prompt_tokens_total {stats.prompt_tokens}",
              "# HELP qwen36_generation_tokens_total Tokens generated.", "# TYPE qwen36_generation_tokens_total counter",
              f"qwen36_generation_tokens_total {stats.generation_tokens}"]
    lines += _histogram("qwen36_time_to_first_token_seconds", "Time from request to first token.", stats.ttft)
    lines += _histogram("qwen36_time_per_output_token_seconds", "Mean time per token after the first.", stats.tpot)
    lines += ["# HELP qwen36_num_requests_running Requests holding a slot.", "# TYPE qwen36_num_requests_running gauge",
              f"qwen36_num_requests_running {load['running']:.0f}",
              "# HELP qwen36_num_requests_waiting Requests queued for a slot or cache.",
              "# TYPE qwen36_num_requests_waiting gauge", f"qwen36_num_requests_waiting {load['waiting']:.0f}",
              "# HELP qwen36_kv_cache_usage_ratio Fraction of KV cache blocks reserved.",
              "# TYPE qwen36_kv_cache_usage_ratio gauge", f"qwen36_kv_cache_usage_ratio {load['cache_usage']:.4f}"]
    lines += _metric("qwen36_prompt_tokens_computed_total", "counter", "Prompt tokens run through the model.",
                     load["prompt_tokens_computed"])
    lines += _metric("qwen36_num_preemptions_total", "counter",
                     "Sequences preempted when the KV cache ran out (recomputed when readmitted).", load["preemptions"])
    if "prefix_hits" in load:
        lines += _metric("qwen36_prompt_tokens_cached_total", "counter",
                         "Prompt tokens taken from the prefix cache.", load["prompt_tokens_cached"])
        lines += _metric("qwen36_prefix_cache_hits_total", "counter", "Requests that started from a cached prefix.",
                         load["prefix_hits"])
        lines += _metric("qwen36_prefix_cache_snapshots", "gauge", "State snapshots held.", load["snapshots"])
        lines += _metric("qwen36_prefix_cache_bytes", "gauge",
                         "Bytes held by the prefix cache: snapshots and KV blocks no request uses.",
                         load["prefix_cache_bytes"])
        lines += _metric("qwen36_prefix_cache_snapshots_saved_total", "counter", "State snapshots saved.",
                         load["snapshots_saved"])
        lines += _metric("qwen36_prefix_cache_evictions_total", "counter", "Snapshots evicted.", load["evictions"])
    if "spec_steps" in load:      # vLLM's names for the same counters (speculative decoding)
        lines += _metric("qwen36_spec_decode_num_drafts_total", "counter", "Verification steps with drafts.",
                         load["spec_steps"])
        lines += _metric("qwen36_spec_decode_num_draft_tokens_total", "counter", "Draft tokens verified.",
                         load["spec_draft_tokens"])
        lines += _metric("qwen36_spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted.",
                         load["spec_accepted_tokens"])
    lines += ["# HELP qwen36_background_prefills_total Idle-time prefills of the next turn's history.",
              "# TYPE qwen36_background_prefills_total counter"]
    for state in ("started", "finished", "preempted"):
        lines.append(f'qwen36_background_prefills_total{{state="{state}"}} {load["background_" + state]}')
    return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_: str, value) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
