"""The real agent clients against a real `qwen36 serve`: Claude Code (`claude -p`, Anthropic Messages) and
Codex CLI (`codex exec`, OpenAI Responses), unchanged, each in a clean temporary HOME.

The model is a scripted checkpoint: the demo checkpoint with every layer's output zeroed, so the last token
alone picks the next one (a bigram table we write into the embedding and lm_head). After the thinking
prompt's `<think>\\n` it writes `Okay.</think>\\n\\nHi there!<|im_end|>`, whatever the conversation, so a
client gets a short, well-formed answer with reasoning and ends its turn (random weights never stop).

Between client and server sits a capture proxy: it records every request and its status, and answers the
first request of a task with a tool call (events written by our adapters' own writers; the request still
reaches the server, which must answer it with a 200). The client then runs the tool for real and sends the
result, which the server answers. Each request's shape (field names, block and item types, roles) must
match the committed fixture in tests/data/agent_requests/, so a client release that changes what it sends
fails here; `QWEN36_UPDATE_AGENT_FIXTURES=1` rewrites the fixtures from the captured requests (then run
tests/test_api_adapters.py, which feeds them through the adapters). .ci/run installs the pinned clients.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_server import KEY, launch, stop

FIXTURES = Path(__file__).parent / "data" / "agent_requests"
UPDATE = os.environ.get("QWEN36_UPDATE_AGENT_FIXTURES") == "1"
# the bigram script: each token's successor; any other token is followed by <|im_end|>
SCRIPT = ["\n", "Okay", ".", "</think>", "\n\n", "Hi", " there", "!"]
ANSWER = "Hi there!"
MARKER = "qwen36-file-marker-5521"             # the content of the file the tool call reads
CODEX_ARGS = ("--skip-git-repo-check", "--sandbox", "danger-full-access")


def scripted_checkpoint(src: Path, out: Path) -> Path:
    """The demo checkpoint as a bigram model: attention, DeltaNet, expert and shared-expert outputs zeroed
    (the residual stream stays the token's embedding), the final norm the identity, each scripted token's
    embedding a one-hot direction whose lm_head row points at its successor (logit 64: sampling at any
    temperature picks it), every other token's embedding the direction of <|im_end|>."""
    from qwen36.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(src)
    ids = [tok.encode(s) for s in SCRIPT]
    assert all(len(i) == 1 for i in ids), ids                 # one token each, all distinct
    ids = [i[0] for i in ids]
    assert len(set(ids)) == len(ids)
    chain = dict(zip(ids, ids[1:] + [tok.im_end_id]))
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    for f in src.glob("*.safetensors"):
        t = load_file(f)
        for name, w in t.items():
            if name.startswith("model.language_model.layers.") and name.endswith(
                    ("o_proj.weight", "out_proj.weight", "experts.down_proj", "shared_expert.down_proj.weight")):
                t[name] = torch.zeros_like(w)
        if "model.language_model.norm.weight" in t:                # zero-centred: (1 + 0) x / rms(x)
            t["model.language_model.norm.weight"].zero_()
        if "model.language_model.embed_tokens.weight" in t:
            e = t["model.language_model.embed_tokens.weight"]
            e.zero_()
            e[:, -1] = 1
            for d, token in enumerate(chain):
                e[token, -1], e[token, d] = 0, 1
        if "lm_head.weight" in t:
            h = t["lm_head.weight"]
            h.zero_()
            for d, nxt in enumerate(chain.values()):
                h[nxt, d] = 8
            h[tok.im_end_id, -1] = 8
        save_file(t, out / f.name, metadata={"format": "pt"})
    return out


# ---- the capture proxy -----------------------------------------------------------------------------------

def _canned_messages(call: dict) -> bytes:
    """An Anthropic event stream whose answer is one tool call, from our adapter's block writer."""
    from qwen36.server.anthropic import _BlockWriter, _event

    usage = {"input_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}
    w = _BlockWriter()
    events = [{"type": "message_start", "message": {"id": "msg_canned", "type": "message", "role": "assistant",
                                                     "model": "qwen36", "content": [], "stop_reason": None,
                                                     "stop_sequence": None, "usage": usage}}]
    events += w.delta({"tool_calls": [call]}) + w.close()
    events += [{"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": usage},
               {"type": "message_stop"}]
    return "".join(_event(e) for e in events).encode()


def _canned_responses(call: dict) -> bytes:
    """A Responses event stream whose answer is one function call, from our adapter's item writer."""
    from qwen36.server.responses import _ItemWriter

    w = _ItemWriter()
    base = {"id": "resp_canned", "object": "response", "created_at": 0, "model": "qwen36", "output": [],
            "status": "in_progress", "usage": None, "error": None, "incomplete_details": None}
    events = [{"type": "response.created", "response": base}] + w.delta({"tool_calls": [call]}) + w.close()
    usage = {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 2}
    events.append({"type": "response.completed", "response": {**base, "status": "completed", "output": w.done,
                                                               "usage": usage}})
    return "".join(f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n"
                   for n, e in enumerate(events)).encode()


class Proxy:
    """Forwards to the server, recording (path, body, status) of each request. `canned[path_prefix]` holds
    answers (event-stream bytes) given in place of the server's to the next such requests, which still
    reach the server (their status is recorded, their answer read and dropped)."""

    def __init__(self, upstream: str):
        self.upstream, self.records, self.canned = upstream, [], {}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                proxy.forward(self)
            do_GET = do_POST

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def forward(self, h):
        raw = h.rfile.read(int(h.headers.get("content-length") or 0))
        record = {"method": h.command, "path": h.path, "headers": dict(h.headers),
                  "body": json.loads(raw) if raw else None, "status": None}
        self.records.append(record)
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() not in ("host", "content-length", "accept-encoding", "connection")}
        canned = next((q.pop(0) for p, q in self.canned.items() if h.path.startswith(p) and q), None)
        with httpx.Client(timeout=300) as c, c.stream(h.command, self.upstream + h.path, content=raw,
                                                      headers=headers) as r:
            record["status"] = r.status_code
            if canned is not None:
                r.read()
                status, ctype, chunks = 200, "text/event-stream", [canned]
            else:
                status, ctype, chunks = r.status_code, r.headers.get("content-type", ""), r.iter_bytes()
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for chunk in chunks:
                if chunk:
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- request shapes and fixtures -------------------------------------------------------------------------

_KEPT = {"type", "role", "effort", "display", "summary", "keep", "tool_choice", "wire"}   # values that matter
_OPAQUE = {"input_schema", "parameters", "properties", "metadata", "client_metadata"}    # contents that do not


def shape(x, key: str | None = None):
    """What an adapter reads of a request: field names, and the values of `type`, `role`, ... fields;
    lists as the set of their elements' shapes; other strings, numbers and schemas reduced to their kind."""
    if key in _OPAQUE:
        return "opaque"
    if isinstance(x, dict):
        return {k: shape(v, k) for k, v in sorted(x.items())}
    if isinstance(x, list):
        return sorted({json.dumps(shape(v), sort_keys=True) for v in x})
    if isinstance(x, str):
        return x if key in _KEPT else "str"
    if isinstance(x, bool) or x is None:
        return x
    return "number"


def sanitize(obj, paths: dict[str, str]):
    """The request with machine-specific paths and ids replaced (fixtures are committed)."""
    text = json.dumps(obj, ensure_ascii=False)
    for path, name in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        dashed = re.sub(r"[^A-Za-z0-9]", "-", path)                  # (Claude Code's project directory name)
        text = text.replace(path, name).replace(dashed, re.sub(r"[^A-Za-z0-9]", "-", name))
    text = re.sub(r'\\"device_id\\":\\"[0-9a-f]+\\"', r'\\"device_id\\":\\"0\\"', text)
    return json.loads(text)


def check_fixture(name: str, record: dict, client: str, paths: dict[str, str]) -> None:
    """Write the fixture (update mode) or require the live request to have the committed fixture's shape."""
    path = FIXTURES / f"{name}.json"
    body = sanitize(record["body"], paths)
    if UPDATE:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        keep = ("user-agent", "anthropic-beta", "anthropic-version", "originator")
        headers = {k.lower(): v for k, v in record["headers"].items() if k.lower() in keep}
        path.write_text(json.dumps({"client": client, "method": record["method"], "path": record["path"],
                                    "headers": headers, "body": body}, indent=1, ensure_ascii=False) + "\n")
        return
    assert path.exists(), f"{path} is missing: run with QWEN36_UPDATE_AGENT_FIXTURES=1"
    fixture = json.loads(path.read_text())
    assert shape(body) == shape(fixture["body"]), (
        f"{client} sends requests of another shape than {path.name} ({fixture['client']}): rerun this file with "
        "QWEN36_UPDATE_AGENT_FIXTURES=1, then tests/test_api_adapters.py, and check the adapters")


# ---- the clients -----------------------------------------------------------------------------------------

def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:                             # a failure, not a skip: CI installs them (.ci/run)
        pytest.fail(f"`{name}` is not installed: npm install -g @anthropic-ai/claude-code @openai/codex "
                    "(the versions .ci/run pins)")
    return path


def version(cmd: str) -> str:
    return subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agents")
    path = scripted_checkpoint(checkpoint("demo"), tmp / "scripted")
    proc, base = launch(path, tmp / "server.log", "--api-key", KEY, "--max-model-len", "32768",
                        "--served-model-name", "qwen36", "--log-level", "debug")
    proxy = Proxy(base)
    yield {"base": base, "proxy": proxy, "log": tmp / "server.log"}
    print((tmp / "server.log").read_text()[-20000:]) if os.environ.get("QWEN36_AGENT_LOG") else None
    proxy.close()
    stop(proc)


def workspace(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """(home, project directory holding the file the tool call reads, the paths to hide in fixtures)."""
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    (project / "hello.txt").write_text(MARKER + "\n")
    return home, project, {str(project): "/home/user/project", str(home): "/home/user", str(tmp_path): "/tmp/t"}


def run(cmd: list[str], env: dict, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **env}      # nothing else of ours reaches the client
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"{cmd[:2]} exited {p.returncode}\nstdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}"
    return p


def answered(server, start: int, route: str) -> list[dict]:
    """The requests since `start`, all answered 200 by the server, those to `route` returned."""
    records = server["proxy"].records[start:]
    assert records and all(r["status"] == 200 for r in records), [(r["path"], r["status"]) for r in records]
    return [r for r in records if r["path"].split("?")[0] == route]


def tool_result_text(body: dict) -> str:
    return json.dumps(body["messages"][-1]["content"])


def test_claude_code(server, tmp_path):
    """`claude -p` reads a file with its Read tool (our tool_use stream), sends the result, gets the scripted
    answer; then `claude -p --continue` runs a second turn on the whole history."""
    claude = binary("claude")
    client = f"claude-code {version(claude).split()[0]}"
    home, project, paths = workspace(tmp_path)
    env = {"HOME": str(home), "ANTHROPIC_BASE_URL": server["proxy"].base, "ANTHROPIC_API_KEY": KEY,
           "ANTHROPIC_MODEL": "qwen36", "ANTHROPIC_SMALL_FAST_MODEL": "qwen36", "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "64",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
           "DISABLE_ERROR_REPORTING": "1"}
    proxy = server["proxy"]
    start = len(proxy.records)
    proxy.canned["/v1/messages"] = [_canned_messages({
        "index": 0, "id": "call_read1", "type": "function",
        "function": {"name": "Read", "arguments": json.dumps({"file_path": str(project / "hello.txt")})}})]
    first = run([claude, "-p", "Read hello.txt and greet me."], env, project)
    assert ANSWER in first.stdout, first.stdout
    turn = answered(server, start, "/v1/messages")
    assert len(turn) == 2, [r["path"] for r in turn]
    ask, result = turn[0]["body"], turn[1]["body"]
    assert ask["max_tokens"] == 64 and "system" in [m["role"] for m in ask["messages"]]
    assert MARKER in tool_result_text(result)                 # Claude Code ran Read and sent what it read
    start = len(proxy.records)
    second = run([claude, "-p", "--continue", "--output-format", "json", "Again."], env, project)
    out = json.loads(second.stdout)
    assert out["result"] == ANSWER and out["is_error"] is False and out["stop_reason"] == "end_turn"
    [again] = answered(server, start, "/v1/messages")
    assert [b["type"] for m in again["body"]["messages"] if m["role"] == "assistant" for b in m["content"]
            if isinstance(b, dict)].count("tool_use") == 1
    for name, record in (("claude_code_first", turn[0]), ("claude_code_tool_result", turn[1]),
                         ("claude_code_second_turn", again)):
        check_fixture(name, record, client, paths)


def test_codex(server, tmp_path):
    """`codex exec` runs a command through exec_command (our function_call stream), sends its output, gets the
    scripted answer; then `codex exec resume --last` runs a second turn on the whole history."""
    codex = binary("codex")
    client = version(codex)                                   # "codex-cli 0.171.0"
    home, project, paths = workspace(tmp_path)
    codex_home = home / ".codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(f'''model = "qwen36"
model_provider = "qwen36"
[model_providers.qwen36]
name = "qwen36"
base_url = "{server["proxy"].base}/v1"
env_key = "QWEN36_API_KEY"
wire_api = "responses"
''')
    env = {"HOME": str(home), "CODEX_HOME": str(codex_home), "QWEN36_API_KEY": KEY}
    paths[str(codex_home)] = "/home/user/.codex"
    proxy = server["proxy"]
    start = len(proxy.records)
    proxy.canned["/v1/responses"] = [_canned_responses({
        "index": 0, "id": "call_cat1", "type": "function",
        "function": {"name": "exec_command", "arguments": json.dumps({"cmd": "cat hello.txt"})}})]
    # no sandbox: Codex's bubblewrap needs user namespaces, which a CI container may not allow
    first = run([codex, "exec", *CODEX_ARGS, "Show me hello.txt."], env, project)
    assert ANSWER in first.stdout, first.stdout + first.stderr
    turn = answered(server, start, "/v1/responses")
    assert len(turn) == 2, [r["path"] for r in turn]
    [output] = [i for i in turn[1]["body"]["input"] if i.get("type") == "function_call_output"]
    assert output["call_id"] == "call_cat1" and MARKER in json.dumps(output)   # Codex ran it, sent its output
    start = len(proxy.records)
    second = run([codex, "exec", *CODEX_ARGS, "resume", "--last", "Again."], env, project)
    assert ANSWER in second.stdout
    [again] = answered(server, start, "/v1/responses")
    kinds = [i.get("type") for i in again["body"]["input"]]        # the whole first task comes back
    assert kinds.count("function_call") == kinds.count("function_call_output") == kinds.count("reasoning") == 1
    for name, record in (("codex_first", turn[0]), ("codex_tool_result", turn[1]), ("codex_second_turn", again)):
        check_fixture(name, record, client, paths)


def test_server_log_has_no_tracebacks(server):
    assert "Traceback" not in server["log"].read_text()
