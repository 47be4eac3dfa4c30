"""qwen36.image against transformers 5.23.

Images: `Qwen2VLImageProcessorPil` itself (runs without torchvision); bit-identical outputs expected.
Videos: `Qwen3VLVideoProcessor` needs torchvision, which is not installed (and must not be). Its pure parts are
compared directly (`sample_frames`, `smart_resize`, `patchify`, `Qwen3VLProcessor._calculate_timestamps`,
`video_utils.read_video_pyav`), and the whole processor is run with a stand-in for the three torchvision
functions it calls (`_tvf_shim` below): resize is the exact code path torchvision's `resize_image` takes for
a uint8 CPU tensor and bicubic (torch's native antialiased uint8 kernel), normalize and grayscale_to_rgb are
their one-line definitions. So the video comparison covers sampling, metadata, resizing sizes, the fused
rescale+normalise, padding, patch layout and the prompt; the resize kernel itself is torch's, by construction.
"""
from __future__ import annotations

import base64
import enum
import io
import os
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qwen36.image import (MAX_INPUT_PIXELS, MediaError, Video, VisionPreprocess,  # noqa: E402
                          expand_vision_tokens, frame_timestamps, load_image, load_video, patchify,
                          preprocess_image, preprocess_images, preprocess_video, sample_frame_indices,
                          smart_resize, video_placeholder, video_smart_resize)

import av  # noqa: E402  (a dependency: video decoding)

QWEN = VisionPreprocess()
TINY = VisionPreprocess(patch_size=4, merge_size=2, temporal_patch_size=2, image_min_pixels=64,
                        image_max_pixels=4096, video_min_pixels=64, video_max_pixels=8192)


# ------------------------------------------------------------------------------------------- helpers

def hf_image_processor(pp: VisionPreprocess):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=pp.patch_size, merge_size=pp.merge_size, temporal_patch_size=pp.temporal_patch_size,
        image_mean=list(pp.image_mean), image_std=list(pp.image_std),
        size={"shortest_edge": pp.image_min_pixels, "longest_edge": pp.image_max_pixels})


def hf_video_processor(pp: VisionPreprocess):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(
        patch_size=pp.patch_size, merge_size=pp.merge_size, temporal_patch_size=pp.temporal_patch_size,
        image_mean=list(pp.video_mean), image_std=list(pp.video_std), fps=pp.video_fps,
        min_frames=pp.video_min_frames, max_frames=pp.video_max_frames, max_video_tokens=pp.max_video_tokens,
        size={"shortest_edge": pp.video_min_pixels, "longest_edge": pp.video_max_pixels})


def rng_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    a = rng.integers(0, 256, (h, w, bands) if bands > 1 else (h, w), dtype=np.uint8)
    return Image.fromarray(a, mode)


def smooth_frames(n, h, w, seed=0):
    """uint8 [n, h, w, 3]: moving gradients plus a little noise, so every frame and pixel differs."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rng = np.random.default_rng(seed)
    frames = [np.stack([128 + 100 * np.sin(x / 5 + i), 128 + 100 * np.cos(y / 4 - i), (x + y + 9 * i) % 256], -1)
              + rng.normal(0, 6, (h, w, 3)) for i in range(n)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h 1-bit pixels and holds none: its header alone says the size."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def frame_colour(i: int) -> tuple[int, int, int]:
    return (i * 8) % 256, (255 - i * 8) % 256, (i * 37) % 256


def write_video(path, n=30, fps=10, w=64, h=48, fmt="matroska", codec="ffv1", pix_fmt="bgr0"):
    """A lossless test video: frame i is filled with frame_colour(i)."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        for i in range(n):
            a = np.empty((h, w, 3), np.uint8)
            a[...] = frame_colour(i)
            for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _tv_resize(image, size, interpolation=_InterpolationMode.BILINEAR, antialias=True):
    # torchvision.transforms.v2.functional.resize_image for a uint8 CPU tensor and BICUBIC: unchanged if
    # the size matches, else torch's native uint8 antialiased bicubic on [-1, C, H, W].
    assert interpolation is _InterpolationMode.BICUBIC and image.dtype == torch.uint8
    h, w = size
    if tuple(image.shape[-2:]) == (h, w):
        return image
    x = F.interpolate(image.reshape(-1, *image.shape[-3:]), size=[h, w], mode="bicubic", align_corners=False,
                      antialias=antialias)
    return x.reshape(*image.shape[:-2], h, w)


def _tv_normalize(image, mean, std, inplace=False):
    image = image if inplace else image.clone()
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return image.sub_(mean).div_(std)


def _tv_grayscale_to_rgb(image):
    return image if image.shape[-3] >= 3 else image.repeat_interleave(3, dim=-3)


@pytest.fixture(scope="module")
def tvf_shim():
    """Let transformers' torchvision-backed video processor run (see the module docstring)."""
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as vpu
    from transformers.image_utils import PILImageResampling

    shim = types.SimpleNamespace(InterpolationMode=_InterpolationMode, resize=_tv_resize,
                                 normalize=_tv_normalize, grayscale_to_rgb=_tv_grayscale_to_rgb)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "tvF", shim, raising=False)
        mp.setattr(vpu, "tvF", shim, raising=False)
        mp.setattr(backends, "pil_torch_interpolation_mapping",
                   {PILImageResampling.BICUBIC: _InterpolationMode.BICUBIC}, raising=False)
        yield shim


@pytest.fixture(scope="module")
def hf_processor(tmp_path_factory, tvf_shim):
    """transformers' Qwen3VLProcessor built offline: our tokenizer files, the PIL image processor and the
    (shimmed) video processor. Its class check consults the video-processor registry, which is a dummy
    without torchvision, so that check is skipped."""
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    from qwen36.tokenizer import write_tokenizer_files

    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
        proc = Qwen3VLProcessor(image_processor=hf_image_processor(TINY), tokenizer=tokenizer,
                                video_processor=hf_video_processor(TINY))
    return proc


# ------------------------------------------------------------------------------------------- images

def test_images_bit_identical_to_transformers_pil_processor():
    palette = rng_image(40, 30, "L", seed=3).convert("P")
    palette.info["transparency"] = 7
    images = [rng_image(1024, 768), rng_image(37, 300, seed=1), rng_image(3000, 20, seed=2),
              rng_image(10, 10, seed=4), rng_image(120, 90, "RGBA", seed=5), rng_image(200, 64, "L", seed=6),
              rng_image(50, 70, "LA", seed=7), palette]
    cases = [(QWEN, {}), (TINY, {}), (QWEN, dict(min_pixels=16 * 16 * 4 * 50, max_pixels=32 * 32 * 300)),
             (TINY, dict(min_pixels=512, max_pixels=1024))]
    for pp, override in cases:
        ours, grid = preprocess_images(images, pp, **override)
        hf_pp = pp if not override else VisionPreprocess(**{**pp.__dict__, "image_min_pixels": override["min_pixels"],
                                                            "image_max_pixels": override["max_pixels"]})
        ref = hf_image_processor(hf_pp)(images, return_tensors="pt")
        assert torch.equal(grid, ref["image_grid_thw"]), (pp, override)
        assert ours.dtype == torch.float32 and ours.shape == ref["pixel_values"].shape
        assert (ours - ref["pixel_values"]).abs().max().item() <= 1e-5
        assert torch.equal(ours, ref["pixel_values"])  # in fact bit-identical


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_image_rule
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video_rule

    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 150), (28, 28), (48, 48), (5000, 26), (26, 5000), (4000, 3000), (17, 33)]
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(150)]
    for h, w in sizes:
        for factor, lo, hi in [(32, 65536, 16777216), (8, 64, 4096), (28, 3136, 1003520)]:
            try:
                expected = hf_image_rule(h, w, factor, lo, hi)
            except ValueError:
                with pytest.raises(MediaError, match="aspect ratio"):
                    smart_resize(h, w, factor, lo, hi)
            else:
                assert smart_resize(h, w, factor, lo, hi) == expected, (h, w, factor)
            for t in (2, 3, 7, 64):
                try:
                    expected = hf_video_rule(t, h, w, 2, factor, lo, hi * 4)
                except ValueError:
                    with pytest.raises(MediaError, match="aspect ratio"):
                        video_smart_resize(t, h, w, 2, factor, lo, hi * 4)
                else:
                    assert video_smart_resize(t, h, w, 2, factor, lo, hi * 4) == expected, (t, h, w, factor)
    with pytest.raises(MediaError, match="at least 2 frames"):
        video_smart_resize(1, 64, 64, 2, 32, 64, 10 ** 6)


def test_patch_layout_matches_transformers_video_patchify():
    hf = hf_video_processor(TINY)
    x = torch.randn(1, 6, 3, 16, 24)
    ours, grid = patchify(x[0], 4, 2, 2)
    ref, gt, gh, gw = hf.patchify(x, patch_size=4, merge_size=2, temporal_patch_size=2)
    assert grid == (gt, gh, gw) and torch.equal(ours, ref[0])


def test_single_image_helper_and_vision_config():
    from qwen36.config import parse_vision_config

    pp = VisionPreprocess.for_vision_config(parse_vision_config({"patch_size": 4, "spatial_merge_size": 2}),
                                            image_min_pixels=64, image_max_pixels=4096)
    assert (pp.patch_size, pp.merge_size, pp.factor) == (4, 2, 8)
    assert VisionPreprocess.for_vision_config({"patch_size": [14, 14]}).patch_size == 14
    img = rng_image(33, 45)
    pv, grid = preprocess_image(png_bytes(img), pp)
    ref_pv, ref_grid = preprocess_images([img], pp)
    assert torch.equal(pv, ref_pv) and torch.equal(grid, ref_grid)
    t, h, w = grid[0].tolist()
    assert pv.shape == (t * h * w, 3 * 2 * 4 * 4)


def test_from_checkpoint(tmp_path):
    import json

    assert VisionPreprocess.from_checkpoint(tmp_path) == QWEN  # no files: the published defaults
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
              "image_std": [0.5] * 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {**common, "size": {"longest_edge": 16777216, "shortest_edge": 65536}}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {**common, "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "fps": 2}))
    assert VisionPreprocess.from_checkpoint(tmp_path) == QWEN
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"longest_edge": 9999, "shortest_edge": 11}, "min_frames": 2, "max_frames": 8,
         "image_mean": [0.1, 0.2, 0.3]}))
    pp = VisionPreprocess.from_checkpoint(tmp_path)
    assert (pp.video_min_pixels, pp.video_max_pixels, pp.video_min_frames, pp.video_max_frames) == (11, 9999, 2, 8)
    assert pp.video_mean == (0.1, 0.2, 0.3) and pp.image_mean == (0.5, 0.5, 0.5)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps({"vision_config": {"patch_size": 4, "spatial_merge_size": 2}}))
    assert VisionPreprocess.from_checkpoint(tiny).patch_size == 4
    assert VisionPreprocess.from_checkpoint(tiny, {"patch_size": 8}).patch_size == 8  # the tower's config wins
    (tiny / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16}))
    with pytest.raises(ValueError, match="patch_size"):
        VisionPreprocess.from_checkpoint(tiny)


# ------------------------------------------------------------------------------------------- loading

def test_load_image_sources(tmp_path):
    img = rng_image(30, 20)
    raw = png_bytes(img)
    (tmp_path / "a.png").write_bytes(raw)
    expected = np.asarray(img)
    for source in (img, raw, str(tmp_path / "a.png"), tmp_path / "a.png", data_url(raw, "image/png"),
                   (tmp_path / "a.png").as_uri()):
        out = load_image(source)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected)
    # the server's policy: data: URLs always, file:// inside the allowed directory only
    assert load_image((tmp_path / "a.png").as_uri(), allowed_local_dir=tmp_path, allow_paths=False).size == (30, 20)
    assert load_image(data_url(raw, "image/png"), allow_paths=False).size == (30, 20)
    # URL-safe base64 without padding, with line breaks, is accepted too
    b64 = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert load_image("data:image/png;base64," + "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))).size \
        == (30, 20)


def test_alpha_and_modes_convert_like_transformers():
    from transformers.image_transforms import convert_to_rgb

    rgba = rng_image(16, 12, "RGBA")
    palette = rng_image(16, 12, "L").convert("P")
    palette.info["transparency"] = 3
    for image in (rgba, rng_image(16, 12, "LA"), palette, rng_image(16, 12, "L"), rng_image(16, 12, "CMYK")):
        assert np.array_equal(np.asarray(load_image(image)), convert_to_rgb(image, return_numpy=True)), image.mode
    clear = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(load_image(clear)).tolist() == [[[255, 255, 255]] * 2] * 2  # onto white, not black


def test_load_image_applies_exif_orientation():
    img = rng_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_errors(tmp_path):
    raw = png_bytes(rng_image(64, 64))
    (tmp_path / "a.png").write_bytes(raw)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.png").write_bytes(raw)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    cases = [
        (b"hello, this is text", {}, "not an image"),
        (raw[: len(raw) // 2], {}, "truncated"),
        (Image.new("RGB", (0, 5)), {}, "zero size"),
        (png_header(11000, 10000), {}, f"too large.*{MAX_INPUT_PIXELS:,}"),
        (png_header(20000, 20000), {}, "too large"),  # beyond PIL's own bomb limit
        (b"P6\n4 4\n255\n" + bytes(48), {}, "not an image in an accepted format"),  # PPM: not allowed
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", {}, "accepted format"),  # EPS: Ghostscript
        ("ftp://example.com/a.png", {}, "unsupported URL scheme 'ftp'"),
        ("https://example.com/a.png", {}, "no network.*data: URL"),
        ("http://example.com/a.png", {"allow_paths": False}, "no network"),
        ((outside / "b.png").as_uri(), {"allowed_local_dir": allowed, "allow_paths": False},
         "outside the allowed local media directory"),
        (f"file://{allowed}/../outside/b.png", {"allowed_local_dir": allowed, "allow_paths": False}, "outside"),
        (str(outside / "b.png"), {"allowed_local_dir": allowed}, "outside"),
        ((tmp_path / "a.png").as_uri(), {"allow_paths": False}, "file:// URLs are not allowed"),
        (str(tmp_path / "a.png"), {"allow_paths": False}, "plain file paths are not accepted"),
        (tmp_path / "a.png", {"allow_paths": False}, "plain file paths are not accepted"),
        ("data:image/png;base64,@@not base64@@", {}, "not valid base64"),
        ("data:image/png;base64,", {}, "carries no image"),
        ("data:image/png," + raw.hex(), {}, "must be base64"),
        (data_url(raw, "text/plain"), {}, "media type 'text/plain'"),
        ("data:image/png;base64" + "AAAA", {}, "malformed data: URL"),
        (str(tmp_path / "missing.png"), {}, "no such file"),
        (str(tmp_path), {}, "no such file"),
        (12345, {}, "not an image source: int"),
        (b"", {}, "empty bytes"),
    ]
    for source, kwargs, message in cases:
        with pytest.raises(MediaError, match=message):
            load_image(source, **kwargs)
    assert issubclass(MediaError, ValueError)
    with pytest.raises(MediaError, match="zero size"):
        preprocess_images([Image.new("RGB", (0, 0))], TINY)
    with pytest.raises(MediaError, match="aspect ratio"):
        preprocess_images([Image.new("RGB", (1, 300))], TINY)
    with pytest.raises(MediaError, match="not an image: str"):
        preprocess_images(["a.png"], TINY)
    with pytest.raises(MediaError, match="no images"):
        preprocess_images([], TINY)


# ------------------------------------------------------------------------------------------- video

def test_frame_sampling_and_timestamps_match_transformers():
    from transformers import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    for pp in (QWEN, VisionPreprocess(video_min_frames=2, video_max_frames=9, video_fps=3.0)):
        hf = hf_video_processor(pp)
        for total in (2, 3, 4, 5, 7, 30, 31, 90, 241, 1000, 20000):
            for src_fps in (1.0, 7.5, 10.0, 23.976, 30.0, 60.0):
                for kw in ({}, {"fps": 0.5}, {"fps": 4}, {"num_frames": 5}, {"num_frames": 1}):
                    ours = sample_frame_indices(total, src_fps, pp, **kw)
                    ref = hf.sample_frames(VideoMetadata(total_num_frames=total, fps=src_fps), **kw)
                    assert np.array_equal(ours, ref), (pp, total, src_fps, kw)
                    for t in (1, 2, 3):
                        assert frame_timestamps(ours, src_fps, t) == \
                            Qwen3VLProcessor._calculate_timestamps(None, ref, src_fps, t)


def test_video_pipeline_matches_transformers_video_processor(tvf_shim):
    from transformers import Qwen3VLProcessor

    frames = smooth_frames(31, 40, 57)
    for pp, kw in [(TINY, {}), (TINY, {"fps": 3}), (TINY, {"num_frames": 7}),
                   (VisionPreprocess(**{**TINY.__dict__, "cap_pixels_per_frame": True, "max_video_tokens": 6}), {}),
                   (QWEN, {})]:
        hf = hf_video_processor(pp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # transformers takes fps from its settings unless told None, and refuses fps with num_frames
            hf_kw = {"fps": None, **kw} if "num_frames" in kw else kw
            ref = hf([frames], video_metadata=[{"total_num_frames": 31, "fps": 12.0}], return_tensors="pt",
                     return_metadata=True, cap_pixels_per_frame=pp.cap_pixels_per_frame, **hf_kw)
        pv, grid, timestamps = preprocess_video(frames, pp, source_fps=12.0, **kw)
        assert torch.equal(grid, ref["video_grid_thw"]), (pp, kw)
        assert pv.shape == ref["pixel_values_videos"].shape
        assert (pv - ref["pixel_values_videos"]).abs().max().item() <= 1e-6
        meta = ref["video_metadata"][0]
        assert timestamps == Qwen3VLProcessor._calculate_timestamps(None, meta.frames_indices, meta.fps,
                                                                    pp.temporal_patch_size)
    # per-call pixel bounds
    pv, grid, _ = preprocess_video(frames, TINY, source_fps=12.0, min_pixels=64, max_pixels=2000)
    ref = hf_video_processor(TINY)([frames], video_metadata=[{"total_num_frames": 31, "fps": 12.0}],
                                   return_tensors="pt", cap_pixels_per_frame=False,
                                   size={"shortest_edge": 64, "longest_edge": 2000})
    assert torch.equal(grid, ref["video_grid_thw"]) and torch.equal(pv, ref["pixel_values_videos"])


def test_load_video_file(tmp_path):
    """3 s at 10 fps, 64x48, lossless, frame i filled with frame_colour(i)."""
    mkv = write_video(tmp_path / "clip.mkv")  # matroska stores no frame count: packets are counted
    mov = write_video(tmp_path / "clip.mov", fmt="mov", codec="png", pix_fmt="rgb24")  # count in the header
    want = np.linspace(0, 29, 6).round().astype(int)  # int(30 / 10 * 2) = 6 frames
    assert want.tolist() == [0, 6, 12, 17, 23, 29]
    for source in (mkv, str(mov), mov.as_uri(), mkv.read_bytes(), data_url(mov.read_bytes(), "video/quicktime")):
        video = load_video(source, TINY)
        assert (video.fps, video.total_frames) == (10.0, 30) and video.indices.tolist() == want.tolist()
        assert video.frames.shape == (6, 48, 64, 3) and video.frames.dtype == np.uint8
        assert [tuple(f[0, 0]) for f in video.frames] == [frame_colour(i) for i in want]
    pv, grid, timestamps = preprocess_video(load_video(mov, TINY), TINY)
    # TINY: 6 frames of 48x64 = 18432 px > 8192, so beta = 1.5 and the frames shrink to 32x40
    assert grid.tolist() == [[3, 8, 10]] and pv.shape == (3 * 8 * 10, 3 * 2 * 4 * 4)
    assert timestamps == pytest.approx([0.3, 1.45, 2.6])  # ((0+6)/2, (12+17)/2, (23+29)/2) / 10
    assert load_video(mov, TINY, num_frames=3).indices.tolist() == [0, 14, 29]
    assert load_video(mov, max_frames=5).indices.tolist() == [0, 7, 14, 22, 29]  # QWEN fps, capped
    lazy = load_video(mkv)  # no sampling settings: opened and checked, nothing decoded yet
    assert lazy.frames is None and lazy.indices is None and (lazy.fps, lazy.total_frames) == (10.0, 30)
    lazy_pv, lazy_grid, lazy_ts = preprocess_video(lazy, TINY)
    assert torch.equal(lazy_pv, pv) and torch.equal(lazy_grid, grid) and lazy_ts == timestamps
    assert torch.equal(preprocess_video(str(mov), TINY)[0], pv)  # a path is decoded and sampled on the way
    assert preprocess_video(mov, TINY, num_frames=4)[1].tolist() == [[2, 8, 12]]  # 4 frames: beta = 1.22
    assert load_video(mov.as_uri(), TINY, allowed_local_dir=tmp_path, allow_paths=False, fps=1).indices.tolist() \
        == [0, 10, 19, 29]


def test_load_video_matches_transformers_pyav_reader(tmp_path):
    """transformers' own PyAV reader (no torchvision needed) on a file whose header has the frame count."""
    from functools import partial

    from transformers.video_utils import read_video_pyav

    mov = write_video(tmp_path / "clip.mov", n=37, fps=7, fmt="mov", codec="png", pix_fmt="rgb24")
    ref_frames, meta = read_video_pyav(str(mov), partial(hf_video_processor(QWEN).sample_frames, fps=2))
    video = load_video(mov, QWEN)
    assert video.indices.tolist() == list(meta.frames_indices) and video.fps == meta.fps
    assert np.array_equal(video.frames, ref_frames)


def test_video_from_frame_list():
    frames = [Image.fromarray(f) for f in smooth_frames(9, 20, 30)]
    video = load_video(frames, source_fps=3)  # frame 0's header read; nothing decoded until sampled
    assert video.indices is None and video.frames is None and video.fps == 3.0
    assert (video.total_frames, video.width, video.height) == (9, 30, 20)
    pv, grid, timestamps = preprocess_video(video, TINY)  # int(9 / 3 * 2) = 6 frames
    pv2, grid2, timestamps2 = preprocess_video(frames, TINY, source_fps=3)
    assert torch.equal(pv, pv2) and torch.equal(grid, grid2) and timestamps == timestamps2
    assert grid[0, 0].item() == 3 and len(timestamps) == 3
    # an odd frame count: the last frame is repeated to fill the final temporal patch
    pv, grid, timestamps = preprocess_video(frames, TINY, source_fps=3, num_frames=5)
    per_t = grid[0, 1].item() * grid[0, 2].item()
    assert grid[0, 0].item() == 3 and pv.shape[0] == 3 * per_t
    last = pv[2 * per_t:].reshape(per_t, 3, 2, 16)
    assert torch.equal(last[:, :, 0], last[:, :, 1])
    assert timestamps == pytest.approx([0 / 3 / 2 + 2 / 3 / 2, (4 + 6) / 3 / 2, 8 / 3])


def test_video_errors(tmp_path):
    empty = tmp_path / "empty.mkv"
    with av.open(str(empty), "w", format="matroska") as c:
        s = c.add_stream("ffv1", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "bgr0"
        c.start_encoding()
    cases = [
        (b"\x00garbage" * 64, {}, "not a readable video"),
        (empty, {}, "no frames"),
        ([], {}, "no frames"),
        (np.zeros((0, 4, 4, 3), np.uint8), {}, "no frames"),
        (np.zeros((2, 4, 4), np.uint8), {}, "uint8 \\[frames, H, W, 3\\]"),
        ([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))], {}, "same size"),
        (Image.new("RGB", (4, 4)), {}, "not a video"),
        ("https://example.com/v.mp4", {}, "no network"),
        (str(empty), {"allow_paths": False}, "plain file paths"),
        (data_url(b"xyz", "image/png"), {}, "media type 'image/png'"),
    ]
    for source, kwargs, message in cases:
        with pytest.raises(MediaError, match=message):
            load_video(source, TINY, **kwargs)
    with pytest.raises(MediaError, match="at least 2 frames"):
        preprocess_video([Image.new("RGB", (16, 16))], TINY)
    with pytest.raises(MediaError, match="not a readable video"):
        load_video(b"\x00garbage" * 64)  # checked on load even when nothing is decoded yet
    with pytest.raises(ValueError, match="already sampled"):
        preprocess_video(load_video(write_video(tmp_path / "v.mkv", n=8), TINY), TINY, fps=1)


# ------------------------------------------------------------------------------------------- prompt

def test_prompt_expansion_images_matches_processor(hf_processor):
    images = [rng_image(50, 30), rng_image(17, 64, seed=1)]
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and "
            "<|vision_start|><|image_pad|><|vision_end|>what?<|im_end|>\n")
    ref = hf_processor(text=[text], images=images)
    _, grids = preprocess_images(images, TINY)
    ours = expand_vision_tokens(text, grids, [], merge_size=TINY.merge_size)
    assert hf_processor.tokenizer(ours)["input_ids"] == ref["input_ids"][0]
    assert ours.count("<|image_pad|>") == sum(t * h * w // 4 for t, h, w in grids.tolist())


def test_prompt_expansion_video_matches_processor(hf_processor):
    frames = smooth_frames(23, 24, 40)
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe.<|im_end|>\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf_processor(text=[text], videos=[frames], video_metadata=[{"total_num_frames": 23, "fps": 5.0}],
                           cap_pixels_per_frame=False)
    pv, grid, timestamps = preprocess_video(frames, TINY, source_fps=5.0)
    assert torch.equal(grid, torch.as_tensor(ref["video_grid_thw"]))
    assert torch.equal(pv, torch.as_tensor(ref["pixel_values_videos"]))
    # transformers 5.x keeps the chat template's outer <|vision_start|> ... <|vision_end|>
    kept = expand_vision_tokens(text, [], [(grid, timestamps)], merge_size=2, keep_video_wrapper=True)
    assert hf_processor.tokenizer(kept)["input_ids"] == ref["input_ids"][0]
    # the default (Qwen's own processor, transformers <= 4.57, vLLM) replaces the wrapper with the blocks
    t, h, w = grid[0].tolist()
    blocks = "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * (h * w // 4) + "<|vision_end|>"
                     for s in timestamps)
    assert expand_vision_tokens(text, [], [(pv, grid, timestamps)]) == \
        "<|im_start|>user\n" + blocks + "Describe.<|im_end|>\n"
    assert kept == "<|im_start|>user\n<|vision_start|>" + blocks + "<|vision_end|>Describe.<|im_end|>\n"
    # int(23 / 5 * 2) = 9 frames: linspace(0, 22, 9) = 0, 2.75, 5.5, 8.25, 11, 13.75, 16.5, 19.25, 22 rounded half
    # to even -> 0 3 6 8 11 14 16 19 22, padded with 22; each pair's mean time at 5 fps:
    assert timestamps == [0.3, 1.4, 2.5, 3.5, 4.4]


def test_prompt_expansion_rules_and_errors():
    grid = torch.tensor([[1, 4, 6]])
    assert expand_vision_tokens("a<|image_pad|>b", grid, []) == "a" + "<|image_pad|>" * 6 + "b"
    vid = {"grid_thw": [2, 2, 2], "timestamps": [0.25, 1.0]}
    block = "<|vision_start|><|video_pad|><|vision_end|>"
    assert expand_vision_tokens("<|video_pad|>", [], [vid]) == video_placeholder([2, 2, 2], [0.25, 1.0]) == \
        "<0.2 seconds>" + block + "<1.0 seconds>" + block  # Python's .1f: 0.25 -> 0.2 (half to even)
    mixed = "<|vision_start|><|video_pad|><|vision_end|> x <|image_pad|> y <|video_pad|>"
    out = expand_vision_tokens(mixed, [(1, 2, 4)], [vid, ((1, 2, 2), [3.0])])
    assert out == (video_placeholder([2, 2, 2], [0.25, 1.0]) + " x " + "<|image_pad|>" * 2 + " y "
                   + video_placeholder([1, 2, 2], [3.0]))
    with pytest.raises(MediaError, match="2 image placeholders.*1 images"):
        expand_vision_tokens("<|image_pad|><|image_pad|>", [(1, 2, 2)], [])
    with pytest.raises(MediaError, match="0 video placeholders.*1 videos"):
        expand_vision_tokens("text", [], [vid])
    with pytest.raises(MediaError, match="2 temporal patches but 1 timestamps"):
        expand_vision_tokens("<|video_pad|>", [], [((2, 2, 2), [0.0])])


def test_video_dataclass_passthrough():
    v = Video(frames=smooth_frames(4, 8, 8), fps=4.0, total_frames=4)
    assert load_video(v) is v
