"""LLaDA model configuration, read from a checkpoint's config.json and validated against what we implement."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


class ModelError(Exception):
    """A user-facing problem with a checkpoint or engine directory (one clear line, no traceback)."""


@dataclass(frozen=True)
class ModelConfig:
    d_model: int
    n_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    mask_token_id: int
    eos_token_id: int
    max_sequence_length: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Every id that ends an answer (EOS, end-of-turn, ...); eos_token_id is the first of them.
    end_token_ids: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def end_ids(self) -> tuple[int, ...]:
        return self.end_token_ids or (self.eos_token_id,)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        values = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "end_token_ids" in values:
            values["end_token_ids"] = tuple(values["end_token_ids"])
        return cls(**values)


# Flags of LLaDA's modeling code that change the computation. We implement exactly one setting of each and
# refuse checkpoints that ask for anything else, instead of silently computing something different.
_REQUIRED_VALUES = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "rope": True,
    "weight_tying": False,
    "scale_logits": False,
    "input_emb_norm": False,
    "attention_layer_norm": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "bias_for_layer_norm": False,
    "alibi": False,
    "block_group_size": 1,
    "multi_query_attention": False,
}
_INT_KEYS = ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size", "mask_token_id",
             "eos_token_id", "max_sequence_length")


def read_json(path: Path, missing_hint: str) -> dict:
    """A JSON file the user pointed us at, or one ModelError naming it."""
    if not path.is_file():
        raise ModelError(f"{path}: missing ({missing_hint})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ModelError(f"{model_dir}: not a directory")
    raw = read_json(path, "a LLaDA checkpoint directory needs config.json")
    for key in _INT_KEYS:
        if key not in raw:
            raise ModelError(f"{path}: missing key '{key}'")
        if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 0:
            raise ModelError(f"{path}: key '{key}' must be a non-negative integer, got {raw[key]!r}")
    for key, want in _REQUIRED_VALUES.items():
        if key in raw and raw[key] is not None and raw[key] != want:
            raise ModelError(f"{path}: unsupported value {key}={raw[key]!r} (dllm-trt implements {key}={want!r})")
    n_kv = raw.get("n_kv_heads") or raw["n_heads"]
    if n_kv != raw["n_heads"]:
        raise ModelError(f"{path}: unsupported value n_kv_heads={n_kv} (grouped-query attention is not implemented)")
    if raw["d_model"] % raw["n_heads"] or (raw["d_model"] // raw["n_heads"]) % 2:
        raise ModelError(f"{path}: d_model={raw['d_model']} must split into n_heads={raw['n_heads']} heads of even size")
    emb = raw.get("embedding_size") or raw["vocab_size"]
    for key in ("mask_token_id", "eos_token_id"):
        if raw[key] >= emb:
            raise ModelError(f"{path}: {key}={raw[key]} is outside the embedding (size {emb})")
    return ModelConfig(
        d_model=raw["d_model"], n_heads=raw["n_heads"], n_layers=raw["n_layers"],
        mlp_hidden_size=raw["mlp_hidden_size"], vocab_size=raw["vocab_size"], embedding_size=emb,
        mask_token_id=raw["mask_token_id"], eos_token_id=raw["eos_token_id"],
        max_sequence_length=raw["max_sequence_length"],
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)), rope_theta=float(raw.get("rope_theta", 10000.0)),
    )


def layer_ranges(n_layers: int, layers_per_range: int) -> list[tuple[int, int]]:
    """Split [0, n_layers) into consecutive ranges of at most layers_per_range layers."""
    if not 1 <= layers_per_range <= n_layers:
        raise ValueError(f"layers per range must be in 1..{n_layers}, got {layers_per_range}")
    return [(a, min(a + layers_per_range, n_layers)) for a in range(0, n_layers, layers_per_range)]
