"""Tiny LLaMA / Qwen2 / Mistral causal LMs with a real byte-level BPE tokenizer, built offline.

The tokenizer is trained with the ``tokenizers`` library on the built-in text (stdlib docstrings),
so llama.cpp and transformers can be compared on real text without a download.
"""

from __future__ import annotations

import functools

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import osscar_opt
from osscar_opt.budget import PerLayerKeep
from osscar_opt.deploy.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

VOCAB = 320
BLOCKS = 3
FAMILIES = ("llama", "qwen2", "mistral")
PER_LAYER_KEEP = {  # different widths in every block: KV groups of 2 and neurons of 96
    "model.layers.0.self_attn.o_proj": 1, "model.layers.0.mlp.down_proj": 40,
    "model.layers.1.mlp.down_proj": 72,
    "model.layers.2.self_attn.o_proj": 1, "model.layers.2.mlp.down_proj": 24,
}


@functools.cache
def passages() -> tuple[str, ...]:
    from osscar_opt.data.text import stdlib_passages

    return tuple(stdlib_passages())


@functools.cache
def tokenizer(pre: str = "gpt-2") -> PreTrainedTokenizerFast:
    """A byte-level BPE of :data:`VOCAB` tokens whose pre-tokenizer is GPT-2's (``gpt-2``), single
    digits then GPT-2's (``smollm``), Qwen2's or LLaMA 3's split rule (``qwen2``, ``llama-bpe``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    steps = {
        "gpt-2": [byte_level],
        "smollm": [pre_tokenizers.Digits(individual_digits=True), byte_level],
        "qwen2": [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), byte_level],
        "llama-bpe": [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level],
    }[pre]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(passages()[:400], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def held_out_ids(count: int) -> list[int]:
    """``count`` token ids of text the tokenizer was not trained on."""
    ids = tokenizer()(" ".join(passages()[400:]))["input_ids"]
    assert len(ids) >= count
    return ids[:count]


def tiny_llm(family: str, seed: int = 0) -> torch.nn.Module:
    """A 3-block causal LM: 64 wide, 4 query heads of 16 over 2 KV heads, 96 MLP neurons
    (Qwen2: Q / K / V biases; Mistral: a 128-token sliding window)."""
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": BLOCKS, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 256,
              "initializer_range": 0.1}
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=128, **common)).eval()
    raise ValueError(family)


def calibration(samples: int = 8, seq_len: int = 32) -> torch.Tensor:
    ids = tokenizer()(" ".join(passages()[:200]))["input_ids"]
    return torch.tensor(ids[: samples * seq_len]).view(samples, seq_len)


def per_layer_pruned(family: str) -> torch.nn.Module:
    """:func:`tiny_llm` pruned to :data:`PER_LAYER_KEEP` (other widths in every block)."""
    model = tiny_llm(family)
    osscar_opt.prune(model, calibration(), PerLayerKeep(PER_LAYER_KEEP), backend="greedy", damp=0.01, batch_size=4,
                     progress=False)
    return model


def widths(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, neurons) of every block, from the modules."""
    out = []
    for block in model.model.layers:
        head = block.self_attn.head_dim
        out.append((block.self_attn.q_proj.out_features // head, block.self_attn.k_proj.out_features // head,
                    block.mlp.gate_proj.out_features))
    return out
