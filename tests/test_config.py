"""config.json in both forms, layer patterns, and clear errors."""
from __future__ import annotations

import json
import time

import pytest

from qwen36.config import ConfigError, FP8Config, GGUFError, load_config, parse_config
from qwen36.loader import quant_config as _quant_config
from qwen36.ops.qformat import QuantConfig
from qwen36.synth import DEMO, REAL, model_config



def test_published_config(request):
    # Qwen3.6-35B-A3B's published config.json, kept with the tests so a clone anywhere can run them
    path = request.config.rootpath / "tests" / "data" / "qwen36_config.json"
    cfg = load_config(path)
    t = cfg.text
    assert cfg.model_type == "qwen3_5_moe" and cfg.vision is not None
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size) == (2048, 40, 248320)
    assert t.layer_types.count("full_attention") == 10 and t.is_full_attention(3) and not t.is_full_attention(4)
    assert (t.rotary_dim, t.rope_theta, t.mrope_section) == (64, 1e7, (11, 11, 10))
    assert (t.linear_conv_dim, t.num_experts, t.num_experts_per_tok) == (8192, 256, 8)
    assert (cfg.vision.depth, cfg.vision.hidden_size, cfg.vision.out_hidden_size) == (27, 1152, 2048)
    assert cfg.image_token_id == 248056


def test_text_only_form():
    raw = model_config(DEMO, text_only=True)
    cfg = parse_config(raw)
    assert cfg.model_type == "qwen3_5_moe_text" and cfg.vision is None
    assert cfg.text.hidden_size == DEMO["hidden_size"]


def test_interval_when_no_layer_types():
    raw = model_config(REAL)
    del raw["text_config"]["layer_types"]
    raw["text_config"]["full_attention_interval"] = 3
    t = parse_config(raw).text
    assert [i for i, k in enumerate(t.layer_types) if k == "full_attention"] == list(range(2, 40, 3))


def test_layer_types_win_over_interval():
    raw = model_config({**DEMO, "layer_types": ["full_attention"] + ["linear_attention"] * 7})
    raw["text_config"]["full_attention_interval"] = 4
    assert parse_config(raw).text.layer_types[0] == "full_attention"


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r.update(model_type="llama"), "'llama' is not supported"),
    (lambda r: r.pop("model_type"), "None is not supported"),
    (lambda r: r.pop("text_config"), "text_config"),
    (lambda r: r["text_config"].update(layer_types=["linear_attention"]), "layer_types has 1 entries"),
    (lambda r: r["text_config"]["layer_types"].__setitem__(0, "sliding_attention"), "sliding_attention"),
    (lambda r: r["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda r: r["text_config"].update(linear_num_key_heads=3), "linear_num_key_heads"),
    (lambda r: r["text_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda r: r["text_config"]["rope_parameters"].update(rope_type="yarn"), "rope_type 'yarn'"),
])
def test_errors(mutate, needle):
    raw = model_config(DEMO)
    mutate(raw)
    with pytest.raises(ConfigError, match="config.json") as e:
        parse_config(raw)
    assert needle in str(e.value)


def test_missing_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:     # "5": the peak (VmHWM) restarts from the RSS now
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_gguf_file_is_refused_by_its_magic_without_reading_it(tmp_path):
    """A 2 GB (sparse) GGUF file: refused in well under a second, and the process's peak memory does not grow
    by anything like its size (all that is read is its first 4 bytes)."""
    from qwen36 import LLM

    big = tmp_path / "Qwen3.6-35B-A3B-Q4_K_M.gguf"
    with open(big, "wb") as f:
        f.write(b"GGUF" + (3).to_bytes(4, "little"))
        f.truncate(2 << 30)
    copy = tmp_path / "model"                          # no .gguf name: the magic is what tells
    copy.symlink_to(big)
    for path in (big, copy):
        _peak_rss_reset()
        before, start = _peak_rss(), time.perf_counter()
        with pytest.raises(GGUFError) as e:
            load_config(path)
        assert time.perf_counter() - start < 1.0
        assert _peak_rss() - before < 64 << 20
    msg = str(e.value)
    for needle in ("GGUF", "Qwen/Qwen3.6-35B-A3B ", "Qwen/Qwen3.6-35B-A3B-FP8", "hf download", "quantizes at load"):
        assert needle in msg, needle
    start = time.perf_counter()
    with pytest.raises(GGUFError):                     # every entry point: LLM(path) loads through load_config
        LLM(big, quantization=None)
    assert time.perf_counter() - start < 1.0


def test_directory_of_gguf_files_is_refused(tmp_path):
    (tmp_path / "Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf").write_bytes(b"GGUF" + bytes(28))
    with pytest.raises(GGUFError, match="has no config.json; Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(model_config(DEMO)))   # a checkpoint with a GGUF beside it
    assert load_config(tmp_path).text.hidden_size == DEMO["hidden_size"]


def test_weights_file_given_as_config_is_not_read(tmp_path):
    f = tmp_path / "model.safetensors"
    with open(f, "wb") as out:
        out.truncate(1 << 30)
    with pytest.raises(ConfigError, match="not a config.json"):
        load_config(f)


def test_fp8_quantization_config_is_a_source_format():
    raw = model_config(DEMO)
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128],
                                  "modules_to_not_convert": ["lm_head", "model.visual"]}
    cfg = parse_config(raw)
    assert cfg.quantization is None                    # not a stored int8/int4 form
    assert cfg.fp8 == FP8Config(block=(128, 128), modules_to_not_convert=("lm_head", "model.visual"))
    assert _quant_config(cfg, None, 128) is None
    assert _quant_config(cfg, "int4", 128) == QuantConfig("int4", 128)
    for bad, needle in ((dict(fmt="e5m2"), "e5m2"), (dict(weight_block_size=None), "weight_block_size"),
                        (dict(weight_block_size=[128]), "two positive integers")):
        raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], **bad}
        with pytest.raises(ConfigError, match=needle):
            parse_config(raw)
