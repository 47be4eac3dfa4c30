"""`qwen36 chat`: an interactive chat in the terminal.

Streaming output; reasoning shown dimmed and apart from the answer; tool calls shown as such.
Commands: /think on|off, /reset, /system TEXT, /image PATH, /video PATH, /help, /exit. /image and /video
attach a file to the next message (checked at once: a bad file is reported and not attached). A line
ending in a backslash continues on the next line; a line of three double quotes starts and ends a
multi-line block. Ctrl-C stops the current answer (what was said so far stays in the history) without
leaving; Ctrl-D or /exit leaves.
"""
from __future__ import annotations

import sys

from .chat import ChatTemplateError
from .inputs import MediaPolicy
from .llm import LLM
from .parsers import AssistantStreamParser
from .sampling import SamplingParams

DIM, RESET, BOLD = "\x1b[2m", "\x1b[0m", "\x1b[1m"
HELP = ("commands: /think on|off  /reset  /system TEXT  /image PATH  /video PATH  /help  /exit   "
        "(end a line with \\ to continue it; \"\"\" starts and ends a block; Ctrl-C stops an answer)")


class ChatSession:
    def __init__(self, llm: LLM, params: SamplingParams, thinking: bool = True, out=sys.stdout):
        self.llm, self.params, self.thinking, self.out = llm, params, thinking, out
        self.system: str | None = None
        self.history: list[dict] = []
        self.attached: list[dict] = []          # image/video parts for the next user message

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        cmd, _, arg = line.partition(" ")
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/think" and arg.strip() in ("on", "off"):
            self.thinking = arg.strip() == "on"
            self.write(f"thinking {'on' if self.thinking else 'off'}\n")
        elif cmd == "/reset":
            self.history = []
            self.write("history cleared\n")
        elif cmd in ("/image", "/video") and arg.strip():
            kind, path = cmd[1:], arg.strip()
            part = {"type": kind, kind: path}
            try:
                self.llm.media.load(kind, part, MediaPolicy())
            except ValueError as e:
                self.write(f"error: {e}\n")
                return True
            self.attached.append(part)
            self.write(f"{kind} attached to your next message: {path}\n")
        elif cmd == "/system":
            self.system = arg.strip() or None
            self.history = []
            self.write(f"system prompt {'set' if self.system else 'cleared'}; history cleared\n")
        else:
            self.write(HELP + "\n")
        return True

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, user_text: str) -> None:
        """Stream one assistant answer; Ctrl-C stops it and keeps what was said."""
        content = [*self.attached, {"type": "text", "text": user_text}] if self.attached else user_text
        self.history.append({"role": "user", "content": content})
        try:
            prompt = self.llm.encode_chat(self.messages(), enable_thinking=self.thinking)
        except (ChatTemplateError, ValueError) as e:
            self.history.pop()
            self.write(f"error: {e}\n")
            return
        self.attached = []
        parser = AssistantStreamParser(thinking=self.thinking)
        stream = self.llm.generate_stream(prompt, self.params)
        in_reasoning = False
        try:
            for out in stream:
                deltas = parser.feed(out.text) + (parser.finish() if out.finished else [])
                for d in deltas:
                    in_reasoning = self._show(d, in_reasoning)
        except KeyboardInterrupt:
            stream.close()                                     # aborts the request, frees its cache slot
            for d in parser.finish():
                in_reasoning = self._show(d, in_reasoning)
            self.write(f"{RESET}\n[stopped]")
        self.write(f"{RESET}\n")
        result = parser.result()
        turn = {"role": "assistant", "content": result.content or ""}
        if result.reasoning_content:
            turn["reasoning_content"] = result.reasoning_content
        if result.tool_calls:
            turn["tool_calls"] = result.tool_calls
        self.history.append(turn)

    def _show(self, delta: dict, in_reasoning: bool) -> bool:
        if "reasoning_content" in delta:
            if not in_reasoning:
                self.write(f"{DIM}[thinking] ")
            self.write(delta["reasoning_content"])
            return True
        if in_reasoning:
            self.write(f"{RESET}\n")
        if "content" in delta:
            self.write(delta["content"])
        for call in delta.get("tool_calls", []):
            fn = call.get("function", {})
            self.write(f"{BOLD}[tool call] {fn.get('name') or ''}{RESET} {fn.get('arguments') or ''}")
        return False


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


def run_repl(llm: LLM, params: SamplingParams, thinking: bool = True) -> int:
    session = ChatSession(llm, params, thinking)
    session.write(f"qwen36 chat: {llm.path} ({HELP})\n")
    while True:
        try:
            text = read_message()
        except EOFError:
            session.write("\n")
            return 0
        except KeyboardInterrupt:
            session.write("\n")
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            if not session.command(text.strip()):
                return 0
            continue
        session.reply(text)

