"""Images and videos in, vision-tower inputs out: the Qwen3-VL processor rules, without transformers.

  load_image(source)            PIL / bytes / path / data: URL / file:// URL  ->  RGB PIL image
  preprocess_images(images, pp) ->  pixel_values [sum t*h*w, C*T*P*P] float32, grid_thw [n, 3] int64
  load_video(source)            file / bytes / URL (PyAV) or a list of frames  ->  Video (a file is only checked;
                                its frames are decoded when sampled, keeping only the chosen ones in memory)
  preprocess_video(video, pp)   sample, resize, normalise, patchify  ->  pixel_values, grid_thw [1, 3],
                                timestamps (seconds, one per temporal patch)
  expand_vision_tokens(text, image_grids, videos)   the prompt expansion of the pad tokens
Header first (what a request will cost, known before any pixel is decoded):
  probe_image(source) -> ImageHeader (size only); image_grid(w, h, pp) its grid; decode_image(header) pixels
  plan_video(video, pp, ...) -> VideoPlan (indices, grid, timestamps, decode_pixels); video_pixels(plan) the
                                pixels, decoding only the sampled frames, each resized as it is decoded
Hostile input: images open only as IMAGE_FORMATS (no EPS/Ghostscript, no rare parsers); videos only as
VIDEO_CONTAINERS with no ffmpeg protocol at all (an ffconcat, SDP, HLS or DASH payload cannot read a file or
open a socket) and VIDEO_TIMEOUT; `cancel` (a threading.Event) raises MediaCancelled between frames.

What each step reproduces (transformers 5.23):
  * images: `Qwen2VLImageProcessorPil` (the PIL backend, available without torchvision): transparency
    composited onto white, "smart resize" to multiples of patch*merge within [min, max] pixels, PIL bicubic,
    x * (1/255) in float64 then float32, (x - mean) / std in float32, the frame repeated temporal_patch_size
    times, patches in merge-block order. Bit-identical to it.
  * videos: `Qwen3VLVideoProcessor` (torchvision backend): frame indices linspace(0, n-1, k).round() with
    k = clamp(int(n / source_fps * fps), min_frames, max_frames, n); the frame-count-aware smart resize;
    resize = torch's antialiased bicubic on uint8 (the kernel torchvision dispatches to on the CPU, called here
    through torch directly: no torchvision); (x - 255*mean) / (255*std) in float32; frames padded to a multiple
    of temporal_patch_size by repeating the last; timestamps = mean of the first and last frame time of each
    temporal patch (`Qwen3VLProcessor._calculate_timestamps`).
    Note that the video resize is NOT the image resize: torch's uint8 antialiased bicubic and PIL's bicubic
    differ by a grey level here and there (more on noise-like content), as they do in transformers.

Sources and trust: `allow_paths=True` (the Python API) accepts PIL images, bytes, plain paths and file:// URLs
anywhere, or only inside `allowed_local_dir` when one is given. `allow_paths=False` (the server) accepts data:
URLs always, file:// URLs only inside `allowed_local_dir`, and never plain paths. http(s) URLs are refused:
there is no network. Every bad input raises `MediaError` (a ValueError) saying what is wrong.

Where this differs from transformers on purpose:
  * the video prompt: transformers 5.x expands only <|video_pad|>, keeping the chat template's outer
    <|vision_start|>..<|vision_end|> around the per-patch blocks; Qwen's processor (transformers <= 4.57, vLLM)
    replaces the whole <|vision_start|><|video_pad|><|vision_end|>. The default is Qwen's layout;
    `expand_vision_tokens(..., keep_video_wrapper=True)` gives transformers 5.x's, token for token.
  * transparency: transformers' `load_image` (str sources) uses convert("RGB"), dropping alpha, before its
    processor sees the image; its processor (PIL inputs) and qwen-vl-utils composite onto white. Here every
    source is composited onto white.
  * Qwen3.6's preprocessor_config.json names the torchvision image processor; without torchvision the PIL one
    is the reference (their bicubics differ by a grey level or two on natural images).
  * a video file whose header has no frame count (e.g. Matroska) is sampled from its packet count, where
    transformers' PyAV reader would see 0 frames; a list of frames is sampled like an array video at
    `source_fps`, where transformers refuses to sample a frame list.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

# Inputs larger than this are refused before their pixels are decoded (the header gives the size): 10^8 pixels
# is ~300 MB as RGB, far above anything the tower uses (at most 16.8 M pixels after resizing).
MAX_INPUT_PIXELS = 100_000_000
MAX_ASPECT_RATIO = 200          # the processor refuses more extreme shapes
# Image formats Pillow may open (vLLM's default set): every other plugin (EPS runs Ghostscript, and ~40 more
# parsers) is never reached. In-memory PIL images given to the Python API are taken as they are.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Video containers ffmpeg may probe, and no protocol at all: a payload cannot name another file (concat, HLS,
# DASH, a mov data reference) or a socket (SDP/RTP). Paths are opened here and handed over as file objects.
VIDEO_CONTAINERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi"
VIDEO_TIMEOUT = 10.0            # seconds ffmpeg may wait in one open or read before giving up
RESCALE = 1 / 255               # uint8 -> [0, 1], the processors' rescale_factor

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class MediaError(ValueError):
    """A bad image or video: not decodable, too large, not allowed, inconsistent with the prompt."""


class MediaCancelled(Exception):
    """The media work of a request was cancelled (its `cancel` event was set: the client went away).
    Not a ValueError: nothing was wrong with the input."""


def check_cancel(cancel) -> None:
    """Raise MediaCancelled if `cancel` (a threading.Event or None) is set."""
    if cancel is not None and cancel.is_set():
        raise MediaCancelled("media processing cancelled")


class ContextTooLong(ValueError):
    """A prompt longer than the context (numbers kept: each API words this error its own way)."""

    def __init__(self, prompt_tokens: int, limit: int, hint: str = ""):
        super().__init__(f"this model's maximum context length is {limit} tokens, but the prompt has "
                         f"{prompt_tokens} tokens{hint}")
        self.prompt_tokens, self.limit = prompt_tokens, limit


# ----------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class VisionPreprocess:
    """Processor settings. Defaults are Qwen3.6's published preprocessor_config.json and
    video_preprocessor_config.json; min/max "pixels" are pixel COUNTS (the configs' size.shortest_edge /
    size.longest_edge), for a video counted over all its frames."""
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_min_pixels: int = 65536
    image_max_pixels: int = 16777216
    video_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    video_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    video_fps: float | None = 2.0           # frames sampled per second of video
    video_num_frames: int | None = None     # a fixed frame count instead (takes precedence over fps when set)
    video_min_frames: int = 4
    video_max_frames: int = 768
    cap_pixels_per_frame: bool = False      # Qwen3VLVideoProcessor's optional per-frame budget (off by default)
    max_video_tokens: int = 768             # that budget, in merged tokens per frame

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merge block of patches."""
        return self.patch_size * self.merge_size

    @classmethod
    def for_vision_config(cls, vc, **overrides) -> "VisionPreprocess":
        """Defaults with the patch geometry of a vision config (a `config.VisionConfig` or the raw dict)."""
        return cls(**{**_geometry(vc), **overrides})

    @classmethod
    def from_checkpoint(cls, path, vision=None, **overrides) -> "VisionPreprocess":
        """Read <path>/preprocessor_config.json and video_preprocessor_config.json; a missing file keeps the
        published defaults. The patch geometry is the tower's: `vision` (a VisionConfig or dict) if given,
        else config.json's vision_config; a processor config that disagrees with it is an error."""
        path = Path(path)
        fields: dict = {}
        cfg = _read_json(path / "config.json")
        if vision is not None:
            fields.update(_geometry(vision))
        elif isinstance(cfg.get("vision_config"), dict):
            fields.update(_geometry(cfg["vision_config"]))
        image = _read_json(path / "preprocessor_config.json")
        video = _read_json(path / "video_preprocessor_config.json")
        for proc in (image, video):  # the processors' geometry must agree with the tower's
            for key in ("patch_size", "temporal_patch_size", "merge_size"):
                if key in proc and proc[key] is not None:
                    value = int(proc[key])
                    if key in fields and fields[key] != value:
                        raise ValueError(f"{path}: {key} = {value} in a processor config but {fields[key]} "
                                         "in the vision config")
                    fields[key] = value
        lo, hi = _pixel_bounds(image)
        fields.update({k: v for k, v in (("image_min_pixels", lo), ("image_max_pixels", hi)) if v is not None})
        lo, hi = _pixel_bounds(video)
        fields.update({k: v for k, v in (("video_min_pixels", lo), ("video_max_pixels", hi)) if v is not None})
        for src, prefix in ((image, "image"), (video, "video")):
            for key in ("mean", "std"):
                if src.get(f"image_{key}") is not None:
                    fields[f"{prefix}_{key}"] = tuple(float(x) for x in src[f"image_{key}"])
        for key, name, conv in (("fps", "video_fps", float), ("num_frames", "video_num_frames", int),
                                ("min_frames", "video_min_frames", int), ("max_frames", "video_max_frames", int),
                                ("cap_pixels_per_frame", "cap_pixels_per_frame", bool),
                                ("max_video_tokens", "max_video_tokens", int)):
            if key in video:
                fields[name] = None if video[key] is None and name in ("video_fps", "video_num_frames") \
                    else conv(video[key])
        return cls(**{**fields, **overrides})


def _geometry(vc) -> dict:
    get = vc.get if isinstance(vc, dict) else (lambda k, d=None: getattr(vc, k, d))

    def one(x):  # patch sizes are sometimes written as [p, p]
        return int(x[0]) if isinstance(x, (list, tuple)) else int(x)

    return dict(patch_size=one(get("patch_size", 16)), temporal_patch_size=one(get("temporal_patch_size", 2)),
                merge_size=int(get("spatial_merge_size", 2)))


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    data = json.loads(file.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _pixel_bounds(proc: dict) -> tuple[int | None, int | None]:
    """(min, max) pixel counts: size.shortest_edge / size.longest_edge, else the legacy min/max_pixels keys."""
    size = proc.get("size") if isinstance(proc.get("size"), dict) else {}
    lo = size.get("shortest_edge", proc.get("min_pixels"))
    hi = size.get("longest_edge", proc.get("max_pixels"))
    return (None if lo is None else int(lo)), (None if hi is None else int(hi))


# ----------------------------------------------------------------------------------------------- sources

def _check_pixels(width: int, height: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"{what} has zero size ({width}x{height})")
    if width * height > MAX_INPUT_PIXELS:
        raise MediaError(f"{what} is too large: {width}x{height} = {width * height:,} pixels; "
                         f"the limit is {MAX_INPUT_PIXELS:,} pixels")


def _data_url(url: str, kind: str) -> bytes:
    """data:[<type>][;base64],<payload> -> bytes. Only base64 payloads of the right media kind."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("malformed data: URL (no ',' before the payload)")
    params = head[len("data:"):].split(";")
    mime = params[0].strip().lower()
    if mime and not mime.startswith(kind + "/"):
        raise MediaError(f"data: URL has media type {mime!r}, not {kind}/*")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise MediaError(f"data: URL for {_a(kind)} must be base64 encoded (data:{kind}/...;base64,...)")
    payload = re.sub(r"\s+", "", unquote(payload))
    payload += "=" * (-len(payload) % 4)  # tolerate stripped padding
    altchars = b"-_" if ("-" in payload or "_" in payload) else None  # URL-safe alphabet
    try:
        data = base64.b64decode(payload, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data: URL payload is not valid base64 ({e})") from None
    if not data:
        raise MediaError(f"data: URL carries no {kind} data")
    return data


def _local_path(path: Path, allowed_local_dir, what: str) -> Path:
    """The resolved path, if it is inside allowed_local_dir (when one is given) and is a file."""
    resolved = path.expanduser().resolve()
    if allowed_local_dir is not None:
        root = Path(allowed_local_dir).expanduser().resolve()
        if not resolved.is_relative_to(root):
            raise MediaError(f"{what} {str(path)!r} is outside the allowed local media directory")
    if not resolved.is_file():
        raise MediaError(f"{what} {str(path)!r}: no such file (or not a regular file)")
    return resolved


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _resolve(source, kind: str, allowed_local_dir, allow_paths: bool):
    """source -> bytes or a Path, enforcing the URL and path policy (see the module docstring)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not bytes(source):
            raise MediaError(f"empty bytes: not {_a(kind)}")
        return bytes(source)
    if isinstance(source, Path):
        if not allow_paths:
            raise MediaError(f"plain file paths are not accepted here; send the {kind} as a data: URL"
                             + (" or a file:// URL" if allowed_local_dir else ""))
        return _local_path(source, allowed_local_dir, f"{kind} path")
    if not isinstance(source, str):
        raise MediaError(f"not {_a(kind)} source: {type(source).__name__} (expected "
                         + ("a PIL image, " if kind == "image" else "") + "bytes, a path or a data:/file:// URL)")
    text = source.strip()
    lower = text.lower()
    if lower.startswith("data:"):
        return _data_url(text, kind)
    if lower.startswith(("http://", "https://")):
        raise MediaError(f"cannot fetch {text[:80]!r}: there is no network access here; send the {kind} "
                         f"inline as a data: URL (data:{kind}/...;base64,...)")
    if lower.startswith("file:"):
        url = urlparse(text)
        if url.netloc not in ("", "localhost"):
            raise MediaError(f"file:// URL with a remote host {url.netloc!r} is not supported")
        if not allow_paths and allowed_local_dir is None:
            raise MediaError("file:// URLs are not allowed: no local media directory is configured "
                             "(--allowed-local-media-path); send the data inline as a data: URL")
        return _local_path(Path(unquote(url.path)), allowed_local_dir, f"{kind} file")
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):", text)
    if scheme and (text[scheme.end():].startswith("//") or not allow_paths):
        raise MediaError(f"unsupported URL scheme {scheme.group(1)!r}: use a data: URL"
                         + (" or a file:// URL" if allow_paths or allowed_local_dir else ""))
    if not allow_paths:
        raise MediaError(f"plain file paths are not accepted here; send the {kind} as a data: URL"
                         + (" or a file:// URL" if allowed_local_dir else ""))
    return _local_path(Path(text), allowed_local_dir, f"{kind} path")


# ----------------------------------------------------------------------------------------------- images

def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way the processor converts: anything with transparency (an alpha band, or a palette /
    greyscale / RGB image with a transparent colour) is composited onto white; the rest is converted."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _open_image(fp, what: str) -> Image.Image:
    """Open an image from its header only (nothing decoded), in an allowed format, its size checked.
    fp: bytes or an open binary file."""
    # Pillow's own bomb check runs in open(): it warns from ~89 M pixels and refuses above ~179 M. Its
    # warning is left alone (silencing warnings is not thread-safe); our limit applies right after.
    try:
        image = Image.open(io.BytesIO(fp) if isinstance(fp, bytes) else fp, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise MediaError(f"{what} is too large ({e}); the limit is {MAX_INPUT_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise MediaError(f"{what} is not an image in an accepted format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"{what} is not an image Pillow can read ({e})") from None
    _check_pixels(*image.size, what)
    return image


@dataclass(frozen=True)
class ImageHeader:
    """An image known from its header only: its stored size (before any EXIF rotation, which swaps the sides
    and so never changes the token count) and where its bytes are. `decode_image` decodes it."""
    width: int
    height: int
    data: bytes | Path | Image.Image = field(repr=False)
    what: str = "image"


def probe_image(source, allowed_local_dir: str | Path | None = None, allow_paths: bool = True) -> ImageHeader:
    """source (as load_image takes) -> its ImageHeader, reading the header only: format and size are checked,
    no pixel is decoded."""
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, "image")
        return ImageHeader(source.width, source.height, source)
    data = _resolve(source, "image", allowed_local_dir, allow_paths)
    if isinstance(data, Path):
        what = f"image file {str(data)!r}"
        with open(data, "rb") as f:
            width, height = _open_image(f, what).size
    else:
        what = "image data"
        width, height = _open_image(data, what).size
    return ImageHeader(width, height, data, what)


def decode_image(header: ImageHeader) -> Image.Image:
    """Decode a probed image -> RGB, upright per its EXIF orientation (as transformers.image_utils.load_image),
    transparency composited onto white (as the image processor). The header is checked again (a file may
    have changed since it was probed)."""
    image, what = header.data, header.what
    if isinstance(image, Path):
        with open(image, "rb") as f:
            image = _open_image(f, what)
            _load(image, what)
    elif isinstance(image, bytes):
        image = _open_image(image, what)
        _load(image, what)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: keep the stored orientation
        pass
    return to_rgb(image)


def _load(image: Image.Image, what: str) -> None:
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise MediaError(f"{what} is truncated or corrupt ({e})") from None


def load_image(source, allowed_local_dir: str | Path | None = None, allow_paths: bool = True) -> Image.Image:
    """source: a PIL image, bytes, a path (str / Path), a data:image/...;base64,... URL or a file:// URL ->
    an RGB image (`probe_image` then `decode_image`). Policy for paths and URLs: see the module docstring;
    encoded images must be one of IMAGE_FORMATS."""
    return decode_image(probe_image(source, allowed_local_dir, allow_paths))


def _fit(height: int, width: int, frames: int, t: int, factor: int, min_pixels: int,
         max_pixels: int, what: str) -> tuple[int, int]:
    """The Qwen-VL resize core: sides rounded (half to even, Python's round) to multiples of `factor`; if
    t x h x w leaves [min_pixels, max_pixels], both sides are scaled by one factor computed from
    frames x height x width (down: floor, at least `factor`; up: ceil) so it comes back inside."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"aspect ratio {max(height, width) / min(height, width):.1f} of {what} "
                         f"exceeds {MAX_ASPECT_RATIO}")
    min_pixels = min(min_pixels, max_pixels)  # a minimum above the maximum never wins
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if t * h * w > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
        if t * h * w > max_pixels:  # rounding up overshot the maximum (min close to max): round down
            h = max(factor, math.floor(height * beta / factor) * factor)
            w = max(factor, math.floor(width * beta / factor) * factor)
    return h, w


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's image rule: `_fit` on one frame."""
    return _fit(height, width, 1, 1, factor, min_pixels, max_pixels, f"a {width}x{height} image")


def image_grid(width: int, height: int, pp: VisionPreprocess, min_pixels: int | None = None,
               max_pixels: int | None = None) -> tuple[int, int, int]:
    """The (t, h, w) patch grid preprocess_images gives a width x height image: from its size alone."""
    lo = pp.image_min_pixels if min_pixels is None else int(min_pixels)
    hi = pp.image_max_pixels if max_pixels is None else int(max_pixels)
    h, w = smart_resize(height, width, pp.factor, lo, hi)
    return 1, h // pp.patch_size, w // pp.patch_size


def patchify(frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int):
    """frames [F, C, H, W] (F a multiple of temporal_patch_size, H and W of patch*merge) ->
    ([gt*gh*gw, C*T*P*P], (gt, gh, gw)). Rows: temporal patch, then merge block (raster order), then the
    m x m patches inside the block, so the tower's merger sees each block's patches consecutively.
    Columns: channel, frame within the temporal patch, patch row, patch column (the Conv3d weight order)."""
    n, c, hh, ww = frames.shape
    t, p, m = temporal_patch_size, patch_size, merge_size
    gt, gh, gw = n // t, hh // p, ww // p
    x = frames.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
    # (gt, t, c, bh, mh, ph, bw, mw, pw) -> (gt, bh, bw, mh, mw, c, t, ph, pw)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * t * p * p), (gt, gh, gw)


def _image_tensor(image: Image.Image, pp: VisionPreprocess, min_pixels: int, max_pixels: int) -> torch.Tensor:
    """One image -> normalised [C, H', W'] float32, exactly as the PIL image processor computes it."""
    if not isinstance(image, Image.Image):
        raise MediaError(f"not an image: {type(image).__name__} (load it with load_image first)")
    _check_pixels(*image.size, "image")
    image = to_rgb(image)
    h, w = smart_resize(image.height, image.width, pp.factor, min_pixels, max_pixels)
    resized = image.resize((w, h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)             # [3, H', W'] uint8
    x = (x.to(torch.float64) * RESCALE).to(torch.float32)                           # rescale in float64
    mean = torch.tensor(pp.image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pp.image_std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std                                                         # normalise in float32


def preprocess_images(images, pp: VisionPreprocess, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL images -> (pixel_values float32 [sum t*h*w, C*T*P*P], grid_thw int64 [n, 3]), t = 1.
    min/max_pixels override the settings' image bounds for this call (pixel counts)."""
    if not images:
        raise MediaError("no images to preprocess")
    lo = pp.image_min_pixels if min_pixels is None else int(min_pixels)
    hi = pp.image_max_pixels if max_pixels is None else int(max_pixels)
    rows, grids = [], []
    for image in images:
        x = _image_tensor(image, pp, lo, hi)
        frames = x.unsqueeze(0).expand(pp.temporal_patch_size, *x.shape)  # a still image fills one patch
        patches, grid = patchify(frames, pp.patch_size, pp.merge_size, pp.temporal_patch_size)
        rows.append(patches)
        grids.append(grid)
    return torch.cat(rows), torch.tensor(grids, dtype=torch.int64)


def preprocess_image(image, pp: VisionPreprocess, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (anything load_image accepts, Python-API policy) -> (pixel_values, grid_thw [1, 3])."""
    return preprocess_images([load_image(image)], pp, min_pixels, max_pixels)


# ----------------------------------------------------------------------------------------------- videos

@dataclass(frozen=True)
class FrameList:
    """The frames of a video sent as a list of images, known by their sources only: each one is read
    (header, then pixels) only if sampled."""
    items: tuple
    allowed_local_dir: str | Path | None = None
    allow_paths: bool = True

    def header(self, i: int) -> ImageHeader:
        try:
            return probe_image(self.items[i], self.allowed_local_dir, self.allow_paths)
        except MediaError as e:
            raise MediaError(f"video frame {i}: {e}") from None


@dataclass(frozen=True)
class Video:
    """A video and where its frames come from.
    fps: the source frame rate; total_frames: frames in the source; width, height: the frame size its
    header gives (None: unknown, read from the frames);
    frames: uint8 [k, H, W, 3] RGB, or None while not decoded (`source` then holds the file's bytes or path,
    or a FrameList); indices: the source index of each frame in `frames`, or None while the video is not
    sampled (`frames`, if any, is then the whole source). `plan_video` / `sample_video` / `preprocess_video`
    sample it."""
    frames: np.ndarray | None
    fps: float
    total_frames: int
    indices: np.ndarray | None = None
    source: bytes | Path | FrameList | None = field(default=None, repr=False)
    width: int | None = None
    height: int | None = None


def sample_frame_indices(total_frames: int, source_fps: float, pp: VisionPreprocess,
                         fps: float | None = None, num_frames: int | None = None) -> np.ndarray:
    """Qwen3VLVideoProcessor.sample_frames: k frames spread evenly over the whole video,
    indices linspace(0, total-1, k) rounded half to even. k = num_frames when given; otherwise
    clamp(int(total / source_fps * fps), min_frames, max_frames) and at most the frames there are.
    (Qwen3-VL does not round k to the temporal patch: patchify pads with the last frame instead.)"""
    if fps is not None and num_frames is not None:
        raise ValueError("fps and num_frames are mutually exclusive")
    if total_frames <= 0:
        raise MediaError("video has no frames")
    if fps is None and num_frames is None:
        num_frames, fps = pp.video_num_frames, (None if pp.video_num_frames is not None else pp.video_fps)
    if num_frames is None:
        if fps is not None:
            k = int(total_frames / source_fps * fps)
            k = min(max(k, pp.video_min_frames), pp.video_max_frames, total_frames)
        else:
            k = min(max(total_frames, pp.video_min_frames), pp.video_max_frames)
    else:
        k = int(num_frames)
        if k <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
    return np.linspace(0, total_frames - 1, k).round().astype(np.int64)


def frame_timestamps(indices, source_fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds for each temporal patch: the indices padded with the last one to a whole patch, then the mean
    of the first and last frame time of each patch (what the processor writes as "<t.t seconds>")."""
    idx = [int(i) for i in indices]
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    secs = [i / source_fps for i in idx]
    t = temporal_patch_size
    return [(secs[i] + secs[i + t - 1]) / 2 for i in range(0, len(secs), t)]


def video_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video rule: `_fit` with the bounds on frames x height x width (frames rounded to the
    temporal patch), after sides shorter than `factor` are scaled up to it."""
    if num_frames < temporal_factor:
        raise MediaError(f"a video needs at least {temporal_factor} frames, got {num_frames} "
                         "(send a single frame as an image)")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    t = round(num_frames / temporal_factor) * temporal_factor
    return _fit(height, width, num_frames, t, factor, min_pixels, max_pixels, "the video")


def _describe(source) -> str:
    if isinstance(source, FrameList):
        return "video frames"
    return f"video file {str(source)!r}" if isinstance(source, Path) else "video data"


@contextmanager
def _container(source):
    """A PyAV container for video bytes or a path, limited to VIDEO_CONTAINERS with no protocols (a path is
    opened here and given to ffmpeg as a file object) and VIDEO_TIMEOUT; MediaError if it cannot be read."""
    import av

    what = _describe(source)
    try:
        f = open(source, "rb") if isinstance(source, Path) else io.BytesIO(source)
    except OSError as e:
        raise MediaError(f"{what} cannot be read ({e.strerror})") from None
    with f:
        try:
            container = av.open(f, mode="r", timeout=VIDEO_TIMEOUT,
                                container_options={"format_whitelist": VIDEO_CONTAINERS, "protocol_whitelist": "none"})
        except av.error.EOFError:
            raise MediaError(f"{what} is empty or truncated: it ends before its first frame (no frames)") from None
        except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
            raise MediaError(f"{what} is not a readable video in an accepted container "
                             f"(MP4/MOV, Matroska/WebM, AVI) ({e})") from None
        with container:
            yield container


def _probe_video(source) -> Video:
    """Header only: the stream, its frame size (checked), rate and frame count -> a Video not decoded yet."""
    import av

    what = _describe(source)
    with _container(source) as container:
        if not container.streams.video:
            raise MediaError(f"{what} has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_pixels(width, height, f"{what} (frame size)")
        rate = stream.average_rate or stream.guessed_rate
        source_fps = float(rate) if rate else 24.0  # transformers' fallback when the rate is unknown
        total = int(stream.frames or 0)
        if total <= 0:  # no count in the header: count the packets (cheap: nothing is decoded)
            try:
                total = sum(1 for packet in container.demux(stream) if packet.size)
            except av.error.FFmpegError as e:
                raise MediaError(f"{what} is corrupt or truncated ({e})") from None
    if total <= 0:
        raise MediaError(f"{what} has no frames")
    return Video(frames=None, fps=source_fps, total_frames=total, source=source, width=width, height=height)


class _StreamEnded(Exception):
    """The stream ended before the last sampled index (the header over-counted): `decoded` frames."""

    def __init__(self, decoded: int):
        super().__init__(decoded)
        self.decoded = decoded


def _file_frames(source, indices: list[int], cancel):
    """Decode a file's frames 0..max(indices) in order, yielding the RGB frame of each index (an index may
    repeat); only the current frame is held. _StreamEnded if the stream stops short."""
    import av

    what = _describe(source)
    pos, decoded = 0, 0
    with _container(source) as container:
        try:
            for i, frame in enumerate(container.decode(video=0)):
                check_cancel(cancel)
                decoded = i + 1
                if i == indices[pos]:
                    array = frame.to_ndarray(format="rgb24")
                    while pos < len(indices) and indices[pos] == i:
                        yield array
                        pos += 1
                    if pos == len(indices):
                        return
        except av.error.FFmpegError as e:
            raise MediaError(f"{what} is corrupt or truncated (decoding frame {decoded}: {e})") from None
    raise _StreamEnded(decoded)


def _sampled_frames(video: Video, indices: list[int], headers: dict | None, cancel):
    """uint8 [H, W, 3] frames of the sampled indices, in order, decoding only those (a file: the frames up to
    the last index, keeping none but the current one)."""
    if video.frames is not None:
        rows = range(len(indices)) if video.indices is not None else indices
        for r in rows:
            check_cancel(cancel)
            yield video.frames[r]
    elif isinstance(video.source, FrameList):
        last, array = None, None
        for i in indices:
            check_cancel(cancel)
            if i != last:
                header = headers[i] if headers and i in headers else video.source.header(i)
                try:
                    array = np.asarray(decode_image(header))
                except MediaError as e:
                    raise MediaError(f"video frame {i}: {e}") from None
                last = i
            yield array
    else:
        yield from _file_frames(video.source, indices, cancel)


def _collect(video: Video, indices: list[int], headers: dict | None, size_for, cancel):
    """Decode the sampled frames, each resized at once to size_for(H, W) (None: kept as decoded), so at most
    one full-size frame is held. -> (frames: uint8 torch [k, 3, h, w] when resized, else numpy [k, H, W, 3];
    (H, W) of the decoded frames)."""
    what = _describe(video.source) if video.frames is None else "video"
    out, size, k = None, None, len(indices)
    for n, frame in enumerate(_sampled_frames(video, indices, headers, cancel)):
        if out is None:
            size = frame.shape[:2]
            _check_pixels(size[1], size[0], f"{what} (frame size)")
            target = size_for(*size) if size_for is not None else None
            out = (np.empty((k, *size, 3), np.uint8) if target is None
                   else torch.empty((k, 3, *target), dtype=torch.uint8))
        elif frame.shape[:2] != size:
            raise MediaError(f"{what}: frame {indices[n]} is {frame.shape[1]}x{frame.shape[0]}, frame {indices[0]} "
                             f"is {size[1]}x{size[0]}: all frames must have the same size")
        if target is None:
            out[n] = frame
        else:
            frame = np.ascontiguousarray(frame) if frame.flags.writeable else np.array(frame)  # torch wants writable
            x = torch.from_numpy(frame).permute(2, 0, 1).unsqueeze(0).contiguous()
            out[n] = resize_frames(x, *target)[0]
    return out, tuple(size)


@dataclass(frozen=True)
class VideoPlan:
    """A video's sampling and size, from its header: what preprocess_video will give, before any frame is
    decoded. grid (t, h, w) in patches, timestamps per temporal patch, size (h, w) in pixels after resizing,
    decode_pixels: pixels ffmpeg / Pillow decode to produce it (a file: every frame up to the last sampled)."""
    video: Video
    indices: tuple[int, ...]
    frame: tuple[int, int]                     # (H, W) of the source frames
    size: tuple[int, int]
    grid: tuple[int, int, int]
    timestamps: list[float]
    decode_pixels: int
    pp: VisionPreprocess = field(repr=False)
    min_pixels: int = 0
    max_pixels: int = 0
    sampling: tuple = ()                       # (fps, num_frames, max_frames) as given
    headers: dict | None = field(default=None, repr=False)   # a FrameList's sampled headers


def _video_size(k: int, height: int, width: int, pp: VisionPreprocess, lo: int, hi: int) -> tuple[int, int]:
    """Resized (h, w) of k frames of height x width under the [lo, hi] pixel bounds (over all frames)."""
    if pp.cap_pixels_per_frame:  # per-frame budget: min(max_video_tokens blocks, even share), >= 1.05*min
        per_frame = max(min(pp.max_video_tokens * pp.factor ** 2, hi // k), int(lo * 1.05))
        hi = per_frame * k
    return video_smart_resize(k, height, width, pp.temporal_patch_size, pp.factor, lo, hi)


def plan_video(video: Video, pp: VisionPreprocess, fps: float | None = None, num_frames: int | None = None,
               min_pixels: int | None = None, max_pixels: int | None = None,
               max_frames: int | None = None) -> VideoPlan:
    """Sample (fps / num_frames / max_frames override the settings; max_frames replaces video_max_frames)
    and size a video from its header alone. A list of frames has the sampled frames' headers read (they
    must all hold as many pixels as frame 0)."""
    if video.indices is not None:
        if fps is not None or num_frames is not None or max_frames is not None:
            raise ValueError("this video is already sampled; give fps / num_frames / max_frames where it was "
                             "loaded")
        indices = [int(i) for i in video.indices]
    else:
        spp = pp if max_frames is None else replace(pp, video_max_frames=int(max_frames))
        indices = sample_frame_indices(video.total_frames, video.fps, spp, fps, num_frames).tolist()
    lo = pp.video_min_pixels if min_pixels is None else int(min_pixels)
    hi = pp.video_max_pixels if max_pixels is None else int(max_pixels)
    headers = None
    if video.frames is not None:
        height, width = video.frames.shape[1], video.frames.shape[2]
        decode = 0
    elif isinstance(video.source, FrameList):
        headers = {i: video.source.header(i) for i in sorted(set(indices))}
        first = headers[indices[0]]
        width, height = first.width, first.height
        for i, h in headers.items():
            if h.width * h.height != width * height:
                raise MediaError(f"video frame {i} is {h.width}x{h.height}, frame {indices[0]} is {width}x{height}: "
                                 "all frames must have the same size")
        decode = len(headers) * width * height
    else:
        width, height = video.width, video.height
        decode = (max(indices) + 1) * width * height
    return _layout(VideoPlan(video, tuple(indices), (0, 0), (0, 0), (0, 0, 0), [], decode, pp, lo, hi,
                             (fps, num_frames, max_frames), headers), height, width)


def _layout(plan: VideoPlan, height: int, width: int) -> VideoPlan:
    """The plan's size, grid and timestamps for frames of height x width."""
    pp, k = plan.pp, len(plan.indices)
    h, w = _video_size(k, height, width, pp, plan.min_pixels, plan.max_pixels)
    t = -(-k // pp.temporal_patch_size)
    return replace(plan, frame=(height, width), size=(h, w), grid=(t, h // pp.patch_size, w // pp.patch_size),
                   timestamps=frame_timestamps(plan.indices, plan.video.fps, pp.temporal_patch_size))


def _decode_plan(plan: VideoPlan, resize: bool, cancel):
    """Decode a plan's frames (resized to its size when `resize`). A file whose stream ends before its header
    said is sampled again from the frames really there. -> (frames, the plan they match)."""
    def size_for(height, width):
        nonlocal plan
        if (height, width) != plan.frame:
            plan = _layout(plan, height, width)   # the decoded frame size wins over the header's
        return plan.size

    try:
        frames, _ = _collect(plan.video, list(plan.indices), plan.headers, size_for if resize else None, cancel)
    except _StreamEnded as e:
        what = _describe(plan.video.source)
        if e.decoded == 0:  # the header over-counted, so sample again from the frames really there
            raise MediaError(f"{what} has no frames") from None
        fps, num_frames, max_frames = plan.sampling
        plan = plan_video(replace(plan.video, total_frames=e.decoded), plan.pp, fps, num_frames,
                          plan.min_pixels, plan.max_pixels, max_frames)
        try:
            frames, _ = _collect(plan.video, list(plan.indices), plan.headers, size_for if resize else None,
                                 cancel)
        except _StreamEnded:
            raise MediaError(f"{what} decoded to a different number of frames twice") from None
    return frames, plan


def sample_video(video: Video, pp: VisionPreprocess, fps: float | None = None, num_frames: int | None = None,
                 max_frames: int | None = None) -> Video:
    """The sampled Video: indices per sample_frame_indices (fps / num_frames / max_frames override the
    settings), only those frames decoded, at their full size."""
    if video.indices is not None:
        plan_video(video, pp, fps, num_frames, max_frames=max_frames)  # refuses new sampling settings
        return video
    frames, plan = _decode_plan(plan_video(video, pp, fps, num_frames, max_frames=max_frames), False, None)
    return Video(frames=frames, fps=video.fps, total_frames=plan.video.total_frames,
                 indices=np.asarray(plan.indices, dtype=np.int64), width=frames.shape[2], height=frames.shape[1])


def load_video(source, pp: VisionPreprocess | None = None, fps: float | None = None,
               num_frames: int | None = None, max_frames: int | None = None, source_fps: float | None = None,
               allowed_local_dir: str | Path | None = None, allow_paths: bool = True) -> Video:
    """source -> Video, from headers only unless sampling settings are given.
    A video file (path / file:// URL / data:video/...;base64 URL / bytes; PyAV, whose wheels bundle ffmpeg; a
    container in VIDEO_CONTAINERS, no protocols) is opened and checked here (a video stream, frame size,
    frame count). A list of frames (each anything load_image accepts) is a video at `source_fps` (24 when not
    given, as transformers assumes): frame 0's header is read here, the others when sampled. A uint8
    [k, H, W, 3] array is such a video already decoded. Frames are decoded when the video is sampled: here
    if any of pp / fps / num_frames / max_frames is given, else by preprocess_video, so only the frames kept
    are ever decoded and held."""
    if isinstance(source, Video):
        video = source
    elif isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("video has no frames")
        frames = FrameList(tuple(source), allowed_local_dir, allow_paths)
        first = frames.header(0)
        video = Video(frames=None, fps=float(source_fps or 24.0), total_frames=len(source), source=frames,
                      width=first.width, height=first.height)
    elif isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise MediaError(f"a video array must be uint8 [frames, H, W, 3], got {source.dtype} "
                             f"{list(source.shape)}")
        if len(source) == 0:
            raise MediaError("video has no frames")
        _check_pixels(source.shape[2], source.shape[1], "video frame")
        video = Video(frames=source, fps=float(source_fps or 24.0), total_frames=len(source),
                      width=source.shape[2], height=source.shape[1])
    elif isinstance(source, Image.Image):
        raise MediaError("a single image is not a video; send it as an image")
    else:
        video = _probe_video(_resolve(source, "video", allowed_local_dir, allow_paths))
    if pp is not None or fps is not None or num_frames is not None or max_frames is not None:
        video = sample_video(video, pp or VisionPreprocess(), fps, num_frames, max_frames)
    return video


def resize_frames(frames: torch.Tensor, height: int, width: int, chunk: int = 16) -> torch.Tensor:
    """uint8 [k, 3, H, W] -> uint8 [k, 3, height, width]: antialiased bicubic on uint8, the kernel
    torchvision's tensor resize runs on the CPU (unchanged when the size already matches)."""
    if frames.shape[-2:] == (height, width):
        return frames
    out = [F.interpolate(frames[i:i + chunk].contiguous(), size=(height, width), mode="bicubic",
                         align_corners=False, antialias=True) for i in range(0, len(frames), chunk)]
    return torch.cat(out)


def preprocess_video(video, pp: VisionPreprocess, fps: float | None = None, num_frames: int | None = None,
                     min_pixels: int | None = None, max_pixels: int | None = None,
                     source_fps: float | None = None, max_frames: int | None = None, cancel=None,
                     ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """A Video, or anything load_video takes (Python-API policy; frames at `source_fps`) ->
    (pixel_values float32 [gt*gh*gw, C*T*P*P], grid_thw int64 [1, 3], timestamps [gt] in seconds).
    An unsampled video is sampled here (fps / num_frames / max_frames override the settings);
    min/max_pixels override the video pixel bounds (counted over all frames). `plan_video` then
    `video_pixels`."""
    if not isinstance(video, Video):
        video = load_video(video, source_fps=source_fps)
    return video_pixels(plan_video(video, pp, fps, num_frames, min_pixels, max_pixels, max_frames), cancel)


def video_pixels(plan: VideoPlan, cancel=None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Decode a planned video's sampled frames (each resized as it is decoded), normalise, patchify ->
    (pixel_values, grid_thw [1, 3], timestamps). The grid and timestamps are the plan's unless the stream
    disagreed with its header (fewer frames, another frame size). `cancel`: a threading.Event checked
    between frames (MediaCancelled)."""
    pp = plan.pp
    x, plan = _decode_plan(plan, True, cancel)
    check_cancel(cancel)
    k = x.shape[0]
    # Rescale and normalise fused, as the torchvision backend does: (x - 255*mean) / (255*std) in float32.
    mean = (torch.tensor(pp.video_mean, dtype=torch.float32) * (1.0 / RESCALE)).view(-1, 1, 1)
    std = (torch.tensor(pp.video_std, dtype=torch.float32) * (1.0 / RESCALE)).view(-1, 1, 1)
    x = (x.to(torch.float32) - mean) / std
    if pad := -k % pp.temporal_patch_size:  # a whole number of temporal patches: repeat the last frame
        x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
    patches, grid = patchify(x, pp.patch_size, pp.merge_size, pp.temporal_patch_size)
    return patches, torch.tensor([grid], dtype=torch.int64), list(plan.timestamps)


# ----------------------------------------------------------------------------------------------- prompt

def _grid(g) -> tuple[int, int, int]:
    values = g.reshape(-1).tolist() if isinstance(g, torch.Tensor) else np.asarray(g).reshape(-1).tolist()
    if len(values) != 3:
        raise MediaError(f"a grid is (t, h, w), got {values}")
    return int(values[0]), int(values[1]), int(values[2])


def _video_parts(v) -> tuple[tuple[int, int, int], list[float]]:
    if isinstance(v, dict):
        return _grid(v["grid_thw"] if "grid_thw" in v else v["grid"]), list(v["timestamps"])
    if hasattr(v, "grid_thw") and hasattr(v, "timestamps"):
        return _grid(v.grid_thw), list(v.timestamps)
    if len(v) == 3:  # preprocess_video's (pixel_values, grid_thw, timestamps)
        return _grid(v[1]), list(v[2])
    return _grid(v[0]), list(v[1])


def video_placeholder(grid, timestamps, merge_size: int = 2) -> str:
    """One video's text: per temporal patch, "<t.t seconds>" + vision_start + h*w/m^2 pads + vision_end."""
    t, h, w = _grid(grid)
    if len(timestamps) != t:
        raise MediaError(f"video has {t} temporal patches but {len(timestamps)} timestamps")
    frame = VISION_START + VIDEO_PAD * (h * w // merge_size ** 2) + VISION_END
    return "".join(f"<{ts:.1f} seconds>" + frame for ts in timestamps)


def expand_vision_tokens(text: str, image_grids, videos, merge_size: int = 2,
                         keep_video_wrapper: bool = False) -> str:
    """The processor's prompt expansion. Each <|image_pad|> becomes t*h*w/merge^2 pads (its
    vision_start/end stay). Each video placeholder becomes video_placeholder(...); `videos` items are
    (grid_thw, timestamps), preprocess_video's 3-tuple, or a dict with grid_thw and timestamps.

    The video's wrapper: Qwen's processor (transformers <= 4.57, and vLLM) replaces the whole
    <|vision_start|><|video_pad|><|vision_end|> with the per-patch blocks, giving
    <t0><vs>pads<ve><t1><vs>pads<ve>... (the default). transformers 5.x replaces only <|video_pad|>, leaving
    the chat template's outer <|vision_start|> ... <|vision_end|> around those blocks:
    keep_video_wrapper=True reproduces that. A bare <|video_pad|> is expanded in place either way."""
    images = [_grid(g) for g in image_grids]
    vids = [_video_parts(v) for v in videos]
    n_img, n_vid = text.count(IMAGE_PAD), text.count(VIDEO_PAD)
    if n_img != len(images):
        raise MediaError(f"the prompt has {n_img} image placeholders ({IMAGE_PAD}) but {len(images)} images "
                         "were given")
    if n_vid != len(vids):
        raise MediaError(f"the prompt has {n_vid} video placeholders ({VIDEO_PAD}) but {len(vids)} videos "
                         "were given")
    wrapped = re.escape(VISION_START + VIDEO_PAD + VISION_END)
    pattern = re.escape(IMAGE_PAD) + "|" + (re.escape(VIDEO_PAD) if keep_video_wrapper
                                            else f"{wrapped}|{re.escape(VIDEO_PAD)}")
    it_img, it_vid = iter(images), iter(vids)

    def expand(match: re.Match) -> str:
        if match.group(0) == IMAGE_PAD:
            t, h, w = next(it_img)
            return IMAGE_PAD * (t * h * w // merge_size ** 2)
        grid, timestamps = next(it_vid)
        return video_placeholder(grid, timestamps, merge_size)

    return re.sub(pattern, expand, text)
