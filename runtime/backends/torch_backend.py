"""The PyTorch backend: runs the reference pieces eagerly (CPU, or CUDA when present) with device-resident caches."""
from __future__ import annotations

import numpy as np

from ..config import layer_ranges
from .base import Backend, BackendError, RangeStats

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model_dir, layers_per_range: int = 1, device: str | None = None, dtype: str = "fp32"):
        try:
            import torch
        except ImportError:
            raise BackendError("the torch backend needs PyTorch: pip install 'dllm-trt[export]'") from None
        from ..checkpoint import Checkpoint
        from ..model_torch import Embedding, Head, LayerRange

        if dtype not in _DTYPES:
            raise BackendError(f"unknown dtype {dtype!r} (choose {', '.join(_DTYPES)})")
        self.torch = torch
        self.device = _device(torch, device)
        self.one_sync_per_step = self.device.type == "cuda"
        self.dtype = getattr(torch, _DTYPES[dtype])
        torch.set_grad_enabled(False)
        if model_dir is None:  # filled in by random()
            return
        ckpt = Checkpoint(model_dir)
        self.config = ckpt.config
        self.ranges = layer_ranges(self.config.n_layers, layers_per_range)
        self.embedding = Embedding(self.config, self.dtype).load(ckpt).to(self.device).eval()
        self.layers = [LayerRange(self.config, a, b, self.dtype).load(ckpt).to(self.device).eval()
                       for a, b in self.ranges]
        self.head_piece = Head(self.config, self.dtype).load(ckpt).to(self.device).eval()
        self._freeze()

    @classmethod
    def random(cls, config, layers_per_range: int = 1, device: str | None = None, dtype: str = "bf16",
               seed: int = 0) -> "TorchBackend":
        """Random weights made directly on the device: for timing model shapes (e.g. LLaDA-8B) with no checkpoint."""
        from ..model_torch import Embedding, Head, LayerRange

        self = cls(None, layers_per_range, device, dtype)
        torch = self.torch
        torch.manual_seed(seed)
        self.config = config
        self.ranges = layer_ranges(config.n_layers, layers_per_range)
        with torch.device(self.device):
            self.embedding = Embedding(config, self.dtype)
            self.layers = [LayerRange(config, a, b, self.dtype) for a, b in self.ranges]
            self.head_piece = Head(config, self.dtype)
        for module in [self.embedding, self.head_piece, *self.layers]:
            for p in module.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
        self._freeze()
        return self

    def _freeze(self) -> None:
        # Grad mode is per thread (set_grad_enabled above only covers this one); frozen weights keep decodings
        # run from other threads (Engine.stream, the server) free of autograd bookkeeping.
        for module in [self.embedding, self.head_piece, *self.layers]:
            module.requires_grad_(False)

    def describe(self) -> str:
        return f"torch ({self.device.type}, {str(self.dtype).removeprefix('torch.')})"

    def _t(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _allocate(self, n: int) -> None:
        c, t = self.config, self.torch
        shape = (c.n_heads, n, c.head_dim)
        self.k = [t.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layers)]
        self.v = [t.zeros_like(x) for x in self.k]
        self.q = [t.zeros_like(x) for x in self.k]
        self.boundary = [t.zeros((n, c.d_model), dtype=self.dtype, device=self.device) for _ in self.ranges]
        self.positions = t.arange(n, device=self.device)

    def _store(self, r: int, positions, hidden) -> None:
        """Keep `hidden` as the current rows and as the input of range r (if it exists)."""
        self.current = hidden
        if r < len(self.ranges):
            if positions is None:
                self.boundary[r].copy_(hidden)
            else:
                self.boundary[r].index_copy_(0, self._t(positions), hidden)

    def _embed(self, ids, positions):
        self._store(0, positions, self.embedding(self._t(ids)))

    def _window(self, r, positions, track_rows, track_positions, window_rows, key_is_mask):
        a, b = self.ranges[r]
        pos, track = self._t(positions), self._t(track_positions)
        caches = []
        for layer in range(a, b):
            caches += [self.k[layer], self.v[layer], self.q[layer].index_select(1, track)]
        out = self.layers[r].window(self.current, pos, self._t(track_rows), self._t(window_rows),
                                    self._t(key_is_mask), *caches)
        drift, colsum = [], []
        for i, layer in enumerate(range(a, b)):
            k, v, q, d, c = out[1 + 5 * i: 6 + 5 * i]
            self.k[layer].index_copy_(1, pos, k)
            self.v[layer].index_copy_(1, pos, v)
            self.q[layer].index_copy_(1, pos, q)
            drift.append(d)
            colsum.append(c)
        self._store(r + 1, positions, out[0])
        return RangeStats(colsum=self.torch.stack(colsum), drift=self.torch.stack(drift))

    def _refresh(self, r, window_positions, key_is_mask):
        a, b = self.ranges[r]
        out = self.layers[r].refresh(self.boundary[r], self.positions, self._t(window_positions),
                                     self._t(key_is_mask))
        colsum = []
        for i, layer in enumerate(range(a, b)):
            k, v, q, c = out[1 + 4 * i: 5 + 4 * i]
            self.k[layer].copy_(k)
            self.v[layer].copy_(v)
            self.q[layer].copy_(q)
            colsum.append(c)
        self._store(r + 1, None, out[0])
        return RangeStats(colsum=self.torch.stack(colsum))

    def fetch(self, stats):
        """Pass and piece outputs stay on the device; all statistics of a step come back in one copy."""
        parts = [t for st in stats for t in (st.colsum, st.drift) if t is not None]
        if not parts:
            return stats
        flat = self.torch.cat([t.reshape(-1).float() for t in parts]).cpu().numpy()
        out, at = [], 0

        def take(t):
            nonlocal at
            if t is None:
                return None
            n = t.numel()
            at += n
            return flat[at - n: at].reshape(tuple(t.shape))

        for st in stats:
            colsum = take(st.colsum)
            out.append(RangeStats(colsum=colsum, drift=take(st.drift)))
        return out

    def _head(self, rows):
        tokens, probs = self.head_piece(self.current, self._t(rows))
        return tokens.cpu().numpy(), probs.float().cpu().numpy()


def _device(torch, name: str | None):
    """cpu or cuda[:N] (default: cuda when present), or one BackendError line."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise BackendError(f"unknown device {name!r} (choose cpu or cuda, e.g. cuda:0)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {name!r}: CUDA is not available here (no GPU, or a CPU-only torch build)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device
