"""`LLM`: the offline entry point (load a checkpoint, score, generate)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .batch import ForwardBatch
from .model import load_model
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer, TokenizerError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = (None,)


class Completion:
    """One generated sequence. `text` is decoded on first use, so id-in/id-out generation works with
    checkpoints that ship no tokenizer files."""

    def __init__(self, token_ids: list[int], finish_reason: str, prompt_token_ids: list[int], decode,
                 text: str | None = None):
        self.token_ids = token_ids
        self.finish_reason = finish_reason              # "stop" | "length"
        self.prompt_token_ids = prompt_token_ids
        self._decode, self._text = decode, text

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._decode(self.token_ids)
        return self._text

    def __repr__(self) -> str:
        return f"Completion(token_ids={self.token_ids!r}, finish_reason={self.finish_reason!r})"


class LLM:
    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu", quantization: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={quantization!r} is not supported by this build; supported: {list(QUANTIZATIONS)}")
        self.path = Path(path)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine")
        self.config, self.model = load_model(self.path, DTYPES[dtype], self.device)
        self.generation_config = _read_optional_json(self.path / "generation_config.json")
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_pretrained(self.path)
        return self._tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """generation_config.json's eos_token_id, else <|im_end|> and <|endoftext|> if a tokenizer ships."""
        eos = self.generation_config.get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
        try:
            return self.tokenizer.eos_ids
        except TokenizerError:
            return ()

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults (temperature, top_k, top_p)."""
        g = self.generation_config
        base = {}
        if g.get("do_sample") is False:
            base["temperature"] = 0.0
        for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
            if key in g and key not in base:
                base[key] = g[key]
        return SamplingParams(**{**base, **overrides})

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if not ids:
            raise ValueError("the prompt has no tokens: give at least one")
        V = self.config.text.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {V})")
        return ids

    @torch.inference_mode()
    def logits(self, token_ids) -> torch.Tensor:
        """float32 [len(token_ids), vocab_size]: one full forward of one sequence, no cache reuse."""
        ids = self._check_ids(token_ids)
        cache = self.model.new_cache(1, len(ids))
        batch = ForwardBatch.text([0], [0], [len(ids)], all_logits=True, device=self.device)
        x = self.model.embed(torch.tensor(ids, device=self.device))
        return self.model(x, batch, cache)

    @torch.inference_mode()
    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Completion:
        params = params or self.default_sampling_params()
        prompt_ids = self._check_ids(self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
        stop_ids = set(self.eos_token_ids) | set(params.stop_token_ids)
        cache = self.model.new_cache(1, len(prompt_ids) + params.max_tokens)
        sampler = Sampler(params, self.device)
        out: list[int] = []
        step_ids, start = prompt_ids, 0
        finish = "length"
        while len(out) < params.max_tokens:
            batch = ForwardBatch.text([0], [start], [len(step_ids)], device=self.device)
            logits = self.model(self.model.embed(torch.tensor(step_ids, device=self.device)), batch, cache)[-1]
            start += len(step_ids)
            tok = sampler(logits, prompt_ids, out)
            if tok in stop_ids:
                finish = "stop"
                break
            out.append(tok)
            if params.stop:
                text = self.tokenizer.decode(out)
                cut = _find_stop(text, params.stop)
                if cut is not None:
                    return Completion(out, "stop", prompt_ids, self.tokenizer.decode, text[:cut])
            step_ids = [tok]
        return Completion(out, finish, prompt_ids, lambda ids: self.tokenizer.decode(ids))


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _read_optional_json(file: Path) -> dict:
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}
