"""`qwen36 chat` driven for real in tmux: typing, streaming, commands, Ctrl-C, exit."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid

import pytest

TMUX = shutil.which("tmux")


def tmux(*args) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def screen(session) -> str:
    return tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", session)


def wait_for(session, predicate, timeout=60.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = screen(session)
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out; screen:\n{screen(session)}")


def start(path, max_tokens: int) -> str:
    """`qwen36 chat` in a new detached tmux session, once its first prompt shows."""
    if TMUX is None:
        pytest.fail("tmux is not installed (.ci/run installs it; apt-get install tmux)")
    name = f"qwen36-{uuid.uuid4().hex[:8]}"
    cmd = f"{sys.executable} -m qwen36.cli chat {path} --temperature 0 --max-tokens {max_tokens}; sleep 30"
    tmux("new-session", "-d", "-s", name, "-x", "200", "-y", "50", cmd)
    wait_for(name, lambda t: "commands: /think" in t and t.rstrip().endswith(">"))
    return name


@pytest.fixture
def session(checkpoint):
    name = start(checkpoint("demo"), 12)
    yield name
    subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def send(session, *keys):
    tmux("send-keys", "-t", session, *keys)


def prompts(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith(">"))


def test_chat_repl(session):
    send(session, "Hello there", "Enter")
    text = wait_for(session, lambda t: prompts(t) >= 2)
    assert "[thinking]" in text                                 # reasoning is shown, marked apart

    send(session, "/think off", "Enter")
    wait_for(session, lambda t: "thinking off" in t)
    before = prompts(screen(session))
    send(session, "first line\\", "Enter")
    wait_for(session, lambda t: "... " in t.splitlines()[-1] or t.rstrip().endswith("..."))
    send(session, "second line", "Enter")
    text = wait_for(session, lambda t: prompts(t) >= before + 1 and t.rstrip().endswith(">"))
    last_answer = text.split("second line")[-1]
    assert "[thinking]" not in last_answer                      # thinking off: answer only

    send(session, "/system Be brief.", "Enter")
    wait_for(session, lambda t: "system prompt set" in t)
    send(session, "/reset", "Enter")
    wait_for(session, lambda t: "history cleared" in t)
    send(session, "/exit", "Enter")
    wait_for(session, lambda t: "commands:" in t and not t.rstrip().endswith(">"), timeout=10)


def test_ctrl_c_stops_answer_not_session(checkpoint):
    name = start(checkpoint("demo"), 100000)
    try:
        send(name, "Tell me a long story", "Enter")
        wait_for(name, lambda t: "[thinking]" in t)
        time.sleep(1.0)
        send(name, "C-c")
        wait_for(name, lambda t: "[stopped]" in t and t.rstrip().endswith(">"), timeout=20)
        send(name, "/think off", "Enter")                       # still alive and answering commands
        wait_for(name, lambda t: "thinking off" in t)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


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
    text = wait_for(session, lambda t: prompts(t) >= 4 and t.rstrip().endswith(">"), timeout=120)
    assert "Traceback" not in text and "[thinking]" in text
