"""config.json -> frozen dataclasses, parsed once.

Two on-disk forms are accepted:
  * the VL wrapper (`model_type: qwen3_5_moe`, `text_config` + `vision_config`), as shipped by Qwen;
  * text-only (`model_type: qwen3_5_moe_text`), the text config at the top level.
A `quantization_config` is either ours (`quant_method: qwen36`, a checkpoint stored int8/int4 by
`qwen36 quantize`: `ModelConfig.quantization`) or Qwen's block FP8 (`quant_method: fp8`, e.g.
Qwen/Qwen3.6-35B-A3B-FP8: `ModelConfig.fp8`), a source format that is dequantized as it is read.

`load_config` refuses a GGUF file (or a directory of them) by its magic bytes, before reading anything else.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
LAYER_TYPES = ("linear_attention", "full_attention")


class ConfigError(ValueError):
    """config.json is missing, malformed, or describes a model we do not run."""


class GGUFError(ConfigError):
    """The model given is llama.cpp's GGUF format, which qwen36 does not read."""


GGUF_MAGIC = b"GGUF"
MAX_CONFIG_BYTES = 16 << 20
OFFICIAL_REPOS = ("Qwen/Qwen3.6-35B-A3B", "Qwen/Qwen3.6-35B-A3B-FP8")


def gguf_advice(what: str) -> str:
    """The message for a GGUF model: what qwen36 reads instead, and how to get it."""
    return f"{what} is a GGUF file (llama.cpp's format), which qwen36 does not read. {READ_INSTEAD}"


READ_INSTEAD = (f"qwen36 reads the official safetensors checkpoint as Qwen publishes it: {OFFICIAL_REPOS[0]} (bf16) or "
                f"the FP8 one {OFFICIAL_REPOS[1]}. Get it with `hf download {OFFICIAL_REPOS[0]} --local-dir DIR` (or "
                f"give the repo id instead of a path and qwen36 downloads it into the Hugging Face cache); qwen36 "
                f"quantizes at load time: --quantization int4 (or int8) on the command line, "
                f"LLM(path, quantization='int4') in Python.")


def check_not_gguf(path: str | Path) -> None:
    """Raise GGUFError if `path` is a GGUF file (its first 4 bytes; nothing more is read) or a directory
    holding .gguf files and no config.json."""
    path = Path(path)
    if path.is_file():
        try:
            with open(path, "rb") as f:
                magic = f.read(len(GGUF_MAGIC))
        except OSError:
            return
        if magic == GGUF_MAGIC:
            raise GGUFError(gguf_advice(str(path)))
    elif path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            raise GGUFError(gguf_advice(f"{path} has no config.json; {ggufs[0]}"
                                        + (f" (and {len(ggufs) - 1} more .gguf)" if len(ggufs) > 1 else "")))


@dataclass(frozen=True)
class FP8Config:
    """Qwen's block FP8 source format: each converted weight W is stored float8_e4m3fn with `W_scale_inv`
    [ceil(N / block[0]), ceil(K / block[1])]; w = fp8 * scale_inv of its block (checkpoint.dequantize_fp8).
    Activations are not ours to quantize (activation_scheme is for FP8 kernels); weights are dequantized as
    they are read, into the dtype (or int8/int4 form) the load asks for."""
    block: tuple[int, int] = (128, 128)
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    modules_to_not_convert: tuple[str, ...] = ()


def parse_fp8_config(q: dict) -> FP8Config:
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"config.json: quantization_config fmt {fmt!r} is not supported; FP8 checkpoints "
                          "must be 'e4m3' (float8_e4m3fn), as Qwen's are")
    block = q.get("weight_block_size")
    if block is None:
        raise ConfigError("config.json: quantization_config (fp8) has no weight_block_size; qwen36 reads block FP8 "
                          f"checkpoints ({OFFICIAL_REPOS[1]}: [128, 128]), not per-tensor FP8")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"config.json: quantization_config weight_block_size must be two positive integers, "
                          f"got {block!r}")
    return FP8Config(block=(block[0], block[1]), fmt=fmt,
                     activation_scheme=str(q.get("activation_scheme", "dynamic")),
                     modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()))


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    # gated DeltaNet
    linear_conv_kernel_dim: int
    linear_num_key_heads: int
    linear_key_head_dim: int
    linear_num_value_heads: int
    linear_value_head_dim: int
    # MoE
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    tie_word_embeddings: bool
    mtp_num_hidden_layers: int
    rope_scaling: RopeScaling | None = None     # YaRN; None: plain RoPE

    @property
    def rope_factor(self) -> float:
        """How far rope scaling stretches the positions (1.0 without it)."""
        return 1.0 if self.rope_scaling is None else self.rope_scaling.factor

    @property
    def max_context(self) -> int:
        """The longest context the positions are meant for: max_position_embeddings, or with YaRN
        factor x original_max_position_embeddings when that is longer (4 x 262,144 for the model card's block)."""
        s = self.rope_scaling
        if s is None:
            return self.max_position_embeddings
        return max(self.max_position_embeddings, int(self.rope_factor * s.original_max_position_embeddings))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:  # channels of the causal conv: [q | k | v]
        return 2 * self.linear_key_dim + self.linear_value_dim

    def is_full_attention(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    num_position_embeddings: int
    hidden_act: str


@dataclass(frozen=True)
class ModelConfig:
    model_type: str                     # as written in config.json
    text: TextConfig
    vision: VisionConfig | None         # None for text-only checkpoints
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    quantization: dict | None = None    # config.json quantization_config (qwen36-quantized checkpoints)
    fp8: FP8Config | None = None        # block-FP8 weights on disk (Qwen's -FP8 checkpoints), dequantized as read


def _get(d: dict, key: str, default, where: str):
    value = d.get(key, default)
    if value is None and default is None:
        raise ConfigError(f"config.json: {where}{key} is required")
    return value


def _layer_types(tc: dict, n_layers: int) -> tuple[str, ...]:
    types = tc.get("layer_types")
    if types is None:
        interval = int(tc.get("full_attention_interval", 4))
        if interval < 1:
            raise ConfigError(f"config.json: full_attention_interval must be >= 1, got {interval}")
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    types = tuple(types)
    if len(types) != n_layers:
        raise ConfigError(f"config.json: layer_types has {len(types)} entries but num_hidden_layers is {n_layers}")
    bad = sorted({t for t in types if t not in LAYER_TYPES})
    if bad:
        raise ConfigError(f"config.json: unknown layer type(s) {bad}; supported: {list(LAYER_TYPES)}")
    return types


ROPE_TYPES = ("default", "yarn")
MAX_POSITIONS = 1 << 24              # the largest position an fp32 holds exactly with every integer below it
ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved",
             "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate", "attention_factor",
             "mscale", "mscale_all_dim"}


@dataclass(frozen=True)
class RopeScaling:
    """YaRN's parameters as the checkpoint (or --rope-scaling) states them; layers/rotary.py turns them into
    frequencies exactly as transformers' `_compute_yarn_parameters` does. None where transformers fills a
    default (attention_factor: 0.1 ln(factor) + 1, or the mscale ratio; beta_fast 32, beta_slow 1 where missing
    or 0). factor is required; original_max_position_embeddings defaults to max_position_embeddings."""
    rope_type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float | None = None
    beta_slow: float | None = None
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None


def merge_rope_scaling(text_config: dict, scaling: dict | str | None) -> dict:
    """text_config with `scaling` (a dict, or its JSON) merged into its rope parameters: the keys given replace
    the checkpoint's, every other key (rope_theta, mrope_section, mrope_interleaved, partial_rotary_factor) is
    kept. `{"rope_type": "default"}` switches scaling off again. Raises ConfigError naming a bad key."""
    if scaling is None:
        return text_config
    if isinstance(scaling, str):
        try:
            scaling = json.loads(scaling)
        except (json.JSONDecodeError, RecursionError) as e:
            hint = " (for YaRN: --yarn FACTOR, or {\"rope_type\": \"yarn\", \"factor\": 4.0})" \
                if scaling.strip().lower() == "yarn" else ""
            raise ConfigError(f"not valid JSON ({e}){hint}") from None
    if not isinstance(scaling, dict):
        raise ConfigError('must be an object such as {"rope_type": "yarn", "factor": 4.0, '
                          '"original_max_position_embeddings": 262144}')
    unknown = sorted(set(scaling) - ROPE_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; known: {sorted(ROPE_KEYS - {'type'})}")
    params = _rope_parameters(text_config)
    if "type" in scaling and "rope_type" not in scaling:
        scaling = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": scaling["type"]}
    if scaling.get("rope_type", params.get("rope_type")) == "default":     # off again: drop YaRN's keys
        params = {k: v for k, v in params.items() if k in ("rope_theta", "partial_rotary_factor", "mrope_section",
                                                           "mrope_interleaved")}
    merged = dict(text_config)
    merged.pop("rope_scaling", None)
    merged["rope_parameters"] = {**params, **scaling}
    return merged


def _rope_parameters(tc: dict) -> dict:
    """The rope parameters of a text config: `rope_parameters`, with the legacy `rope_scaling` key's entries
    merged over them (transformers takes one or the other, and with only the legacy key present it loses
    rope_theta and the M-RoPE keys; here both keep what they say), and the top-level rope_theta /
    partial_rotary_factor where the dict has none. `type` is read as `rope_type`."""
    params = dict(tc.get("rope_parameters") or {})
    legacy = tc.get("rope_scaling")
    for name, value in (("rope_parameters", params), ("rope_scaling", legacy)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config.json: {name} must be an object, got {type(value).__name__}")
    params.update(legacy or {})
    if "type" in params:
        kind = params.pop("type")
        params.setdefault("rope_type", kind)
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in params and key in tc:
            params[key] = tc[key]
    return params


def _number(params: dict, key: str, where: str, positive: bool = True) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")) or (positive and value <= 0):
        raise ConfigError(f"config.json: {where}rope_parameters.{key} must be a {'positive ' if positive else ''}"
                          f"number, got {value!r}")
    return float(value)


def _rope(tc: dict, where: str = "") -> tuple[float, float, tuple[int, int, int], RopeScaling | None]:
    rp = _rope_parameters(tc)
    rope_type = rp.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"config.json: {where}rope_type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
    theta = _number(rp, "rope_theta", where)
    theta = 10_000_000.0 if theta is None else theta
    partial = _number(rp, "partial_rotary_factor", where)
    partial = 0.25 if partial is None else partial
    section = tuple(int(s) for s in rp.get("mrope_section", (11, 11, 10)))
    if len(section) != 3:
        raise ConfigError(f"config.json: {where}mrope_section must have 3 entries, got {list(section)}")
    scaling = None
    if rope_type == "yarn":
        native = int(tc.get("max_position_embeddings", 262144))
        original = rp.get("original_max_position_embeddings", tc.get("original_max_position_embeddings", native))
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise ConfigError(f"config.json: {where}rope_parameters.original_max_position_embeddings must be a "
                              f"positive integer, got {original!r}")
        truncate = rp.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ConfigError(f"config.json: {where}rope_parameters.truncate must be true or false, got {truncate!r}")
        if rp.get("factor") is None:
            raise ConfigError(f"config.json: {where}rope_parameters.factor is required with rope_type 'yarn' "
                              "(4.0 reaches ~1M tokens from 262,144)")
        factor = _number(rp, "factor", where)
        if factor * original > MAX_POSITIONS:
            raise ConfigError(f"config.json: {where}rope_parameters: factor {factor:g} x original_max_position_embeddings "
                              f"{original:,} is past {MAX_POSITIONS:,} positions, beyond which fp32 positions (and so "
                              "the rotary angles) are no longer exact")
        scaling = RopeScaling("yarn", factor, original,
                              _number(rp, "beta_fast", where, positive=False),
                              _number(rp, "beta_slow", where, positive=False), truncate,
                              _number(rp, "attention_factor", where), _number(rp, "mscale", where, positive=False),
                              _number(rp, "mscale_all_dim", where, positive=False))
    return theta, partial, section, scaling


def parse_text_config(tc: dict, where: str = "") -> TextConfig:
    act = tc.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: {where}hidden_act {act!r} is not supported; qwen3_5_moe uses 'silu'")
    n_layers = int(_get(tc, "num_hidden_layers", 40, where))
    theta, partial, section, scaling = _rope(tc, where)
    cfg = TextConfig(
        vocab_size=int(_get(tc, "vocab_size", 248320, where)),
        hidden_size=int(_get(tc, "hidden_size", 2048, where)),
        num_hidden_layers=n_layers,
        layer_types=_layer_types(tc, n_layers),
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
        num_attention_heads=int(tc.get("num_attention_heads", 16)),
        num_key_value_heads=int(tc.get("num_key_value_heads", 2)),
        head_dim=int(tc.get("head_dim", 256)),
        attention_bias=bool(tc.get("attention_bias", False)),
        rope_theta=theta,
        partial_rotary_factor=partial,
        mrope_section=section,
        max_position_embeddings=int(tc.get("max_position_embeddings", 262144)),
        rope_scaling=scaling,
        linear_conv_kernel_dim=int(tc.get("linear_conv_kernel_dim", 4)),
        linear_num_key_heads=int(tc.get("linear_num_key_heads", 16)),
        linear_key_head_dim=int(tc.get("linear_key_head_dim", 128)),
        linear_num_value_heads=int(tc.get("linear_num_value_heads", 32)),
        linear_value_head_dim=int(tc.get("linear_value_head_dim", 128)),
        num_experts=int(tc.get("num_experts", 256)),
        num_experts_per_tok=int(tc.get("num_experts_per_tok", 8)),
        moe_intermediate_size=int(tc.get("moe_intermediate_size", 512)),
        shared_expert_intermediate_size=int(tc.get("shared_expert_intermediate_size", 512)),
        tie_word_embeddings=bool(tc.get("tie_word_embeddings", False)),
        mtp_num_hidden_layers=int(tc.get("mtp_num_hidden_layers", 0)),
    )
    _check_text(cfg, where)
    return cfg


def _check_text(c: TextConfig, where: str) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(f"config.json: {where}{msg}")

    need(c.num_attention_heads % c.num_key_value_heads == 0,
         f"num_attention_heads ({c.num_attention_heads}) must be a multiple of num_key_value_heads ({c.num_key_value_heads})")
    need(c.linear_num_value_heads % c.linear_num_key_heads == 0,
         f"linear_num_value_heads ({c.linear_num_value_heads}) must be a multiple of linear_num_key_heads ({c.linear_num_key_heads})")
    need(0 < c.num_experts_per_tok <= c.num_experts,
         f"num_experts_per_tok ({c.num_experts_per_tok}) must be in 1..num_experts ({c.num_experts})")
    need(c.rotary_dim % 2 == 0 and 0 < c.rotary_dim <= c.head_dim,
         f"rotary dim head_dim*partial_rotary_factor = {c.rotary_dim} must be even and in 1..head_dim")
    need(c.linear_conv_kernel_dim >= 1, "linear_conv_kernel_dim must be >= 1")


def parse_vision_config(vc: dict) -> VisionConfig:
    def one(x):  # patch sizes may be written as [p, p]
        return int(x[0]) if isinstance(x, (list, tuple)) else int(x)

    return VisionConfig(
        depth=int(vc.get("depth", 27)),
        hidden_size=int(vc.get("hidden_size", 1152)),
        intermediate_size=int(vc.get("intermediate_size", 4304)),
        num_heads=int(vc.get("num_heads", 16)),
        in_channels=int(vc.get("in_channels", 3)),
        patch_size=one(vc.get("patch_size", 16)),
        spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
        temporal_patch_size=one(vc.get("temporal_patch_size", 2)),
        out_hidden_size=int(vc.get("out_hidden_size", 3584)),
        num_position_embeddings=int(vc.get("num_position_embeddings", 2304)),
        hidden_act=str(vc.get("hidden_act", "gelu_pytorch_tanh")),
    )


def parse_config(raw: dict, rope_scaling: dict | str | None = None) -> ModelConfig:
    """rope_scaling: merged into the text config's rope parameters first (merge_rope_scaling)."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported; qwen36 runs {list(SUPPORTED_MODEL_TYPES)} "
            "(Qwen3.6-35B-A3B, Qwen3.5-35B-A3B and fine-tunes with that architecture)")
    if model_type == "qwen3_5_moe":
        tc = raw.get("text_config")
        if not isinstance(tc, dict):
            raise ConfigError("config.json: model_type 'qwen3_5_moe' needs a 'text_config' object")
        text = parse_text_config(merge_rope_scaling(tc, rope_scaling), "text_config.")
        vc = raw.get("vision_config")
        vision = parse_vision_config(vc) if isinstance(vc, dict) else None
    else:
        text = parse_text_config(merge_rope_scaling(raw, rope_scaling))
        vision = None
    q = raw.get("quantization_config")
    fp8 = None
    if isinstance(q, dict) and q.get("quant_method") == "fp8":
        fp8, q = parse_fp8_config(q), None
    return ModelConfig(
        model_type=model_type,
        text=text,
        vision=vision,
        image_token_id=int(raw.get("image_token_id", 248056)),
        video_token_id=int(raw.get("video_token_id", 248057)),
        vision_start_token_id=int(raw.get("vision_start_token_id", 248053)),
        vision_end_token_id=int(raw.get("vision_end_token_id", 248054)),
        quantization=q,
        fp8=fp8,
    )


def load_config(path: str | Path, rope_scaling: dict | str | None = None) -> ModelConfig:
    """Parse `path/config.json` (or `path` itself if it is the file), with `rope_scaling` merged into its rope
    parameters (merge_rope_scaling). A GGUF file, or a directory of them without config.json, raises
    GGUFError at once (its first 4 bytes are all that is read)."""
    path = Path(path)
    check_not_gguf(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{file}: no config.json (is {path} a Hugging Face checkpoint directory?)")
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:     # a weights file given as the model: say so without reading it
        raise ConfigError(f"{file}: not a config.json ({size:,} bytes); give the checkpoint directory")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return parse_config(raw, rope_scaling)
