"""Write LLaDA checkpoints in the Hugging Face layout the loader reads: config.json, (sharded) safetensors,
tokenizer.json and tokenizer_config.json with a chat template. Used for the tiny test models and for trained ones."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dllm_trt.runtime.checkpoint import expected_shapes
from dllm_trt.runtime.config import ModelConfig

# LLaDA's special-token spellings; ids are assigned after the 256 byte tokens.
SPECIAL_TOKENS = ["<|endoftext|>", "<|mdm_mask|>", "<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer without merges: any text round-trips, 256 + len(SPECIAL_TOKENS) ids."""
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_char))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def write_tokenizer(out: Path, tok: Tokenizer, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "mask_token": "<|mdm_mask|>",
        "pad_token": "<|endoftext|>", "model_max_length": max_len, "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))


def config_json(cfg: ModelConfig) -> dict:
    """config.json with LLaDA's keys and the flag values dllm-trt implements."""
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_heads, "n_layers": cfg.n_layers,
        "mlp_hidden_size": cfg.mlp_hidden_size, "mlp_ratio": cfg.mlp_hidden_size // cfg.d_model,
        "vocab_size": cfg.vocab_size, "embedding_size": cfg.embedding_size,
        "mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.eos_token_id,
        "max_sequence_length": cfg.max_sequence_length, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope": True, "rope_full_precision": True, "weight_tying": False,
        "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "scale_logits": False,
        "input_emb_norm": False, "attention_layer_norm": False, "include_bias": False,
        "include_qkv_bias": False, "bias_for_layer_norm": False, "alibi": False, "block_group_size": 1,
        "multi_query_attention": None, "flash_attention": False,
    }


def write_checkpoint(out: str | Path, cfg: ModelConfig, weights: dict[str, torch.Tensor], tok: Tokenizer,
                     shards: int = 2) -> Path:
    """Save weights (checkpoint names) as `shards` safetensors files plus index (or one file if shards == 1)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_json(cfg), indent=2))
    names = list(expected_shapes(cfg))
    weights = {k: weights[k].contiguous() for k in names}
    if shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: weights[k] for k in names[s * per:(s + 1) * per]}
            save_file(part, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in weights.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    write_tokenizer(out, tok, cfg.max_sequence_length)
    return out


def random_weights(cfg: ModelConfig, seed: int, std: float = 0.02, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            out[name] = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        elif name.endswith("wte.weight"):
            out[name] = torch.randn(shape, generator=g).to(dtype)
        else:
            out[name] = (std * torch.randn(shape, generator=g) * (64 / shape[-1]) ** 0.5 * 8).to(dtype)
    return out


def tiny_config(n_layers: int = 4, d_model: int = 64, n_heads: int = 4, max_len: int = 512) -> ModelConfig:
    tok = byte_tokenizer()
    vocab = tok.get_vocab_size()
    return ModelConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, mlp_hidden_size=2 * d_model + 32,
                       vocab_size=vocab, embedding_size=vocab, mask_token_id=tok.token_to_id("<|mdm_mask|>"),
                       eos_token_id=tok.token_to_id("<|endoftext|>"), max_sequence_length=max_len,
                       rms_norm_eps=1e-5, rope_theta=10000.0)


def write_tiny_checkpoint(out: str | Path, seed: int = 0, **config_overrides) -> Path:
    """A small random LLaDA checkpoint (sharded, byte tokenizer) that goes through the real loading code."""
    cfg = tiny_config(**config_overrides)
    return write_checkpoint(out, cfg, random_weights(cfg, seed), byte_tokenizer(), shards=2)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write a tiny random LLaDA checkpoint (Hugging Face layout).")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    a = ap.parse_args()
    print(write_tiny_checkpoint(a.out, a.seed, n_layers=a.layers, d_model=a.d_model, n_heads=a.heads))
