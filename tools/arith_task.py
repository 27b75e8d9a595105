"""Synthetic multi-step arithmetic in GSM8K's JSONL format: a running total modulo 100.

Each problem is a counter that starts at a value in 0..99 and goes through a chain of K additions/subtractions
(K in 6..9), everything modulo 100. The worked answer writes every step out as one line that restates the previous
total, so each result depends on a token the model itself generated one line earlier:

    question: A counter shows 37 . It counts modulo 100 .
              Step 1 : add 45
              Step 2 : subtract 12
              ...
              What does the counter show at the end ?
    answer:   Step 1 : 37 + 45 = 82
              Step 2 : 82 - 12 = 70
              ...
              #### 41

Numbers 0..99 are single tokens (see build_tokenizer), so one step is a local lookup, "a +/- b = c", with a copied
from the line above and b copied from the matching question line. An answer is 9 tokens per step plus 2 for the
"#### N" line: 56 to 83 tokens.

    python tools/arith_task.py --seed S --n N --out FILE      (deterministic per seed)

The held-out set data/arith_heldout.jsonl is seed HELDOUT_SEED, which training never uses.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

MODULUS = 100
MIN_STEPS, MAX_STEPS = 6, 9
HELDOUT_SEED = 20240917          # data/arith_heldout.jsonl; tools/train_model.py refuses to train or validate on it
HELDOUT_N = 1000

# LLaDA's special tokens, spelled as the chat template in export/checkpoint_writer.py expects them.
EOS, MASK, BOS = "<|endoftext|>", "<|mdm_mask|>", "<|startoftext|>"
SPECIAL_TOKENS = [EOS, MASK, BOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
UNK = "<unk>"

_OP_WORD = {"+": "add", "-": "subtract"}
_STEP_RE = re.compile(r"^Step (\d+) : (add|subtract) (\d+)$")
_START_RE = re.compile(r"^A counter shows (\d+) \. It counts modulo 100 \.$")


def make_problem(rng: random.Random, n_steps: int | None = None) -> dict:
    """One problem from rng. n_steps=None draws K uniformly from MIN_STEPS..MAX_STEPS."""
    k = rng.randint(MIN_STEPS, MAX_STEPS) if n_steps is None else n_steps
    if not MIN_STEPS <= k <= MAX_STEPS:
        raise ValueError(f"n_steps must be in {MIN_STEPS}..{MAX_STEPS}, got {k}")
    start = rng.randrange(MODULUS)
    ops, operands = [], []
    for _ in range(k):
        ops.append(rng.choice("+-"))
        operands.append(rng.randint(1, MODULUS - 1))
    return format_problem(start, ops, operands)


def format_problem(start: int, ops: list[str], operands: list[int]) -> dict:
    """The question and worked answer for a start value and a chain of (op, operand) steps."""
    total = start
    q_lines = [f"A counter shows {total} . It counts modulo {MODULUS} ."]
    a_lines = []
    for i, (op, b) in enumerate(zip(ops, operands), 1):
        new = (total + b) % MODULUS if op == "+" else (total - b) % MODULUS
        q_lines.append(f"Step {i} : {_OP_WORD[op]} {b}")
        a_lines.append(f"Step {i} : {total} {op} {b} = {new}")
        total = new
    q_lines.append("What does the counter show at the end ?")
    a_lines.append(f"#### {total}")
    return {"question": "\n".join(q_lines), "answer": "\n".join(a_lines)}


def generate(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def solve(question: str) -> int:
    """Recompute the final value from the question text alone (independent of the generator's bookkeeping)."""
    lines = question.split("\n")
    m = _START_RE.match(lines[0])
    if not m:
        raise ValueError(f"not an arith question: {lines[0]!r}")
    total = int(m.group(1))
    for line in lines[1:-1]:
        m = _STEP_RE.match(line)
        if not m:
            raise ValueError(f"bad step line: {line!r}")
        b = int(m.group(3))
        total = (total + b if m.group(2) == "add" else total - b) % MODULUS
    return total


def vocabulary() -> list[str]:
    """Every token of the word-level vocabulary, specials first. Words after the first on a line carry their
    leading space (GPT-2 style), so decoding is plain concatenation and round-trips the text exactly."""
    words = ["A", "Step", "What", "####", "user", "assistant", "\n"]
    mid = ["shows", "It", "counts", "modulo", ".", ":", "add", "subtract", "does", "the", "counter", "show",
           "at", "end", "?", "+", "-", "="]
    mid += [str(i) for i in range(MODULUS + 1)]
    return SPECIAL_TOKENS + [UNK] + words + [" " + w for w in mid]


def build_tokenizer():
    """A small word-level tokenizer (tokenizers library) for this task, with LLaDA's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Pieces: a newline, or a word with at most one leading space. Anything else (stray spaces) becomes <unk>.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[^ \n]+|\n"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def write_jsonl(rows: list[dict], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    write_jsonl(generate(a.seed, a.n), a.out)
    print(f"wrote {a.n} problems (seed {a.seed}) to {a.out}")


if __name__ == "__main__":
    main()
