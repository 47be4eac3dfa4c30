"""Vision tower: equal to transformers' Qwen3_5MoeVisionModel on random pixels, bf16 storage, loader errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qwen36.checkpoint import Checkpoint, CheckpointError
from qwen36.config import load_config
from qwen36.synth import TINY_VISION, write_checkpoint
from qwen36.vision import VisionTower, load_vision_tower, num_merged_tokens, resample_positions

from conftest import BASE, load_reference, rel_err

TOL = 1e-4  # max |ours - ref| / max |ref| in fp32; measured ~5e-7

# TINY_VISION's position table is 4 x 4; grids are (t, h, w) in patches, h and w even (merge 2)
GRIDS = {
    "image-h!=w": [(1, 2, 6)],
    "images-of-three-sizes": [(1, 2, 2), (1, 6, 4), (1, 4, 8)],
    "same-size-images-apart": [(1, 4, 4), (1, 2, 6), (1, 4, 4)],
    "video-t3": [(3, 4, 6)],
    "larger-than-table": [(1, 10, 12)],
    "smaller-than-table": [(1, 2, 2)],
    "video-and-images": [(2, 4, 4), (1, 4, 4), (1, 8, 2)],
}
BIG_VISION = dict(TINY_VISION, hidden_size=64, num_heads=4, intermediate_size=96, num_position_embeddings=36,
                  depth=3, patch_size=2)


def pixels(cfg, grid, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.tensor(grid)
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    return torch.randn(int(g.prod(-1).sum()), width, generator=torch.Generator().manual_seed(seed)), g


def load(path, dtype=torch.float32) -> VisionTower:
    return load_vision_tower(Checkpoint(path), load_config(path).vision, dtype, "cpu")


@pytest.fixture(scope="module")
def tiny(checkpoint):
    path = checkpoint("ratio2")
    return load(path, torch.bfloat16), load_reference(path)


@pytest.mark.parametrize("name", list(GRIDS))
def test_matches_reference(tiny, name):
    tower, ref = tiny
    px, g = pixels(tower.cfg, GRIDS[name])
    ours = tower(px, g)
    with torch.no_grad():
        want = ref.model.visual(px, grid_thw=g).pooler_output
    assert ours.dtype == torch.float32 and ours.shape == want.shape == (sum(num_merged_tokens(g)), 64)
    assert rel_err(ours, want) <= TOL


def test_encode_matches_get_image_and_video_features(tiny):
    tower, ref = tiny
    px, g = pixels(tower.cfg, GRIDS["images-of-three-sizes"], seed=1)
    ours = tower.encode(px, g)
    with torch.no_grad():
        want = ref.model.get_image_features(px, g).pooler_output
    assert [t.shape[0] for t in ours] == [1, 6, 8] == [t.shape[0] for t in want]
    assert all(rel_err(a, b) <= TOL for a, b in zip(ours, want))
    px, g = pixels(tower.cfg, [(3, 4, 6), (2, 2, 4)], seed=2)
    ours = tower.encode(px, g.tolist())                                      # a list of (t, h, w) works too
    with torch.no_grad():
        want = ref.model.get_video_features(px, g).pooler_output
    assert [t.shape[0] for t in ours] == [18, 4] and all(rel_err(a, b) <= TOL for a, b in zip(ours, want))


def test_images_do_not_see_each_other(tiny):
    """Attention stays within each image: changing one image leaves the others' tokens unchanged."""
    tower, _ = tiny
    px, g = pixels(tower.cfg, [(1, 4, 4), (1, 4, 4), (2, 2, 4)])
    a = tower.encode(px, g)
    px2 = px.clone()
    px2[16:32] += 1.0                                                        # the second image
    b = tower.encode(px2, g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and not torch.equal(a[1], b[1])


def test_larger_tower(tmp_path):
    path = write_checkpoint(tmp_path / "big", BASE, seed=3, vision=BIG_VISION, mtp=False, shards=1)
    tower, ref = load(path, torch.bfloat16), load_reference(path)
    assert len(tower.blocks) == 3 and tower.cfg.num_heads == 4
    px, g = pixels(tower.cfg, [(1, 2, 2), (1, 6, 6), (2, 14, 8), (1, 4, 10)], seed=5)
    with torch.no_grad():
        want = ref.model.visual(px, grid_thw=g).pooler_output
    assert rel_err(tower(px, g), want) <= TOL


def test_position_resampling_is_bilinear_align_corners():
    """An independent oracle: F.interpolate of the square table, then merge-block order."""
    table = torch.randn(36, 8)
    for h, w in [(2, 2), (4, 10), (12, 6), (6, 6)]:
        grid = F.interpolate(table.t().reshape(1, 8, 6, 6), size=(h, w), mode="bilinear", align_corners=True)[0]
        want = grid.permute(1, 2, 0).reshape(h // 2, 2, w // 2, 2, 8).transpose(1, 2).reshape(h * w, 8)
        assert rel_err(resample_positions(table, h, w, 2), want) <= 1e-6


def test_bf16_storage_equals_fp32_on_rounded_weights(tmp_path):
    path = write_checkpoint(tmp_path / "fp32", BASE, seed=7, mtp=False, shards=1, dtype=torch.float32)
    stored = load(path, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in stored.state_dict().values())
    rounded = load(path, torch.float32)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in rounded.state_dict().items()})
    px, g = pixels(stored.cfg, [(1, 4, 6), (2, 2, 2)])
    a, b = stored(px, g), rounded(px, g)
    assert a.dtype == torch.float32 and rel_err(a, b) <= 1e-6
    assert rel_err(load(path, torch.float32)(px, g), b) > 1e-4               # the rounding is visible


def test_state_dict_names_are_the_disk_names(checkpoint):
    path = checkpoint("ratio2")
    tower = load(path)
    disk = {n.removeprefix("model.visual.") for n in Checkpoint(path).names() if n.startswith("model.visual.")}
    assert set(tower.state_dict()) == disk


def test_no_tower(checkpoint, tmp_path):
    path = write_checkpoint(tmp_path / "novis", BASE, vision=None, mtp=False, shards=1)
    assert load_vision_tower(Checkpoint(path), None, torch.bfloat16, "cpu") is None


def test_num_merged_tokens():
    assert num_merged_tokens(torch.tensor([[1, 4, 6], [3, 2, 2]])) == [6, 3]
    assert num_merged_tokens([(2, 6, 6)], spatial_merge_size=3) == [8]


def test_bad_inputs(tiny):
    tower, _ = tiny
    px, g = pixels(tower.cfg, [(1, 4, 4)])
    with pytest.raises(ValueError, match=r"needs \[16, 96\]"):
        tower(px[:15], g)
    with pytest.raises(ValueError, match="multiples of 2"):
        tower(torch.zeros(15, 96), [(1, 3, 5)])


# ---- loader errors: a copy of the checkpoint with one tensor changed -----------------------------

@pytest.fixture
def ckpt(checkpoint, tmp_path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint("ratio2", tokenizer=False), out)
    return out


def edit(path: Path, name: str, tensor: torch.Tensor | None, new_name: str | None = None) -> None:
    """Drop `name` (tensor None) or store `tensor` under new_name or name, in name's shard."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    file = path / index["weight_map"][name]
    tensors = load_file(str(file))
    if tensor is None:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[new_name or name] = tensor
        index["weight_map"][new_name or name] = file.name
    save_file(tensors, str(file), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))


def error_of(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        load(path)
    return str(e.value)


def test_missing_tensor(ckpt):
    victim = "model.visual.blocks.1.attn.qkv.bias"
    edit(ckpt, victim, None)
    msg = error_of(ckpt)
    assert "missing tensor" in msg and victim in msg


def test_wrong_shape(ckpt):
    victim = "model.visual.merger.linear_fc1.weight"
    edit(ckpt, victim, torch.zeros(128, 64, dtype=torch.bfloat16))
    msg = error_of(ckpt)
    assert victim in msg and "[128, 64]" in msg and "[128, 128]" in msg


def test_unexpected_tensor(ckpt):
    extra = "model.visual.blocks.2.norm1.weight"                            # depth is 2
    edit(ckpt, "model.visual.blocks.0.norm1.weight", torch.zeros(32), new_name=extra)
    msg = error_of(ckpt)
    assert "unexpected" in msg and extra in msg


def test_integer_dtype(ckpt):
    victim = "model.visual.pos_embed.weight"
    edit(ckpt, victim, torch.zeros(16, 32, dtype=torch.int32))
    msg = error_of(ckpt)
    assert victim in msg and "I32" in msg


def test_tower_without_vision_config(ckpt):
    with pytest.raises(CheckpointError, match="no vision_config"):
        load_vision_tower(Checkpoint(ckpt), None, torch.bfloat16, "cpu")
