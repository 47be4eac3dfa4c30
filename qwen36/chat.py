"""Qwen3.6 prompt rendering, byte-identical to the official Qwen3.6-35B-A3B chat template.

Three ways to turn a conversation into the prompt string, all with the same output:

* `render_chat` -- our own Python implementation of the template's algorithm (the built-in renderer);
* `CHAT_TEMPLATE` -- our own Jinja text for the same format (the package file `templates/chat_template.jinja`),
  saved into checkpoints as `chat_template.jinja`;
* `ChatTemplate` -- renders a checkpoint's template (or `CHAT_TEMPLATE`) in a sandbox set up like
  transformers' (`make_sandbox`), falling back to `render_chat` when the checkpoint has none.

The format (the model card's, rendered by the official chat_template.jinja): an optional system block (tool list + system prompt),
then one `<|im_start|>role\\n...<|im_end|>\\n` turn per message, consecutive tool results grouped into one
user turn, assistant turns after the last real user query keeping their `<think>` block, and a generation
prompt that opens the assistant turn inside `<think>` (or with an empty think block when thinking is off).

Before rendering, messages are normalised the way serving engines do it (`normalize_messages`): keys
whose value is None are dropped (transformers' apply_chat_template), `reasoning`/`thinking` fill a
missing `reasoning_content` (transformers and vLLM), and tool-call `arguments` given as a JSON string are
parsed into a dict (vLLM), since the template can only iterate a mapping. Input the template could never
render sensibly is rejected there with a `ChatTemplateError` naming the message and field: messages that
are not a list of dicts, content parts that are not dicts or have non-string text, tool calls without a
string name, and arguments that are not a JSON object. Everything else behaves as the official template:
the same output, or a `ChatTemplateError` carrying the template's own message.
"""
from __future__ import annotations

import json
import logging
from importlib import resources
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "ChatTemplateError", "CHAT_TEMPLATE", "make_sandbox", "merge_system_messages",
           "normalize_messages", "render_chat"]


log = logging.getLogger("qwen36.chat")


class ChatTemplateError(ValueError):
    """A conversation the Qwen3.6 format cannot render, or a chat template that cannot be used."""


IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
TOOLS_HEADER = "# Tools\n\nYou have access to the following functions:\n\n<tools>"
TOOLS_FOOTER = (
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested"
    " within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function call,"
    " but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge and"
    " do not tell the user about function calls\n</IMPORTANT>"
)
# transformers' apply_chat_template copies these into `reasoning_content` (first non-None wins)
REASONING_ALIASES = ("thinking", "reasoning")


# ----------------------------------------------------------------------------------------------------------
# Normalisation (shared by every renderer)
# ----------------------------------------------------------------------------------------------------------

def normalize_messages(messages) -> list[dict]:
    """Validated copies of `messages`, normalised as described in the module docstring (input untouched)."""
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(index: int, message) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"{where} must be a dict, got {type(message).__name__}")
    # None-valued keys are dropped, as transformers does: templates treat a missing key more gracefully
    msg = {key: value for key, value in message.items() if value is not None}
    if "reasoning_content" not in msg:
        alias = next((msg[key] for key in REASONING_ALIASES if key in msg), None)
        if alias is not None:
            msg["reasoning_content"] = alias
    _check_content_parts(where, msg.get("content"))
    # the template reads tool calls of assistant messages only, so only those are checked
    if msg.get("role") == "assistant" and "tool_calls" in msg:
        msg["tool_calls"] = _normalize_tool_calls(f"{where}.tool_calls", msg["tool_calls"])
    return msg


def merge_system_messages(messages: list) -> list:
    """The conversation with every system (and `developer`, OpenAI's newer name) message joined, in order,
    into one leading system message, texts separated by a blank line; the other messages keep their order.
    The official template accepts one system message, first: agents also send reminders as later system
    messages, and servers merge them (this is not the template's behaviour: the server applies it, the
    Python API does not). A conversation that needs nothing merged, or whose system message holds
    anything but text (the template's own error then), is returned as it is."""
    at = [i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") in ("system", "developer")]
    if not at or (at == [0] and messages[0].get("role") == "system"):
        return messages
    texts = []
    for i in at:
        content = messages[i].get("content")
        if isinstance(content, (list, tuple)) and all(isinstance(p, Mapping) and media_kind(p) is None
                                                      and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if content is None:
            continue
        if not isinstance(content, str):
            return messages
        if content.strip():
            texts.append(content.strip())
    merged = set(at)                                   # (a list here made this quadratic in the message count)
    return [{"role": "system", "content": "\n\n".join(texts)}] + [m for i, m in enumerate(messages) if i not in merged]


def _check_content_parts(where: str, content) -> None:
    if not isinstance(content, (list, tuple)):
        return  # strings, missing content and the template's own "Unexpected content type." are not ours
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise ChatTemplateError(f"{where}.content[{j}] must be a dict content part, got {type(part).__name__}")
        is_media = any(key in part for key in ("image", "image_url", "video")) or part.get("type") in ("image", "video")
        if not is_media and "text" in part and not isinstance(part["text"], str):
            raise ChatTemplateError(f"{where}.content[{j}].text must be a string, got {type(part['text']).__name__}")


def _normalize_tool_calls(where: str, calls) -> list[dict]:
    if not isinstance(calls, (list, tuple)):
        raise ChatTemplateError(f"{where} must be a list of tool calls, got {type(calls).__name__}")
    normalized = []
    for j, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise ChatTemplateError(f"{where}[{j}] must be a dict, got {type(call).__name__}")
        call = dict(call)
        if "function" in call:  # OpenAI shape {"function": {"name", "arguments"}}
            if not isinstance(call["function"], Mapping):
                raise ChatTemplateError(f"{where}[{j}].function must be a dict")
            call["function"] = _normalize_function(f"{where}[{j}].function", call["function"])
        else:  # flat shape {"name", "arguments"}
            call = _normalize_function(f"{where}[{j}]", call)
        normalized.append(call)
    return normalized


def _normalize_function(where: str, function: Mapping) -> dict:
    function = dict(function)
    if not isinstance(function.get("name"), str):
        raise ChatTemplateError(f"{where}.name must be a string, got {function.get('name')!r}")
    function["arguments"] = _parse_arguments(f"{where}.arguments", function.get("arguments"))
    return function


def _parse_arguments(where: str, arguments) -> dict:
    """Tool-call arguments as a dict: a JSON string is parsed and None/"" mean no arguments (as vLLM does)."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ChatTemplateError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(arguments, Mapping):
        raise ChatTemplateError(f"{where} must be a JSON object, got {type(arguments).__name__}")
    for key in arguments:
        if not isinstance(key, str):
            raise ChatTemplateError(f"{where} has a non-string parameter name {key!r}")
    return dict(arguments)


def _check_tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(tool, Mapping) for tool in tools):
        raise ChatTemplateError("tools must be a list of dicts (JSON schemas)")
    return list(tools)


def _tojson(value, where: str) -> str:
    # transformers' tojson: no key sorting, ", "/": " separators, non-ASCII kept, no HTML escaping
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ChatTemplateError(f"{where} cannot be written as JSON: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# The built-in renderer
# ----------------------------------------------------------------------------------------------------------

def render_chat(messages, tools=None, add_generation_prompt: bool = True, enable_thinking: bool = True,
                preserve_thinking: bool = False, add_vision_id: bool = False, escape=None) -> str:
    """The Qwen3.6 prompt for a conversation (OpenAI-style message dicts), exactly as the official template.

    Like the template's variables, only `enable_thinking is False` turns thinking off (it changes only the
    generation prompt) and only `preserve_thinking is True` keeps the think blocks of every past turn.
    With `escape` (a `tokenizer.ContentEscape`) the prompt comes back in escaped form: every piece of text
    taken from the messages or tools is escaped as it is written out, after the format's logic has read
    it, so the special-token strings left are the format's own.
    """
    renderer = _Renderer(add_vision_id=bool(add_vision_id), preserve_thinking=preserve_thinking is True,
                         escape=escape)
    return renderer.render(normalize_messages(messages), _check_tools(tools), add_generation_prompt,
                           thinking=enable_thinking is not False)


def media_kind(part) -> str | None:
    """"image" / "video" / None for a content part, in the template's order (a part with both keys is an
    image). `video_url` parts are videos too (the server and LLM rewrite them to `video` before rendering)."""
    if not isinstance(part, Mapping):
        return None
    if "image" in part or "image_url" in part or part.get("type") == "image":
        return "image"
    if "video" in part or "video_url" in part or part.get("type") in ("video", "video_url"):
        return "video"
    return None


class _Renderer:
    """One rendering: holds the options and the image/video counters, which run across the conversation."""

    def __init__(self, add_vision_id: bool, preserve_thinking: bool, escape=None):
        self.add_vision_id = add_vision_id
        self.preserve_thinking = preserve_thinking
        self.text = escape.escape if escape is not None else str   # text from the input, as written out
        self.images = 0
        self.videos = 0

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt, thinking: bool) -> str:
        if not messages:
            raise ChatTemplateError("No messages provided.")
        # the order of these steps is the template's, so that the first error reported is the same
        out = [self.system_block(messages[0], tools)]
        last_query = self.last_query_index(messages)
        for index, message in enumerate(messages):
            out.append(self.message(messages, index, show_thinking=self.preserve_thinking or index > last_query))
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n<think>\n" + ("" if thinking else "\n</think>\n\n"))
        return "".join(out)

    # -- content ------------------------------------------------------------------------------------------
    def content(self, content, count: bool, system: bool = False) -> str:
        """A message's content as text; media placeholders are numbered only when `count` (the main pass)."""
        if isinstance(content, str):
            return self.text(content)
        if content is None:
            return ""
        if not isinstance(content, (list, tuple)):
            raise ChatTemplateError("Unexpected content type.")
        return "".join(self.part(part, count, system) for part in content)

    def part(self, part: Mapping, count: bool, system: bool) -> str:
        kind = media_kind(part)
        if kind == "image":
            if system:
                raise ChatTemplateError("System message cannot contain images.")
            if count:
                self.images += 1
            return (f"Picture {self.images}: " if self.add_vision_id else "") + IMAGE
        if kind == "video":
            if system:
                raise ChatTemplateError("System message cannot contain videos.")
            if count:
                self.videos += 1
            return (f"Video {self.videos}: " if self.add_vision_id else "") + VIDEO
        if "text" in part:
            return self.text(part["text"])
        raise ChatTemplateError("Unexpected item type in content.")

    # -- structure ----------------------------------------------------------------------------------------
    def system_block(self, first: dict, tools: list[dict] | None) -> str:
        is_system = first.get("role") == "system"
        if tools:
            listed = "".join("\n" + self.text(_tojson(tool, f"tools[{i}]")) for i, tool in enumerate(tools))
            system = self.content(first.get("content"), count=False, system=True).strip() if is_system else ""
            return ("<|im_start|>system\n" + TOOLS_HEADER + listed + TOOLS_FOOTER
                    + ("\n\n" + system if system else "") + "<|im_end|>\n")
        if is_system:  # emitted even when the system prompt is empty
            system = self.content(first.get("content"), count=False, system=True).strip()
            return "<|im_start|>system\n" + system + "<|im_end|>\n"
        return ""

    def last_query_index(self, messages: list[dict]) -> int:
        """Index of the last user message that is not just tool output wrapped in <tool_response> tags."""
        for index in range(len(messages) - 1, -1, -1):
            if messages[index].get("role") == "user":
                text = self.content(messages[index].get("content"), count=False).strip()
                if not (text.startswith(self.text("<tool_response>")) and text.endswith(self.text("</tool_response>"))):
                    return index
        raise ChatTemplateError("No user query found in messages.")

    def message(self, messages: list[dict], index: int, show_thinking: bool) -> str:
        message = messages[index]
        content = self.content(message.get("content"), count=True).strip()  # rendered before the role check
        role = message.get("role")
        if role == "system":
            if index != 0:
                raise ChatTemplateError("System message must be at the beginning.")
            return ""  # already part of the system block
        if role == "user":
            return "<|im_start|>user\n" + content + "<|im_end|>\n"
        if role == "assistant":
            return self.assistant(message, content, show_thinking)
        if role == "tool":
            return self.tool_result(messages, index, content)
        raise ChatTemplateError("Unexpected message role.")

    def assistant(self, message: dict, content: str, show_thinking: bool) -> str:
        reasoning = message.get("reasoning_content")
        if isinstance(reasoning, str):
            reasoning = self.text(reasoning)
        else:
            # reasoning left inline in the content by the client (content is escaped text: so are the tags)
            reasoning, opened, closed = "", self.text("<think>"), self.text("</think>")
            if closed in content:
                reasoning = content.split(closed)[0].rstrip("\n").split(opened)[-1].lstrip("\n")
                content = content.split(closed)[-1].lstrip("\n")
        if show_thinking:  # even an empty reasoning gives "<think>\n\n</think>\n\n"
            out = "<|im_start|>assistant\n<think>\n" + reasoning.strip() + "\n</think>\n\n" + content
        else:
            out = "<|im_start|>assistant\n" + content
        for j, call in enumerate(message.get("tool_calls") or ()):
            separator = "\n" if j else ("\n\n" if content.strip() else "")
            out += separator + self.tool_call(call.get("function", call))
        return out + "<|im_end|>\n"

    def tool_call(self, function: dict) -> str:
        out = "<tool_call>\n<function=" + self.text(function["name"]) + ">\n"
        for name, value in function["arguments"].items():
            text = value if isinstance(value, str) else _tojson(value, f"tool call argument {name!r}")
            out += "<parameter=" + self.text(name) + ">\n" + self.text(text) + "\n</parameter>\n"
        return out + "</function>\n</tool_call>"

    @staticmethod
    def tool_result(messages: list[dict], index: int, content: str) -> str:
        # consecutive tool results share one user turn
        opens = index > 0 and messages[index - 1].get("role") != "tool"
        closes = index == len(messages) - 1 or messages[index + 1].get("role") != "tool"
        return (("<|im_start|>user" if opens else "") + "\n<tool_response>\n" + content + "\n</tool_response>"
                + ("<|im_end|>\n" if closes else ""))


# ----------------------------------------------------------------------------------------------------------
# Our Jinja template for the same format
# ----------------------------------------------------------------------------------------------------------

# Written for this engine from the format notes (the package file templates/chat_template.jinja);
# `render_chat` is its Python twin and the tests hold the two byte-identical. The file names the long tool
# instructions and the media placeholders by @NAME@; they are spliced in from the constants above as JSON
# string literals (a valid Jinja string literal), so the text exists once.
_CHAT_TEMPLATE_SOURCE = resources.files(__package__).joinpath("templates", "chat_template.jinja").read_text(
    encoding="utf-8")
CHAT_TEMPLATE: str = (_CHAT_TEMPLATE_SOURCE
                      .replace("@IMAGE@", json.dumps(IMAGE)).replace("@VIDEO@", json.dumps(VIDEO))
                      .replace("@TOOLS_HEADER@", json.dumps(TOOLS_HEADER))
                      .replace("@TOOLS_FOOTER@", json.dumps(TOOLS_FOOTER)))


# ----------------------------------------------------------------------------------------------------------
# The transformers-compatible sandbox
# ----------------------------------------------------------------------------------------------------------

class _GenerationBlock(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` tag (it marks assistant tokens for training
    masks); we only render, so its body renders unchanged, in its own scope as there."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller):
        return caller()


def _refuse_private(names) -> None:
    # underscore attributes are the way from a template object towards Python internals
    for name in names:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"Chat templates cannot set underscore attributes, got {name!r}")


class _GuardedNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attribute names, at creation and on `set ns.x = ...`."""

    def __init__(*args, **kwargs):  # no named `self`, like Jinja's: `namespace(self=1)` must keep working
        _refuse_private(dict(*args[1:], **kwargs))
        jinja2.utils.Namespace.__init__(*args, **kwargs)

    def __setitem__(self, name, value):
        _refuse_private([name])
        super().__setitem__(name, value)


class _DictFactory:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the dict type itself."""
    __call__ = staticmethod(dict)
    fromkeys = staticmethod(dict.fromkeys)


def _tojson_filter(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces Jinja's tojson, which sorts keys and HTML-escapes, with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise ChatTemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def make_sandbox() -> ImmutableSandboxedEnvironment:
    """A Jinja environment that renders chat templates as transformers' apply_chat_template does."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson_filter
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictFactory(),
                       namespace=_GuardedNamespace)
    return env


_SANDBOX = make_sandbox()  # stateless, so one serves every template

# Errors a template can raise while rendering bad input (e.g. `|items` on a string gives TypeError)
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate:
    """A chat template ready to render: Jinja text in the sandbox, or the built-in `render_chat` (text None).

    `source` is "checkpoint" (loaded by `from_checkpoint`), "builtin" (no template text: `render_chat`) or
    "custom" (text given directly). `special_tokens` (bos_token, eos_token, ...) are template variables, as
    transformers passes them; explicit render options win over them.
    """

    def __init__(self, template: str | None = None, *, source: str | None = None, origin: str = "chat template",
                 special_tokens: Mapping[str, str] | None = None):
        self.text = template
        self.source = source or ("builtin" if template is None else "custom")
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        self._compiled = None if template is None else self._compile(template, origin)

    @staticmethod
    def _compile(text: str, origin: str):
        try:
            return _SANDBOX.from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"{origin}: invalid Jinja template (line {exc.lineno}): {exc.message}") from exc

    @classmethod
    def from_checkpoint(cls, path) -> ChatTemplate:
        """The checkpoint's `chat_template.jinja`, else `chat_template` in its `tokenizer_config.json`, else
        the built-in renderer."""
        path = Path(path)
        if not path.is_dir():
            raise ChatTemplateError(f"checkpoint directory not found: {path}")
        config = _read_tokenizer_config(path / "tokenizer_config.json")
        special_tokens = _special_tokens(config)
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                text = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ChatTemplateError(f"{jinja_file}: cannot read chat template: {exc}") from exc
            return cls(text, source="checkpoint", origin=str(jinja_file), special_tokens=special_tokens)
        if config.get("chat_template") is not None:
            origin = f"{path / 'tokenizer_config.json'} (chat_template)"
            return cls(_default_template(config["chat_template"], origin), source="checkpoint", origin=origin,
                       special_tokens=special_tokens)
        return cls(source="builtin", special_tokens=special_tokens)

    def render(self, messages, tools=None, add_generation_prompt: bool = True, enable_thinking: bool = True,
               preserve_thinking: bool = False, add_vision_id: bool = False, escape=None) -> str:
        """The prompt string; same options and normalisation as `render_chat`.

        With `escape` (the tokenizer's `ContentEscape`) the prompt comes back in escaped form, for
        `Tokenizer.encode_escaped`: text from the messages and tools is escaped, so that only the
        template's own special-token strings become control tokens; `escape.unescape` of it is the
        prompt this method returns without `escape`, byte for byte. A Jinja template renders the escaped
        messages; where its logic reads special-token strings in the content (the official one splits
        `</think>` out of assistant content) and so renders differently, the built-in renderer's escaped
        prompt is used when its text is the template's, else the template's escaped rendering (logged).
        """
        if self._compiled is None:
            return render_chat(messages, tools, add_generation_prompt, enable_thinking, preserve_thinking,
                               add_vision_id, escape)
        variables = {**self.special_tokens, "messages": normalize_messages(messages), "tools": _check_tools(tools),
                     "add_generation_prompt": add_generation_prompt, "enable_thinking": enable_thinking,
                     "preserve_thinking": preserve_thinking, "add_vision_id": add_vision_id}
        text = self._render(variables)
        if escape is None or not escape.needed([variables["messages"], variables["tools"]]):
            return text               # nothing in the input to escape: every special-token string is structure
        try:
            escaped = self._render({**variables, "messages": escape.escape_tree(variables["messages"]),
                                    "tools": escape.escape_tree(variables["tools"])})
        except ChatTemplateError:
            escaped = None
        if escaped is not None and escape.unescape(escaped) == text:
            return escaped
        try:
            builtin = render_chat(messages, tools, add_generation_prompt, enable_thinking, preserve_thinking,
                                  add_vision_id, escape)
        except ChatTemplateError:
            builtin = None
        if builtin is not None and escape.unescape(builtin) == text:
            return builtin
        if escaped is None:
            raise ChatTemplateError(f"{self.origin}: the template cannot render this conversation with its "
                                    "special-token strings kept as text")
        log.warning("%s: the template reads special-token strings in message content; the prompt differs "
                    "from its plain rendering so that they stay text", self.origin)
        return escaped

    def _render(self, variables: dict) -> str:
        try:
            return self._compiled.render(**variables)
        except ChatTemplateError:
            raise  # raise_exception() in the template: its message is already the user-facing one
        except _RENDER_ERRORS as exc:
            raise ChatTemplateError(str(exc)) from exc

    def __repr__(self) -> str:
        return f"ChatTemplate(source={self.source!r}, origin={self.origin!r})"


def _read_tokenizer_config(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatTemplateError(f"{file}: cannot read tokenizer config: {exc}") from exc
    if not isinstance(config, dict):
        raise ChatTemplateError(f"{file}: expected a JSON object")
    return config


def _special_tokens(config: dict) -> dict[str, str]:
    """bos_token & co. as strings; the config stores each as a string or an AddedToken dict ({"content": ...})."""
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _default_template(value, origin: str) -> str:
    """`chat_template` is a string, or a list of {"name", "template"} of which "default" is the one to use."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatTemplateError(f"{origin}: no template named 'default' among {sorted(map(str, named))}")
    raise ChatTemplateError(f"{origin}: expected a string or a list of named templates, got {type(value).__name__}")
