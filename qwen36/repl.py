"""`qwen36 chat`: an interactive chat in the terminal.

Streaming output; reasoning shown dimmed and apart from the answer; tool calls shown as such. Commands are
listed in HELP (/help in the chat). /image and /video attach a file to the next message (checked at once: a
bad file is reported and not attached); `//text` sends the message `/text`. A line ending in a backslash
continues on the next line; a line of three double quotes starts and ends a multi-line block. Ctrl-C stops
the current answer (what was said so far stays in the history) without leaving; Ctrl-D or /exit leaves.

On a terminal: line editing, history (Up/Down; kept in chat_history under the qwen36 cache dir, the last
HISTORY_LENGTH lines; QWEN36_HISTORY=FILE puts it elsewhere, QWEN36_NOHISTORY=1 keeps none) and Tab completion
of commands and /image paths, by the standard library's readline where it exists (else plain input()).
Escape codes (dim reasoning, bold tool calls) only when stdout is a terminal and NO_COLOR is unset or empty;
the "loading..."/"thinking..." indicator before the first output only on a terminal, and erased. An answer
cut at max_tokens ends with a [stopped: ...] mark; `/stats on` (or run_repl(verbose=True)) adds a timing line
on stderr after each answer (stats.py).
"""
from __future__ import annotations

import dataclasses
import glob
import os
import sys
import time
from pathlib import Path

from .chat import ChatTemplateError
from .inputs import MediaPolicy
from .llm import LLM
from .parsers import AssistantStreamParser
from .paths import cache_dir
from .sampling import SamplingParams
from .stats import StreamTimer

DIM, RESET, BOLD = "\x1b[2m", "\x1b[0m", "\x1b[1m"
HISTORY_LENGTH = 1000
COMMANDS = ["/think", "/stats", "/set", "/system", "/reset", "/image", "/video", "/help", "/exit", "/quit"]
SETTABLE = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}
HELP = """commands:
  /think [on|off]     reasoning on or off (alone: toggle)
  /stats [on|off]     after each answer a line of prompt and generation tokens, tok/s, time to first token
  /set [NAME VALUE]   set max_tokens, temperature, top_p, top_k or seed (alone: show them)
  /system [TEXT]      set the system prompt (alone: clear it); clears the history
  /reset              clear the history
  /image PATH         attach a picture to the next message
  /video PATH         attach a video to the next message
  /help, /?           this list
  /exit, /quit        leave (or Ctrl-D)
  //TEXT              send a message starting with '/' (sends /TEXT)
end a line with \\ to continue it; a line of \"\"\" starts and ends a block; Up/Down recall earlier lines
Ctrl-C stops an answer (what was said stays in the history)"""


def use_color(stream) -> bool:
    """Escape codes only on a terminal, and not when NO_COLOR is set non-empty (no-color.org) or TERM=dumb."""
    return _isatty(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ChatSession:
    def __init__(self, llm: LLM, params: SamplingParams, thinking: bool = True, out=sys.stdout,
                 verbose: bool = False, err=sys.stderr):
        self.llm, self.params, self.thinking, self.out, self.err = llm, params, thinking, out, err
        self.verbose = verbose                 # the stats line after each answer
        self.system: str | None = None
        self.history: list[dict] = []
        self.attached: list[dict] = []          # image/video parts for the next user message
        color = use_color(out)
        self.dim, self.bold, self.reset = (DIM, BOLD, RESET) if color else ("", "", "")
        self.tty = _isatty(out)                 # the progress indicator only on a terminal
        self._indicator = ""

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    # the indicator: plain text erased by \r and spaces, so no escape codes even with NO_COLOR
    def indicate(self, text: str) -> None:
        if self.tty:
            self.clear_indicator()
            self.write(text)
            self._indicator = text

    def clear_indicator(self) -> None:
        if self._indicator:
            n, self._indicator = len(self._indicator), ""
            self.write("\r" + " " * n + "\r")

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd in ("/think", "/stats"):
            attr, name = ("thinking", "thinking") if cmd == "/think" else ("verbose", "stats")
            if arg not in ("", "on", "off"):
                self.write(f"usage: {cmd} [on|off]\n")
                return True
            setattr(self, attr, not getattr(self, attr) if not arg else arg == "on")     # alone: toggle
            self.write(f"{name} {'on' if getattr(self, attr) else 'off'}\n")
        elif cmd == "/set":
            self.set(arg)
        elif cmd == "/reset":
            self.history = []
            self.write("history cleared\n")
        elif cmd in ("/image", "/video"):
            kind, path = cmd[1:], os.path.expanduser(arg)
            if not arg:
                self.write(f"usage: {cmd} PATH\n")
                return True
            part = {"type": kind, kind: path}
            try:
                self.llm.media.load(kind, part, MediaPolicy())
            except ValueError as e:
                self.write(f"error: {e}\n")
                return True
            self.attached.append(part)
            self.write(f"{kind} attached to your next message: {path}\n")
        elif cmd == "/system":
            self.system = arg or None
            self.history = []
            self.write(f"system prompt {'set' if self.system else 'cleared'}; history cleared\n")
        elif cmd in ("/help", "/?"):
            self.write(HELP + "\n")
        else:
            self.write(f"unknown command {cmd}: /help lists the commands; //TEXT sends /TEXT as a message\n")
        return True

    def set(self, arg: str) -> None:
        """/set NAME VALUE: one sampling parameter; /set alone: show them."""
        if not arg:
            self.write("  ".join(f"{k} {getattr(self.params, k)}" for k in SETTABLE) + "\n")
            return
        name, _, value = arg.partition(" ")
        if name not in SETTABLE or not value.strip():
            self.write(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTABLE)}\n")
            return
        try:
            self.params = dataclasses.replace(self.params, **{name: SETTABLE[name](value.strip())})
        except ValueError as e:
            self.write(f"error: {name} {value.strip()!r}: {e}\n")
            return
        self.write(f"{name} {getattr(self.params, name)}\n")

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, user_text: str) -> None:
        """Stream one assistant answer; Ctrl-C stops it and keeps what was said."""
        content = [*self.attached, {"type": "text", "text": user_text}] if self.attached else user_text
        self.history.append({"role": "user", "content": content})
        load_s = None
        try:
            if getattr(self.llm, "_engine", None) is None:    # LLM makes its engine on first use: say so,
                self.indicate("loading...")                     # and time it apart from the prompt
                t = time.perf_counter()
                self.llm.engine()
                load_s = time.perf_counter() - t
            self.indicate("thinking...")
            prompt = self.llm.encode_chat(self.messages(), enable_thinking=self.thinking)
        except (ChatTemplateError, ValueError) as e:
            self.clear_indicator()
            self.history.pop()
            self.write(f"error: {e}\n")
            return
        except KeyboardInterrupt:
            self.clear_indicator()
            self.history.pop()
            self.write("[stopped]\n")
            return
        self.attached = []
        parser = AssistantStreamParser(thinking=self.thinking)
        timer = StreamTimer(len(prompt.ids), load_s)
        stream = self.llm.generate_stream(prompt, self.params)
        state = {"reasoning": False}
        finish = None
        try:
            timer.start()
            for out in stream:
                timer.observe(out)
                deltas = parser.feed(out.text) + (parser.finish() if out.finished else [])
                self._show_all(deltas, state)
                if out.finished:
                    finish = out.finish_reason
        except KeyboardInterrupt:
            stream.close()                                     # aborts the request, frees its cache slot
            self._show_all(parser.finish(), state)
            self.clear_indicator()
            self.write(f"{self.reset}\n[stopped]")
        except ValueError as e:                                # the engine refused the prompt (too long)
            self.clear_indicator()
            self.history.pop()
            self.write(f"error: {e}\n")
            return
        self.clear_indicator()
        self.write(f"{self.reset}\n")
        result = parser.result()
        if finish == "length":
            where = (" while thinking, before any answer" if result.reasoning_content and not result.content
                     and not result.tool_calls else "")
            self.write(f"[stopped: reached max tokens ({self.params.max_tokens}){where}; "
                       f"/set max_tokens N or --max-tokens N]\n")
        if self.verbose:
            self.out.flush()
            dim, reset = (DIM, RESET) if use_color(self.err) else ("", "")
            self.err.write(f"{dim}{timer.line()}{reset}\n")      # on stderr, as ollama's: pipes keep the answer
            self.err.flush()
        turn = {"role": "assistant", "content": result.content or ""}
        if result.reasoning_content:
            turn["reasoning_content"] = result.reasoning_content
        if result.tool_calls:
            turn["tool_calls"] = result.tool_calls
        self.history.append(turn)

    def _show_all(self, deltas: list[dict], state: dict) -> None:
        for d in deltas:
            self.clear_indicator()
            state["reasoning"] = self._show(d, state["reasoning"])

    def _show(self, delta: dict, in_reasoning: bool) -> bool:
        if "reasoning_content" in delta:
            if not in_reasoning:
                self.write(f"{self.dim}[thinking] ")
            self.write(delta["reasoning_content"])
            return True
        if in_reasoning:
            self.write(f"{self.reset}\n")
        if "content" in delta:
            self.write(delta["content"])
        for call in delta.get("tool_calls", []):
            fn = call.get("function", {})
            self.write(f"{self.bold}[tool call] {fn.get('name') or ''}{self.reset} {fn.get('arguments') or ''}")
        return False


class LineEditing:
    """readline on a terminal: editing keys, history in a file (bounded), Tab completion. Inactive (plain
    input()) when stdin or stdout is not a terminal or readline is missing."""

    def __init__(self, history_file: Path | None, length: int = HISTORY_LENGTH):
        self.readline = None
        self.file = history_file
        self._saved = 0
        if not (_isatty(sys.stdin) and _isatty(sys.stdout)):
            return
        try:
            import readline
        except ImportError:                                    # e.g. Windows without pyreadline
            return
        self.readline = readline
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")
        readline.set_completer_delims(" \t\n")
        readline.set_completer(self._complete)
        readline.set_history_length(length)                    # the file keeps the last `length` lines
        if self.file is not None:
            try:
                readline.read_history_file(self.file)
            except (OSError, UnicodeDecodeError):
                pass                                           # none yet, or unreadable: start empty
        self._saved = readline.get_current_history_length()

    def save(self) -> None:
        """Append the lines entered since the last save (the file is then cut to the last `length`)."""
        rl = self.readline
        if rl is None or self.file is None:
            return
        n = rl.get_current_history_length()
        if n <= self._saved:
            self._saved = n
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            if not self.file.exists():
                self.file.touch(mode=0o600)                    # what was typed is nobody else's business
            rl.append_history_file(n - self._saved, self.file)
        except (OSError, AttributeError):
            pass
        self._saved = n

    def _complete(self, text: str, state: int):
        rl = self.readline
        line = rl.get_line_buffer()
        begin = rl.get_begidx()
        if begin == 0:
            options = [c + " " for c in COMMANDS if c.startswith(text)]
        elif line.startswith(("/image ", "/video ")):
            options = [p + ("/" if os.path.isdir(p) else "") for p in sorted(glob.glob(os.path.expanduser(text) + "*"))]
        elif line.startswith(("/think ", "/stats ")):
            options = [w for w in ("on", "off") if w.startswith(text)]
        elif line.startswith("/set "):
            options = [k + " " for k in SETTABLE if k.startswith(text)]
        else:
            options = []
        return options[state] if state < len(options) else None


def history_file() -> Path | None:
    """$QWEN36_HISTORY, else chat_history in the qwen36 cache dir; None (no file) when QWEN36_NOHISTORY is set."""
    if os.environ.get("QWEN36_NOHISTORY"):
        return None
    return Path(os.environ.get("QWEN36_HISTORY") or cache_dir() / "chat_history")


def read_message(prompt: str = "> ") -> str:
    """One user message: continuation lines after a trailing backslash, or a triple-quoted block."""
    line = input(prompt)
    if line.strip() == '"""':
        lines = []
        while (more := input("... ")).strip() != '"""':
            lines.append(more)
        return "\n".join(lines)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = input("... ")
    parts.append(line)
    return "\n".join(parts)


def run_repl(llm: LLM, params: SamplingParams, thinking: bool = True, verbose: bool = False) -> int:
    session = ChatSession(llm, params, thinking, verbose=verbose)
    editing = LineEditing(history_file())
    session.write(f"qwen36 chat: {llm.path} (/help for commands, Ctrl-D or /exit to leave)\n")
    while True:
        try:
            text = read_message()
        except EOFError:
            session.write("\n")
            return 0
        except KeyboardInterrupt:
            session.write("\n")
            continue
        finally:
            editing.save()
        if not text.strip():
            continue
        if text.startswith("//"):
            text = text[1:]
        elif text.startswith("/"):
            if not session.command(text.strip()):
                return 0
            continue
        session.reply(text)
