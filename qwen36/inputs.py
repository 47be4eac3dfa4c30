"""Prompts with images and videos -> what the engine runs: token ids + a MultimodalPrompt.

  messages (OpenAI or Qwen content parts)  --render-->  text with one placeholder per image / video
  each medium: load (image.py) -> resize, normalise, patchify -> pixel values + grid (t, h, w)
  text: each placeholder expanded to its pad tokens (and a video's timestamps) -> token ids
  vision tower: pixel values -> one embedding per pad token; mRoPE positions from the ids and the grids
Errors in a medium raise MediaError (a ValueError) naming the part; nothing is queued before all succeed.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .chat import media_kind
from .config import ModelConfig
from .image import (ContextTooLong, MediaError, VisionPreprocess, expand_vision_tokens, load_image, load_video, preprocess_images,
                    preprocess_video)
from .multimodal import MultimodalPrompt, mrope_positions
from .vision import VisionTower


@dataclass(frozen=True)
class PromptInputs:
    ids: list[int]
    mm: MultimodalPrompt | None = None


@dataclass
class Medium:
    kind: str                          # "image" | "video"
    pixel_values: torch.Tensor         # [t*h*w, C*T*P*P] fp32
    grid: tuple[int, int, int]         # (t, h, w) in patches
    timestamps: list[float] = field(default_factory=list)   # videos: seconds of each frame group


def _media_key(m: Medium) -> tuple:
    """Same pixels and grid -> same embeddings (a digest of the preprocessed pixels)."""
    digest = hashlib.blake2b(m.pixel_values.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
    return m.kind, m.grid, digest


def _spans(rows: list[int], owner: list[int], digests: list[str]) -> tuple[tuple[int, int, str], ...]:
    """Runs of consecutive pad rows of one medium -> (start, end, the medium's digest)."""
    spans: list[list] = []
    for r, o in zip(rows, owner):
        if spans and spans[-1][1] == r and spans[-1][2] == digests[o]:
            spans[-1][1] = r + 1
        else:
            spans.append([r, r + 1, digests[o]])
    return tuple((a, b, d) for a, b, d in spans)


class EncoderCache:
    """Vision embeddings of recently seen media, least recently used dropped first past `capacity` bytes."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self.items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key: tuple, value: torch.Tensor) -> torch.Tensor:
        size = value.numel() * value.element_size()
        if size <= self.capacity:
            self.items[key] = value
            self.used += size
            while self.used > self.capacity:
                _, old = self.items.popitem(last=False)
                self.used -= old.numel() * old.element_size()
        return value


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from: the Python API reads paths; the server only data: URLs, and file:// URLs
    inside `allowed_local_dir` when the operator names one."""
    allow_paths: bool = True
    allowed_local_dir: str | None = None
    max_image_pixels: int | None = None   # caps the pixel budget of an image (per-part max_pixels included)
    max_video_pixels: int | None = None   # and of a video (over all its frames): the tower's cost follows it


def _options(part: dict, keys: tuple[str, ...]) -> dict:
    """The per-part preprocessing options present, checked: positive numbers (fps may be fractional)."""
    out = {}
    for key in keys:
        value = part.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok or (key != "fps" and value != int(value)):
            raise MediaError(f"{key} must be a positive {'number' if key == 'fps' else 'integer'}, not {value!r}")
        out[key] = float(value) if key == "fps" else int(value)
    return out


def _url(value: Any) -> Any:
    return value.get("url") if isinstance(value, dict) else value


class MediaInputs:
    """Turns chat messages or placeholder prompts with media into PromptInputs for one checkpoint."""

    def __init__(self, config: ModelConfig, tower: VisionTower | None, preprocess: VisionPreprocess, tokenizer,
                 device, cache_bytes: int = 256 << 20):
        self.config, self.tower, self.pp, self.tokenizer, self.device = config, tower, preprocess, tokenizer, device
        self.lock = threading.Lock()                    # one encode at a time (server handlers share the tower)
        self.cache = EncoderCache(cache_bytes)

    # -------------------------------------------------------------------- media from messages
    def normalize(self, messages: list[dict]) -> list[dict]:
        """`video_url` parts -> `video` parts, so the chat template renders them as videos."""
        out = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and any(isinstance(p, dict) and "video_url" in p for p in content):
                content = [{"type": "video", "video": _url(p["video_url"]), **{k: v for k, v in p.items()
                            if k not in ("type", "video_url")}} if isinstance(p, dict) and "video_url" in p else p
                           for p in content]
                m = {**m, "content": content}
            out.append(m)
        return out

    def media_of(self, messages: list[dict], policy: MediaPolicy = MediaPolicy()) -> list[Medium]:
        """Load and preprocess every image / video part, in the order the template places them."""
        media = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                kind = media_kind(part)
                if kind is None:
                    continue
                where = f"messages[{i}].content[{j}]"
                try:
                    media.append(self.load(kind, part, policy))
                except MediaError as e:
                    raise MediaError(f"{where}: {e}") from None
        return media

    def load(self, kind: str, part: dict, policy: MediaPolicy) -> Medium:
        """One content part -> Medium. Per-part options: min_pixels, max_pixels; videos also fps, max_frames."""
        opts = _options(part, ("min_pixels", "max_pixels") + (("fps", "max_frames") if kind == "video" else ()))
        cap = policy.max_image_pixels if kind == "image" else policy.max_video_pixels
        if cap is not None:
            lo, hi = ((self.pp.image_min_pixels, self.pp.image_max_pixels) if kind == "image"
                      else (self.pp.video_min_pixels, self.pp.video_max_pixels))
            opts["max_pixels"] = min(opts.get("max_pixels", hi), cap)
            opts["min_pixels"] = min(opts.get("min_pixels", lo), opts["max_pixels"])
        if kind == "image":
            source = part.get("image", None)
            if source is None:
                source = _url(part.get("image_url"))
            if source is None:
                raise MediaError("an image part needs 'image' or 'image_url': {'url': ...}")
            image = load_image(source, allowed_local_dir=policy.allowed_local_dir, allow_paths=policy.allow_paths)
            pixels, grid = preprocess_images([image], self.pp, **opts)
            return Medium("image", pixels, tuple(int(v) for v in grid[0].tolist()))
        source = part.get("video")
        if source is None:
            raise MediaError("a video part needs 'video' (a file, URL or list of frames) or 'video_url'")
        video = load_video(source, allowed_local_dir=policy.allowed_local_dir, allow_paths=policy.allow_paths)
        pixels, grid, stamps = preprocess_video(video, self.pp, **opts)
        return Medium("video", pixels, tuple(int(v) for v in grid[0].tolist()), list(stamps))

    # -------------------------------------------------------------------- prompt text + media -> inputs
    def build(self, text: str, media: list[Medium], max_len: int | None = None, escaped: bool = False) -> PromptInputs:
        """text holds one placeholder per medium (in order); -> token ids with pads, embeddings, positions.
        A prompt longer than max_len is refused before the (costly) vision tower runs. `escaped`: text is a
        chat prompt in escaped form (`ChatTemplate.render(escape=...)`): only the template's placeholders
        count, and message text stays text."""
        images = [m for m in media if m.kind == "image"]
        videos = [m for m in media if m.kind == "video"]
        text = expand_vision_tokens(text, [m.grid for m in images], [(m.grid, m.timestamps) for m in videos],
                                    self.pp.merge_size)
        ids = self.tokenizer.encode_escaped(text) if escaped else self.tokenizer.encode(text)
        if max_len is not None and len(ids) > max_len:
            hint = (" with its images/videos expanded; send smaller images (max_pixels) or fewer frames"
                    if media else "")
            raise ContextTooLong(len(ids), max_len, hint)
        if not media:
            return PromptInputs(ids)
        if self.tower is None:
            raise MediaError("this checkpoint has no vision tower (no model.visual.* weights): it cannot take "
                             "images or videos")
        c = self.config
        positions, delta = mrope_positions(ids, [m.grid for m in images], [m.grid for m in videos],
                                           c.image_token_id, c.video_token_id, self.pp.merge_size)
        t = torch.tensor(ids)
        # embeddings of the images, then of the videos (one tower call); pad rows in the same order
        parts = self.encode(images + videos)
        embeds = torch.cat(parts)
        rows = torch.cat([torch.nonzero(t == pad).flatten() for pad in (c.image_token_id, c.video_token_id)])
        order = torch.argsort(rows)
        digests = ["/".join(map(str, _media_key(m))) for m in images + videos]
        owner = torch.cat([torch.full((len(e),), i) for i, e in enumerate(parts)])[order]
        return PromptInputs(ids, MultimodalPrompt(positions, delta, rows[order].to(self.device), embeds[order],
                                                  _spans(rows[order].tolist(), owner.tolist(), digests)))

    @torch.inference_mode()
    def encode(self, media: list[Medium]) -> list[torch.Tensor]:
        """Embeddings per medium [t*h*w/m^2, hidden] (images and videos may mix): from the encoder cache (a chat sends its past images
        again every turn), the rest through the tower in one call."""
        keys = [_media_key(m) for m in media]
        with self.lock:
            out = {k: self.cache.get(k) for k in keys}
            todo = list({k: m for k, m in zip(keys, media) if out[k] is None}.items())
            if todo:
                pixels = torch.cat([m.pixel_values for _, m in todo]).to(self.device, self.tower.compute_dtype)
                for (k, _), e in zip(todo, self.tower.encode(pixels, [m.grid for _, m in todo])):
                    out[k] = self.cache.put(k, e)
        return [out[k] for k in keys]
