"""Tiny random transformers (BERT, OPT, LLaMA with GQA, GPT-2) built from configs, no download."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB = 120
FAMILIES = ("bert", "opt", "llama", "gpt2")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-block model of ``family`` with 4 heads (LLaMA: 4 query heads over 2 KV heads)."""
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    if family == "bert":
        model = BertModel(BertConfig(intermediate_size=48, max_position_embeddings=64, **common))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=64, **common))
    elif family == "llama":
        config = LlamaConfig(intermediate_size=48, num_key_value_heads=2, max_position_embeddings=64, **common)
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    return model.eval()


def token_ids(samples: int = 12, seq_len: int = 10, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (samples, seq_len), generator=generator)


@torch.no_grad()
def output_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden state (encoders) or logits (causal LMs)."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
