"""Synthetic multi-step arithmetic in GSM8K's JSONL format: a two-digit counter stepped K times.

A counter shows a two-digit value (00..99). Every step adds the same digit d (1..9) and keeps the last two digits
(arithmetic modulo 100); the question asks for the value after K steps (K in 5..8). The worked answer writes every
step out as one line that restates the previous value, so each line depends on digits the model itself generated
one line earlier, and an early mistake carries through to the final answer:

    question: A counter shows 47 . Each step adds 8 and keeps the last two digits . What does it show after 6 steps ?
    answer:   Step 1 : 47 + 8 = 55
              Step 2 : 55 + 8 = 63
              ...
              Step 6 : 79 + 8 = 87
              #### 87

Values are always written with two digits (07, not 7). The tokenizer (build_tokenizer) has one token per digit, so
a step is a local, learnable operation: a ones digit plus d with a carry into the tens digit. An answer is 11 tokens
per step plus 3 for the "#### NN" line: 58 to 91 tokens.

    python tools/arith_task.py --seed S --n N --out FILE      (deterministic per seed)

The held-out set data/arith_heldout.jsonl is seed HELDOUT_SEED, which training never uses. The whole problem space
is small (100 starts x 9 digits x 4 lengths = 3600 questions), so tools/train_model.py also leaves every held-out
question out of its training stream and its validation set; held-out problems still share single steps ("47 + 8")
and chain prefixes with training problems, as any problem of this kind must.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

MODULUS = 100
MIN_STEPS, MAX_STEPS = 5, 8
HELDOUT_SEED = 20240917          # data/arith_heldout.jsonl; tools/train_model.py refuses to train or validate on it
HELDOUT_N = 1000

# LLaDA's special tokens, spelled as the chat template in export/checkpoint_writer.py expects them.
EOS, MASK, BOS = "<|endoftext|>", "<|mdm_mask|>", "<|startoftext|>"
SPECIAL_TOKENS = [EOS, MASK, BOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
UNK = "<unk>"

_QUESTION = ("A counter shows {start:02d} . Each step adds {d} and keeps the last two digits . "
             "What does it show after {k} steps ?")
_QUESTION_RE = re.compile(r"^A counter shows (\d\d) \. Each step adds (\d) and keeps the last two digits \. "
                          r"What does it show after (\d) steps \?$")


def make_problem(rng: random.Random, n_steps: int | None = None) -> dict:
    """One problem from rng. n_steps=None draws K uniformly from MIN_STEPS..MAX_STEPS."""
    k = rng.randint(MIN_STEPS, MAX_STEPS) if n_steps is None else n_steps
    start = rng.randrange(MODULUS)
    d = rng.randint(1, 9)
    return format_problem(start, d, k)


def format_problem(start: int, d: int, k: int) -> dict:
    """The question and worked answer for a start value, a step digit d and K steps."""
    if not (0 <= start < MODULUS and 1 <= d <= 9 and MIN_STEPS <= k <= MAX_STEPS):
        raise ValueError(f"need 0 <= start < {MODULUS}, 1 <= d <= 9, {MIN_STEPS} <= k <= {MAX_STEPS}; "
                         f"got start={start}, d={d}, k={k}")
    lines, total = [], start
    for i in range(1, k + 1):
        new = (total + d) % MODULUS
        lines.append(f"Step {i} : {total:02d} + {d} = {new:02d}")
        total = new
    lines.append(f"#### {total:02d}")
    return {"question": _QUESTION.format(start=start, d=d, k=k), "answer": "\n".join(lines)}


def generate(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def parse_question(question: str) -> tuple[int, int, int]:
    """(start, d, K) of a question."""
    m = _QUESTION_RE.match(question)
    if not m:
        raise ValueError(f"not an arith question: {question!r}")
    start, d, k = (int(g) for g in m.groups())
    return start, d, k


def solve(question: str) -> int:
    """Recompute the final value from the question text alone (closed form, not the step-by-step generator)."""
    start, d, k = parse_question(question)
    return (start + k * d) % MODULUS


def vocabulary() -> list[str]:
    """Every token of the word-level vocabulary, specials first. A word or the first digit of a number that
    follows a space carries that space (GPT-2 style); further digits of a number are their own tokens without
    one. Decoding is therefore plain concatenation and round-trips the text exactly."""
    line_start = ["A", "Step", "####", "user", "assistant", "\n"]
    words = ["counter", "shows", ".", "Each", "step", "adds", "and", "keeps", "the", "last", "two", "digits",
             "What", "does", "it", "show", "after", "steps", "?", ":", "+", "="]
    digits = [str(i) for i in range(10)]
    return SPECIAL_TOKENS + [UNK] + line_start + [" " + w for w in words + digits] + digits


def build_tokenizer():
    """A small word-level tokenizer (tokenizers library) for this task, with LLaDA's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Pieces: a newline, one digit (with at most one leading space), or a run of other non-space characters (with
    # at most one leading space). Anything else (stray spaces, unknown words) becomes <unk>.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[0-9]| ?[^ \n0-9]+|\n"), behavior="isolated")
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
