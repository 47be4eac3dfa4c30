"""`qwen36 bench --agent`: replay a deterministic coding-agent session against an OpenAI-compatible server.

The transcript (built here, the same for every engine): a long system prompt, six tools, and `tasks` user
tasks of `turns_per_task` requests each: the user's task, then tool loops (the assistant reasons, calls a
tool, the tool's result is a source file or command output), and a final answer before the next task.
Each request asks for one token (max_tokens=1), so the time of a request is its time to first token, and
the next request carries the transcript's own assistant message, not the engine's: every engine sees the
same prompts. Reported per turn: time, prompt tokens, cached prompt tokens (usage.prompt_tokens_details,
or llama.cpp's timings.cache_n), and totals; with preserve_thinking on and off.

LONG_SESSION (`qwen36 bench --agent --long-session`) is the long-context preset: 6 tasks of 6 requests with
320-line files, 36 requests whose last prompt is 103,211 tokens with preserve_thinking on (101,191 off), by the
real tokenizer and the default chat template with the six tools.
"""
from __future__ import annotations

import json
import random
import time

WORDS = ("value index buffer state cache token layer block result config parser stream request batch "
         "offset window weight scale group expert router tensor shape length prefix snapshot record limit").split()

SYSTEM = ("You are a coding agent working in a Python repository. You can read and write files, search the "
          "code and run shell commands through the tools you are given. Work step by step: read the code that "
          "matters before changing it, keep changes small, run the tests after each change, and report what "
          "you changed and why. Never invent file contents; read them. Prefer the project's existing helpers "
          "over new code. When a command fails, read its output and fix the cause.\n\n")


# the long-context preset: the last request past 100K tokens (module docstring; tests/test_bench_context.py)
LONG_SESSION = {"tasks": 6, "turns_per_task": 6, "file_lines": 320}
LONG_SESSION_CONTEXT = 131072            # --max-model-len of the server the bench starts for it


def _source_file(rng: random.Random, name: str, lines: int) -> str:
    """A plausible Python module (deterministic for a seed)."""
    out = [f'"""{name}: {" ".join(rng.choices(WORDS, k=8))}."""', "from __future__ import annotations", ""]
    while len(out) < lines:
        fn = "_".join(rng.choices(WORDS, k=2))
        args = ", ".join(rng.sample(WORDS, 3))
        out += [f"def {fn}({args}):", f'    """{" ".join(rng.choices(WORDS, k=10))}."""']
        for _ in range(rng.randint(3, 8)):
            a, b, c = rng.sample(WORDS, 3)
            out.append(f"    {a} = {b}[{rng.randint(0, 64)}] * {c} + {rng.randint(1, 999)}")
        out += [f"    return {rng.choice(WORDS)}", ""]
    return "\n".join(out)


TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": {
    "type": "object", "properties": {k: {"type": t, "description": k.replace("_", " ")} for k, t in p.items()},
    "required": list(p)}}} for n, d, p in [
    ("read_file", "Read a file of the repository and return its contents.", {"path": "string"}),
    ("write_file", "Write a file of the repository (whole contents).", {"path": "string", "content": "string"}),
    ("edit_file", "Replace one exact string in a file.", {"path": "string", "old": "string", "new": "string"}),
    ("search", "Search the repository for a regular expression.", {"pattern": "string", "path": "string"}),
    ("run", "Run a shell command in the repository and return its output.", {"command": "string",
                                                                             "timeout": "integer"}),
    ("list_dir", "List a directory of the repository.", {"path": "string"})]]


def transcript(tasks: int = 3, turns_per_task: int = 4, file_lines: int = 120, seed: int = 0) -> list[dict]:
    """The whole session as messages; requests are its prefixes ending in a user or tool message."""
    rng = random.Random(seed)
    system = SYSTEM + "Project conventions:\n" + "\n".join(
        f"- {' '.join(rng.choices(WORDS, k=14))}." for _ in range(40))
    msgs = [{"role": "system", "content": system}]
    for t in range(tasks):
        mod = f"pkg/{rng.choice(WORDS)}_{t}.py"
        msgs.append({"role": "user", "content": f"Task {t + 1}: in {mod}, " + " ".join(rng.choices(WORDS, k=30))
                     + ". Then run the tests."})
        for k in range(turns_per_task - 1):
            tool, args, result = _tool_step(rng, mod, k, file_lines)
            msgs.append({"role": "assistant", "content": "",
                         "reasoning_content": " ".join(rng.choices(WORDS, k=60)),
                         "tool_calls": [{"id": f"call_{t}_{k}", "type": "function",
                                         "function": {"name": tool, "arguments": json.dumps(args)}}]})
            msgs.append({"role": "tool", "tool_call_id": f"call_{t}_{k}", "content": result})
        msgs.append({"role": "assistant", "reasoning_content": " ".join(rng.choices(WORDS, k=50)),
                     "content": f"Done: {mod} " + " ".join(rng.choices(WORDS, k=40)) + "."})
    return msgs


def _tool_step(rng: random.Random, mod: str, k: int, file_lines: int):
    if k % 3 == 0:
        return "read_file", {"path": mod}, _source_file(rng, mod, file_lines)
    if k % 3 == 1:
        other = f"pkg/{rng.choice(WORDS)}.py"
        return "read_file", {"path": other}, _source_file(rng, other, file_lines)
    out = "\n".join(f"tests/test_{rng.choice(WORDS)}.py::test_{'_'.join(rng.choices(WORDS, k=2))} PASSED"
                    for _ in range(40)) + "\n40 passed in 3.2s"
    return "run", {"command": "python -m pytest -q", "timeout": 600}, out


def requests_of(msgs: list[dict]) -> list[tuple[list[dict], str]]:
    """(messages, kind) of every request: kind 'user' (a new task) or 'tool' (a tool result came back)."""
    return [(msgs[:i + 1], m["role"]) for i, m in enumerate(msgs) if m["role"] in ("user", "tool")]


def replay(url: str, model: str | None, preserve_thinking: bool, idle_tool: float = 0.0, idle_user: float = 0.0,
           api_key: str | None = None, session: dict | None = None, log=print) -> dict:
    import httpx

    session = session or {}
    msgs = transcript(**session)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=3600)
    if model is None:
        model = client.get("/v1/models").json()["data"][0]["id"]
    turns = []
    for i, (prefix, kind) in enumerate(requests_of(msgs)):
        idle = idle_user if kind == "user" else idle_tool
        if i > 0 and idle > 0:
            time.sleep(idle)
        body = {"model": model, "messages": prefix, "tools": TOOLS, "max_tokens": 1, "temperature": 0,
                "chat_template_kwargs": {"enable_thinking": True, "preserve_thinking": preserve_thinking}}
        t = time.perf_counter()
        r = client.post("/v1/chat/completions", json=body)
        dt = time.perf_counter() - t
        r.raise_for_status()
        data = r.json()
        usage = data.get("usage") or {}
        prompt = usage.get("prompt_tokens", 0)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is None and "timings" in data:                         # llama.cpp's server
            cached = data["timings"].get("cache_n", 0)
        turns.append({"turn": i + 1, "kind": kind, "seconds": dt, "prompt_tokens": prompt, "cached_tokens": cached or 0})
        log(f"  turn {i + 1:2d} ({kind:4s}): {dt:7.2f} s  prompt {prompt:6d}  cached {cached or 0:6d}")
    total_prompt = sum(t["prompt_tokens"] for t in turns)
    total_cached = sum(t["cached_tokens"] for t in turns)
    return {"preserve_thinking": preserve_thinking, "idle_tool": idle_tool, "idle_user": idle_user,
            "turns": turns, "total_seconds": sum(t["seconds"] for t in turns), "prompt_tokens": total_prompt,
            "cached_tokens": total_cached, "cached_fraction": total_cached / max(total_prompt, 1)}


def run(url: str, model: str | None = None, preserve: tuple[bool, ...] = (True, False), idle_tool: float = 0.0,
        idle_user: float = 0.0, api_key: str | None = None, session: dict | None = None, log=print) -> list[dict]:
    results = []
    for p in preserve:
        log(f"agent session against {url}: preserve_thinking={p}, idle {idle_tool} s per tool result, "
            f"{idle_user} s before each new task")
        r = replay(url, model, p, idle_tool, idle_user, api_key, session, log)
        log(f"  total {r['total_seconds']:.1f} s, prompt tokens {r['prompt_tokens']}, cached {r['cached_tokens']} "
            f"({100 * r['cached_fraction']:.1f} %)")
        results.append(r)
    return results
