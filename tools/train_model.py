#!/usr/bin/env python3
"""Train the project's default model: a small LLaDA-architecture masked diffusion model on tools/arith_task.py.

Objective (LLaDA's SFT recipe): per sequence draw t ~ U(0, 1) and mask each answer-region token independently with
probability p = (1 - eps) t + eps; prompt tokens are never masked. The answer region is the worked answer followed
by EOS padding up to the generation length (128), so the padding is part of what the model learns and can be
masked. Loss: cross-entropy on masked positions weighted by 1/p, summed per sequence, divided by the answer-region
length, averaged over the batch. The prompt is the checkpoint's chat template applied to the question.

Evaluation is LLaDA's sampler: gen length 128, one token per step (128 steps), block length 32, greedy, low-
confidence remasking (argmax over the vocabulary with MASK excluded, confidence = its softmax probability; each
step commits the most confident still-masked position of the current block). The answer is scored with
dllm_trt.evaluate.scoring (GSM8K's '#### N' rule).

Training stops at the first validation (seed --val-seed, never the held-out seed) whose exact match reaches
--stop-at, or when the step budget / time budget runs out. The saved weights are those of the evaluation with the
best validation accuracy not above --max-acc (a model that aces the task could not show accuracy loss).

    python tools/train_model.py                  # auto device; writes models/arith and docs/training/
    python tools/train_model.py --steps 3000     # fixed schedule (the step count TRAINING.json records)
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import arith_task as task  # noqa: E402

from dllm_trt.export.checkpoint_writer import CHAT_TEMPLATE, write_checkpoint  # noqa: E402
from dllm_trt.runtime.checkpoint import PREFIX, Checkpoint  # noqa: E402
from dllm_trt.runtime.config import ModelConfig  # noqa: E402
from dllm_trt.runtime.model_torch import Embedding, Head, LayerRange, dense_logits  # noqa: E402
from dllm_trt.evaluate.scoring import is_correct  # noqa: E402

GEN_LEN, BLOCK_LEN = 128, 32
MASK_EPS = 1e-3
MAX_SEQ_LEN = 256

# Sizes per device. "cpu" fits the whole run (training loop 55 min + the 1000-problem evaluation, about 20 min) in
# well under 90 minutes on one core of this machine's two.
PRESETS = {
    "gpu": dict(d_model=256, n_heads=8, n_layers=6, mlp_hidden=768, batch=256, lr=1.5e-3, warmup=300,
                time_budget=400.0, eval_every=500, n_val=512, eval_batch=512),
    "cpu": dict(d_model=128, n_heads=4, n_layers=6, mlp_hidden=384, batch=32, lr=2e-3, warmup=100,
                time_budget=3300.0, eval_every=500, n_val=32, eval_batch=64),
}


# ----------------------------------------------------------------------------------------------- text and ids
def render_prompt(question: str) -> str:
    """The chat template of the checkpoint (export/checkpoint_writer.py) applied to one user turn."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(CHAT_TEMPLATE).render(
        bos_token=task.BOS, messages=[{"role": "user", "content": question}], add_generation_prompt=True)
    expect = (f"{task.BOS}<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert text == expect, (text, expect)
    return text


class Ids:
    """Token ids of the task and a vectorised batch builder equivalent to tokenising task.format_problem()."""

    def __init__(self, tok):
        v = tok.get_vocab()
        self.tok, self.vocab_size, self.v = tok, tok.get_vocab_size(), v
        self.eos, self.mask = v[task.EOS], v[task.MASK]
        self.spaced = torch.tensor([v[f" {i}"] for i in range(10)])     # first digit of a number
        self.plain = torch.tensor([v[str(i)] for i in range(10)])        # following digits
        self.templates = {k: self._template(k) for k in range(task.MIN_STEPS, task.MAX_STEPS + 1)}
        plens = {t["plen"] for t in self.templates.values()}
        assert len(plens) == 1, "the prompt length must not depend on K"
        self.plen = plens.pop()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def prompt_ids(self, question: str) -> list[int]:
        return self.encode(render_prompt(question))

    def sequence_ids(self, problem: dict) -> tuple[list[int], int]:
        """Prompt + answer + EOS padding to GEN_LEN; returns (ids, prompt length)."""
        p, a = self.prompt_ids(problem["question"]), self.encode(problem["answer"])
        assert len(a) <= GEN_LEN
        return p + a + [self.eos] * (GEN_LEN - len(a)), len(p)

    def _template(self, k: int) -> dict:
        ids, plen = self.sequence_ids(task.format_problem(0, 1, k))
        v = self.v
        steps = torch.tensor([i for i in range(plen, len(ids)) if ids[i] == v["Step"]])
        hashes = ids.index(v["####"])
        assert len(steps) == k
        shows, adds = ids.index(v[" shows"]), ids.index(v[" adds"])
        result = torch.zeros(GEN_LEN, dtype=torch.bool)      # answer-region positions of computed digits
        for pos in (steps + 8, steps + 9, torch.tensor([hashes + 1, hashes + 2])):
            result[pos - plen] = True
        return dict(ids=torch.tensor(ids), plen=plen, result=result, s_t=shows + 1, s_o=shows + 2, q_d=adds + 1,
                    x_t=steps + 3, x_o=steps + 4, a_d=steps + 6, y_t=steps + 8, y_o=steps + 9,
                    f_t=hashes + 1, f_o=hashes + 2)

    def batch_k(self, k: int, start: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids [B, S] and result mask [B, GEN_LEN] for problems (start [B], step digit d [B]) of K = k steps."""
        t = self.templates[k]
        y = (start[:, None] + d[:, None] * torch.arange(1, k + 1)) % task.MODULUS
        x = torch.cat([start[:, None], y[:, :-1]], 1)
        sp, pl = self.spaced, self.plain
        ids = t["ids"].repeat(start.shape[0], 1)
        ids[:, t["s_t"]], ids[:, t["s_o"]], ids[:, t["q_d"]] = sp[start // 10], pl[start % 10], sp[d]
        ids[:, t["x_t"]], ids[:, t["x_o"]] = sp[x // 10], pl[x % 10]
        ids[:, t["a_d"]] = sp[d][:, None].expand(-1, k)
        ids[:, t["y_t"]], ids[:, t["y_o"]] = sp[y // 10], pl[y % 10]
        ids[:, t["f_t"]], ids[:, t["f_o"]] = sp[y[:, -1] // 10], pl[y[:, -1] % 10]
        return ids, t["result"].expand(start.shape[0], -1)

    def batch(self, k: torch.Tensor, start: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of mixed K (all prompts have the same length): ids [B, plen + GEN_LEN], result mask [B, GEN_LEN]."""
        ids = torch.empty(len(k), self.plen + GEN_LEN, dtype=torch.long)
        res = torch.empty(len(k), GEN_LEN, dtype=torch.bool)
        for kk in range(task.MIN_STEPS, task.MAX_STEPS + 1):
            rows = (k == kk).nonzero().flatten()
            if len(rows):
                ids[rows], res[rows] = self.batch_k(kk, start[rows], d[rows])
        return ids, res

    def self_check(self, seed: int = 0, n: int = 64) -> None:
        """The vectorised builder must agree with tokenising the generator's text (chat template included)."""
        g = torch.Generator().manual_seed(seed)
        k = torch.randint(task.MIN_STEPS, task.MAX_STEPS + 1, (n,), generator=g)
        start, d = torch.randint(0, 100, (n,), generator=g), torch.randint(1, 10, (n,), generator=g)
        ids, _ = self.batch(k, start, d)
        for r in range(n):
            want, plen = self.sequence_ids(task.format_problem(int(start[r]), int(d[r]), int(k[r])))
            assert plen == self.plen and ids[r].tolist() == want, "batch builder disagrees with the tokenizer"


def problem_code(k, start, d):
    """One integer per (K, start, d): the identity of a question."""
    return (k * task.MODULUS + start) * 10 + d


class Stream:
    """The training data: an endless, seeded stream of batches drawn on the CPU (device-independent), with the
    same distribution as task.make_problem (K, start value and step digit uniform) except that the questions in
    `excluded` (the held-out set) are redrawn, so training never sees a held-out question."""

    def __init__(self, ids: Ids, seed: int, batch: int, excluded: list[dict]):
        self.ids, self.batch = ids, batch
        self.g = torch.Generator().manual_seed(seed)
        self.banned = torch.zeros(int(problem_code(task.MAX_STEPS + 1, 0, 0)), dtype=torch.bool)
        for p in excluded:
            start, d, k = task.parse_question(p["question"])
            self.banned[problem_code(k, start, d)] = True

    def next(self):
        B, g = self.batch, self.g
        k = torch.randint(task.MIN_STEPS, task.MAX_STEPS + 1, (B,), generator=g)
        start = torch.randint(0, task.MODULUS, (B,), generator=g)
        d = torch.randint(1, 10, (B,), generator=g)
        while True:
            bad = self.banned[problem_code(k, start, d)].nonzero().flatten()
            if not len(bad):
                break
            n = len(bad)
            k[bad] = torch.randint(task.MIN_STEPS, task.MAX_STEPS + 1, (n,), generator=g)
            start[bad] = torch.randint(0, task.MODULUS, (n,), generator=g)
            d[bad] = torch.randint(1, 10, (n,), generator=g)
        ids, result = self.ids.batch(k, start, d)
        t = torch.rand(B, 1, generator=g)
        u = torch.rand(B, GEN_LEN, generator=g)
        return ids, self.ids.plen, t, u, result


# ---------------------------------------------------------------------------------------------------- model
class LLaDA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.emb, self.layers, self.head = Embedding(cfg), LayerRange(cfg, 0, cfg.n_layers), Head(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dense_logits(self.emb, self.layers, self.head, input_ids)

    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(self.emb.weight.shape, generator=g) * std)
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * std)
            for blk in self.layers.blocks:
                for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
                    lin = getattr(blk, name)
                    s = out_std if name in ("attn_out", "ff_out") else std
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * s)

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        w = {PREFIX + "wte.weight": self.emb.weight, PREFIX + "ln_f.weight": self.head.norm,
             PREFIX + "ff_out.weight": self.head.weight}
        for i, blk in enumerate(self.layers.blocks):
            w[f"{PREFIX}blocks.{i}.attn_norm.weight"] = blk.attn_norm
            w[f"{PREFIX}blocks.{i}.ff_norm.weight"] = blk.ff_norm
            for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
                w[f"{PREFIX}blocks.{i}.{name}.weight"] = getattr(blk, name).weight
        return {k: v.detach().float().cpu().clone().contiguous() for k, v in w.items()}


def diffusion_loss(model, ids, plen, t, u, result, mask_id):
    """LLaDA SFT loss for one batch; t [B, 1] and u [B, G] are the uniform draws (masking ratio, per token).
    Also returns the number of masked tokens predicted right and masked, overall and at `result` positions
    (the computed numbers, [G] bool): the part of the answer that needs arithmetic."""
    p = (1 - MASK_EPS) * t + MASK_EPS
    masked = u < p
    answer = ids[:, plen:]
    noisy = torch.cat([ids[:, :plen], torch.where(masked, mask_id, answer)], 1)
    logits = model(noisy)[:, plen:].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answer.reshape(-1), reduction="none")
    ce = ce.view_as(answer)
    loss = (ce * masked / p).sum() / answer.numel()
    with torch.no_grad():
        hit = (logits.argmax(-1) == answer) & masked
        masked_res = masked & result
        stats = torch.stack([hit.sum(), masked.sum(), (hit & result).sum(), masked_res.sum()]).float()
    return loss, stats


# ---------------------------------------------------------------------------------------------------- sampler
@torch.no_grad()
def llada_generate(model, prompt: torch.Tensor, mask_id: int, autocast) -> torch.Tensor:
    """LLaDA's sampler, batched (all prompts of equal length): returns the GEN_LEN generated ids [B, GEN_LEN]."""
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, GEN_LEN), mask_id, dtype=prompt.dtype, device=prompt.device)], 1)
    rows = torch.arange(B, device=x.device)
    for lo in range(P, P + GEN_LEN, BLOCK_LEN):
        for _ in range(BLOCK_LEN):          # steps per block = 128 steps * 32 / 128: one token per step
            with autocast():
                logits = model(x)[:, lo:lo + BLOCK_LEN].float()
            logits[..., mask_id] = -math.inf
            conf, pred = torch.softmax(logits, -1).max(-1)
            conf = torch.where(x[:, lo:lo + BLOCK_LEN] == mask_id, conf, -math.inf)
            j = conf.argmax(-1)
            x[rows, lo + j] = pred[rows, j]
    return x[:, P:]


def evaluate(model, ids: Ids, problems: list[dict], device, batch: int, autocast) -> tuple[float, list[str]]:
    """Exact match (GSM8K rule) of LLaDA-sampled answers; returns (accuracy, decoded outputs in input order)."""
    was_training = model.training
    model.eval()
    by_len: dict[int, list[int]] = {}
    prompts = [ids.prompt_ids(p["question"]) for p in problems]
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    outputs: list[str] = [""] * len(problems)
    for idx in by_len.values():
        for s in range(0, len(idx), batch):
            chunk = idx[s:s + batch]
            prompt = torch.tensor([prompts[i] for i in chunk], device=device)
            gen = llada_generate(model, prompt, ids.mask, autocast).tolist()
            for i, text in zip(chunk, ids.tok.decode_batch(gen, skip_special_tokens=True)):
                outputs[i] = text
    model.train(was_training)
    correct = sum(is_correct(o, p["answer"]) for o, p in zip(outputs, problems))
    return correct / len(problems), outputs


# ---------------------------------------------------------------------------------------------------- main
class Log:
    def __init__(self, path: Path | None):
        self.f = open(path, "w") if path else None

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        if self.f:
            self.f.write(msg + "\n")
            self.f.flush()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plot_curve(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    tr = [r for r in rows if r["train_loss"] != ""]
    ax[0].plot([r["step"] for r in tr], [r["train_loss"] for r in tr], lw=1)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("masked-diffusion loss (train)")
    ax[0].grid(alpha=0.3)
    ev = [r for r in rows if r["val_exact_match"] != ""]
    ax[1].plot([r["step"] for r in ev], [100 * r["val_exact_match"] for r in ev], marker="o", ms=3,
               label="validation exact match (LLaDA sampler, gen 128, block 32)")
    ax[1].plot([r["step"] for r in tr], [100 * r["masked_result_acc"] for r in tr], lw=1, alpha=0.7,
               label="train: masked result-token accuracy")
    ax[1].legend(fontsize=8, loc="lower right")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("%")
    ax[1].set_ylim(0, 100)
    ax[1].grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="training seed (model init, data stream, masking)")
    ap.add_argument("--val-seed", type=int, default=1, help="seed of the validation problems (early stopping)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    ap.add_argument("--preset", default="auto", choices=["auto", "gpu", "cpu"])
    ap.add_argument("--steps", type=int, default=None,
                    help="total steps of the LR schedule; default: fitted to --time-budget after timing 30 steps")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the training loop (evals included)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--n-heads", type=int, default=None)
    ap.add_argument("--mlp-hidden", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--n-val", type=int, default=None)
    ap.add_argument("--eval-batch", type=int, default=None)
    ap.add_argument("--stop-at", type=float, default=0.90, help="stop at the first validation exact match >= this")
    ap.add_argument("--max-acc", type=float, default=0.97, help="never keep weights whose validation exceeds this")
    ap.add_argument("--heldout", default=str(REPO / "data" / "arith_heldout.jsonl"))
    ap.add_argument("--n-heldout", type=int, default=None, help="evaluate only the first N held-out problems")
    ap.add_argument("--out-model", default=str(REPO / "models" / "arith"))
    ap.add_argument("--out-docs", default=str(REPO / "docs" / "training"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 on CPU, where the cores are shared; 0: torch's default)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--state-out", default=None, help="also torch.save the kept state dict here, before evaluation")
    a = ap.parse_args(argv)

    t_start = time.time()
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    threads = a.threads if a.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    preset_name = a.preset if a.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    hp = dict(PRESETS[preset_name])
    for key in ("batch", "lr", "d_model", "n_layers", "n_heads", "mlp_hidden", "eval_every", "n_val",
                "eval_batch", "time_budget"):
        if getattr(a, key) is not None:
            hp[key] = getattr(a, key)
    if task.HELDOUT_SEED in (a.seed, a.val_seed):
        raise SystemExit(f"seed {task.HELDOUT_SEED} is the held-out seed: never train or validate on it")

    out_model, out_docs = Path(a.out_model), Path(a.out_docs)
    out_docs.mkdir(parents=True, exist_ok=True)
    log = Log(out_docs / "arith_train.log")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    log(f"device {dev_name}; torch {torch.__version__}; preset {preset_name}; hyperparameters {hp}")
    fp32 = contextlib.nullcontext
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        train_autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        train_autocast = fp32

    tok = task.build_tokenizer()
    ids = Ids(tok)
    ids.self_check(seed=a.seed)
    cfg = ModelConfig(d_model=hp["d_model"], n_heads=hp["n_heads"], n_layers=hp["n_layers"],
                      mlp_hidden_size=hp["mlp_hidden"], vocab_size=ids.vocab_size, embedding_size=ids.vocab_size,
                      mask_token_id=ids.mask, eos_token_id=ids.eos, max_sequence_length=MAX_SEQ_LEN,
                      rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(a.seed)
    model = LLaDA(cfg)
    model.init_weights(a.seed)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"config {cfg.to_dict()}; {n_params / 1e6:.2f}M parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(0.9, 0.98), eps=1e-8,
                            **({"fused": True} if device.type == "cuda" else {}))

    heldout_all = task.read_jsonl(a.heldout) if Path(a.heldout).is_file() else \
        task.generate(task.HELDOUT_SEED, task.HELDOUT_N)
    heldout = heldout_all[:a.n_heldout] if a.n_heldout else heldout_all
    held_q = {p["question"] for p in heldout_all}
    val = [p for p in task.generate(a.val_seed, 20 * hp["n_val"]) if p["question"] not in held_q][:hp["n_val"]]
    assert len(val) == hp["n_val"]

    stream = Stream(ids, a.seed, hp["batch"], heldout_all)
    total_steps = a.steps
    rows: list[dict] = []
    best = None  # (val_acc, step, state dict on CPU)
    t_loop = time.time()
    eval_time = 0.0

    def run_eval(step: int) -> float:
        nonlocal best, eval_time
        t0 = time.time()
        acc, outs = evaluate(model, ids, val, device, hp["eval_batch"], train_autocast)
        eval_time += time.time() - t0
        if acc <= a.max_acc and (best is None or acc >= best[0]):
            best = (acc, step, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        log(f"step {step:6d}  val exact match {acc:.4f} ({len(val)} problems, {time.time() - t0:.1f}s)  "
            f"sample: {outs[0][-60:]!r}")
        return acc

    if device.type == "cuda":   # warm the kernels up so that the timed evaluation below is representative
        evaluate(model, ids, val[:8], device, hp["eval_batch"], train_autocast)
    acc = run_eval(0)
    rows.append(dict(step=0, elapsed_s=round(time.time() - t_loop, 1), lr=0.0, train_loss="", masked_token_acc="",
                     masked_result_acc="", val_exact_match=acc))
    step, stop_reason, last_acc = 0, None, acc
    loss_sum = torch.zeros((), device=device)
    stat_sum = torch.zeros(4, device=device)
    n_in_window = 0
    t_calib = None
    while True:
        if total_steps is None and step == 10:
            t_calib = time.time()
        if total_steps is None and step == 40:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_calib) / 30
            per_eval = eval_time  # one evaluation so far
            left = hp["time_budget"] - (time.time() - t_loop)
            # evaluations come every eval_every steps, later every eval_every / 2: count them as every 2/3 of it
            total_steps = max(200, int(40 + left / (per_step + per_eval / (hp["eval_every"] * 2 / 3))))
            log(f"timing: {per_step * 1000:.1f} ms/step, {per_eval:.1f} s/eval -> schedule of {total_steps} steps")
        sched_steps = total_steps or 10 ** 9
        lr = hp["lr"] * min(1.0, (step + 1) / hp["warmup"])
        if step >= hp["warmup"] and total_steps:
            prog = min(1.0, (step - hp["warmup"]) / max(1, total_steps - hp["warmup"]))
            lr = hp["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))
        for group in opt.param_groups:
            group["lr"] = lr
        bid, plen, t, u, res = stream.next()
        bid, t, u, res = (x.to(device, non_blocking=True) for x in (bid, t, u, res))
        with train_autocast():
            loss, stats = diffusion_loss(model, bid, plen, t, u, res, ids.mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_sum += loss.detach()
        stat_sum += stats
        n_in_window += 1
        # Validate every eval_every steps, twice as often once the model is within reach of --stop-at.
        every = hp["eval_every"] if last_acc < 0.4 else max(1, hp["eval_every"] // 2)
        do_eval = step % every == 0 or step >= sched_steps
        if step % a.log_every == 0 or do_eval:
            tl = (loss_sum / n_in_window).item()
            st = stat_sum.tolist()
            ta, ra = st[0] / max(st[1], 1), st[2] / max(st[3], 1)
            row = dict(step=step, elapsed_s=round(time.time() - t_loop, 1), lr=lr, train_loss=round(tl, 5),
                       masked_token_acc=round(ta, 5), masked_result_acc=round(ra, 5), val_exact_match="")
            log(f"step {step:6d}  loss {tl:.4f}  masked-token acc {ta:.4f}  masked-result acc {ra:.4f}  "
                f"lr {lr:.2e}  {row['elapsed_s']:.0f}s")
            loss_sum.zero_(), stat_sum.zero_()
            n_in_window = 0
            if do_eval:
                row["val_exact_match"] = last_acc = run_eval(step)
            rows.append(row)
            if do_eval and row["val_exact_match"] >= a.stop_at:
                stop_reason = f"validation exact match {row['val_exact_match']:.4f} >= {a.stop_at}"
            elif step >= sched_steps:
                stop_reason = f"schedule of {total_steps} steps done"
            elif time.time() - t_loop > hp["time_budget"] * 1.05:
                stop_reason = "time budget exhausted"
                if not do_eval:
                    row["val_exact_match"] = run_eval(step)
            if stop_reason:
                break
    train_wall = time.time() - t_loop
    log(f"stopped after {step} steps ({stop_reason}); training loop {train_wall:.0f}s")

    if best is None:
        raise SystemExit("no evaluation at or below --max-acc: nothing to save")
    val_acc, best_step, state = best
    model.load_state_dict(state)
    if a.state_out:
        torch.save({"config": cfg.to_dict(), "step": best_step, "val_acc": val_acc, "state_dict": state}, a.state_out)
    log(f"keeping the weights of step {best_step} (validation exact match {val_acc:.4f})")

    # Final held-out evaluation in float32 (TF32 off): what the exported fp32 checkpoint computes.
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    held_acc, held_out = evaluate(model, ids, heldout, device, hp["eval_batch"], fp32)
    log(f"held-out exact match {held_acc:.4f} on {len(heldout)} problems (float32, {time.time() - t0:.0f}s)")
    for i in range(min(3, len(heldout))):
        log(f"--- held-out #{i}: gold {heldout[i]['answer'].rsplit('####', 1)[1].strip()}, "
            f"{'correct' if is_correct(held_out[i], heldout[i]['answer']) else 'WRONG'}\n{held_out[i]}")

    # Save, then reload through the project's own loader and compare logits.
    weights = model.checkpoint_weights()
    write_checkpoint(out_model, cfg, weights, tok, shards=1)
    # The answers are trained at this length; longer canvases leave the model in positions it never saw.
    (Path(out_model) / "generation_config.json").write_text(json.dumps({"max_new_tokens": GEN_LEN}, indent=2) + "\n")
    ckpt = Checkpoint(out_model)
    emb, layers, head = Embedding(ckpt.config).load(ckpt), LayerRange(ckpt.config, 0, cfg.n_layers).load(ckpt), \
        Head(ckpt.config).load(ckpt)
    probe = torch.tensor([ids.sequence_ids(heldout[0])[0]])
    with torch.no_grad():
        ref = model.cpu()(probe)
        got = dense_logits(emb, layers, head, probe)
    diff = (ref - got).abs().max().item()
    assert diff < 1e-4, f"reloaded checkpoint disagrees with the trained model (max |diff| {diff})"
    log(f"checkpoint reloaded through dllm_trt.runtime.checkpoint: max |logit diff| {diff:.2e}")

    with open(out_docs / "arith_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot_curve(rows, out_docs / "arith_curve.png",
               f"LLaDA {n_params / 1e6:.1f}M on arith (running total mod 100), {dev_name}; "
               f"kept step {best_step}, held-out {100 * held_acc:.1f}%")

    files = sorted(p for p in out_model.iterdir() if p.is_file() and p.name != "TRAINING.json")
    record = {
        "task": (f"tools/arith_task.py: two-digit counter stepped by a constant digit modulo 100, "
                 f"{task.MIN_STEPS}-{task.MAX_STEPS} steps, every step written out"),
        "seed": a.seed, "val_seed": a.val_seed, "heldout_seed": task.HELDOUT_SEED,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if argv is None else argv,
        "preset": preset_name, "hyperparameters": {**hp, "warmup": hp["warmup"], "weight_decay": 0.1,
                                                   "betas": [0.9, 0.98], "grad_clip": 1.0, "mask_eps": MASK_EPS,
                                                   "schedule": "linear warmup, cosine to 10% of peak",
                                                   "stop_at": a.stop_at, "max_acc": a.max_acc,
                                                   "train_precision": "bf16 autocast" if device.type == "cuda"
                                                   else "float32"},
        "config": cfg.to_dict(), "n_parameters": n_params,
        "steps_scheduled": total_steps, "steps_run": step, "kept_step": best_step, "stop_reason": stop_reason,
        "wall_time_s": {"training_loop": round(train_wall, 1), "evaluations_in_loop": round(eval_time, 1),
                        "total": round(time.time() - t_start, 1)},
        "device": dev_name, "torch": torch.__version__,
        "sampler": {"gen_length": GEN_LEN, "steps": GEN_LEN, "block_length": BLOCK_LEN, "greedy": True,
                    "remasking": "low_confidence", "mask_logit_excluded": True},
        "final_metrics": {"heldout_exact_match": held_acc, "heldout_n": len(heldout),
                          "heldout_eval_precision": "float32", "val_exact_match": val_acc, "val_n": len(val),
                          "final_train_loss": rows[-1]["train_loss"]},
        "sha256": {p.name: sha256(p) for p in files},
    }
    (out_model / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out_model.iterdir())
    log(f"wrote {out_model} ({size / 1e6:.1f} MB), {out_docs}/arith_curve.csv/.png; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
