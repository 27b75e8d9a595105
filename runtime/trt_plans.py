"""TensorRT plan bookkeeping that needs no TensorRT: which flavour to use (TensorRT or TensorRT for RTX), which
GPUs each supports, the plan fingerprint, and whether existing plans can be used, must be rebuilt, or must be
refused. What only building needs (precision checks, optimization profiles, RTX targets, writing build.json) is in
export/tensorrt_build.py.

Plans live in <engines>/trt/<fingerprint>/: one <piece>.plan per ONNX piece, plus build.json recording the
fingerprint's inputs, the sha256 of each source ONNX file, each plan's size and sha256, and the dimension ranges of
each plan's optimization profiles. A layer range's plan has two profiles, one per mode (window, refresh: the
order is profile_modes'); embed and head have one. "Built once per
target": the same flavour, version, GPU (TensorRT) or compute-capability targets (TensorRT for RTX), precision and
profiles give the same folder, and a complete folder whose sources and plans still match is reused as is. Plans of
one flavour are never loaded by the other.

Plans are code the GPU runs, so trt/ and everything under it must be real folders and files inside the engine
folder: a symlink anywhere there is refused (check_plan_tree), by `build` and by the runtime alike. Whether a plan
folder is valid is decided by one function, stale_pieces, for both; its per-plan check, read_plan, is also what the
runtime runs on the bytes it deserializes.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .manifest import MODES, Manifest

BUILD_RECORD = "build.json"
RECORD_LIMIT = 1 << 22  # a build.json is a few KiB; anything near this is not one

# flavour -> Python module. TensorRT proper needs the GPU it builds for; TensorRT for RTX compiles ahead of time
# without a GPU, for compute-capability targets, and finishes kernels just in time on the user's GPU.
FLAVORS = {"tensorrt": "tensorrt", "rtx": "tensorrt_rtx"}
FLAVOR_NAMES = {"tensorrt": "TensorRT", "rtx": "TensorRT for RTX"}
FLAVOR_TAGS = {"tensorrt": "trt", "rtx": "rtx"}
# Compute capabilities TensorRT for RTX 1.x builds our pieces for (its ComputeCapability enum: Ampere, Ada,
# Blackwell RTX and GB10). No Volta, no Hopper (9.0), no data-centre Blackwell (10.x). The enum also has Turing
# (7.5), but RTX compiles only fp16 matrix multiplies for Turing and every window piece computes its drift
# statistics with fp32 ones, so Turing is left out.
RTX_CCS = ("8.0", "8.6", "8.9", "12.0", "12.1")
RTX_TURING = "7.5"
# What an RTX build without explicit targets runs on ("ampere+" here).
RTX_DEFAULT_CCS = RTX_CCS
RTX_DEFAULT = "ampere+"
TRT_MIN_CC = (7, 5)  # TensorRT 10.x/11.x: Turing and newer, data-centre GPUs and Jetson Orin included


def choose_flavor(requested: str, installed: list[str], device_cc: str | None = None) -> str:
    """The flavour to use: the requested one if installed; with 'auto', the only one installed, or with both, the
    one that supports this GPU (TensorRT for RTX when there is no GPU: only it can build without one)."""
    if requested not in ("auto", *FLAVORS):
        raise ValueError(f"--trt-flavor must be auto, tensorrt or rtx, got {requested!r}")
    if requested != "auto":
        if requested not in installed:
            raise ValueError(f"{FLAVOR_NAMES[requested]} is not installed ({install_hint(requested)})")
        return requested
    if not installed:
        raise ValueError("TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU, or "
                         "pip install tensorrt-rtx for RTX GPUs and GPU-less builds); "
                         "use --backend onnxruntime or --backend torch")
    if len(installed) == 1:
        return installed[0]
    if device_cc is None or device_cc in RTX_CCS:
        return "rtx"
    return "tensorrt"


def install_hint(flavor: str) -> str:
    return {"tensorrt": "pip install tensorrt", "rtx": "pip install tensorrt-rtx"}[flavor]


def gpu_support(flavor: str, cc: str) -> tuple[bool, str]:
    """Whether `flavor` runs on a GPU of compute capability `cc` ("9.0"), and what to install instead if not."""
    major, minor = (int(x) for x in cc.split("."))
    if flavor == "rtx":
        if cc in RTX_CCS:
            return True, ""
        if cc == RTX_TURING:
            return False, ("TensorRT for RTX has no fp32 matrix multiplies on Turing (sm75), which the drift "
                           f"statistics need: {install_hint('tensorrt')}")
        if (major, minor) >= TRT_MIN_CC:
            return False, ("TensorRT for RTX supports Ampere..Blackwell RTX GPUs (sm80, sm86, sm89, sm120, sm121), "
                           f"not sm{major}{minor} (Hopper / data-centre Blackwell): {install_hint('tensorrt')}")
        return False, f"sm{major}{minor} is older than Turing: no TensorRT flavour supports it"
    if (major, minor) >= TRT_MIN_CC:
        return True, ""
    return False, f"TensorRT 10/11 needs Turing (sm75) or newer, not sm{major}{minor}"


def covered_ccs(flavor: str, compute_capability: str) -> tuple[str, ...]:
    """The compute capabilities a plan built for this target runs on."""
    if flavor == "rtx" and compute_capability == RTX_DEFAULT:
        return RTX_DEFAULT_CCS
    return tuple(compute_capability.split(","))


@dataclass(frozen=True)
class Target:
    """What a plan is specific to."""

    gpu_name: str                 # "" for RTX builds, which are not tied to one GPU
    compute_capability: str       # "9.0"; RTX: its targets ("8.6", "7.5,8.6", "ampere+")
    trt_version: str
    precision: str
    max_len: int
    max_active: int
    opt_level: int = 3
    flavor: str = "tensorrt"      # records written before flavours existed are TensorRT's
    max_batch: int = 1            # sequences per call; records written before batched pieces were batch 1

    def fingerprint(self) -> str:
        key = json.dumps(asdict(self), sort_keys=True)
        if self.compute_capability == RTX_DEFAULT:
            cc = RTX_DEFAULT
        else:
            cc = "_".join("sm" + c.replace(".", "") for c in self.compute_capability.split(","))
        tag = FLAVOR_TAGS[self.flavor]
        return f"{cc}-{tag}{self.trt_version}-{self.precision}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"

    def runs_on(self, flavor: str, version: str, gpu_name: str, device_cc: str) -> bool:
        """Whether this machine (flavour, version, GPU) can load plans built for this target."""
        if (self.flavor, self.trt_version) != (flavor, version):
            return False
        if flavor == "rtx":
            return device_cc in covered_ccs(flavor, self.compute_capability)
        return (self.gpu_name, self.compute_capability) == (gpu_name, device_cc)


ONE_PROFILE = "all"   # the single profile of embed and head


def profile_modes(kind: str) -> tuple[str, ...]:
    """The optimization profiles of a piece's plan, in profile-index order: a layer range runs in window mode (few
    query rows) and refresh mode (a query row per canvas slot), embed and head at any length with one profile."""
    return MODES if kind == "layers" else (ONE_PROFILE,)


def profile_index(kind: str, mode: str) -> int:
    """The index of the optimization profile a piece of this kind runs `mode` on."""
    modes = profile_modes(kind)
    if mode not in modes:
        raise ValueError(f"a {kind} piece has no {mode!r} profile (it has {', '.join(modes)})")
    return modes.index(mode)


def plan_dir(engine_dir: str | Path, target: Target) -> Path:
    return Path(engine_dir) / "trt" / target.fingerprint()


class PlanError(ValueError):
    """A plan folder that cannot be used or written as it is and that building cannot repair (a symlink, a folder
    where a plan belongs, a file where a folder belongs): the user must remove it. One line."""


class StalePlan(PlanError):
    """A plan or record that is missing, damaged or not what was built: rebuilding replaces it."""


def check_plan_tree(engine_dir: str | Path) -> None:
    """Refuse (PlanError) a trt/ that is not a real folder of the engine folder, or that holds a symlink anywhere:
    plans (executable code) and their records would be written and loaded outside the engine folder."""
    root = Path(engine_dir) / "trt"
    if root.is_symlink():
        raise PlanError(f"{root} is a symlink (to {os.readlink(root)}); plans are code the GPU runs and must stay "
                        f"inside the engine folder: replace it with a real folder")
    if not root.exists():
        return
    if not root.is_dir():
        raise PlanError(f"{root} is not a folder: remove it (dllm-trt build writes plans there)")
    for top, dirs, files in os.walk(root):  # does not descend into symlinked folders; they are refused here
        for name in sorted(dirs + files):
            path = Path(top) / name
            if path.is_symlink():
                raise PlanError(f"{path} is a symlink (to {os.readlink(path)}); plans and their records must be "
                                f"real files inside the engine folder: remove it")


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of the regular file at `path`, opened without following a symlink (or blocking on a FIFO).
    StalePlan when it is missing or larger than `limit`; PlanError when it is anything but a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise StalePlan(f"{path} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PlanError(f"{path} is a symlink; plans and their records must be real files inside the engine "
                            f"folder: remove it") from None
        raise PlanError(f"{path} cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PlanError(f"{path} is not a file: remove it (dllm-trt build writes a file there)")
        if limit is not None and st.st_size > limit:
            raise StalePlan(f"{path} is too large ({st.st_size} bytes) to be a build record")
        return f.read()


def read_plan(path: Path, size: int | None, sha256: str | None) -> bytes:
    """The bytes of one plan if they are what build.json records (its size, and its sha256 when recorded), else
    StalePlan saying why (PlanError when something other than a file is there). The hash catches a plan swapped
    for another piece's of the same size (same-shaped layer ranges give equal sizes), which sizes alone cannot.
    `build` and the runtime both decide with this function."""
    blob = read_regular(path)
    if size is not None and len(blob) != size:
        raise StalePlan(f"{path} is missing or incomplete")
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise StalePlan(f"{path} is not the plan that was built there")
    return blob


def plan_size(path: Path) -> int | None:
    """The size of the plan file at `path`, None when there is none; PlanError when something other than a
    regular file is there (a build could not replace it)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise PlanError(f"{path} is a symlink; plans and their records must be real files inside the engine "
                        f"folder: remove it")
    if not stat.S_ISREG(st.st_mode):
        raise PlanError(f"{path} is not a file: remove it (dllm-trt build writes a file there)")
    return st.st_size


_TARGET_FIELDS = {f.name: (f.type, f.default is MISSING) for f in fields(Target)}
_RECORD_MAPS = {"onnx_sha256": (str,), "plan_size": (int,), "plan_sha256": (str,), "build_seconds": (int, float),
                "profiles": (dict,)}


def parse_record(path: Path) -> dict:
    """build.json as a checked dict (its target's fields of the right types, its maps name -> str / int), or
    StalePlan saying what is wrong with it: a damaged record is never trusted, and a build replaces it."""
    raw = read_regular(path, RECORD_LIMIT)
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise StalePlan(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise StalePlan(f"{path} is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise StalePlan(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(record, dict):
        raise StalePlan(f"{path} is not a JSON object")
    target = record.get("target")
    if not (isinstance(target, dict) and set(target) <= set(_TARGET_FIELDS)
            and all(k in target for k, (_, required) in _TARGET_FIELDS.items() if required)
            and all(isinstance(v, int if _TARGET_FIELDS[k][0] in (int, "int") else str) and not isinstance(v, bool)
                    for k, v in target.items())):
        raise StalePlan(f"{path} does not describe a target")
    for key, types in _RECORD_MAPS.items():
        value = record.get(key, {})
        if not (isinstance(value, dict) and all(isinstance(v, types) and not isinstance(v, bool)
                                                for v in value.values())):
            raise StalePlan(f"{path}: '{key}' is not a map of piece names to {types[0].__name__}s")
    return record


def stale_pieces(engine_dir: str | Path, manifest: Manifest, target: Target,
                 hash_plans: bool = True) -> tuple[list[str], str]:
    """(names of the pieces whose plans must be (re)built, why the first one must); ([], '') when all are up to
    date. Every piece when there is no trustworthy record for this target; a foreign or damaged record is never
    trusted. Otherwise only the pieces whose ONNX changed or whose plan is missing, incomplete, or (hash_plans) not
    the plan that was built there. PlanError for what building cannot repair (symlinks, a folder where a file
    belongs, a file where a folder belongs).

    The one decision of whether a plan folder is valid: `build` calls it with hash_plans, the runtime without (it
    runs read_plan, hash included, on the bytes it then deserializes, instead of reading every plan twice)."""
    everything = [p.name for p in manifest.pieces]
    check_plan_tree(engine_dir)
    d = plan_dir(engine_dir, target)
    if d.exists() and not d.is_dir():
        raise PlanError(f"{d} is not a folder: remove it (dllm-trt build writes plans there)")
    record_path = d / BUILD_RECORD
    try:
        record = parse_record(record_path)
    except StalePlan as e:
        return everything, ("no plans for this flavour / GPU / precision yet" if not record_path.exists() else str(e))
    if record["target"] != asdict(target):
        return everything, f"{record_path} was written for another target"
    sizes, hashes = record.get("plan_size", {}), record.get("plan_sha256", {})
    stale, why = [], ""
    for p in manifest.pieces:
        plan = d / f"{p.name}.plan"
        size, reason = plan_size(plan), ""
        if record.get("onnx_sha256", {}).get(p.name) != p.sha256:
            reason = f"{p.file} changed since its plan was built"
        elif size is None or size != sizes.get(p.name):
            reason = f"{plan} is missing or incomplete"
        elif hash_plans:
            try:
                read_plan(plan, sizes.get(p.name), hashes.get(p.name))
            except StalePlan as e:
                reason = str(e)
        if reason:
            stale.append(p.name)
            why = why or reason
    return stale, why


def plan_status(engine_dir: str | Path, manifest: Manifest, target: Target,
                hash_plans: bool = True) -> tuple[str, str]:
    """('ok', '') when every plan exists and was built from the current ONNX files for this target;
    ('build', why) when some plans must be (re)built."""
    stale, why = stale_pieces(engine_dir, manifest, target, hash_plans)
    return ("build", why) if stale else ("ok", "")


def find_built(engine_dir: str | Path, manifest: Manifest, gpu_name: str, compute_capability: str,
               trt_version: str, precision: str, flavor: str = "tensorrt") -> Target | None:
    """The target of complete, up-to-date plans this flavour / version / GPU / precision can load (whatever
    --max-len, --max-active and --opt-level they were built with), or None. Plans are not hashed here: the runtime
    hashes each as it loads it (read_plan). PlanError when trt/ holds a symlink or a plan folder for this machine
    holds something other than files where plans belong."""
    check_plan_tree(engine_dir)
    for record_path in sorted((Path(engine_dir) / "trt").glob(f"*/{BUILD_RECORD}")):
        try:
            target = Target(**parse_record(record_path)["target"])
        except StalePlan:
            continue
        if target.flavor not in FLAVORS or target.precision != precision:
            continue
        if not target.runs_on(flavor, trt_version, gpu_name, compute_capability):
            continue
        if plan_status(engine_dir, manifest, target, hash_plans=False)[0] == "ok":
            return target
    return None


def read_record(engine_dir: str | Path, target: Target) -> dict:
    """The target's build.json, checked (parse_record), or {} when there is none or it is damaged."""
    try:
        return parse_record(plan_dir(engine_dir, target) / BUILD_RECORD)
    except StalePlan:
        return {}


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` atomically: into a new file created exclusively next to it (so never through a symlink
    planted at a predictable temporary name), then renamed over it (which replaces a symlink at `path` instead of
    writing through it). An interrupted write leaves no torn file, and its temporary file is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cache_bytes(manifest: Manifest, seq_len: int, dtype_bytes: int) -> dict[str, int]:
    """Device memory the runtime keeps for a canvas of seq_len slots: K/V/Q per layer and one hidden-state
    boundary per layer range (plus one for the last output)."""
    c = manifest.config
    kvq = 3 * c.n_layers * c.n_heads * seq_len * c.head_dim * dtype_bytes
    hidden = (len(manifest.layer_ranges) + 1) * seq_len * c.d_model * dtype_bytes
    return {"kvq": kvq, "hidden": hidden, "total": kvq + hidden}
