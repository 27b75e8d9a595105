"""The synthetic arithmetic task (tools/arith_task.py) and the GSM8K-style scorer (dllm_trt/evaluate/scoring.py)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_trt.evaluate.scoring import extract_answer, is_correct

REPO = Path(__file__).resolve().parent.parent


def _load_task():
    spec = importlib.util.spec_from_file_location("arith_task", REPO / "tools" / "arith_task.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


task = _load_task()


# ------------------------------------------------------------------------------------------------ generator
def test_deterministic_per_seed():
    assert task.generate(7, 50) == task.generate(7, 50)


def test_seeds_differ():
    a, b = task.generate(7, 50), task.generate(8, 50)
    assert a != b
    assert sum(x == y for x, y in zip(a, b)) < 3


def test_cli_writes_same_file_per_seed(tmp_path):
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        subprocess.run([sys.executable, str(REPO / "tools" / "arith_task.py"), "--seed", "3", "--n", "20",
                        "--out", str(tmp_path / name)], check=True, capture_output=True)
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    rows = [json.loads(line) for line in outs[0].decode().splitlines()]
    assert len(rows) == 20 and all(set(r) == {"question", "answer"} for r in rows)
    assert rows == task.generate(3, 20)


def test_answer_number_equals_recomputed_result():
    for p in task.generate(11, 2000):
        assert int(extract_answer(p["answer"])) == task.solve(p["question"])
        assert is_correct(p["answer"], str(task.solve(p["question"])))      # "#### 07" scores as 7
        assert is_correct(p["answer"], p["answer"])


def test_each_step_restates_previous_total():
    for p in task.generate(12, 300):
        start, d, k = task.parse_question(p["question"])
        lines = p["answer"].split("\n")
        steps, final = lines[:-1], lines[-1]
        assert len(steps) == k and task.MIN_STEPS <= k <= task.MAX_STEPS
        prev = start
        for i, line in enumerate(steps, 1):
            step, idx, colon, x, plus, dd, eq, y = line.split(" ")
            assert (step, int(idx), colon, plus, int(dd), eq) == ("Step", i, ":", "+", d, "=")
            assert x == f"{prev:02d}"                       # restates the value generated one line earlier
            assert y == f"{(prev + d) % task.MODULUS:02d}"
            prev = int(y)
        assert final == f"#### {prev:02d}"


def test_problem_space_and_parse():
    rows = task.generate(14, 3000)
    ks = {task.parse_question(p["question"])[2] for p in rows}
    ds = {task.parse_question(p["question"])[1] for p in rows}
    assert ks == set(range(task.MIN_STEPS, task.MAX_STEPS + 1)) and ds == set(range(1, 10))
    with pytest.raises(ValueError):
        task.parse_question("What is 2 + 2 ?")
    with pytest.raises(ValueError):
        task.format_problem(5, 0, 6)


def test_answers_long_enough_and_tokenizer_round_trips():
    pytest.importorskip("tokenizers")
    tok = task.build_tokenizer()
    unk = tok.token_to_id(task.UNK)
    lengths = []
    for p in task.generate(13, 500):
        for text in (p["question"], p["answer"]):
            enc = tok.encode(text)
            assert unk not in enc.ids
            assert tok.decode(enc.ids) == text
        lengths.append(len(tok.encode(p["answer"]).ids))
    assert min(lengths) >= 48 and max(lengths) <= 128 - 1  # at least one EOS within a 128-token generation
    for name in task.SPECIAL_TOKENS:
        assert tok.token_to_id(name) is not None
        assert tok.encode(name).ids == [tok.token_to_id(name)]
    assert tok.get_vocab_size() < 256


def test_heldout_file_matches_its_seed():
    path = REPO / "data" / "arith_heldout.jsonl"
    if not path.is_file():
        pytest.skip("data/arith_heldout.jsonl not generated")
    rows = task.read_jsonl(path)
    assert len(rows) == task.HELDOUT_N
    assert rows == task.generate(task.HELDOUT_SEED, task.HELDOUT_N)


# ------------------------------------------------------------------------------------------------ scorer
@pytest.mark.parametrize("text,want", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("Total: 2,000,000 dollars\n#### 2,000,000", "2000000"),
    ("#### -5", "-5"),
    ("#### -1,250.75", "-1250.75"),
    ("#### 3.5", "3.5"),
    ("#### 12.", "12"),
    ("####42", "42"),
    ("#### 10\nthen again\n#### 11", "11"),          # the last marker wins
    ("no marker 42", None),
    ("#### ", None),
    ("#### abc", None),
    ("#### ,", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_is_correct():
    gold = "Step 1 : 36 - 25 = 11\n#### 1,011"
    assert is_correct("blah\n#### 1011", gold)
    assert is_correct("#### 1,011.0", gold)
    assert not is_correct("#### 1012", gold)
    assert not is_correct("1011", gold)                   # no marker: no answer
    assert not is_correct(None, gold)
    assert is_correct("#### -7", "#### -7")
    assert not is_correct("#### 7", "#### -7")
    assert is_correct("#### 42", "42")                    # bare gold number
    assert is_correct("#### 0.5", "#### .5")


# ------------------------------------------------------------------------------------------------ training data
def _load_trainer():
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("train_model", REPO / "tools" / "train_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_batches_match_tokenizer_and_skip_heldout():
    tm = _load_trainer()
    ids = tm.Ids(task.build_tokenizer())
    ids.self_check(seed=3, n=64)            # vectorised ids == tokenised chat-template prompt + answer + EOS padding
    heldout = task.generate(task.HELDOUT_SEED, 300)
    stream = tm.Stream(ids, seed=0, batch=64, excluded=heldout)
    banned = {task.parse_question(p["question"]) for p in heldout}
    seen = set()
    for _ in range(20):
        batch, plen, t, u, result = stream.next()
        assert batch.shape == (64, plen + tm.GEN_LEN) and u.shape == result.shape == (64, tm.GEN_LEN)
        for row in batch.tolist():
            prompt = ids.tok.decode(row[:plen], skip_special_tokens=True)
            question = prompt.split("\n\n", 1)[1].rsplit("assistant", 1)[0]
            seen.add(task.parse_question(question))
    assert seen and not seen & banned
