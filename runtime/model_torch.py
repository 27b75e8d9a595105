"""LLaDA in PyTorch, expressed as the pieces that get exported: embedding, layer ranges, head.

LayerRange.forward is the exported layer-range piece (docs/CONTRACT.md): batched, one graph for both modes (a
refresh is a window pass whose query rows are every slot). LayerRange.window and LayerRange.refresh are the
reference the torch backend runs and `dllm-trt check` compares the exported pieces with: one sequence, written
separately, the two modes as two functions.

Layouts: hidden states [S, d_model]; per-layer K/V/Q [n_heads, S, head_dim] after RoPE; positions are absolute
canvas indices. Numerics follow LLaDA: RMSNorm statistics, RoPE, softmax and every statistic in float32, matmuls in
the model dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .checkpoint import PREFIX, Checkpoint, layer_keys
from .config import ModelConfig

_COS_EPS = 1e-8  # same guard as torch.cosine_similarity


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def rope(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE at absolute positions, in float32. x: [..., H, S, hd], position_ids: [..., S]."""
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(-3)   # [..., 1, S, hd]: the same for every head
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * emb.cos() + rotated * emb.sin()).to(x.dtype)


def masked_colsum(probs_rows: torch.Tensor, key_is_mask: torch.Tensor, row_valid=None) -> torch.Tensor:
    """Attention received by each key position, summed over heads and rows; still-MASK keys get 0. -> [N].
    row_valid [R] (optional) leaves pad rows out of the sum."""
    if row_valid is not None:
        probs_rows = torch.where(row_valid[None, :, None], probs_rows, torch.zeros_like(probs_rows))
    score = probs_rows.sum(dim=(0, 1))
    return torch.where(key_is_mask, torch.zeros_like(score), score)


def cosine(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Cosine along `dim` with each norm clamped at eps separately, as torch.nn.functional.cosine_similarity
    does (clamping the product of the norms instead collapses the similarity of tiny attention values to ~0).
    Written out so that it exports to plain ONNX ops."""
    norm_a = torch.sqrt((a * a).sum(dim)).clamp_min(_COS_EPS)
    norm_b = torch.sqrt((b * b).sum(dim)).clamp_min(_COS_EPS)
    return (a * b).sum(dim) / (norm_a * norm_b)


def masked_mean(x: torch.Tensor, valid) -> torch.Tensor:
    """Mean of x over the entries where `valid` (broadcast to x) holds; plain mean when valid is None."""
    if valid is None:
        return x.mean()
    valid = valid.expand(x.shape)
    return torch.where(valid, x, torch.zeros_like(x)).sum() / valid.sum()


def head_axis_cosine(a: torch.Tensor, b: torch.Tensor, row_valid=None, key_valid=None) -> torch.Tensor:
    """Mean over (row, key) of the cosine between a[:, row, key] and b[:, row, key] taken across heads."""
    if row_valid is None and key_valid is None:
        return cosine(a, b, 0).mean()
    rows = torch.ones(a.shape[1], dtype=torch.bool, device=a.device) if row_valid is None else row_valid
    keys = torch.ones(a.shape[2], dtype=torch.bool, device=a.device) if key_valid is None else key_valid
    return masked_mean(cosine(a, b, 0), rows[:, None] & keys[None, :])


def key_axis_cosine(a: torch.Tensor, b: torch.Tensor, row_valid=None) -> torch.Tensor:
    """Mean over (head, row) of the cosine between two attention rows taken across key positions (paper formula).
    Pad keys hold zero attention on both sides, so they need no mask here."""
    return masked_mean(cosine(a, b, -1), None if row_valid is None else row_valid[None, :])


def batched_head_axis_cosine(a, b, row_valid, key_valid) -> torch.Tensor:
    """Per sequence: mean over valid (row, key) of the cosine across heads. a, b [B, H, T, N] -> [B]."""
    valid = row_valid[:, :, None] & key_valid[:, None, :]
    c = torch.where(valid, cosine(a, b, 1), 0.0)
    return c.sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1)


def batched_key_axis_cosine(a, b, row_valid) -> torch.Tensor:
    """Per sequence: mean over (head, valid row) of the cosine across keys. a, b [B, H, T, N] -> [B]."""
    c = torch.where(row_valid[:, None, :], cosine(a, b, -1), 0.0)
    return c.sum(dim=(1, 2)) / (row_valid.sum(-1) * a.shape[1]).clamp_min(1)


def sdpa(q, k, v, allowed=None):
    """scaled_dot_product_attention on [H, S, hd] tensors, given a batch dimension (the fused CUDA kernels want
    4-D inputs); allowed [Sk] bool marks the keys every query may attend to."""
    mask = None if allowed is None else allowed[None, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]


def on_rows(linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer on x [..., D] applied to x as one matrix of rows: a 3-D input would export as MatMul with a
    transposed weight, which ONNX Runtime runs about 30% slower than Gemm when weights are not pre-packed
    (a 25-row window pass, d_model 2048; docs/BENCHMARKS.md section 15)."""
    return linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        d, f = cfg.d_model, cfg.mlp_hidden_size
        kw = dict(bias=False, dtype=dtype)
        self.attn_norm = nn.Parameter(torch.ones(d, dtype=dtype))
        self.ff_norm = nn.Parameter(torch.ones(d, dtype=dtype))
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d, **kw), nn.Linear(d, d, **kw), nn.Linear(d, d, **kw)
        self.attn_out = nn.Linear(d, d, **kw)
        self.ff_proj, self.up_proj = nn.Linear(d, f, **kw), nn.Linear(d, f, **kw)
        self.ff_out = nn.Linear(f, d, **kw)
        self.n_heads, self.head_dim, self.eps = cfg.n_heads, cfg.head_dim, cfg.rms_norm_eps
        self.qkv_weight = None  # set by fuse_qkv(): one [3D, D] projection instead of three

    def fuse_qkv(self) -> None:
        """Replace the three projections by one (fewer, larger matmuls). Only after loading weights; the exported
        graphs keep the three separate projections."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).detach()
        self.qkv_weight = nn.Parameter(w, requires_grad=False)
        del self.q_proj, self.k_proj, self.v_proj
        self.q_proj = self.k_proj = self.v_proj = None

    def qkv(self, h: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor):
        x = rms_norm(h, self.attn_norm, self.eps)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [..., S, D] -> [..., H, S, hd]
            return t.unflatten(-1, (self.n_heads, self.head_dim)).transpose(-3, -2)

        if self.qkv_weight is not None:
            q, k, v = on_rows(lambda rows: torch.nn.functional.linear(rows, self.qkv_weight), x).chunk(3, dim=-1)
        else:
            q, k, v = on_rows(self.q_proj, x), on_rows(self.k_proj, x), on_rows(self.v_proj, x)
        return rope(heads(q), position_ids, inv_freq), rope(heads(k), position_ids, inv_freq), heads(v)

    def finish(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and SwiGLU MLP. ctx: [..., H, S, hd]."""
        h = h + on_rows(self.attn_out, ctx.transpose(-3, -2).flatten(-2))
        x = rms_norm(h, self.ff_norm, self.eps)
        hidden = torch.nn.functional.silu(on_rows(self.ff_proj, x)) * on_rows(self.up_proj, x)
        return h + on_rows(self.ff_out, hidden)


class LayerRange(nn.Module):
    """Layers [first, last) of LLaDA: forward() is the exported piece; window() and refresh() the reference."""

    def __init__(self, cfg: ModelConfig, first: int, last: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg, self.first, self.last, self.dtype = cfg, first, last, dtype
        self.blocks = nn.ModuleList(Block(cfg, dtype) for _ in range(first, last))
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.fast = False  # see make_fast()

    @property
    def n(self) -> int:
        return self.last - self.first

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale

    def forward(self, hidden, position_ids, canvas_lengths, key_is_mask, track_rows, window_rows, *caches):
        """The layer-range piece, for a batch of sequences padded to a common canvas of N slots and R query rows.

        hidden [B, R, D]; position_ids [B, R] (canvas slot of each query row, -1 = padding row); canvas_lengths
        [B] (slots at or beyond are padding); key_is_mask [B, N]; track_rows [B, T] and window_rows [B, W] (rows
        into the query rows, -1 = padding); per layer past_key, past_value [B, H, N, hd] and track_query
        [B, H, T, hd]. Returns hidden_out [B, R, D], then per layer new_key, new_value, new_query [B, H, R, hd],
        drift [B, 2], attn_colsum [B, N].

        Each query row attends to every slot of its canvas: to its fresh key/value at the slots of query rows and
        to the cache at the others. The drift's "before" attention reads the cached keys at every real slot;
        nothing else reads the cache at query slots. With every slot a query row (refresh mode) the attention uses
        no cached key/value and the drift output is ignored, so a backend may bind any buffer of cache shape as
        past_key / past_value there. Cached entries are only ever selected (torch.where), never multiplied by a
        zero, so whatever unread entries hold (NaN included) cannot leak in. Padding rows must come after a
        sequence's real rows, with row 0 real: padding slots and padded picks borrow row 0.
        """
        n_heads, head_dim = self.cfg.n_heads, self.cfg.head_dim
        batch, n_rows = position_ids.shape
        n_keys = key_is_mask.shape[-1]
        slots = torch.arange(n_keys, device=hidden.device)
        key_valid = slots[None, :] < canvas_lengths[:, None]                          # [B, N]
        # the query row at each slot (-1: none), by one scatter; padding rows land in an extra slot, dropped
        target = torch.where(position_ids >= 0, position_ids, n_keys)
        row_numbers = torch.arange(n_rows, device=hidden.device).expand(batch, n_rows)
        row_of_slot = torch.full((batch, n_keys + 1), -1, dtype=torch.int64, device=hidden.device)
        row_of_slot = row_of_slot.scatter(1, target, row_numbers)[:, :n_keys]
        # Keys and values in slot order: each (sequence, head, slot) is one head_dim-long row of a table stacking
        # the cache's rows and this pass's fresh rows, taken by one Gather. Query rows' slots and padding slots
        # (any finite value will do there) come from the fresh rows, every other slot from the cache.
        fresh = ((row_of_slot >= 0) | ~key_valid)[:, None, :]                        # [B, 1, N]
        sequence_head = torch.arange(batch * n_heads, device=hidden.device).reshape(batch, n_heads, 1)
        from_cache = sequence_head * n_keys + slots
        from_fresh = batch * n_heads * n_keys + sequence_head * n_rows + row_of_slot.clamp_min(0)[:, None, :]
        table_rows = torch.where(fresh, from_fresh, from_cache).reshape(-1)          # [B * H * N]

        def in_slot_order(fresh_rows, cache):                                        # -> [B, H, N, hd]
            table = torch.cat([cache.reshape(-1, head_dim), fresh_rows.reshape(-1, head_dim)])
            return table.index_select(0, table_rows).reshape(batch, n_heads, n_keys, head_dim)

        def rows_of(probs, rows):   # probs [B, H, R, N] at rows [B, K] (-1: padding, all zero) -> [B, H, K, N]
            picked = (sequence_head * n_rows + rows.clamp_min(0)[:, None, :]).reshape(-1)
            taken = probs.reshape(-1, n_keys).index_select(0, picked).reshape(batch, n_heads, -1, n_keys)
            return taken * (rows >= 0)[:, None, :, None]

        # padding slots hold fresh (finite) keys, so an additive bias masks them in the scores; the drift's "old"
        # attention reads the cache as it is (anything at padding slots), so it masks by selection
        key_bias = torch.where(key_valid, 0.0, float("-inf"))[:, None, None, :]
        key_valid_column = key_valid[:, None, :, None]
        positions = position_ids.clamp_min(0)
        track_valid = track_rows >= 0
        outputs = []
        for i, block in enumerate(self.blocks):
            past_k, past_v, track_q = caches[3 * i], caches[3 * i + 1], caches[3 * i + 2]
            q, k, v = block.qkv(hidden, positions, self.inv_freq)                    # [B, H, R, hd]
            keys, values = in_slot_order(k, past_k), in_slot_order(v, past_v)
            # the scale on the scores, as LayerRange.refresh has it: a refresh pass then rounds exactly as the
            # reference (on the queries it saves a pass, but quantized engines amplify the changed rounding)
            probs = torch.softmax(self.scores(q, keys) + key_bias, dim=-1)
            hidden = block.finish(hidden, torch.matmul(probs.to(values.dtype), values))
            colsum = torch.where(key_is_mask, 0.0, rows_of(probs, window_rows).sum(dim=(1, 2)))
            # slots x tracked rows, so that the cache is not transposed
            old_scores = torch.matmul(past_k.float(), track_q.float().transpose(-1, -2) * self.scale)
            old = torch.softmax(torch.where(key_valid_column, old_scores, float("-inf")), dim=-2).transpose(-1, -2)
            new = rows_of(probs, track_rows)                                          # [B, H, T, N]
            drift = torch.stack([batched_head_axis_cosine(old, new, track_valid, key_valid),
                                 batched_key_axis_cosine(old, new, track_valid)], dim=-1)
            outputs += [k, v, q, drift, colsum]
        return (hidden, *outputs)

    def window(self, hidden, position_ids, track_rows, window_rows, key_is_mask, *caches,
               query_valid=None, key_valid=None, track_valid=None, window_valid=None):
        """Recompute only the query rows; read every other key from the cache.

        hidden [Sq, D] (range input for the query rows), position_ids [Sq] (their canvas slots), track_rows [T]
        (rows of the tracked tokens), window_rows [W] (rows of the decoding window), key_is_mask [N] bool, then for
        each layer: past_key [H, N, hd], past_value [H, N, hd] (cache before this step's writes), track_query
        [H, T, hd] (the tracked tokens' cached queries).
        Returns hidden_out [Sq, D], then per layer: new_key, new_value, new_query [H, Sq, hd], drift [2] (float32:
        the similarity across heads as the reference code computes it, and across keys as the paper writes it),
        attn_colsum [N] (float32).

        Optional validity masks (not exported; None = every row is real) make padded, fixed-shape steps exact:
        query_valid [Sq] (pad query rows are attended by no row), key_valid [N] (pad cache slots are attended by
        no row), track_valid [T] and window_valid [W] (pad rows are left out of the drift means and column sums).
        """
        n_keys = key_is_mask.shape[0]
        # slot_of_row[i, p] = 1 where query row i lives in canvas slot p: maps new-key columns onto canvas columns.
        slot_of_row = (position_ids[:, None] == torch.arange(n_keys, device=hidden.device)[None, :]).float()
        stale = slot_of_row.sum(0) > 0
        if key_valid is not None:
            stale = stale | ~key_valid
        stale_bias = torch.where(stale, float("-inf"), 0.0)
        new_bias = None if query_valid is None else torch.where(query_valid, 0.0, float("-inf"))
        old_bias = None if key_valid is None else torch.where(key_valid, 0.0, float("-inf"))
        outputs = []
        for i, block in enumerate(self.blocks):
            past_k, past_v, track_q = caches[3 * i], caches[3 * i + 1], caches[3 * i + 2]
            q, k, v = block.qkv(hidden, position_ids, self.inv_freq)
            if self.fast:
                ctx = self._fused_context(q, k, v, past_k, past_v, stale, query_valid)
                rows = torch.cat([track_rows, window_rows])
                p_past, p_new = self._probs(q.index_select(1, rows), k, past_k, stale_bias, new_bias)
                t = track_rows.shape[0]
                p_track, p_window = (p_past[:, :t], p_new[:, :t]), (p_past[:, t:], p_new[:, t:])
            else:
                p_past, p_new = self._probs(q, k, past_k, stale_bias, new_bias)
                ctx = torch.matmul(p_past.to(v.dtype), past_v) + torch.matmul(p_new.to(v.dtype), v)
                p_track = (p_past.index_select(1, track_rows), p_new.index_select(1, track_rows))
                p_window = (p_past.index_select(1, window_rows), p_new.index_select(1, window_rows))

            def aligned(pair) -> torch.Tensor:  # attention of some query rows over canvas slots
                return pair[0] + torch.matmul(pair[1], slot_of_row)

            colsum = masked_colsum(aligned(p_window), key_is_mask, window_valid)
            old_scores = self.scores(track_q, past_k)
            old = torch.softmax(old_scores if old_bias is None else old_scores + old_bias, dim=-1)
            new = aligned(p_track)
            drift = torch.stack([head_axis_cosine(old, new, track_valid, key_valid),
                                 key_axis_cosine(old, new, track_valid)])
            hidden = block.finish(hidden, ctx)
            outputs += [k, v, q, drift, colsum]
        return (hidden, *outputs)

    def _probs(self, q, k, past_k, stale_bias, new_bias):
        """float32 attention of query rows q over [cache slots, new keys], split into those two parts."""
        s_new = self.scores(q, k)
        if new_bias is not None:
            s_new = s_new + new_bias
        probs = torch.softmax(torch.cat([self.scores(q, past_k) + stale_bias, s_new], dim=-1), dim=-1)
        n_keys = past_k.shape[-2]
        return probs[..., :n_keys], probs[..., n_keys:]

    def _fused_context(self, q, k, v, past_k, past_v, stale, query_valid):
        """Attention context of every query row through scaled_dot_product_attention (no explicit probabilities)."""
        allowed = ~stale if query_valid is None else torch.cat([~stale, query_valid])
        if query_valid is None:
            allowed = torch.cat([allowed, torch.ones(q.shape[-2], dtype=torch.bool, device=q.device)])
        return sdpa(q, torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2), allowed)

    def refresh(self, hidden, position_ids, window_rows, key_is_mask, window_valid=None):
        """Recompute every position of the range. hidden [N, D] is the full range input; window_rows are canvas
        slots of the decoding window. Returns hidden_out [N, D], then per layer: key, value, query [H, N, hd],
        attn_colsum [N] (float32). window_valid [W] (optional, not exported) leaves pad window rows out."""
        outputs = []
        for block in self.blocks:
            q, k, v = block.qkv(hidden, position_ids, self.inv_freq)
            if self.fast:
                ctx = sdpa(q, k, v)
                window_probs = torch.softmax(self.scores(q.index_select(1, window_rows), k), dim=-1)
            else:
                probs = torch.softmax(self.scores(q, k), dim=-1)
                ctx = torch.matmul(probs.to(v.dtype), v)
                window_probs = probs.index_select(1, window_rows)
            colsum = masked_colsum(window_probs, key_is_mask, window_valid)
            hidden = block.finish(hidden, ctx)
            outputs += [k, v, q, colsum]
        return (hidden, *outputs)

    def make_fast(self) -> "LayerRange":
        """Fused QKV projection, attention context through scaled_dot_product_attention, and explicit
        probabilities only for the rows the statistics need. For the torch backend; never for export."""
        for block in self.blocks:
            if block.qkv_weight is None:
                block.fuse_qkv()
        self.fast = True
        return self

    def load(self, ckpt: Checkpoint) -> "LayerRange":
        weights = ckpt.read(layer_keys(self.first, self.last), dtype=self.dtype)
        self.load_state_dict(range_state_dict(weights, self.first, self.last))
        return self


def range_state_dict(weights: dict, first: int, last: int) -> dict:
    """Map checkpoint names of layers [first, last) to LayerRange parameter names."""
    out = {}
    for i in range(first, last):
        src = f"{PREFIX}blocks.{i}."
        local = f"blocks.{i - first}."
        for name in ("attn_norm", "ff_norm"):
            out[local + name] = weights[src + name + ".weight"]
        for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
            out[local + name + ".weight"] = weights[src + name + ".weight"]
    return out


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.embedding_size, cfg.d_model, dtype=dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[input_ids]

    def load(self, ckpt: Checkpoint) -> "Embedding":
        self.weight.data = ckpt.read([PREFIX + "wte.weight"], dtype=self.weight.dtype)[PREFIX + "wte.weight"]
        return self


class Head(nn.Module):
    """Final norm + LM head for some rows; returns only argmax token and its float32 softmax probability.

    The MASK token is never proposed (its logit is -inf): committing MASK would leave the position undecoded.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(cfg.d_model, dtype=dtype))
        self.weight = nn.Parameter(torch.zeros(cfg.embedding_size, cfg.d_model, dtype=dtype))
        self.eps, self.vocab, self.mask_id = cfg.rms_norm_eps, cfg.vocab_size, cfg.mask_token_id

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor):
        """hidden [S, D], rows [n] (one sequence), or hidden [B, S, D], rows [B, n] (-1 = padding row)."""
        picked = rows.clamp_min(0)[..., None].expand(*rows.shape, hidden.shape[-1])
        x = rms_norm(hidden.gather(-2, picked), self.norm, self.eps)
        logits = torch.matmul(x, self.weight[: self.vocab].t()).float()
        banned = torch.arange(self.vocab, device=logits.device) == self.mask_id
        logits = torch.where(banned, float("-inf"), logits)
        probs, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
        return tokens, probs

    def load(self, ckpt: Checkpoint) -> "Head":
        w = ckpt.read([PREFIX + "ln_f.weight", PREFIX + "ff_out.weight"], dtype=self.weight.dtype)
        self.norm.data, self.weight.data = w[PREFIX + "ln_f.weight"], w[PREFIX + "ff_out.weight"]
        return self


def dense_logits(embedding: Embedding, layers: LayerRange, head: Head, input_ids: torch.Tensor) -> torch.Tensor:
    """Full bidirectional forward with batch support and fused attention, returning all logits [..., S, V].
    For training and quick checks; decoding uses the pieces above."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    h = embedding(input_ids)
    for block in layers.blocks:
        q, k, v = block.qkv(h, positions, layers.inv_freq)
        h = block.finish(h, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    return torch.matmul(rms_norm(h, head.norm, head.eps), head.weight.t())
