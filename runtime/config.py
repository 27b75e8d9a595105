"""LLaDA model configuration, read from a checkpoint's config.json and validated against what we implement."""
from __future__ import annotations

import json
import math
import sys
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
    # The generation length the checkpoint declares (generation_config.json's max_new_tokens); None: the runtime's.
    default_gen_length: int | None = None

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


# Flags of LLaDA's modeling code that change the computation: (LLaDA's default when config.json lacks the key,
# the values dllm-trt implements). Anything else is refused, never approximated.
_FLAGS = {
    "block_type": ("sequential", ("llama",)),
    "activation_type": ("swiglu", ("silu",)),
    "layer_norm_type": ("default", ("rms",)),
    "layer_norm_with_affine": (True, (True,)),
    "rope": (False, (True,)),
    "rope_full_precision": (True, (True,)),
    "weight_tying": (True, (False,)),
    "scale_logits": (False, (False,)),
    "input_emb_norm": (False, (False,)),
    "attention_layer_norm": (False, (False,)),
    "include_bias": (True, (False,)),
    "include_qkv_bias": (False, (False,)),
    "bias_for_layer_norm": (None, (None, False)),  # None means "as include_bias", which must be False
    "alibi": (False, (False,)),
    "block_group_size": (1, (1,)),
    "multi_query_attention": (None, (None, False)),
    "clip_qkv": (None, (None,)),
}
_POSITIVE = ("d_model", "n_heads", "n_layers", "vocab_size", "max_sequence_length")
# LLaDA's defaults for optional sizes; embedding_size: null means vocab_size.
_EMBEDDING_DEFAULT = 50304
_MLP_RATIO_DEFAULT = 4
EOT_TOKEN = "<|eot_id|>"
# Sanity bounds, checked before anything is sized from a config: TensorRT's dimensions are int32, and the largest
# models have a few hundred layers (code loops over the layers, so a corrupt 10**9 must not get that far).
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 4096
# What config.json may say the model is (a key left out is not checked).
LLADA_MODEL_TYPES = ("llada",)
LLADA_ARCHITECTURES = ("LLaDAModelLM",)


def check_bounds(values: dict[str, int], path: Path) -> None:
    """Refuse sizes no LLaDA model has (a corrupt or hostile file), before any allocation or loop uses them."""
    for key, v in values.items():
        limit = MAX_LAYERS if key == "n_layers" else MAX_SIZE
        if v > limit:
            shown = str(v) if v < 10**40 else f"a {len(str(v))}-digit number"
            raise ModelError(f"{path}: {key}={shown} is beyond any LLaDA model (at most {limit}); the file is corrupt")


def _check_model_type(raw: dict, path: Path) -> None:
    """config.json's model_type and architectures, where present, must name LLaDA (not, say, LLaDA-MoE or Llama)."""
    mt, arch = raw.get("model_type"), raw.get("architectures")
    if mt is not None and (not isinstance(mt, str) or mt.lower() not in LLADA_MODEL_TYPES):
        raise ModelError(f"{path}: model_type {mt!r} is not LLaDA (dllm-trt runs checkpoints with model_type "
                         f"{' or '.join(map(repr, LLADA_MODEL_TYPES))})")
    if arch is not None and (not isinstance(arch, list) or not all(a in LLADA_ARCHITECTURES for a in arch)):
        raise ModelError(f"{path}: architectures {arch!r} is not LLaDA (dllm-trt runs "
                         f"{' or '.join(LLADA_ARCHITECTURES)} checkpoints)")


def read_json(path: Path, missing_hint: str, want=dict):
    """A JSON file the user pointed us at (an object unless `want` says otherwise), or one ModelError naming it."""
    if not path.is_file():
        raise ModelError(f"{path}: missing ({missing_hint})")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    except ValueError:  # Python's int() limit (4300 digits by default), raised from inside the parser
        raise ModelError(f"{path}: holds an integer of more than {sys.get_int_max_str_digits()} digits, which "
                         f"no setting of a model needs (the file is corrupt)") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e.strerror})") from None
    if want is not None and not isinstance(value, want):
        raise ModelError(f"{path}: must hold a JSON {'object' if want is dict else want.__name__}, "
                         f"got {type(value).__name__}")
    return value


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_key(raw: dict, key: str, path: Path, minimum: int) -> int:
    if key not in raw:
        raise ModelError(f"{path}: missing key '{key}'")
    v = raw[key]
    if not is_int(v) or v < minimum:
        kind = "a positive" if minimum > 0 else "a non-negative"
        raise ModelError(f"{path}: key '{key}' must be {kind} integer, got {v!r}")
    return v


def number_key(raw: dict, key: str, default: float, path: Path) -> float:
    v = raw.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ModelError(f"{path}: key '{key}' must be a positive number, got {v!r}")
    return float(v)


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b  # so that 1 is not True and 0 is not False


def _check_flags(raw: dict, path: Path) -> None:
    for key, (default, implemented) in _FLAGS.items():
        shown = " or ".join(repr(v) for v in implemented)
        if key not in raw:
            if not any(_same(default, v) for v in implemented):
                raise ModelError(f"{path} has no '{key}'; LLaDA's default {default!r} is not "
                                 f"implemented (dllm-trt implements {shown})")
        elif not any(_same(raw[key], v) for v in implemented):
            raise ModelError(f"{path}: unsupported value {key}={raw[key]!r} (dllm-trt implements {key}={shown})")


def _token_ids(value, where: str) -> list[int]:
    """An id or a non-empty list of ids (eos_token_id may be either)."""
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(is_int(i) and i >= 0 for i in ids):
        raise ModelError(f"{where} must be a non-negative integer or a list of them, got {value!r}")
    return ids


def _eot_id(d: Path) -> list[int]:
    """The end-of-turn token of the checkpoint's tokenizer (tokenizer_config.json's eot_token, else <|eot_id|>)."""
    tok_path, cfg_path = d / "tokenizer.json", d / "tokenizer_config.json"
    name, declared = EOT_TOKEN, False
    if cfg_path.is_file():
        eot = read_json(cfg_path, "").get("eot_token")
        if isinstance(eot, dict):  # a serialised AddedToken
            eot = eot.get("content")
        if eot is not None:
            if not isinstance(eot, str):
                raise ModelError(f"{cfg_path}: eot_token must be a token string, got {eot!r}")
            name, declared = eot, True
    if not tok_path.is_file():
        if declared:
            raise ModelError(f"{cfg_path}: eot_token {name!r} is declared but there is no tokenizer.json")
        return []
    tok = read_json(tok_path, "")
    added = tok.get("added_tokens") or []
    vocab = (tok.get("model") or {}).get("vocab") if isinstance(tok.get("model"), dict) else None
    for t in added if isinstance(added, list) else []:
        if isinstance(t, dict) and t.get("content") == name and is_int(t.get("id")):
            return [t["id"]]
    if isinstance(vocab, dict) and is_int(vocab.get(name)):
        return [vocab[name]]
    if declared:
        raise ModelError(f"{cfg_path}: eot_token {name!r} is not a token of {tok_path.name}")
    return []


def end_token_ids(d: Path, config_eos) -> tuple[int, ...]:
    """Every id the checkpoint declares as ending an answer, config.json's first eos_token_id first."""
    ids = _token_ids(config_eos, f"{d / 'config.json'}: key 'eos_token_id'")
    gen = d / "generation_config.json"
    if gen.is_file():
        raw = read_json(gen, "")
        if raw.get("eos_token_id") is not None:
            ids += _token_ids(raw["eos_token_id"], f"{gen}: key 'eos_token_id'")
    ids += _eot_id(d)
    return tuple(dict.fromkeys(ids))


def default_gen_length(d: Path) -> int | None:
    """generation_config.json's max_new_tokens: how long the checkpoint's answers are meant to be."""
    gen = d / "generation_config.json"
    if not gen.is_file():
        return None
    raw = read_json(gen, "")
    return None if raw.get("max_new_tokens") is None else int_key(raw, "max_new_tokens", gen, 1)


def load_config(model_dir: str | Path) -> ModelConfig:
    d = Path(model_dir)
    path = d / "config.json"
    if not d.is_dir():
        raise ModelError(f"{model_dir}: not a directory")
    raw = read_json(path, "a LLaDA checkpoint directory needs config.json")
    _check_model_type(raw, path)
    sizes = {key: int_key(raw, key, path, 1) for key in _POSITIVE}
    check_bounds(sizes, path)
    mask = int_key(raw, "mask_token_id", path, 0)
    if "eos_token_id" not in raw:
        raise ModelError(f"{path}: missing key 'eos_token_id'")
    _check_flags(raw, path)
    d_model, n_heads = sizes["d_model"], sizes["n_heads"]
    n_kv = raw.get("n_kv_heads")
    if n_kv is not None and not _same(n_kv, n_heads):
        raise ModelError(f"{path}: unsupported value n_kv_heads={n_kv!r} (grouped-query attention is not "
                         f"implemented; it must equal n_heads={n_heads})")
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise ModelError(f"{path}: d_model={d_model} must split into n_heads={n_heads} heads of even size")
    if raw.get("mlp_hidden_size") is not None:
        mlp = int_key(raw, "mlp_hidden_size", path, 1)
    else:
        mlp = int_key({"mlp_ratio": _MLP_RATIO_DEFAULT, **raw}, "mlp_ratio", path, 1) * d_model
    if raw.get("embedding_size", _EMBEDDING_DEFAULT) is None:
        emb = sizes["vocab_size"]
    else:
        emb = int_key({"embedding_size": _EMBEDDING_DEFAULT, **raw}, "embedding_size", path, 1)
    check_bounds({"mlp_hidden_size": mlp, "embedding_size": emb}, path)
    ends = end_token_ids(d, raw["eos_token_id"])
    for key, i in (("mask_token_id", mask), ("eos_token_id", ends[0])):
        if i >= emb:
            raise ModelError(f"{path}: {key}={i} is outside the embedding (size {emb})")
    for i in ends[1:]:
        if i >= emb:
            raise ModelError(f"{d}: end token id {i} (from config.json, generation_config.json or the tokenizer's "
                             f"end-of-turn token) is outside the embedding (size {emb})")
    return ModelConfig(
        d_model=d_model, n_heads=n_heads, n_layers=sizes["n_layers"], mlp_hidden_size=mlp,
        vocab_size=sizes["vocab_size"], embedding_size=emb, mask_token_id=mask, eos_token_id=ends[0],
        max_sequence_length=sizes["max_sequence_length"],
        rms_norm_eps=number_key(raw, "rms_norm_eps", 1e-5, path),
        rope_theta=number_key(raw, "rope_theta", 10000.0, path), end_token_ids=ends,
        default_gen_length=default_gen_length(d),
    )


def config_from_manifest(raw: dict, path: Path) -> ModelConfig:
    """The "model" object of an engine's manifest.json, with the same checks as a checkpoint's config.json."""
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: 'model' must be an object")
    v = {k: int_key(raw, k, path, 1) for k in _POSITIVE + ("mlp_hidden_size", "embedding_size")}
    v.update({k: int_key(raw, k, path, 0) for k in ("mask_token_id", "eos_token_id")})
    check_bounds(v, path)
    ends = tuple(_token_ids(raw.get("end_token_ids") or [v["eos_token_id"]], f"{path}: key 'end_token_ids'"))
    if v["d_model"] % v["n_heads"] or (v["d_model"] // v["n_heads"]) % 2:
        raise ModelError(f"{path}: d_model={v['d_model']} must split into n_heads={v['n_heads']} heads of even size")
    if ends[0] != v["eos_token_id"] or max(ends + (v["mask_token_id"],)) >= v["embedding_size"]:
        raise ModelError(f"{path}: end_token_ids {list(ends)} must start with eos_token_id and lie, like "
                         f"mask_token_id, inside the embedding (size {v['embedding_size']})")
    gen = None if raw.get("default_gen_length") is None else int_key(raw, "default_gen_length", path, 1)
    return ModelConfig(**v, rms_norm_eps=number_key(raw, "rms_norm_eps", 1e-5, path),
                       rope_theta=number_key(raw, "rope_theta", 10000.0, path), end_token_ids=ends,
                       default_gen_length=gen)


def layer_ranges(n_layers: int, layers_per_range: int) -> list[tuple[int, int]]:
    """Split [0, n_layers) into consecutive ranges of at most layers_per_range layers."""
    if not 1 <= layers_per_range <= n_layers:
        raise ValueError(f"layers per range must be in 1..{n_layers}, got {layers_per_range}")
    return [(a, min(a + layers_per_range, n_layers)) for a in range(0, n_layers, layers_per_range)]
