"""Bad checkpoint directories give one clear error naming the file and the key."""
import json
import re
import shutil
from pathlib import Path

import pytest

from dllm_trt.runtime.checkpoint import Checkpoint
from dllm_trt.runtime.config import ModelError, load_config


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


# ---- end tokens ---------------------------------------------------------------------------------------------
def write_json(path, value):
    path.write_text(json.dumps(value))


def test_end_tokens_include_the_tokenizers_end_of_turn(ckpt_copy):
    cfg = load_config(ckpt_copy)
    assert cfg.eos_token_id == 256 and cfg.end_token_ids == (256, 261) and cfg.end_ids == (256, 261)


def test_end_tokens_from_lists_in_config_and_generation_config(ckpt_copy):
    edit_config(ckpt_copy, eos_token_id=[256, 258])
    write_json(ckpt_copy / "generation_config.json", {"eos_token_id": [259, 256]})
    cfg = load_config(ckpt_copy)
    assert cfg.eos_token_id == 256 and cfg.end_token_ids == (256, 258, 259, 261)
    write_json(ckpt_copy / "generation_config.json", {"eos_token_id": 260})
    assert load_config(ckpt_copy).end_token_ids == (256, 258, 260, 261)


def test_eot_token_named_by_tokenizer_config(ckpt_copy):
    tc = json.loads((ckpt_copy / "tokenizer_config.json").read_text())
    write_json(ckpt_copy / "tokenizer_config.json", {**tc, "eot_token": "<|end_header_id|>"})
    assert load_config(ckpt_copy).end_token_ids == (256, 260)
    write_json(ckpt_copy / "tokenizer_config.json", {**tc, "eot_token": "<|nope|>"})
    with pytest.raises(ModelError, match=r"eot_token '<\|nope\|>' is not a token of tokenizer.json"):
        load_config(ckpt_copy)


@pytest.mark.parametrize("gen", [{"eos_token_id": 999}, {"eos_token_id": [256, 999]}])
def test_end_token_outside_embedding(ckpt_copy, gen):
    write_json(ckpt_copy / "generation_config.json", gen)
    with pytest.raises(ModelError, match=r"end token id 999 .* outside the embedding \(size 262\)"):
        load_config(ckpt_copy)


@pytest.mark.parametrize("eos", [[], ["256"], -1, 2.5, True])
def test_bad_eos_token_id(ckpt_copy, eos):
    edit_config(ckpt_copy, eos_token_id=eos)
    with pytest.raises(ModelError, match=r"config.json: key 'eos_token_id' must be a non-negative integer or a list"):
        load_config(ckpt_copy)


# ---- config keys: LLaDA's defaults are implemented or refused -------------------------------------------------
def drop_keys(d, *keys):
    cfg = json.loads((d / "config.json").read_text())
    for k in keys:
        del cfg[k]
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("key,default,ours", [
    ("block_type", "'sequential'", "'llama'"), ("activation_type", "'swiglu'", "'silu'"),
    ("layer_norm_type", "'default'", "'rms'"), ("rope", "False", "True"), ("weight_tying", "True", "False"),
    ("include_bias", "True", "False")])
def test_missing_key_whose_llada_default_is_not_implemented(ckpt_copy, key, default, ours):
    drop_keys(ckpt_copy, key)
    with pytest.raises(ModelError, match=rf"config.json has no '{key}'; LLaDA's default {default} is not "
                                         rf"implemented \(dllm-trt implements {ours}\)"):
        Checkpoint(ckpt_copy)


def test_missing_keys_whose_llada_defaults_are_implemented(ckpt_copy):
    before = load_config(ckpt_copy)
    drop_keys(ckpt_copy, "alibi", "scale_logits", "input_emb_norm", "attention_layer_norm", "block_group_size",
              "bias_for_layer_norm", "include_qkv_bias", "multi_query_attention", "n_kv_heads", "rope_full_precision",
              "rms_norm_eps", "rope_theta", "flash_attention")
    assert load_config(ckpt_copy) == before
    Checkpoint(ckpt_copy)


@pytest.mark.parametrize("key,value", [("layer_norm_with_affine", False), ("block_group_size", True),
                                       ("rope", 1), ("bias_for_layer_norm", True), ("rope_full_precision", False),
                                       ("clip_qkv", 8.0), ("layer_norm_type", "default")])
def test_more_unsupported_values(ckpt_copy, key, value):
    edit_config(ckpt_copy, **{key: value})
    with pytest.raises(ModelError, match=rf"config.json: unsupported value {key}="):
        load_config(ckpt_copy)


def test_mlp_hidden_size_from_mlp_ratio(ckpt_copy):
    edit_config(ckpt_copy, mlp_hidden_size=None, mlp_ratio=3)
    assert load_config(ckpt_copy).mlp_hidden_size == 192
    drop_keys(ckpt_copy, "mlp_hidden_size", "mlp_ratio")
    assert load_config(ckpt_copy).mlp_hidden_size == 256  # LLaDA's default mlp_ratio 4
    with pytest.raises(ModelError, match=r"ff_proj\.weight' has shape \[160, 64\], config.json implies \[256, 64\]"):
        Checkpoint(ckpt_copy)


def test_embedding_size_null_or_missing(ckpt_copy):
    edit_config(ckpt_copy, embedding_size=None)
    assert load_config(ckpt_copy).embedding_size == 262
    drop_keys(ckpt_copy, "embedding_size")
    assert load_config(ckpt_copy).embedding_size == 50304  # LLaDA's default


@pytest.mark.parametrize("key,value,message", [
    ("n_heads", 0, "key 'n_heads' must be a positive integer, got 0"),
    ("d_model", "64", "key 'd_model' must be a positive integer, got '64'"),
    ("d_model", 64.0, "key 'd_model' must be a positive integer, got 64.0"),
    ("n_layers", True, "key 'n_layers' must be a positive integer, got True"),
    ("mlp_hidden_size", "160", "key 'mlp_hidden_size' must be a positive integer"),
    ("mask_token_id", -1, "key 'mask_token_id' must be a non-negative integer"),
    ("rope_theta", 0, "key 'rope_theta' must be a positive number, got 0"),
    ("rope_theta", -5.0, "key 'rope_theta' must be a positive number"),
    ("rope_theta", float("nan"), "key 'rope_theta' must be a positive number, got nan"),
    ("rope_theta", "1e4", "key 'rope_theta' must be a positive number"),
    ("rms_norm_eps", True, "key 'rms_norm_eps' must be a positive number"),
    ("n_kv_heads", "4", "unsupported value n_kv_heads='4'"),
])
def test_bad_config_values_are_one_line(ckpt_copy, key, value, message):
    edit_config(ckpt_copy, **{key: value})
    with pytest.raises(ModelError, match=re.escape(message)):
        load_config(ckpt_copy)


def test_config_not_an_object_or_not_utf8(ckpt_copy):
    (ckpt_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"config.json: must hold a JSON object, got list"):
        load_config(ckpt_copy)
    (ckpt_copy / "config.json").write_bytes(b'{"d_model": "\xff\xfe"}')
    with pytest.raises(ModelError, match=r"config.json: not UTF-8 text"):
        load_config(ckpt_copy)


def test_models_in_the_repository_load(tmp_path):
    root = Path(__file__).parent.parent / "models"
    tiny, arith = load_config(root / "tiny"), load_config(root / "arith")
    assert (tiny.d_model, tiny.mlp_hidden_size, tiny.end_token_ids) == (64, 160, (256, 261))
    assert (arith.d_model, arith.mlp_hidden_size, arith.end_token_ids) == (256, 768, (0, 5))


# ---- shard paths and safetensors headers ------------------------------------------------------------------------
def edit_index(d, shard):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.transformer.wte.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("shard", ["/etc/passwd", "../m/model-00001-of-00002.safetensors", "sub/../x"])
def test_shard_path_outside_the_folder(ckpt_copy, shard):
    edit_index(ckpt_copy, shard)
    with pytest.raises(ModelError, match=r"must be a plain path inside the folder"):
        Checkpoint(ckpt_copy)


def test_shard_symlink_outside_the_folder(ckpt_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(ckpt_copy / "model-00001-of-00002.safetensors", outside)
    (ckpt_copy / "link.safetensors").symlink_to(outside)
    edit_index(ckpt_copy, "link.safetensors")
    with pytest.raises(ModelError, match=r"'link.safetensors' leads outside the folder"):
        Checkpoint(ckpt_copy)


def test_hub_snapshot_symlinks_into_blobs_are_allowed(tiny_dir, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in tiny_dir.iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    assert Checkpoint(snap).config.d_model == 64


def corrupt_header(path, header_bytes, length=None):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    body = data[8 + n:]
    length = len(header_bytes) if length is None else length
    path.write_bytes(length.to_bytes(8, "little") + header_bytes + body)


@pytest.mark.parametrize("header,length,message", [
    (b"{}", 1 << 60, r"header length 1152921504606846976 does not fit"),
    (b"[1, 2, 3]", None, r"header is not a JSON object"),
    (b"{not json", None, r"header is not valid JSON"),
    (b'{"a": "\xff"}', None, r"header is not valid JSON"),
    (b'{"model.transformer.wte.weight": {"dtype": "F32", "shape": [262, 64], "data_offsets": [0, 99999999]}}', None,
     r"tensor 'model.transformer.wte.weight' has data_offsets \[0, 99999999\]"),
    (b'{"model.transformer.wte.weight": 5}', None, r"entry 'model.transformer.wte.weight' needs dtype"),
])
def test_corrupt_safetensors_header(ckpt_copy, header, length, message):
    corrupt_header(ckpt_copy / "model-00001-of-00002.safetensors", header, length)
    with pytest.raises(ModelError, match=r"model-00001-of-00002.safetensors: .*" + message):
        Checkpoint(ckpt_copy)
