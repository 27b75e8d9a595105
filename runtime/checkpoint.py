"""Hugging Face style LLaDA checkpoints: locate the safetensors shards and read weights lazily, piece by piece.

Only the tensors of the piece being built are read, so an 8B checkpoint never sits in memory whole.
torch is imported inside the functions that return tensors; listing and validating needs no torch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import ModelConfig, ModelError, load_config

PREFIX = "model.transformer."
LAYER_PARAMS = ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a LLaDA checkpoint with its shape (torch Linear layout: [out, in])."""
    d, f = cfg.d_model, cfg.mlp_hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        PREFIX + "wte.weight": (cfg.embedding_size, d),
        PREFIX + "ln_f.weight": (d,),
        PREFIX + "ff_out.weight": (cfg.embedding_size, d),
    }
    per_layer = {"attn_norm": (d,), "q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "attn_out": (d, d),
                 "ff_norm": (d,), "ff_proj": (f, d), "up_proj": (f, d), "ff_out": (d, f)}
    for i in range(cfg.n_layers):
        for name, shape in per_layer.items():
            shapes[f"{PREFIX}blocks.{i}.{name}.weight"] = shape
    return shapes


def layer_keys(a: int, b: int) -> list[str]:
    return [f"{PREFIX}blocks.{i}.{p}.weight" for i in range(a, b) for p in LAYER_PARAMS]


class Checkpoint:
    """A validated checkpoint directory: config, the shard holding each tensor, and lazy reads."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = load_config(self.dir)
        self.shard_of = self._index()
        self._check_shapes()

    def _index(self) -> dict[str, Path]:
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
            shard_of = {k: self.dir / v for k, v in weight_map.items()}
        elif single.is_file():
            shard_of = {k: single for k in _safetensors_header(single)}
        else:
            raise ModelError(f"{self.dir}: no weights (expected model.safetensors or model.safetensors.index.json)")
        for shard in sorted(set(shard_of.values())):
            if not shard.is_file():
                key = next(k for k, v in shard_of.items() if v == shard)
                raise ModelError(f"{shard}: missing shard (listed in the index for '{key}')")
        return shard_of

    def _check_shapes(self) -> None:
        headers = {s: _safetensors_header(s) for s in set(self.shard_of.values())}
        for key, shape in expected_shapes(self.config).items():
            if key not in self.shard_of:
                raise ModelError(f"{self.dir}: missing weight '{key}'")
            shard = self.shard_of[key]
            if key not in headers[shard]:
                raise ModelError(f"{shard}: missing weight '{key}' (the index says it is in this file)")
            got = tuple(headers[shard][key]["shape"])
            if got != shape:
                raise ModelError(f"{shard}: weight '{key}' has shape {list(got)}, config.json implies {list(shape)}")
        known = set(expected_shapes(self.config))
        unknown = sorted(set(self.shard_of) - known)
        if unknown:
            raise ModelError(f"{self.shard_of[unknown[0]]}: unexpected weight '{unknown[0]}' "
                             f"(not a LLaDA parameter name, or n_layers in config.json is too small)")

    def read(self, keys: list[str], dtype=None) -> dict:
        """Read the named tensors (torch) from their shards; nothing else is loaded."""
        from safetensors import safe_open

        out = {}
        by_shard: dict[Path, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self.shard_of[k], []).append(k)
        for shard, names in by_shard.items():
            with safe_open(str(shard), framework="pt") as f:
                for k in names:
                    t = f.get_tensor(k)
                    out[k] = t.to(dtype) if dtype is not None else t
        return out

    def fingerprint(self) -> str:
        """sha256 over config.json and the shard headers + sizes: cheap, and changes when the weights change."""
        h = hashlib.sha256((self.dir / "config.json").read_bytes())
        for shard in sorted(set(self.shard_of.values())):
            st = shard.stat()
            h.update(f"{shard.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            with open(shard, "rb") as f:
                h.update(f.read(1 << 20))
        return h.hexdigest()


def _safetensors_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header
