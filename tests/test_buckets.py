"""Static shape buckets: padded window steps (inert rows, scratch cache slot, validity masks) change nothing."""
import numpy as np
import pytest
import torch

from dllm_trt.runtime import buckets as bk
from dllm_trt.runtime.backends.torch_backend import PaddedTorchBackend, TorchBackend
from dllm_trt.runtime.checkpoint import Checkpoint
from dllm_trt.runtime.decoder import Decoder
from dllm_trt.runtime.model_torch import LayerRange
from dllm_trt.runtime.options import DecodeOptions, build

GEN = 32
CASES = [DecodeOptions(cache="none", window=8, threshold=0.08), DecodeOptions(cache="dual", threshold=0.08),
         DecodeOptions(cache="prefix", threshold=0.08)]
CASES += [DecodeOptions(cache="elastic", window=8, threshold=0.08, gamma=g, refresh_alignment=al, track_num=t)
          for g in (0.9, 0.995) for al in ("rerun", "next") for t in (1, 3)]


def test_bucket_sizes_and_lookup():
    assert bk.bucket_sizes(40) == [8, 16, 32, 40]
    assert bk.bucket_sizes(64) == [8, 16, 32, 64]
    assert bk.bucket_sizes(5) == [5]
    sizes = bk.bucket_sizes(1024)
    assert [bk.bucket_for(n, sizes) for n in (1, 8, 9, 29, 33, 1024)] == [8, 8, 16, 32, 64, 1024]
    with pytest.raises(ValueError):
        bk.bucket_for(1025, sizes)
    assert bk.step_shape(512, 29, 0, 16, sizes) == bk.StepShape(512, 32, 8, 16)


def test_pad_and_manifest_entry():
    values, valid = bk.pad(np.array([4, 7]), 4, 9)
    assert values.tolist() == [4, 7, 9, 9] and valid.tolist() == [True, True, False, False]
    with pytest.raises(ValueError):
        bk.pad(np.arange(5), 4, 0)
    assert bk.manifest_entry(1024, 64) == {"canvas": 1024, "rows": [8, 16, 32, 64], "scratch_slots": 1}


@pytest.mark.parametrize("fast", [False, True])
def test_padded_window_piece_equals_unpadded_on_real_rows(tiny_dir, fast):
    ckpt = Checkpoint(tiny_dir)
    cfg = ckpt.config
    lr = LayerRange(cfg, 0, 2).load(ckpt)
    if fast:
        lr.make_fast()
    torch.manual_seed(3)
    n, H, hd = 30, cfg.n_heads, cfg.head_dim
    caches = [torch.randn(H, n, hd) for _ in range(2)]
    queries = torch.tensor([2, 9, 20, 21, 22, 23])
    track_rows, window_rows = torch.tensor([0, 1]), torch.tensor([3, 4, 5])
    key_is_mask = torch.arange(n) >= 21
    hidden = torch.randn(len(queries), cfg.d_model)
    track_q = [torch.randn(H, 2, hd) for _ in range(2)]
    args = []
    for i in range(2):
        args += [caches[0] * (i + 1), caches[1] - i, track_q[i]]
    with torch.no_grad():
        want = lr.window(hidden, queries, track_rows, window_rows, key_is_mask, *args)
        # the padded step: one scratch slot (index n, garbage contents), 2 pad query rows, 3 pad tracked rows,
        # 5 pad window rows
        pad_args = []
        for i in range(2):
            k, v, tq = args[3 * i: 3 * i + 3]
            pad_args += [torch.cat([k, torch.randn(H, 1, hd)], 1), torch.cat([v, torch.randn(H, 1, hd)], 1),
                         torch.cat([tq, torch.randn(H, 3, hd)], 1)]
        got = lr.window(torch.cat([hidden, torch.randn(2, cfg.d_model)]), torch.cat([queries, torch.tensor([n, n])]),
                        torch.cat([track_rows, torch.zeros(3, dtype=torch.long)]),
                        torch.cat([window_rows, torch.zeros(5, dtype=torch.long)]),
                        torch.cat([key_is_mask, torch.tensor([True])]), *pad_args,
                        query_valid=torch.arange(8) < 6, key_valid=torch.arange(n + 1) < n,
                        track_valid=torch.arange(5) < 2, window_valid=torch.arange(8) < 3)
    assert torch.allclose(got[0][:6], want[0], atol=1e-5)
    for i in range(2):
        k, v, q, drift, colsum = got[1 + 5 * i: 6 + 5 * i]
        wk, wv, wq, wdrift, wcolsum = want[1 + 5 * i: 6 + 5 * i]
        for a, b in ((k, wk), (v, wv), (q, wq)):
            assert torch.allclose(a[:, :6], b, atol=1e-5)
        assert torch.allclose(drift, wdrift, atol=1e-6), (drift, wdrift)
        assert torch.allclose(colsum[:n], wcolsum, atol=1e-5) and float(colsum[n]) == 0.0


def test_fast_refresh_equals_reference(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    cfg = ckpt.config
    ref, fast = LayerRange(cfg, 0, 2).load(ckpt), LayerRange(cfg, 0, 2).load(ckpt).make_fast()
    torch.manual_seed(4)
    h, pos, mask = torch.randn(25, cfg.d_model), torch.arange(25), torch.arange(25) >= 15
    with torch.no_grad():
        want = ref.refresh(h, pos, torch.tensor([15, 16, 17]), mask)
        got = fast.refresh(h, pos, torch.tensor([15, 16, 17, 0]), mask, window_valid=torch.tensor([1, 1, 1, 0]).bool())
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


@pytest.fixture(scope="module")
def backends(tiny_dir):
    return TorchBackend(tiny_dir, 1, "cpu"), PaddedTorchBackend(tiny_dir, 1, "cpu")


def generate(backend, opts, prompt, order="auto"):
    schedule, policy = build(opts, GEN)
    return Decoder(backend, policy, schedule, step_order=order).generate(prompt)


def test_bucketed_generation_equals_unpadded(backends, prompts):
    plain, padded = backends
    assert padded.one_sync_per_step and "buckets" in padded.describe()
    partial = 0
    for opts in CASES:
        for prompt in prompts[:3]:
            a, b = generate(plain, opts, prompt), generate(padded, opts, prompt)
            assert a.canvas_ids == b.canvas_ids, opts
            assert (a.steps, a.layer_steps_refreshed) == (b.steps, b.layer_steps_refreshed), opts
            n = len(prompt) + GEN
            for L in range(plain.config.n_layers):
                assert torch.allclose(plain.k[L], padded.k[L][:, :n], atol=1e-4)
            n_layers = plain.config.n_layers
            partial += 0 < a.layer_steps_refreshed - n_layers < (a.steps - 1) * n_layers
    assert partial, "no generation refreshed from a middle range: padded drift was not really compared"


def test_bucketed_range_order_equals_batched(backends, prompts):
    """Range by range, the padded backend runs the whole step at the first fetch and answers later ranges from it."""
    _, padded = backends
    opts = DecodeOptions(cache="elastic", window=8, threshold=0.08, gamma=0.995)
    for prompt in prompts[:2]:
        a, b = generate(padded, opts, prompt, "range"), generate(padded, opts, prompt, "batched")
        assert (a.canvas_ids, a.layer_steps_refreshed) == (b.canvas_ids, b.layer_steps_refreshed)


def test_padded_step_rejects_mismatched_ranges(backends):
    _, padded = backends
    n = 20
    padded.begin(n)
    ids = np.full(n, padded.config.mask_token_id)
    mask = ids == padded.config.mask_token_id
    padded.embed(ids[[3, 4, 5]], np.array([3, 4, 5]))
    padded.window(0, np.array([3, 4, 5]), np.array([3]), np.array([4, 5]), mask)
    with pytest.raises(ValueError, match="same rows"):
        padded.window(1, np.array([3, 4, 5]), np.array([4]), np.array([4, 5]), mask)
