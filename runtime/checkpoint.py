"""Hugging Face style LLaDA checkpoints: locate the safetensors shards and read weights lazily, piece by piece.

Only the tensors of the piece being built are read, so an 8B checkpoint never sits in memory whole.
torch is imported inside the functions that return tensors; listing and validating needs no torch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import ModelConfig, ModelError, is_int, load_config, read_json
from .paths import hub_root, inside

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


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the checkpoint config.json describes, from its sizes alone (no loop over the layers)."""
    d, f = cfg.d_model, cfg.mlp_hidden_size
    return 2 * cfg.embedding_size * d + d + cfg.n_layers * (4 * d * d + 3 * d * f + 2 * d)


def layer_keys(a: int, b: int) -> list[str]:
    return [f"{PREFIX}blocks.{i}.{p}.weight" for i in range(a, b) for p in LAYER_PARAMS]


class Checkpoint:
    """A validated checkpoint directory: config, the shard holding each tensor, and lazy reads."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = load_config(self.dir)
        self.shard_of = self._index()
        self._check_size()
        self._check_shapes()

    def _index(self) -> dict[str, Path]:
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = read_json(index, "").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelError(f"{index}: not a safetensors index (needs a 'weight_map' object)")
            root = hub_root(self.dir)
            shard_of = {k: inside(self.dir, v, f"shard of '{k}' in {index.name}", root)
                        for k, v in weight_map.items()}
        elif single.is_file():
            single = inside(self.dir, single.name, "weights file", hub_root(self.dir))
            shard_of = {k: single for k in _safetensors_header(single)}
        else:
            raise ModelError(f"{self.dir}: no weights (expected model.safetensors or model.safetensors.index.json)")
        for shard in sorted(set(shard_of.values())):
            if not shard.is_file():
                key = next(k for k, v in shard_of.items() if v == shard)
                raise ModelError(f"{shard}: missing shard (listed in the index for '{key}')")
        return shard_of

    def _check_size(self) -> None:
        """Every parameter takes a byte at least (float8): a config.json that declares more than the weight files
        can hold is refused before anything is sized from it."""
        have = sum(s.stat().st_size for s in set(self.shard_of.values()))
        declared = parameter_count(self.config)
        if declared > have:
            raise ModelError(f"{self.dir / 'config.json'}: its sizes make {declared} parameters, more than the "
                             f"{have} bytes of weight files can hold (config.json does not describe these weights)")

    def require_memory(self, bytes_per_parameter: int, extra: int = 0) -> None:
        """One ModelError when holding every weight at bytes_per_parameter (plus `extra` bytes, e.g. caches) needs
        more memory than this machine has: for a backend that loads the checkpoint whole (export reads it piece by
        piece and needs no such check)."""
        from .memory import require_memory

        n = parameter_count(self.config)
        require_memory(n * bytes_per_parameter + extra,
                       f"{self.dir}: loading its {n} parameters at {bytes_per_parameter} bytes each",
                       "use a smaller dtype, or export it and run the engines")

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
            if headers[shard][key]["dtype"] not in FLOAT_DTYPES:
                raise ModelError(f"{shard}: weight '{key}' is stored as {headers[shard][key]['dtype']}; LLaDA weights "
                                 f"are floating point ({', '.join(FLOAT_DTYPES)})")
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
        """sha256 over config.json, generation_config.json (end ids, default length: both recorded in an export's
        manifest) and the shard headers + sizes: cheap, and changes when the weights change."""
        h = hashlib.sha256((self.dir / "config.json").read_bytes())
        gen = self.dir / "generation_config.json"
        if gen.is_file():
            h.update(b"generation_config.json:" + gen.read_bytes())
        for shard in sorted(set(self.shard_of.values())):
            st = shard.stat()
            h.update(f"{shard.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            with open(shard, "rb") as f:
                h.update(f.read(1 << 20))
        return h.hexdigest()


# bytes per element of each safetensors dtype
_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2")
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def _safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file, every entry checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(_MAX_HEADER, size - 8):
                raise ModelError(f"{path}: not a safetensors file (header length {n} does not fit the file's "
                                 f"{size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path}: not a safetensors file (header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    _check_layout(path, header, data_size)
    return header


def _unique_keys(pairs: list) -> dict:
    """json's object hook: a name given twice (json would keep the last one silently) is a corrupt header."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the name {twice!r} appears twice")
    return out


def _check_layout(path: Path, header: dict, data_size: int) -> None:
    """The layout the safetensors library itself requires (it refuses anything else only when a tensor is read):
    tensors back to back from offset 0, sorted by offset, covering the data section exactly. So no two tensors share
    bytes, and no gap hides data that no entry names."""
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items())
    expected, previous = 0, None
    for begin, end, name in spans:
        if begin != expected:
            what = "overlap" if begin < expected else "leave a gap between them"
            raise ModelError(f"{path}: tensors '{previous}' and '{name}' {what} in the file (data_offsets "
                             f"{header[previous]['data_offsets']} and {header[name]['data_offsets']}; corrupt)"
                             if previous else f"{path}: the first tensor '{name}' does not start at offset 0 (corrupt)")
        expected, previous = end, name
    if expected != data_size:
        raise ModelError(f"{path}: its tensors cover {expected} of the file's {data_size} data bytes (corrupt)")


def _check_entry(path: Path, name: str, entry, data_size: int) -> None:
    ok = (isinstance(entry, dict) and entry.get("dtype") in _DTYPE_SIZES and isinstance(entry.get("shape"), list)
          and all(is_int(x) and x >= 0 for x in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
          and len(entry["data_offsets"]) == 2 and all(is_int(x) for x in entry["data_offsets"]))
    if not ok:
        raise ModelError(f"{path}: not a safetensors file (entry '{name}' needs dtype, shape and data_offsets)")
    begin, end = entry["data_offsets"]
    numel = 1
    for x in entry["shape"]:
        numel *= x
    if not 0 <= begin <= end <= data_size or end - begin != numel * _DTYPE_SIZES[entry["dtype"]]:
        raise ModelError(f"{path}: tensor '{name}' has data_offsets {entry['data_offsets']} that do not match its "
                         f"shape and dtype or lie outside the file (truncated or corrupt)")
