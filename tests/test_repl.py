"""`qwen36 chat` driven for real: in tmux (a terminal: typing, line editing, history, streaming, colors, the
loading indicator, commands, Ctrl-C, exit) and through pipes (no escape codes, the max-tokens mark, stats)."""
from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from qwen36.stats import format_stats

TMUX = shutil.which("tmux")
BANNER = "/help for commands"
STATS = re.compile(r"^\[stats\] prompt \d+ tokens( \(\d+ cached\))?, ([\d.]+|-) tok/s \| generated (\d+) tokens, "
                   r"([\d.]+|-) tok/s \| first token [\d.]+ s \| total [\d.]+ s( \| load [\d.]+ s)?$", re.M)


def tmux(session, *args) -> str:
    # a tmux server per session (-L): killing the last session of a shared server races the next new-session
    # ("server exited unexpectedly")
    return subprocess.run(["tmux", "-L", session, "-f", "/dev/null", *args], capture_output=True, text=True,
                          check=True).stdout


def screen(session, escapes: bool = False) -> str:
    return tmux(session, "capture-pane", "-p", "-J", *(["-e"] if escapes else []), "-S", "-200", "-t", session)


def wait_for(session, predicate, timeout=60.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = screen(session)
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out; screen:\n{screen(session)}")


def at_prompt(text: str) -> bool:
    return text.rstrip().endswith(">")


def start(path, max_tokens: int, raw_log=None, **env) -> str:
    """`qwen36 chat` in a new detached tmux session, once its first prompt shows. raw_log: a file that gets
    every byte the program writes to the terminal."""
    if TMUX is None:
        pytest.fail("tmux is not installed (.ci/run installs it; apt-get install tmux)")
    name = f"qwen36-{uuid.uuid4().hex[:8]}"
    env_words = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
    cmd = (f"env {env_words} {sys.executable} -m qwen36.cli chat {path} --temperature 0 "
           f"--max-tokens {max_tokens}; sleep 30")
    tmux(name, "new-session", "-d", "-s", name, "-x", "200", "-y", "50", cmd)
    if raw_log is not None:
        tmux(name, "pipe-pane", "-o", "-t", name, f"cat >> {shlex.quote(str(raw_log))}")
    wait_for(name, lambda t: BANNER in t and at_prompt(t))
    return name


def stop(name) -> None:
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)


@pytest.fixture
def session(checkpoint, tmp_path):
    name = start(checkpoint("demo"), 12, raw_log=tmp_path / "raw", QWEN36_NOHISTORY=1)
    yield name
    stop(name)


def send(session, *keys):
    tmux(session, "send-keys", "-t", session, *keys)


def prompts(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith(">"))


def test_chat_repl(session, tmp_path):
    send(session, "Hello there", "Enter")
    text = wait_for(session, lambda t: prompts(t) >= 2)
    assert "[thinking]" in text                                 # reasoning is shown, marked apart
    assert "\x1b[2m[thinking]" in screen(session, escapes=True)   # and dimmed, on a terminal
    raw = (tmp_path / "raw").read_bytes().decode(errors="replace")     # \r kept
    # the first turn's indicator, written and then erased with plain \r and spaces
    assert "loading...\r          \rthinking...\r           \r" in raw
    assert "loading..." not in text and "thinking..." not in text

    send(session, "/think", "Enter")                            # alone: toggles
    wait_for(session, lambda t: "thinking off" in t)
    before = prompts(screen(session))
    send(session, "first line\\", "Enter")
    wait_for(session, lambda t: "... " in t.splitlines()[-1] or t.rstrip().endswith("..."))
    send(session, "second line", "Enter")
    text = wait_for(session, lambda t: prompts(t) >= before + 1 and at_prompt(t))
    last_answer = text.split("second line")[-1]
    assert "[thinking]" not in last_answer                      # thinking off: answer only

    send(session, "/system Be brief.", "Enter")
    wait_for(session, lambda t: "system prompt set" in t)
    send(session, "/reset", "Enter")
    wait_for(session, lambda t: "history cleared" in t)
    send(session, "/exit", "Enter")
    wait_for(session, lambda t: BANNER in t and not at_prompt(t), timeout=10)


def test_line_editing_and_history(checkpoint, tmp_path):
    """Arrow keys edit the line and recall earlier ones; the history survives the session, in a bounded
    file; NO_COLOR keeps escape codes out."""
    hist = tmp_path / "history"
    hist.write_text("".join(f"old {i}\n" for i in range(1200)))
    name = start(checkpoint("demo"), 3, QWEN36_HISTORY=hist, NO_COLOR=1)
    try:
        send(name, "/image abc", "Left", "d", "Enter")          # Left moves the cursor: abc -> abdc
        wait_for(name, lambda t: "image path 'abdc'" in t and at_prompt(t))
        send(name, "Up", "Enter")                               # Up recalls the last line
        text = wait_for(name, lambda t: t.count("image path 'abdc'") == 2 and at_prompt(t))
        assert "^[" not in text and "\x1b" not in text
        send(name, "Hello", "Enter")
        wait_for(name, lambda t: "[stopped: reached max tokens (3)" in t and at_prompt(t))
        assert "\x1b[2m" not in screen(name, escapes=True)       # NO_COLOR: reasoning not dimmed
        send(name, "/exit", "Enter")
        wait_for(name, lambda t: BANNER in t and not at_prompt(t), timeout=10)
    finally:
        stop(name)
    lines = hist.read_text().splitlines()
    assert len(lines) == 1000                                   # bounded: the newest lines kept
    assert lines[-3:] == ["/image abdc", "Hello", "/exit"]

    name = start(checkpoint("demo"), 3, QWEN36_HISTORY=hist)    # a new session recalls the old one's lines
    try:
        send(name, "Up", "Up")
        wait_for(name, lambda t: t.rstrip().endswith("> Hello"))
    finally:
        stop(name)


def test_ctrl_c_stops_answer_not_session(checkpoint):
    name = start(checkpoint("demo"), 100000, QWEN36_NOHISTORY=1)
    try:
        send(name, "Tell me a long story", "Enter")
        wait_for(name, lambda t: "[thinking]" in t)
        time.sleep(1.0)
        send(name, "C-c")
        wait_for(name, lambda t: "[stopped]" in t and at_prompt(t), timeout=20)
        send(name, "/think off", "Enter")                       # still alive and answering commands
        wait_for(name, lambda t: "thinking off" in t)
    finally:
        stop(name)


def test_image_command(session, tmp_path):
    """/image attaches a file to the next message; a bad file is reported and the session goes on."""
    import numpy as np
    from PIL import Image

    good = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    send(session, f"/image {bad}", "Enter")
    wait_for(session, lambda t: "error:" in t and "image" in t.split("error:")[-1])
    send(session, f"/image {good}", "Enter")
    wait_for(session, lambda t: "image attached to your next message" in t)
    send(session, "What is this?", "Enter")
    text = wait_for(session, lambda t: prompts(t) >= 4 and at_prompt(t), timeout=120)
    assert "Traceback" not in text and "[thinking]" in text


def test_piped_session(checkpoint, tmp_path):
    """stdin and stdout pipes: no escape codes (even with a color TERM), no indicator, no history file; the
    max-tokens mark, /stats lines on stderr, /think toggling, unknown commands, //text sent as /text."""
    env = {**os.environ, "TERM": "xterm-256color", "QWEN36_HISTORY": str(tmp_path / "history")}
    env.pop("NO_COLOR", None)
    script = "Hello\n/think\n/stats\nHi there\n/foo\n//slash text\n"
    run = subprocess.run([sys.executable, "-m", "qwen36.cli", "chat", str(checkpoint("demo")), "--temperature", "0",
                          "--max-tokens", "3"], input=script.encode(), capture_output=True, env=env, timeout=300)
    out, err = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 0, err
    assert b"\x1b" not in run.stdout and b"\x1b" not in run.stderr
    assert "loading..." not in out and "thinking..." not in out
    assert not (tmp_path / "history").exists()
    # thinking on, cut inside the reasoning; then two answers with thinking off (one of them '/slash text')
    assert out.count("[stopped: reached max tokens (3) while thinking, before any answer; /set max_tokens N") == 1
    assert out.count("[stopped: reached max tokens (3); /set max_tokens N") == 2
    assert "thinking off" in out and "stats on" in out
    assert out.count("unknown command") == 1 and "unknown command /foo" in out
    stats = STATS.findall(err)
    assert len(stats) == 2 and all(s[2] == "3" for s in stats), err   # one per answer after /stats on


def test_run_repl_verbose(checkpoint, monkeypatch, capsys):
    """run_repl(..., verbose=True) starts with the stats line on (cli passes --verbose); the default is off."""
    from qwen36 import LLM
    from qwen36.repl import run_repl

    llm = LLM(checkpoint("demo"))
    params = llm.default_sampling_params(temperature=0, max_tokens=2)
    monkeypatch.setenv("QWEN36_NOHISTORY", "1")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert run_repl(llm, params, thinking=False, verbose=True) == 0
    captured = capsys.readouterr()
    assert len(STATS.findall(captured.err)) == 1 and "load " in captured.err   # first turn: engine set-up timed
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/stats\nHi\n"))
    assert run_repl(llm, params, thinking=False) == 0
    captured = capsys.readouterr()
    assert len(STATS.findall(captured.err)) == 1 and "stats on" in captured.out


def test_format_stats():
    line = format_stats(100, 11, start=10.0, first_token=10.5, end=11.5, cached_tokens=20, load_s=2.0)
    assert line == ("[stats] prompt 100 tokens (20 cached), 160.0 tok/s | generated 11 tokens, 10.0 tok/s | "
                    "first token 0.500 s | total 1.50 s | load 2.00 s")
    assert format_stats(5, 0, 0.0, None, 1.0) == \
        "[stats] prompt 5 tokens, - tok/s | generated 0 tokens, - tok/s | no token | total 1.00 s"
    assert STATS.match(format_stats(7, 1, 0.0, 0.25, 0.25))
