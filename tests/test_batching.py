"""Several requests decoded together: each sequence's tokens, steps and refreshes equal decoding it alone, whatever
it shares a step with (other options, prompt lengths, caches, requests joining and leaving)."""
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from dllm_trt.runtime.api import Cancelled, Engine, QueueFull
from dllm_trt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dllm_trt.runtime.backends.torch_backend import TorchBackend
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.options import build, decode_options
from dllm_trt.runtime.scheduler import Scheduler
from dllm_trt.runtime.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
ARITH = ROOT / "models" / "arith"
# every cache and both schedules, different gammas, windows, thresholds, drift metrics and alignments in one batch
MIXED = [dict(), dict(gamma=0.95, window=8), dict(cache="dual", block_length=32),
         dict(cache="none", block_length=32, steps=32), dict(cache="prefix", threshold=0.8),
         dict(drift_metric="keys", refresh_alignment="next", gamma=0.97), dict(block_length=32, gamma=0.99),
         dict(gamma=1.5, window=4)]


@pytest.fixture(scope="module")
def problems():
    lines = (ROOT / "data" / "arith_heldout.jsonl").read_text().splitlines()[:24]
    tok = TextTokenizer(ARITH)
    return [tok.encode_prompt([{"role": "user", "content": json.loads(line)["question"]}], chat=True)
            for line in lines]


def requests(problems, n):
    """n (prompt ids, options) pairs: mixed options and generation lengths, prompts of different lengths."""
    out = []
    for i in range(n):
        opts = dict(MIXED[i % len(MIXED)])
        opts["max_tokens"] = (32, 64, 96)[i % 3] if "block_length" not in opts else (32, 64)[i % 2]
        ids = problems[i % len(problems)][: 20 + 7 * (i % 5)]   # prompts cut to different lengths
        out.append((ids, decode_options(opts)))
    return out


def alone(backend, reqs):
    out = []
    for ids, opts in reqs:
        schedule, policy = build(opts, opts.gen_length)
        out.append(Decoder(backend, policy, schedule).generate(ids))
    return out


def together(backend, reqs, batch):
    """Continuous batching by hand: at most `batch` sequences step together; a finished one leaves and the next
    request joins at the next step."""
    decoder, waiting, running, results = Decoder(backend), list(range(len(reqs))), {}, {}
    while waiting or running:
        while waiting and len(running) < batch:
            i = waiting.pop(0)
            ids, opts = reqs[i]
            schedule, policy = build(opts, opts.gen_length)
            running[i] = decoder.start(ids, schedule, policy)
        decoder.step(list(running.values()))
        for i, seq in list(running.items()):
            if seq.done:
                results[i] = decoder.finish(running.pop(i))
    return [results[i] for i in range(len(reqs))]


def key(res):
    return res.token_ids, res.canvas_ids, res.steps, res.layer_steps_refreshed, res.finish_reason


@pytest.fixture(scope="module")
def decoded_alone(arith_engines, problems):
    backend = OnnxRuntimeBackend(arith_engines, threads=1)
    reqs = requests(problems, 24)
    return backend, reqs, alone(backend, reqs)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_onnxruntime_batch_decodes_each_sequence_as_alone(decoded_alone, batch):
    backend, reqs, expected = decoded_alone
    got = together(backend, reqs, batch)
    assert [key(r) for r in got] == [key(r) for r in expected]
    # the mix really mixes: partial refreshes, full refreshes and pure window steps all happened
    fractions = {round(r.refresh_fraction, 3) for r in expected}
    assert len(fractions) > 3 and max(fractions) == 1.0 and min(fractions) < 0.5


def test_torch_backend_interleaves_sequences_as_alone(problems):
    """The torch backend runs one sequence per piece call; stepping several in turn must keep their caches apart."""
    backend = TorchBackend(ARITH)
    reqs = requests(problems, 6)
    assert [key(r) for r in together(backend, reqs, 4)] == [key(r) for r in alone(backend, reqs)]


def test_batched_call_pads_to_the_longest_canvas_and_row_count(arith_engines, problems):
    """Sequences of very different canvas lengths share calls; each one's statistics are cut to its own canvas."""
    backend = OnnxRuntimeBackend(arith_engines, threads=1)
    reqs = [(problems[0][:12], decode_options({"max_tokens": 16})), (problems[1], decode_options({"max_tokens": 128}))]
    assert [key(r) for r in together(backend, reqs, 2)] == [key(r) for r in alone(backend, reqs)]


# ---- the engine's scheduler -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(arith_engines):
    return Engine.load(arith_engines, threads=1, max_batch=4)


def chats(n):
    lines = (ROOT / "data" / "arith_heldout.jsonl").read_text().splitlines()[:n]
    return [[{"role": "user", "content": json.loads(line)["question"]}] for line in lines]


def test_generate_batch_equals_generate_one_by_one(engine):
    prompts = chats(6)
    batch = engine.generate_batch(prompts, max_tokens=64)
    assert [r.text for r in batch] == [engine.generate(p, max_tokens=64).text for p in prompts]
    assert engine.scheduler.running == engine.scheduler.queued == 0


def test_generate_batch_checks_every_prompt_before_decoding(engine):
    steps = engine.scheduler.steps
    with pytest.raises(ValueError, match="exceeds"):
        engine.generate_batch(["What is 2 plus 2 ?", "x " * 400], max_tokens=64)
    assert engine.scheduler.steps == steps


def test_threads_decoding_at_once_get_their_own_answers(engine):
    prompts = chats(8)
    expected = [engine.generate(p, max_tokens=64, cache=("elastic", "dual")[i % 2]).text
                for i, p in enumerate(prompts)]
    got = [None] * len(prompts)

    def ask(i):
        got[i] = engine.generate(prompts[i], max_tokens=64, cache=("elastic", "dual")[i % 2]).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_a_cancelled_request_leaves_and_the_others_finish_as_alone(engine):
    prompts = chats(4)
    expected = [engine.generate(p, max_tokens=96).text for p in prompts]
    seen = {"steps": 0}

    def cancelled():
        seen["steps"] += 1
        return seen["steps"] > 2

    results = [None] * 4

    def ask(i):
        try:
            results[i] = engine.generate(prompts[i], max_tokens=96, cancelled=cancelled if i == 1 else None).text
        except Cancelled:
            results[i] = "cancelled"

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[1] == "cancelled" and seen["steps"] == 3
    assert [results[i] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]


class _Recorder(Decoder):
    """A decoder that records how many sequences each step advanced."""

    def __init__(self, backend):
        super().__init__(backend, detokenize=str)
        self.sizes = []

    def step(self, seqs):
        self.sizes.append(len(seqs))
        super().step(seqs)


def submit_all(scheduler, problems, n, max_tokens=32):
    opts = decode_options({"max_tokens": max_tokens})
    futures = []
    for ids in problems[:n]:
        schedule, policy = build(opts, max_tokens)
        futures.append(scheduler.submit(ids, schedule, policy, cache_bytes=100))
    return [f.result(timeout=120) for f in futures]


def test_scheduler_runs_at_most_max_batch_and_within_the_memory_budget(arith_engines, problems):
    backend = OnnxRuntimeBackend(arith_engines, threads=1)
    wide = _Recorder(backend)
    submit_all(Scheduler(wide, max_batch=3), problems, 8)
    assert max(wide.sizes) == 3
    tight = _Recorder(backend)
    submit_all(Scheduler(tight, max_batch=3, memory_budget=250), problems, 8)   # two requests' caches fit
    assert max(tight.sizes) == 2


def test_scheduler_queue_bound(arith_engines, problems):
    backend = OnnxRuntimeBackend(arith_engines, threads=1)
    gate = threading.Event()

    class Held(Decoder):
        def step(self, seqs):
            gate.wait(60)
            super().step(seqs)

    scheduler = Scheduler(Held(backend), max_batch=1, max_queue=2)
    opts = decode_options({"max_tokens": 16})

    def submit():
        schedule, policy = build(opts, 16)
        return scheduler.submit(problems[0], schedule, policy)

    futures = [submit()]
    for _ in range(50):   # wait for the first to be admitted: then two more may wait
        if scheduler.running == 1:
            break
        threading.Event().wait(0.05)
    futures += [submit(), submit()]
    with pytest.raises(QueueFull):
        submit()
    gate.set()
    assert len({tuple(f.result(timeout=60).token_ids) for f in futures}) == 1


def test_engine_refuses_bad_batch_settings(arith_engines):
    backend = OnnxRuntimeBackend(arith_engines, threads=1)
    for bad in (0, 1025):
        with pytest.raises(ValueError, match="max_batch must be in 1..1024"):
            Engine(backend, TextTokenizer(arith_engines), "arith", max_batch=bad)


def test_one_sequence_backends_decode_one_request_at_a_time():
    engine = Engine.load(ARITH, backend="torch", max_batch=8)
    assert engine.max_batch == 1


def test_memory_budget_counts_canvas_caches(engine):
    assert engine.sequence_bytes(100) < engine.sequence_bytes(200)
    fit = engine.sequences_that_fit()
    assert fit is None or fit >= 1
    assert np.isfinite(engine.sequence_bytes())


def test_torch_batched_calls_decode_each_sequence_as_alone(problems):
    """max_batch > 1: the torch backend runs the exported formulation (LayerRange.forward) on padded batches; it must
    decode as the reference passes do one sequence at a time."""
    reference, batched = TorchBackend(ARITH), TorchBackend(ARITH, max_batch=4)
    reqs = requests(problems, 8)
    assert [key(r) for r in together(batched, reqs, 4)] == [key(r) for r in alone(reference, reqs)]


def test_bench_concurrency_table(arith_engines, capsys):
    from dllm_trt.cli import main

    main(["bench", "--engines", str(arith_engines), "--data", str(ROOT / "data" / "arith_heldout.jsonl"),
          "--concurrency", "1,3", "--prompts", "4", "--gen-lengths", "64", "--max-batch", "4"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "clients" not in line]
    assert [r.split(" | ")[:2] for r in rows] == [["| 1", "one at a time"], ["| 1", "batched (max 4)"],
                                                  ["| 3", "one at a time"], ["| 3", "batched (max 4)"]]
    assert all(r.rstrip(" |").endswith("4/4") for r in rows)   # every answer as one request at a time gives it


def test_bench_concurrency_refuses_bad_numbers(capsys):
    from dllm_trt.cli import main

    for bad in ("1,x", "0"):
        with pytest.raises(SystemExit):
            main(["bench", "--data", str(ROOT / "data" / "arith_heldout.jsonl"), "--concurrency", bad])
        assert "--concurrency" in capsys.readouterr().err


# ---- one request's trouble stays its own ------------------------------------------------------------------------------
def test_a_request_too_large_for_the_engine_fails_alone(arith_engines, problems):
    """A step needing more rows than a piece call takes (the export's --max-active) fails that request before any
    call; the requests stepping with it decode as alone."""
    from dllm_trt.runtime.backends.base import RowLimit

    backend = OnnxRuntimeBackend(arith_engines, threads=1)
    reqs = requests(problems, 6)
    backend.max_active = 24   # as if exported with --max-active 24: window 16 plus tracked and fresh rows exceed it
    big = (problems[0], decode_options({"max_tokens": 64, "window": 16}))
    small = [(ids, decode_options({"max_tokens": opts.gen_length, "window": 4, "cache": "elastic"})) for ids, opts in
             reqs]
    expected = alone(OnnxRuntimeBackend(arith_engines, threads=1), small)
    decoder = Decoder(backend)
    seqs = [decoder.start(ids, *build(o, o.gen_length)) for ids, o in [big, *small]]
    while any(not s.done and s.error is None for s in seqs):
        decoder.step([s for s in seqs if not s.done and s.error is None])
    assert isinstance(seqs[0].error, RowLimit) and "--max-active" in str(seqs[0].error)
    assert [key(decoder.finish(s)) for s in seqs[1:]] == [key(r) for r in expected]


def test_engine_refuses_a_window_wider_than_the_engine_takes(arith_engines):
    from dllm_trt.runtime.api import OptionError

    engine = Engine.load(arith_engines, threads=1)
    engine.backend.max_active = 12
    with pytest.raises(OptionError, match="window .*more than the 12 rows"):
        engine.prepare("What is 2 plus 2 ?", window=16)
    engine.close()


def test_queue_counts_only_requests_beyond_the_free_places(arith_engines, problems):
    engine = Engine.load(arith_engines, threads=1, max_batch=4, max_queue=0)
    assert len(engine.generate_batch(chats(3), max_tokens=32)) == 3   # three free places: nothing waits
    engine.close()


def test_a_dead_waiting_request_leaves_the_queue_without_starting(arith_engines, problems):
    backend = OnnxRuntimeBackend(arith_engines, threads=1)
    gate, started = threading.Event(), []

    class Held(Decoder):
        def start(self, *args, **kwargs):
            started.append(1)
            return super().start(*args, **kwargs)

        def step(self, seqs):
            gate.wait(60)
            super().step(seqs)

    scheduler = Scheduler(Held(backend), max_batch=1)
    opts = decode_options({"max_tokens": 16})
    first = scheduler.submit(problems[0], *build(opts, 16))
    for _ in range(100):
        if scheduler.running == 1:
            break
        threading.Event().wait(0.05)
    dead = scheduler.submit(problems[1], *build(opts, 16), cancelled=lambda: True)
    gate.set()
    with pytest.raises(Cancelled):
        dead.result(timeout=60)
    assert first.result(timeout=60).tokens >= 0 and len(started) == 1
    scheduler.close()


def test_closing_an_engine_ends_its_scheduler_thread(arith_engines):
    with Engine.load(arith_engines, threads=1) as engine:
        engine.generate(chats(1)[0], max_tokens=16)
        thread = engine.scheduler._thread
    thread.join(10)
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(chats(1)[0], max_tokens=16)


def test_one_prepared_request_decoded_twice_at_once(engine):
    prepared = engine.prepare(chats(1)[0], max_tokens=64)
    expected = engine.generate(None, prepared=prepared).token_ids
    results = [None, None]

    def ask(i):
        results[i] = engine.generate(None, prepared=prepared).token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected, expected]
