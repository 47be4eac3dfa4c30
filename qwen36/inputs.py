"""Prompts with images and videos -> what the engine runs: token ids + a MultimodalPrompt.

  messages (OpenAI or Qwen content parts)  --render-->  text with one placeholder per image / video
  each medium: load (image.py) -> resize, normalise, patchify -> pixel values + grid (t, h, w)
  text: each placeholder expanded to its pad tokens (and a video's timestamps) -> token ids
  vision tower: pixel values -> one embedding per pad token; mRoPE positions from the ids and the grids
Errors in a medium raise MediaError (a ValueError) naming the part; nothing is queued before all succeed.

Order of work (`MediaInputs.prompt_inputs`), so a request's cost is known and bounded before it is paid:
  1. count the media parts against the per-request limits (MediaPolicy.limit_images / limit_videos);
  2. plan each medium from its header alone (image size; a video's frame count, rate and size; a frame
     list's sampled frames' headers): per-part options clamped to the server's range, the grid, the pad
     tokens, the pixels decoding will cost (checked against MediaPolicy.max_decode_pixels);
  3. expand the prompt and check it against the context (ContextTooLong);
  4. only then decode: each image, and each video's sampled frames only (each resized as it is decoded);
  5. the vision tower. A `cancel` event stops the work between items, frames and before the tower.
`count_tokens` stops after step 3: no pixel is decoded, the tower never runs.

`render_chat_prompt` is the one chat -> prompt pipeline of `LLM.chat` and the server: media parts
normalized, late system messages merged (the server's policy, `merge_system`), the template rendered in
escaped form; its `ChatPrompt` then goes through the steps above (`MediaInputs.prompt_inputs`, or
`plan_prompt` and `realize` where a server runs the cheap and the costly half in different places).
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .chat import ChatTemplate, media_kind, merge_system_messages
from .config import ModelConfig
from .image import (ContextTooLong, ImageHeader, MediaCancelled, MediaError, VideoPlan,
                    VisionPreprocess, check_cancel, decode_image, expand_vision_tokens, image_grid, load_video,
                    plan_video, preprocess_images, probe_image, video_pixels)

__all__ = ["MediaCancelled", "MediaError", "ContextTooLong", "ChatPrompt", "MediaInputs", "MediaPolicy", "MediumPlan",
           "PromptInputs", "DECODE_PIXELS_BUDGET", "normalize_media_parts", "render_chat_prompt"]

# Pixels a request's media may decode in all (a video file: every frame up to the last one sampled) when the
# server clamps and sets no budget of its own: about 80 minutes of 1080p video sampled over 40 s of CPU.
DECODE_PIXELS_BUDGET = 10_000_000_000
# count_tokens expands the prompt text only up to this many pad tokens; past it, it adds the counts up.
_EXPAND_LIMIT = 1 << 22
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
    """What a request's media may be and cost.

    Sources: the Python API reads paths; the server only data: URLs, and file:// URLs inside
    `allowed_local_dir` when the operator names one (`allow_paths=False`).
    Bounds (None: see each):
      max_image_pixels / max_video_pixels: the operator's cap on an image's pixel budget / a video's (over all
        its frames; per-part max_pixels included). None: no cap, or the processor's maximum when `clamp`.
      clamp: the server's mode. Per-part min_pixels / max_pixels are clamped to at most the server's maximum
        (the cap above, else the processor's), and frames per video to `max_frames` (else the processor's
        video_max_frames); the decode budget defaults to DECODE_PIXELS_BUDGET. Off (the Python API): per-part
        options are taken as given, except that a minimum above the maximum is lowered to it.
      limit_images / limit_videos: media items per request (the server's --limit-mm-per-prompt); None: any.
      max_frames: frames sampled per video; a per-part max_frames may lower it, never raise it.
      max_decode_pixels: pixels all of a request's media may decode (checked from the headers, before
        decoding). None: DECODE_PIXELS_BUDGET when `clamp`, else unlimited."""
    allow_paths: bool = True
    allowed_local_dir: str | None = None
    max_image_pixels: int | None = None
    max_video_pixels: int | None = None
    clamp: bool = False
    limit_images: int | None = None
    limit_videos: int | None = None
    max_frames: int | None = None
    max_decode_pixels: int | None = None


@dataclass(frozen=True)
class MediumPlan:
    """One image or video known from its header: what decoding it will give (grid, timestamps) and cost
    (decode_pixels), and what decoding needs (the image header and its pixel bounds, or the VideoPlan)."""
    kind: str                              # "image" | "video"
    where: str                             # the part, for errors: "messages[i].content[j]"
    grid: tuple[int, int, int]
    timestamps: list[float]
    decode_pixels: int
    image: ImageHeader | None = field(default=None, repr=False)
    bounds: tuple[int, int] = (0, 0)       # an image's (min_pixels, max_pixels)
    video: VideoPlan | None = field(default=None, repr=False)

    @property
    def pad_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _layout(m) -> tuple:
    """What a medium's prompt text depends on (its pad count, a video's patches and timestamps): an
    image's grid may come out transposed by its EXIF orientation, the text is the same."""
    t, h, w = m.grid
    return m.kind, t, h * w, tuple(m.timestamps)


def _options(part: dict, keys: tuple[str, ...]) -> dict:
    """The per-part preprocessing options present, checked: finite positive numbers (fps may be fractional)."""
    out = {}
    for key in keys:
        value = part.get(key)
        if value is None:
            continue
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
              and math.isfinite(value))
        if not ok or (key != "fps" and value != int(value)):
            raise MediaError(f"{key} must be a positive {'number' if key == 'fps' else 'integer'}, not {value!r}")
        out[key] = float(value) if key == "fps" else int(value)
    return out


def _url(value: Any) -> Any:
    return value.get("url") if isinstance(value, dict) else value


def normalize_media_parts(messages: list[dict]) -> list[dict]:
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


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation rendered for generation: the prompt text in escaped form (`Tokenizer.encode_escaped`:
    message text never becomes control tokens) and the messages it was rendered from (media parts
    normalized, system messages merged when asked), whose media parts `MediaInputs.parts` walks."""
    text: str
    messages: list[dict]


def render_chat_prompt(template: ChatTemplate, escape, messages: list[dict], tools: list[dict] | None = None, *,
                       enable_thinking: bool = True, preserve_thinking: bool = False,
                       merge_system: bool = False) -> ChatPrompt:
    """The chat -> prompt pipeline: media parts normalized, late system (and developer) messages joined to
    the leading one when `merge_system` (a server's policy: agents send reminders that way; the Python API
    renders messages as given), the generation prompt rendered with `escape` (the tokenizer's ContentEscape).
    Raises ChatTemplateError for a conversation the template cannot render."""
    messages = normalize_media_parts(messages)
    if merge_system:
        messages = merge_system_messages(messages)
    text = template.render(messages, tools=tools, add_generation_prompt=True, enable_thinking=enable_thinking,
                           preserve_thinking=preserve_thinking, escape=escape)
    return ChatPrompt(text, messages)


@dataclass
class PlannedPrompt:
    """A prompt whose media are planned from their headers and checked, not yet decoded (see plan_prompt)."""
    text: str
    ids: list[int]
    plans: list
    max_len: int | None
    escaped: bool


class MediaInputs:
    """Turns chat messages or placeholder prompts with media into PromptInputs for one checkpoint."""

    def __init__(self, config: ModelConfig, tower: VisionTower | None, preprocess: VisionPreprocess, tokenizer,
                 device, cache_bytes: int = 256 << 20):
        self.config, self.tower, self.pp, self.tokenizer, self.device = config, tower, preprocess, tokenizer, device
        self.lock = threading.Lock()                    # one encode at a time (server handlers share the tower)
        self.cache = EncoderCache(cache_bytes)

    # -------------------------------------------------------------------- media from messages
    @staticmethod
    def parts(messages: list[dict]) -> list[tuple[str, str, dict]]:
        """(where, kind, part) of every image / video part, in the order the template places them."""
        out = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                kind = media_kind(part)
                if kind is not None:
                    out.append((f"messages[{i}].content[{j}]", kind, part))
        return out

    def media_of(self, messages: list[dict], policy: MediaPolicy = MediaPolicy(), cancel=None) -> list[Medium]:
        """Load and preprocess every image / video part, in the order the template places them (planned from
        the headers first: limits and budgets checked before anything is decoded)."""
        return [self.decode(p, cancel) for p in self.plan(self.parts(messages), policy, cancel=cancel)]

    def load(self, kind: str, part: dict, policy: MediaPolicy) -> Medium:
        """One content part -> Medium. Per-part options: min_pixels, max_pixels; videos also fps, max_frames."""
        return self.decode(self.plan_part(kind, part, policy))

    # -------------------------------------------------------------------- planning (headers only)
    def plan(self, parts: list[tuple[str, str, dict]], policy: MediaPolicy = MediaPolicy(),
             max_len: int | None = None, cancel=None) -> list[MediumPlan]:
        """Plan every part from its header: the per-request count limits first (nothing is read for a
        request over them), then each medium, the decode budget, and, with `max_len`, the pad tokens
        alone against the context (ContextTooLong as soon as they exceed it). MediaError names the part."""
        counts = {"image": 0, "video": 0}
        for where, kind, _ in parts:
            counts[kind] += 1
            limit = policy.limit_images if kind == "image" else policy.limit_videos
            if limit is not None and counts[kind] > limit:
                raise MediaError(f"{where}: at most {limit} {kind}{'' if limit == 1 else 's'} per request "
                                 "(the server's --limit-mm-per-prompt)")
        budget = policy.max_decode_pixels
        if budget is None and policy.clamp:
            budget = DECODE_PIXELS_BUDGET
        plans, decode, pads = [], 0, 0
        for where, kind, part in parts:
            check_cancel(cancel)
            p = self.plan_part(kind, part, policy, where)
            decode += p.decode_pixels
            if budget is not None and decode > budget:
                raise MediaError(f"{where}: this request's images and videos would decode {decode:,} pixels, more "
                                 f"than the limit of {budget:,}; send fewer or smaller media (or fewer frames)")
            pads += p.pad_tokens // self.pp.merge_size ** 2
            if max_len is not None and pads > max_len:
                raise ContextTooLong(pads, max_len, " (counting only the image/video pad tokens so far); send "
                                     "smaller images (max_pixels) or fewer frames")
            plans.append(p)
        return plans

    def plan_part(self, kind: str, part: dict, policy: MediaPolicy = MediaPolicy(), where: str = "") -> MediumPlan:
        """One content part -> its MediumPlan, from headers only. Per-part options: min_pixels, max_pixels;
        videos also fps, max_frames (see MediaPolicy for how they are bounded)."""
        try:
            return self._plan_part(kind, part, policy, where)
        except MediaError as e:
            raise MediaError(f"{where}: {e}" if where else str(e)) from None

    def bounds(self, kind: str, opts: dict, policy: MediaPolicy) -> tuple[int, int]:
        """(min_pixels, max_pixels) for one medium: the per-part options under the policy."""
        pp = self.pp
        lo, hi = ((pp.image_min_pixels, pp.image_max_pixels) if kind == "image"
                  else (pp.video_min_pixels, pp.video_max_pixels))
        cap = policy.max_image_pixels if kind == "image" else policy.max_video_pixels
        top = cap if cap is not None else (hi if policy.clamp else None)
        hi = opts.get("max_pixels", hi if cap is None else min(hi, cap))
        if top is not None:
            hi = min(hi, top)
        return min(opts.get("min_pixels", lo), hi), hi

    def _plan_part(self, kind: str, part: dict, policy: MediaPolicy, where: str) -> MediumPlan:
        opts = _options(part, ("min_pixels", "max_pixels") + (("fps", "max_frames") if kind == "video" else ()))
        lo, hi = self.bounds(kind, opts, policy)
        if kind == "image":
            source = part.get("image", None)
            if source is None:
                source = _url(part.get("image_url"))
            if source is None:
                raise MediaError("an image part needs 'image' or 'image_url': {'url': ...}")
            header = probe_image(source, allowed_local_dir=policy.allowed_local_dir, allow_paths=policy.allow_paths)
            grid = image_grid(header.width, header.height, self.pp, lo, hi)
            return MediumPlan("image", where, grid, [], header.width * header.height, image=header, bounds=(lo, hi))
        source = part.get("video")
        if source is None:
            raise MediaError("a video part needs 'video' (a file, URL or list of frames) or 'video_url'")
        video = load_video(source, allowed_local_dir=policy.allowed_local_dir, allow_paths=policy.allow_paths)
        frames = policy.max_frames
        if frames is None and policy.clamp:
            frames = self.pp.video_max_frames
        max_frames = opts.get("max_frames")
        if frames is not None:
            max_frames = min(max_frames or frames, frames)
        num_frames = None
        if frames is not None and "fps" not in opts and self.pp.video_num_frames is not None:
            num_frames = min(self.pp.video_num_frames, frames)      # a fixed frame count is under the budget too
        vp = plan_video(video, self.pp, opts.get("fps"), num_frames, lo, hi, max_frames)
        return MediumPlan("video", where, vp.grid, list(vp.timestamps), vp.decode_pixels, video=vp)

    def decode(self, plan: MediumPlan, cancel=None) -> Medium:
        """Decode and preprocess one planned medium (a video: only its sampled frames)."""
        check_cancel(cancel)
        try:
            if plan.kind == "image":
                pixels, grid = preprocess_images([decode_image(plan.image)], self.pp, *plan.bounds)
                medium = Medium("image", pixels, tuple(int(v) for v in grid[0].tolist()))
            else:
                pixels, grid, stamps = video_pixels(plan.video, cancel)
                medium = Medium("video", pixels, tuple(int(v) for v in grid[0].tolist()), list(stamps))
            if plan.kind == "image" and _layout(medium) != _layout(plan):
                raise MediaError(f"the image decoded to {medium.grid}, not the {plan.grid} its header gave")
        except MediaError as e:
            raise MediaError(f"{plan.where}: {e}" if plan.where else str(e)) from None
        return medium

    # -------------------------------------------------------------------- prompt text + media -> inputs
    def prompt_inputs(self, text: str, messages: list[dict], policy: MediaPolicy, max_len: int | None,
                      escaped: bool = True, cancel: threading.Event | None = None) -> PromptInputs:
        """A rendered chat prompt and its (already normalized) messages -> PromptInputs, bounded before it is
        paid: the media parts of `messages` (in template order, as `parts` walks them) are planned from their
        headers; `text` (one placeholder per medium, escaped form when `escaped`) is expanded and checked
        against `max_len`; only then is anything decoded, and the vision tower run.
        Raises ContextTooLong; MediaError naming the part (`messages[i].content[j]`), count limits naming
        --limit-mm-per-prompt; MediaCancelled when `cancel` is set (checked between items, frames, decodes
        and before the tower)."""
        return self.inputs_for(text, self.parts(messages), policy, max_len, escaped, cancel)

    def inputs_for(self, text: str, parts: list[tuple[str, str, dict]], policy: MediaPolicy = MediaPolicy(),
                   max_len: int | None = None, escaped: bool = False, cancel=None) -> PromptInputs:
        """prompt_inputs for (where, kind, part) triples (e.g. vLLM-style multi_modal_data)."""
        return self.realize(self.plan_prompt(text, parts, policy, max_len, escaped, cancel), cancel)

    def plan_prompt(self, text: str, parts: list[tuple[str, str, dict]], policy: MediaPolicy = MediaPolicy(),
                    max_len: int | None = None, escaped: bool = False, cancel=None) -> "PlannedPrompt":
        """The cheap half of inputs_for: headers read, every limit and the context checked, token ids made;
        nothing decoded (a server runs this where refusals are quick, and `realize` where media work waits)."""
        plans = self.plan(parts, policy, max_len, cancel)
        ids = self._ids(text, plans, max_len, escaped)
        if plans and self.tower is None:
            raise MediaError("this checkpoint has no vision tower (no model.visual.* weights): it cannot take "
                             "images or videos")
        return PlannedPrompt(text, ids, plans, max_len, escaped)

    def realize(self, planned: "PlannedPrompt", cancel=None) -> PromptInputs:
        """The costly half: decode the planned media (sampled frames only) and run the vision tower."""
        if not planned.plans:
            return PromptInputs(planned.ids)
        ids = planned.ids
        media = [self.decode(p, cancel) for p in planned.plans]
        if any(_layout(m) != _layout(p) for m, p in zip(media, planned.plans)):   # a video stream unlike its header
            ids = self._ids(planned.text, media, planned.max_len, planned.escaped)
        return self._assemble(ids, media, cancel)

    def count_tokens(self, text: str, messages: list[dict], policy: MediaPolicy, escaped: bool = True) -> int:
        """The prompt's token count from the header plans alone (what prompt_inputs would give, unless a
        video's stream disagrees with its header): no pixel is decoded and the vision tower never runs.
        Same errors as prompt_inputs but ContextTooLong (a count has no limit) and MediaCancelled."""
        plans = self.plan(self.parts(messages), policy)
        if plans and self.tower is None:
            raise MediaError("this checkpoint has no vision tower (no model.visual.* weights): it cannot take "
                             "images or videos")
        pads = sum(p.pad_tokens for p in plans) // self.pp.merge_size ** 2
        if pads <= _EXPAND_LIMIT:
            return len(self._ids(text, plans, None, escaped))
        # too many pads to spell out: the text without them, plus each medium's tokens
        encode = self.tokenizer.encode_escaped if escaped else self.tokenizer.encode
        expanded = expand_vision_tokens(text, [(1, 1, self.pp.merge_size ** 2)] * sum(p.kind == "image" for p in plans),
                                        [((len(p.timestamps), 1, self.pp.merge_size ** 2), p.timestamps)
                                         for p in plans if p.kind == "video"], self.pp.merge_size)
        n = len(encode(expanded))     # one pad per image and per video patch
        return n + sum(p.pad_tokens // self.pp.merge_size ** 2 - (1 if p.kind == "image" else p.grid[0])
                       for p in plans)

    def _ids(self, text: str, layout: list, max_len: int | None, escaped: bool) -> list[int]:
        """Expand text's placeholders for media (plans or Media: kind, grid, timestamps), tokenize, check."""
        images = [m for m in layout if m.kind == "image"]
        videos = [m for m in layout if m.kind == "video"]
        text = expand_vision_tokens(text, [m.grid for m in images], [(m.grid, m.timestamps) for m in videos],
                                    self.pp.merge_size)
        ids = self.tokenizer.encode_escaped(text) if escaped else self.tokenizer.encode(text)
        if max_len is not None and len(ids) > max_len:
            hint = (" with its images/videos expanded; send smaller images (max_pixels) or fewer frames"
                    if layout else "")
            raise ContextTooLong(len(ids), max_len, hint)
        return ids

    def build(self, text: str, media: list[Medium], max_len: int | None = None, escaped: bool = False,
              cancel=None) -> PromptInputs:
        """text holds one placeholder per medium (in order); -> token ids with pads, embeddings, positions.
        A prompt longer than max_len is refused before the (costly) vision tower runs. `escaped`: text is a
        chat prompt in escaped form (`ChatTemplate.render(escape=...)`): only the template's placeholders
        count, and message text stays text. (prompt_inputs checks all this before decoding the media.)"""
        ids = self._ids(text, media, max_len, escaped)
        return self._assemble(ids, media, cancel)

    def _assemble(self, ids: list[int], media: list[Medium], cancel=None) -> PromptInputs:
        """Token ids and decoded media -> PromptInputs: the tower's embeddings and mRoPE positions."""
        if not media:
            return PromptInputs(ids)
        if self.tower is None:
            raise MediaError("this checkpoint has no vision tower (no model.visual.* weights): it cannot take "
                             "images or videos")
        images = [m for m in media if m.kind == "image"]
        videos = [m for m in media if m.kind == "video"]
        c = self.config
        positions, delta = mrope_positions(ids, [m.grid for m in images], [m.grid for m in videos],
                                           c.image_token_id, c.video_token_id, self.pp.merge_size)
        t = torch.tensor(ids)
        # embeddings of the images, then of the videos (one tower call); pad rows in the same order
        parts = self.encode(images + videos, cancel)
        embeds = torch.cat(parts)
        rows = torch.cat([torch.nonzero(t == pad).flatten() for pad in (c.image_token_id, c.video_token_id)])
        order = torch.argsort(rows)
        digests = ["/".join(map(str, _media_key(m))) for m in images + videos]
        owner = torch.cat([torch.full((len(e),), i) for i, e in enumerate(parts)])[order]
        return PromptInputs(ids, MultimodalPrompt(positions, delta, rows[order].to(self.device), embeds[order],
                                                  _spans(rows[order].tolist(), owner.tolist(), digests)))

    @torch.inference_mode()
    def encode(self, media: list[Medium], cancel=None) -> list[torch.Tensor]:
        """Embeddings per medium [t*h*w/m^2, hidden] (images and videos may mix): from the encoder cache (a
        chat sends its past images again every turn), the rest through the tower in one call (not started
        once `cancel` is set: MediaCancelled)."""
        keys = [_media_key(m) for m in media]
        check_cancel(cancel)
        with self.lock:
            check_cancel(cancel)       # set while this request waited for another's encode
            out = {k: self.cache.get(k) for k in keys}
            todo = list({k: m for k, m in zip(keys, media) if out[k] is None}.items())
            if todo:
                pixels = torch.cat([m.pixel_values for _, m in todo]).to(self.device, self.tower.compute_dtype)
                for (k, _), e in zip(todo, self.tower.encode(pixels, [m.grid for _, m in todo])):
                    out[k] = self.cache.put(k, e)
        return [out[k] for k in keys]
