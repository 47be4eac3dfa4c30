"""Decode tok/s with and without a JSON schema on any OpenAI-compatible server (ours or llama.cpp's).

Usage: python scripts/bench_structured_server.py URL LABEL   (chat completions, streamed, batch 1, thinking off,
64 tokens with ignore_eos, a long-string schema as response_format; plain and schema alternated 3 times, medians)
"""
import json, sys, time, httpx, statistics
url, label = sys.argv[1], sys.argv[2]
SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 100000}}, "required": ["text"]}
MSG = [{"role": "user", "content": "Write a long story as JSON."}]

def run(schema, n=64):
    body = {"model": "m", "messages": MSG, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True,
            "chat_template_kwargs": {"enable_thinking": False}}
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
    stamps, text = [], ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                for c in d.get("choices", []):
                    t = (c.get("delta") or {}).get("content")
                    if t:
                        stamps.append(time.perf_counter()); text += t
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps), text

run(True, 8); run(False, 8)            # warm both paths
res = {"plain": [], "schema": []}
for _ in range(3):
    for k, s in (("plain", False), ("schema", True)):
        rate, chunks, text = run(s)
        res[k].append(rate)
        if s: last = text
med = {k: round(statistics.median(v), 2) for k, v in res.items()}
print(json.dumps({"server": label, "rounds": res, "median_tok_s": med,
                  "slowdown": round(1 - med["schema"] / med["plain"], 3), "schema_text_head": last[:60]}))
