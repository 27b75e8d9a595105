"""Export a LLaDA checkpoint as ONNX pieces (embedding, each layer range in window and refresh mode, head) plus
manifest.json and the tokenizer files.

Each piece is traced on the meta device (no weights in memory), then only that piece's tensors are read from the
safetensors shards and attached, so peak memory is about one piece, not the whole model. Every file must pass
onnx.checker's full check before it is listed in the manifest.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnx
import torch
from torch.export import Dim
from tqdm import tqdm

from dllm_trt.runtime import buckets
from dllm_trt.runtime.backends.tensorrt_backend import RUNTIME_CACHE
from dllm_trt.runtime.checkpoint import PREFIX, Checkpoint, layer_keys
from dllm_trt.runtime.config import ModelError, layer_ranges, read_json
from dllm_trt.runtime.manifest import (DTYPES, FORMAT, Manifest, PieceSpec, dims_for, piece_specs, range_name,
                                       sha256_file)
from dllm_trt.runtime.model_torch import Embedding, Head, LayerRange, RefreshMode, WindowMode, range_state_dict
from dllm_trt.runtime.trt_plans import BUILD_RECORD

from .quantize import (DEFAULT_BLOCK, QuantizeError, check_scheme, embedding_bits, quantize_file,
                       scheme_record)

MAX_ACTIVE = 256  # default largest window pass (query rows), or the whole canvas when that is shorter
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED_KINDS = ("window", "refresh", "head")  # and the embedding with int4 (see quantize.embedding_bits)


def quantized_kinds(scheme: str | None) -> tuple[str, ...]:
    if not scheme:
        return ()
    return QUANTIZED_KINDS + (("embed",) if embedding_bits(scheme) else ())


# Preferred example sizes for tracing (see example_sizes).
EXAMPLE = {"seq_len": 37, "active_len": 13, "track_len": 3, "window_len": 5, "n_tokens": 11, "n_hidden": 19,
           "n_rows": 7}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def example_sizes(dims: dict, static: set[int], names=None) -> dict[str, int]:
    """A tracing size for each dim (those of one piece when `names` is given) inside its range, >= 2, distinct
    from each other and from the static dims, so the exporter neither specialises a dynamic dim to a constant nor
    ties two of them together: EXAMPLE's size when free, else the nearest free size below or above it."""
    chosen = [n for n in EXAMPLE if names is None or n in names]
    # Narrowest range first: the ranges share their lower end, so this order finds sizes whenever any exist.
    chosen.sort(key=lambda n: dims[n]["max"] - max(2, dims[n]["min"]))
    taken, out = set(static), {}
    for name in chosen:
        lo, hi = max(2, dims[name]["min"]), dims[name]["max"]
        size = _nearest_free(EXAMPLE[name], lo, hi, taken)
        if size is None:
            raise ModelError(f"dimension {name} (range {dims[name]['min']}..{hi}) is too small to export; "
                             f"use a larger --max-len / --max-active")
        taken.add(size)
        out[name] = size
    return {n: out[n] for n in EXAMPLE if n in out}


def _nearest_free(preferred: int, lo: int, hi: int, taken: set[int]) -> int | None:
    start = min(max(preferred, lo), hi)
    for delta in range(hi - lo + 1):
        for size in (start - delta, start + delta):
            if lo <= size <= hi and size not in taken:
                return size
    return None


def static_sizes(cfg) -> set[int]:
    """Sizes fixed by the model (and the drift output's 2) that no dynamic dim may take while tracing."""
    return {2, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.head_dim // 2, cfg.mlp_hidden_size, cfg.vocab_size,
            cfg.embedding_size}


def _example(spec: PieceSpec, dtype: torch.dtype, sizes: dict[str, int]):
    def make(t):
        shape = [sizes[s] if isinstance(s, str) else s for s in t.shape]
        dt = {"int64": torch.int64, "bool": torch.bool, "float32": torch.float32}.get(t.dtype, dtype)
        return torch.zeros(shape, dtype=dt, device="meta")
    return tuple(make(t) for t in spec.inputs)


def _dynamic_shapes(spec: PieceSpec, dims: dict):
    made: dict[str, Dim] = {}

    def dim(name: str) -> Dim:
        if name not in made:
            made[name] = Dim(name, min=dims[name]["min"], max=dims[name]["max"])
        return made[name]
    return tuple({i: dim(s) for i, s in enumerate(t.shape) if isinstance(s, str)} for t in spec.inputs)


def _module_and_weights(spec: PieceSpec, ckpt: Checkpoint, dtype: torch.dtype):
    """The meta-device module of a piece and the real tensors for it (read from the checkpoint now)."""
    cfg = ckpt.config
    with torch.device("meta"):
        if spec.kind == "embed":
            module = Embedding(cfg, dtype)
        elif spec.kind == "head":
            module = Head(cfg, dtype)
        else:
            layers = LayerRange(cfg, spec.layers[0], spec.layers[1], dtype)
            module = WindowMode(layers) if spec.kind == "window" else RefreshMode(layers)
    if spec.kind == "embed":
        weights = {"weight": ckpt.read([PREFIX + "wte.weight"], dtype)[PREFIX + "wte.weight"]}
    elif spec.kind == "head":
        w = ckpt.read([PREFIX + "ln_f.weight", PREFIX + "ff_out.weight"], dtype)
        weights = {"norm": w[PREFIX + "ln_f.weight"], "weight": w[PREFIX + "ff_out.weight"]}
    else:
        a, b = spec.layers
        raw = ckpt.read(layer_keys(a, b), dtype)
        weights = {"layers." + k: v for k, v in range_state_dict(raw, a, b).items()}
        weights["layers.inv_freq"] = LayerRange(cfg, 0, 0).inv_freq  # a computed constant, not a checkpoint tensor
    return module.eval(), weights


def export_piece(spec: PieceSpec, ckpt: Checkpoint, out: Path, dtype: str, opset: int, dims: dict,
                 quantize: str | None = None, quant_block: int = DEFAULT_BLOCK) -> None:
    tdtype = TORCH_DTYPES[dtype]
    module, weights = _module_and_weights(spec, ckpt, tdtype)
    shapes = _dynamic_shapes(spec, dims)
    if spec.kind in ("window", "refresh"):  # these modules take *args, which torch.export sees as one tuple
        shapes = (shapes,)
    used = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    sizes = example_sizes(dims, static_sizes(ckpt.config), used)
    program = torch.onnx.export(
        module, _example(spec, tdtype, sizes), dynamic_shapes=shapes,
        input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
        opset_version=opset, dynamo=True, optimize=False, verbose=False)
    program.apply_weights(weights)
    del weights
    program.optimize()
    spec.file = f"{spec.name}.onnx"
    spec.data_file = f"{spec.name}.onnx.data"
    path = out / spec.file
    program.save(str(path), external_data=True)
    if not (out / spec.data_file).is_file():  # exporter kept everything inline (tiny piece): nothing external
        spec.data_file = ""
    onnx.checker.check_model(str(path), full_check=True)
    if spec.kind in quantized_kinds(quantize):
        spec.data_file = spec.data_file or f"{spec.name}.onnx.data"
        quantize_file(path, spec.data_file, quantize, quant_block, lookup=spec.kind == "embed")
        if not (out / spec.data_file).is_file():
            spec.data_file = ""
        onnx.checker.check_model(str(path))
    spec.sha256 = sha256_file(path)
    if spec.data_file:
        spec.data_size = (out / spec.data_file).stat().st_size
        spec.data_sha256 = sha256_file(out / spec.data_file)


def share_weights(owner: PieceSpec, other: PieceSpec, out: Path) -> None:
    """Point `other`'s external tensors at identical tensors (same name, type, shape and bytes) already stored in
    `owner`'s data file, so a range's weights are on disk once although two graphs (window, refresh) use them."""
    if not owner.data_file or not other.data_file:
        return
    src = onnx.load(str(out / owner.file), load_external_data=False)
    stored = {t.name: t for t in src.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    model = onnx.load(str(out / other.file))  # this piece's tensors in memory: one range at a time
    with open(out / owner.data_file, "rb") as f:
        for t in model.graph.initializer:
            s = stored.get(t.name)
            if s is None or s.data_type != t.data_type or list(s.dims) != list(t.dims):
                continue
            info = {e.key: e.value for e in s.external_data}
            f.seek(int(info.get("offset", 0)))
            if f.read(int(info["length"])) != t.raw_data:
                continue
            t.ClearField("raw_data")
            del t.external_data[:]
            for key in ("location", "offset", "length"):
                if key in info:
                    entry = t.external_data.add()
                    entry.key, entry.value = key, info[key]
            t.data_location = onnx.TensorProto.EXTERNAL
    (out / other.data_file).unlink()
    onnx.save_model(model, str(out / other.file), save_as_external_data=True, location=other.data_file,
                    size_threshold=1024)
    onnx.checker.check_model(str(out / other.file), full_check=not _has_contrib_ops(model))
    other.sha256 = sha256_file(out / other.file)
    other.shares_data_of = owner.name
    if (out / other.data_file).is_file():
        other.data_size = (out / other.data_file).stat().st_size
        other.data_sha256 = sha256_file(out / other.data_file)
    else:
        other.data_file, other.data_size, other.data_sha256 = "", 0, ""


def export_model(model_dir: str | Path, out_dir: str | Path, layers_per_range: int = 1, dtype: str = "fp32",
                 opset: int = 20, max_len: int | None = None, max_active: int | None = None, quiet: bool = False,
                 shown_as: str | Path | None = None, quantize: str | None = None,
                 quant_block: int = DEFAULT_BLOCK, after_piece=None) -> Manifest:
    """after_piece: called after each piece (export_into stops an interrupted export there)."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    if quantize is not None:
        try:
            check_scheme(quantize, quant_block)
        except QuantizeError as e:
            raise ModelError(str(e)) from None
        if dtype != "fp32":
            raise ModelError(f"--quantize needs --dtype fp32 (weight-only quantization for ONNX Runtime on CPU), "
                             f"got --dtype {dtype}")
    if opset not in (20, 23):
        raise ModelError(f"opset must be 20 or 23, got {opset}")
    out = Path(out_dir)
    check_out_dir(out)
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    max_len = cfg.max_sequence_length if max_len is None else max_len
    if not 2 <= max_len <= cfg.max_sequence_length:
        raise ModelError(f"--max-len must be in 2..{cfg.max_sequence_length}, got {max_len}")
    max_active = min(MAX_ACTIVE, max_len) if max_active is None else max_active
    if not 1 <= max_active <= max_len:
        raise ModelError(f"--max-active must be in 1..{max_len}, got {max_active}")
    try:
        ranges = layer_ranges(cfg.n_layers, layers_per_range)
    except ValueError as e:
        raise ModelError(str(e)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"{out}: cannot create the output folder ({e.strerror})") from None
    dims = dims_for(max_len, max_active)
    pieces = piece_specs(cfg, ranges, dtype)
    t0 = time.perf_counter()
    bar = tqdm(pieces, desc="export", unit="piece", disable=quiet, file=sys.stderr)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        try:
            _quietly(export_piece, spec, ckpt, out, dtype, opset, dims, quantize, quant_block)
        except QuantizeError as e:
            raise ModelError(str(e)) from None
        if spec.kind == "refresh":  # exported right after the window piece of the same range
            share_weights(manifest_piece(pieces, f"{range_name(*spec.layers)}.window"), spec, out)
        if after_piece is not None:
            after_piece()
    tokenizer_files = []
    for name in TOKENIZER_FILES:
        if (ckpt.dir / name).is_file():
            shutil.copy2(ckpt.dir / name, out / name)
            tokenizer_files.append(name)
    manifest = Manifest(cfg, dtype, [list(r) for r in ranges], dims, pieces, tokenizer_files, {
        "source": str(ckpt.dir.resolve()), "source_fingerprint": ckpt.fingerprint(), "layers_per_range": layers_per_range, "opset": opset,
        "max_len": max_len, "max_active": max_active, "buckets": buckets.manifest_entry(max_len, max_active),
        "tools": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": _version("onnxscript")},
        "seconds": round(time.perf_counter() - t0, 1),
    }, out)
    if quantize:
        manifest.quantization = scheme_record(quantize, quant_block)
    manifest.save(out)
    if not quiet:
        total = sum((out / p.file).stat().st_size + p.data_size for p in pieces)  # shared data counted once
        what = f"{dtype}, {quantize} weights (block {quant_block})" if quantize else dtype
        ranges_text = f"{len(ranges)} layer range" + ("s" if len(ranges) > 1 else "")
        print(f"exported {len(pieces)} pieces ({what}, opset {opset}, {ranges_text}) to {shown_as or out}: "
              f"{total / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return manifest


def check_out_dir(out: Path, replacing: bool = False) -> None:
    """Refuse an output path that cannot become an engine folder, before any work is done. A folder with files in
    it is refused (pieces of an older export would stay behind), except, when `replacing`, a folder that is provably
    an engine folder (export_into replaces it as a whole)."""
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a folder; choose a new --out")
    if out.is_dir() and any(out.iterdir()):
        why = not_an_engine_folder(out) if replacing else "is not empty"
        if why:
            raise ModelError(f"{out}: {why}; choose a new or empty --out")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ModelError(f"{out}: cannot create the output folder ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ModelError(f"{out}: cannot create the output folder ({existing} is not writable)")


def _has_contrib_ops(model: onnx.ModelProto) -> bool:
    """onnx's full check cannot infer shapes through ONNX Runtime's own ops (MatMulNBits)."""
    return any(n.domain == "com.microsoft" for n in model.graph.node)


def manifest_piece(pieces: list[PieceSpec], name: str) -> PieceSpec:
    return next(p for p in pieces if p.name == name)


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def _quietly(fn, *args):
    """The torch exporter prints progress lines of its own; keep the terminal to our progress bar."""
    import contextlib
    import io
    import warnings

    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args)


# ---- replacing an engine folder ---------------------------------------------------------------------------------
def not_an_engine_folder(folder: Path) -> str:
    """Why `folder` is not provably one of our engine folders, or '' when it is: a manifest.json in our format, and
    besides it only the files it lists, tokenizer files and the TensorRT plans `dllm-trt build` adds (trt/). Only
    such a folder may be replaced as a whole."""
    manifest = folder / "manifest.json"
    if manifest.is_symlink() or not manifest.is_file():
        return "is not empty and holds no engines"
    listed = _listed_files(_our_manifest(folder))
    if listed is None:
        return "holds a manifest.json that is not a dllm-trt manifest"
    others = sorted(e.name for e in folder.iterdir() if not _engine_entry(e, listed))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        return f"holds files its manifest.json does not list ({shown})"
    return ""


def _our_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    if path.is_symlink() or not path.is_file():
        return None
    try:
        raw = read_json(path, "")
    except ModelError:
        return None
    return raw if raw.get("format") == FORMAT else None


def _listed_files(raw: dict | None) -> set[str] | None:
    """The file names a manifest lists (any format version: an older export is replaced too), or None when it
    lists them in a way we never wrote."""
    if raw is None or not isinstance(raw.get("pieces"), list) or not isinstance(raw.get("tokenizer_files", []), list):
        return None
    names = {"manifest.json", *TOKENIZER_FILES}
    for p in raw["pieces"]:
        files = [p.get("file", ""), p.get("data_file", "")] if isinstance(p, dict) else [None]
        if not all(isinstance(f, str) for f in files):
            return None
        names.update(files)
    if not all(isinstance(f, str) for f in raw.get("tokenizer_files", [])):
        return None
    return (names | set(raw.get("tokenizer_files", []))) - {""}


def _engine_entry(entry: Path, listed: set[str]) -> bool:
    if entry.name == "trt" and entry.is_dir() and not entry.is_symlink():
        return _plan_folder(entry)
    return entry.name in listed and (entry.is_symlink() or entry.is_file())


def _plan_folder(trt: Path) -> bool:
    """trt/ as `dllm-trt build` leaves it (runtime/trt_plans.py): timing caches, and a folder of plans per target."""
    for e in trt.iterdir():
        name = _built_name(e.name)
        if e.is_symlink():
            return False
        if e.is_dir():
            if not all(_plan_file(f) for f in e.iterdir()):
                return False
        elif not (e.is_file() and name.startswith("timing-") and name.endswith(".cache")):
            return False
    return True


def _plan_file(f: Path) -> bool:
    name = _built_name(f.name)
    return not f.is_symlink() and f.is_file() and (name in (BUILD_RECORD, RUNTIME_CACHE) or name.endswith(".plan"))


def _built_name(name: str) -> str:
    """The file a temporary file of `dllm-trt build` (left by a build that was killed) was to become: <name>.partial,
    or .<name>.<random>.partial (trt_plans.replace_file); any other name as it is."""
    if not name.endswith(".partial"):
        return name
    name = name.removesuffix(".partial")
    return name[1:].rpartition(".")[0] if name.startswith(".") else name


def _destination(target: Path, model_dir: Path) -> Path:
    """`target`, refused when replacing it could delete what it must not: a symlink (never followed to replace its
    target), the current folder or the checkpoint being exported (or a folder holding them), a folder inside an
    engine folder."""
    if target.is_symlink():
        raise ModelError(f"{target}: is a symbolic link; choose a new --out or the folder it points to")
    real = target.resolve()
    for what, held in (("the current folder", _cwd()), ("the checkpoint being exported", model_dir.resolve())):
        if held is not None and (held == real or real in held.parents):
            raise ModelError(f"{target}: {'is' if held == real else 'holds'} {what}; choose another --out")
    engine = next((p for p in real.parents if _our_manifest(p) is not None), None)
    if engine is not None:
        raise ModelError(f"{target}: is inside the engine folder {engine}; choose an --out outside it")
    return real if target.name in ("", "..") else target  # a folder named by its own path, not by '..'


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except OSError:  # the current folder was deleted: nothing to protect
        return None


class _Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM during an export raise KeyboardInterrupt, even where the process was started with
    SIGINT ignored (a background job of a script). They are also remembered: one that lands inside torch's exporter
    can come out as another error (a lazy import left half done) or be swallowed when the exporter retries with its
    next capture strategy, so the export checks after each piece and before replacing anything. Inside held()
    (cleanup, the final swap) they are only remembered. Handlers can only be set from the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received, self.holding, self.previous = False, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum, frame):
        self.received = True
        if not self.holding:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _locked(target: Path):
    """One export at a time into `target`: a lock file beside it, held for the whole export and removed after. A
    second export is refused rather than sharing (or deleting) the first one's files."""
    lock = target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ModelError(f"{target}: another export into it is running; wait for it to finish") from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # its holder removed it between our open and our lock: lock the file now at that path
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _make_parents(folder: Path, made: list[Path]) -> None:
    """Create `folder` and its missing parents, adding those this call created to `made`, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            continue
        made.insert(0, d)


def _new_sibling(target: Path, suffix: str) -> Path:
    """A new empty folder beside `target` that no other process uses (created exclusively), with the permissions a
    plain mkdir gives (mkdtemp makes it private)."""
    d = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=suffix, dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(d, 0o777 & ~mask)
    return d


def _swap_in(tmp: Path, target: Path) -> None:
    """Move the finished export to `target`. An engine folder there is first renamed aside (onto an empty folder of
    our own: atomic, and a name no one else uses), put back if the move fails, and deleted after."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = _new_sibling(target, ".old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_into(model_dir: str | Path, target: Path, **settings) -> Path:
    """Export into `target` through a temporary sibling folder of this export's own, so that an interrupted or
    failed export leaves nothing behind and changes nothing; an engine folder already at `target` is replaced as a
    whole, once the new export is complete. One export at a time per target."""
    target = _destination(Path(target), Path(model_dir))
    check_out_dir(target, replacing=True)
    made, interrupts = [], _Interrupts()
    try:
        with interrupts:
            _make_parents(target.parent, made)
            with _locked(target):
                check_out_dir(target, replacing=True)  # again: it may have changed while we waited
                _export_and_swap(model_dir, target, interrupts, settings)
    except BaseException as e:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        if interrupts.received or isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        if isinstance(e, OSError):  # disk full, an I/O error: the machine's state, not a bug
            raise ModelError(f"{target}: export failed ({_reason(e)}); nothing was changed") from None
        raise
    return target


def _reason(e: OSError) -> str:
    code = e.errno if e.errno is not None else next((a for a in e.args if isinstance(a, int)), None)
    return e.strerror or (os.strerror(code) if code is not None else str(e))


def _export_and_swap(model_dir, target: Path, interrupts: _Interrupts, settings: dict) -> None:
    with interrupts.held():  # an interrupt now would lose track of the new folder
        tmp = _new_sibling(target, ".partial")
    try:
        interrupts.check()
        export_model(model_dir, tmp, shown_as=target, after_piece=interrupts.check, **settings)
        with interrupts.held():
            interrupts.check()
            check_out_dir(target, replacing=True)
            _swap_in(tmp, target)
    except BaseException:
        with interrupts.held():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
