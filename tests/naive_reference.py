"""A deliberately simple, independent re-implementation of LLaDA and its samplers, used as a test oracle.

Nothing here imports the production model, decoders or policies; only the config and checkpoint reader are
used to load weights. Everything is float32, batch size 1, greedy (temperature 0), written as plain loops.

Shared conventions (must match the production code token for token):
- candidate token of a row = argmax over logits[:vocab_size] with the MASK id's logit at -inf (first index on
  exact ties, as torch.argmax); confidence = float32 softmax probability of that token (same masked logits);
- top-k by confidence breaks ties by lower canvas position first;
- threshold rule: every candidate with confidence >= tau; if none qualifies, the single most confident one
  (lowest position on ties).
"""
from __future__ import annotations

import math

import torch

from dllm_trt.runtime.checkpoint import Checkpoint
from dllm_trt.runtime.config import ModelConfig

P = "model.transformer."


# ----------------------------------------------------------------------------------------------- weights

def load_weights(model_dir) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    ckpt = Checkpoint(model_dir)
    keys = list(ckpt.shard_of)
    return ckpt.config, ckpt.read(keys, torch.float32)


# ----------------------------------------------------------------------------------------------- model

def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [H, S, hd]; positions [S] absolute canvas indices."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(positions.to(torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, hd]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def naive_forward(weights: dict[str, torch.Tensor], cfg: ModelConfig, input_ids, query_positions=None,
                  cached_kv=None) -> dict:
    """Forward the canvas `input_ids` (length N).

    query_positions None: every row is computed (plain full forward; cached_kv is ignored).
    Otherwise only the rows at query_positions are computed at every layer; at layer l the keys/values of every
    other canvas position come from cached_kv[l] = (K [H, N, hd], V [H, N, hd]) (post-RoPE), the query rows use
    their freshly computed K/V.

    Returns {"logits": [Sq, embedding_size] float32 of the query rows (in query_positions order),
             "qkv": per layer (q, k, v) each [H, Sq, hd] of the computed rows (post-RoPE for q and k),
             "probs": per layer attention probabilities [H, Sq, N], columns = canvas key positions}.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    n = ids.numel()
    H, hd, eps = cfg.n_heads, cfg.head_dim, cfg.rms_norm_eps
    if query_positions is None:
        qpos = torch.arange(n)
        cached_kv = None
    else:
        qpos = torch.as_tensor(query_positions, dtype=torch.long).reshape(-1)
        if cached_kv is None and not torch.equal(torch.sort(qpos).values, torch.arange(n)):
            raise ValueError("query rows that do not cover the canvas need cached_kv")
    sq = qpos.numel()

    h = weights[P + "wte.weight"].to(torch.float32)[ids[qpos]]  # [Sq, D]
    qkv, probs_all = [], []
    for l in range(cfg.n_layers):
        w = lambda name: weights[f"{P}blocks.{l}.{name}.weight"].to(torch.float32)  # noqa: E731
        x = _rms_norm(h, w("attn_norm"), eps)
        q = (x @ w("q_proj").T).reshape(sq, H, hd).transpose(0, 1)  # [H, Sq, hd]
        k = (x @ w("k_proj").T).reshape(sq, H, hd).transpose(0, 1)
        v = (x @ w("v_proj").T).reshape(sq, H, hd).transpose(0, 1)
        q = _rope(q, qpos, cfg.rope_theta)
        k = _rope(k, qpos, cfg.rope_theta)
        qkv.append((q, k, v))
        if cached_kv is None:
            K = torch.zeros(H, n, hd)
            V = torch.zeros(H, n, hd)
        else:
            K = cached_kv[l][0].to(torch.float32).clone()
            V = cached_kv[l][1].to(torch.float32).clone()
        K[:, qpos] = k
        V[:, qpos] = v
        scores = (q @ K.transpose(1, 2)) / math.sqrt(hd)  # [H, Sq, N], bidirectional, no mask
        p = torch.softmax(scores, dim=-1)
        probs_all.append(p)
        att = (p @ V).transpose(0, 1).reshape(sq, H * hd)
        h = h + att @ w("attn_out").T
        m = _rms_norm(h, w("ff_norm"), eps)
        h = h + (torch.nn.functional.silu(m @ w("ff_proj").T) * (m @ w("up_proj").T)) @ w("ff_out").T
    hf = _rms_norm(h, weights[P + "ln_f.weight"].to(torch.float32), eps)
    logits = hf @ weights[P + "ff_out.weight"].to(torch.float32).T
    return {"logits": logits, "qkv": qkv, "probs": probs_all}


def full_kv(out: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) [H, N, hd] of a full forward's output (rows in canvas order)."""
    return [(k, v) for (_, k, v) in out["qkv"]]


# ----------------------------------------------------------------------------------------------- decoding rules

def candidates(logits: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [S, >=vocab_size] -> (token [S] long, confidence [S] float32)."""
    lg = logits[:, : cfg.vocab_size].to(torch.float32).clone()
    if cfg.mask_token_id < cfg.vocab_size:
        lg[:, cfg.mask_token_id] = float("-inf")
    p = torch.softmax(lg, dim=-1)
    tok = torch.argmax(lg, dim=-1)
    conf = p.gather(1, tok[:, None])[:, 0]
    return tok, conf


def _ranked(positions, conf) -> list[int]:
    """positions sorted by confidence descending, lower position first on ties."""
    pairs = [(int(pos), float(c)) for pos, c in zip(positions, conf)]
    return [pos for pos, _ in sorted(pairs, key=lambda t: (-t[1], t[0]))]


def select_topk(positions, conf, k: int) -> list[int]:
    """The k most confident positions (ties: lower position first). Returned in ranking order."""
    return _ranked(positions, conf)[:k]


def select_threshold(positions, conf, tau: float) -> list[int]:
    """All positions with confidence >= tau; if none, the single most confident one. Ranking order."""
    ranked = _ranked(positions, conf)
    c = {int(pos): float(x) for pos, x in zip(positions, conf)}
    picked = [pos for pos in ranked if c[pos] >= tau]
    return picked if picked else ranked[:1]


def transfer_counts(mask_count: int, steps: int) -> list[int]:
    """mask_count spread evenly over steps, the remainder going to the first steps (LLaDA's schedule)."""
    base, rem = divmod(mask_count, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _decode(canvas: torch.Tensor, logits_by_pos: dict[int, torch.Tensor], cand_positions: list[int],
            cfg: ModelConfig, rule) -> None:
    """Fill canvas at the positions picked by rule(positions, conf) among cand_positions."""
    if not cand_positions:
        return
    lg = torch.stack([logits_by_pos[p] for p in cand_positions])
    tok, conf = candidates(lg, cfg)
    chosen = rule(cand_positions, conf)
    by_pos = dict(zip(cand_positions, tok.tolist()))
    for p in chosen:
        canvas[p] = by_pos[p]


def _canvas(prompt_ids, gen_length: int, cfg: ModelConfig) -> tuple[torch.Tensor, int]:
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    canvas = torch.cat([prompt, torch.full((gen_length,), cfg.mask_token_id, dtype=torch.long)])
    return canvas, prompt.numel()


def _masked(canvas: torch.Tensor, a: int, b: int, cfg: ModelConfig) -> list[int]:
    return [p for p in range(a, b) if int(canvas[p]) == cfg.mask_token_id]


# ----------------------------------------------------------------------------------------------- samplers

def naive_llada_generate(weights, cfg: ModelConfig, prompt_ids, gen_length: int, block_length: int,
                         steps: int) -> list[int]:
    """LLaDA's original sampler (low-confidence remasking, greedy). Returns the gen_length canvas tail."""
    assert gen_length % block_length == 0, "gen_length must be a multiple of block_length"
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0, "steps must be a multiple of the number of blocks"
    steps_per_block = steps // num_blocks
    canvas, plen = _canvas(prompt_ids, gen_length, cfg)
    for b in range(num_blocks):
        a, e = plen + b * block_length, plen + (b + 1) * block_length
        counts = transfer_counts(len(_masked(canvas, a, e, cfg)), steps_per_block)
        for k in counts:
            logits = naive_forward(weights, cfg, canvas)["logits"]
            cand = _masked(canvas, a, e, cfg)
            _decode(canvas, {p: logits[p] for p in cand}, cand, cfg, lambda pos, c: select_topk(pos, c, k))
    return canvas[plen:].tolist()


def naive_fastdllm_generate(weights, cfg: ModelConfig, prompt_ids, gen_length: int, block_length: int,
                            threshold: float, cache: str) -> tuple[list[int], int]:
    """Fast-dLLM v1 (threshold parallel decoding) with a prefix or dual K/V cache.

    Returns (the gen_length canvas tail, number of forward passes)."""
    assert cache in ("prefix", "dual")
    assert gen_length % block_length == 0, "gen_length must be a multiple of block_length"
    canvas, plen = _canvas(prompt_ids, gen_length, cfg)
    n = canvas.numel()
    rule = lambda pos, c: select_threshold(pos, c, threshold)  # noqa: E731
    nfe = 0
    for b in range(gen_length // block_length):
        a, e = plen + b * block_length, plen + (b + 1) * block_length
        out = naive_forward(weights, cfg, canvas)
        nfe += 1
        kv = full_kv(out)  # stored cache: rebuilt only here, at the block start
        cand = _masked(canvas, a, e, cfg)
        _decode(canvas, {p: out["logits"][p] for p in cand}, cand, cfg, rule)
        while _masked(canvas, a, e, cfg):
            qpos = list(range(a, n)) if cache == "prefix" else list(range(a, e))
            out = naive_forward(weights, cfg, canvas, query_positions=qpos, cached_kv=kv)
            nfe += 1
            row = {p: out["logits"][i] for i, p in enumerate(qpos)}
            cand = _masked(canvas, a, e, cfg)
            _decode(canvas, row, cand, cfg, rule)
    return canvas[plen:].tolist(), nfe
