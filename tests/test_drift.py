"""The drift similarities against torch.nn.functional.cosine_similarity (what the reference code calls), on
attention unlike a random tiny model's: sharply peaked over many keys, so most probabilities are tiny."""
import torch

from dllm_trt.runtime.model_torch import head_axis_cosine, key_axis_cosine


def peaked_attention(heads=32, rows=3, keys=512, sharpness=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(heads, rows, keys, generator=g), dim=-1)


def test_head_axis_cosine_equals_torch_on_peaked_attention():
    old = peaked_attention(seed=0)
    new = old * (1 + 0.01 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1)))  # slightly moved
    norms = old.norm(dim=0)
    # norms between eps and sqrt(eps): each norm is above the eps clamp, their squared product is far below eps^2
    tiny = ((norms > 1e-8) & (norms < 1e-4)).float().mean()
    assert tiny > 0.3, "the case must have many keys that every head barely attends to"
    want = torch.nn.functional.cosine_similarity(old, new, dim=0).mean()
    assert abs(float(head_axis_cosine(old, new)) - float(want)) < 1e-5
    assert float(want) > 0.98  # slightly moved attention is not "drifted" (clamping the product gives ~0.5)


def test_key_axis_cosine_equals_torch_on_peaked_attention():
    old, new = peaked_attention(seed=2), peaked_attention(seed=3)
    want = torch.nn.functional.cosine_similarity(old, new, dim=-1).mean()
    assert abs(float(key_axis_cosine(old, new)) - float(want)) < 1e-5


def test_vectors_of_tiny_norm():
    a = torch.full((4, 1, 1), 5e-6)  # norm 1e-5 across heads, below eps squared once multiplied
    assert abs(float(head_axis_cosine(a, a)) - 1.0) < 1e-6
    assert abs(float(head_axis_cosine(a, torch.zeros_like(a)))) < 1e-6  # a zero vector has similarity 0, as torch
