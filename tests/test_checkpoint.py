"""Bad checkpoint directories give one clear error naming the file and the key."""
import json
import shutil

import pytest

from dllm_trt.runtime.checkpoint import Checkpoint
from dllm_trt.runtime.config import ModelError


@pytest.fixture
def ckpt_copy(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "m")


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_loads_sharded_checkpoint(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    assert len(set(ckpt.shard_of.values())) == 2
    w = ckpt.read(["model.transformer.blocks.0.q_proj.weight"])
    assert tuple(w["model.transformer.blocks.0.q_proj.weight"].shape) == (64, 64)


def test_missing_config(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(ModelError, match=r"config.json: missing"):
        Checkpoint(ckpt_copy)


def test_missing_shard(ckpt_copy):
    (ckpt_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match=r"model-00002-of-00002.safetensors: missing shard .*'model\.transformer\."):
        Checkpoint(ckpt_copy)


def test_wrong_key(ckpt_copy):
    index = json.loads((ckpt_copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.transformer.blocks.0.qproj.weight"] = index["weight_map"].pop(
        "model.transformer.blocks.0.q_proj.weight")
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"missing weight 'model\.transformer\.blocks\.0\.q_proj\.weight'"):
        Checkpoint(ckpt_copy)


def test_shape_mismatch(ckpt_copy):
    edit_config(ckpt_copy, mlp_hidden_size=100)
    with pytest.raises(ModelError, match=r"safetensors: weight 'model\.transformer\.blocks\.0\.ff_proj\.weight' has "
                                         r"shape \[160, 64\], config.json implies \[100, 64\]"):
        Checkpoint(ckpt_copy)


@pytest.mark.parametrize("key,value", [("block_type", "sequential"), ("weight_tying", True), ("alibi", True),
                                       ("activation_type", "swiglu"), ("n_kv_heads", 2)])
def test_unsupported_config_value(ckpt_copy, key, value):
    edit_config(ckpt_copy, **{key: value})
    with pytest.raises(ModelError, match=rf"config.json: unsupported value {key}="):
        Checkpoint(ckpt_copy)


def test_missing_config_key(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    del cfg["mask_token_id"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"config.json: missing key 'mask_token_id'"):
        Checkpoint(ckpt_copy)


def test_no_weights(ckpt_copy):
    for f in ckpt_copy.glob("model*"):
        f.unlink()
    with pytest.raises(ModelError, match="no weights"):
        Checkpoint(ckpt_copy)
