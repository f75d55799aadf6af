"""Tiny random models of the 2026 families (issue 26), built from transformers configs, no download.

Decoders have 2 blocks, hidden size 32, 4 query heads of 8 over 2 KV heads (GPT-NeoX: 4 heads, no
GQA) and an MLP of 48; Gemma 2 / 3 alternate a sliding window of 4 tokens with global layers, so
calibration samples of 10 tokens see different masks (and, in Gemma 3, different rotary bases)
per layer type. ``helium`` is a family no adapter lists: it is recognized by its LLaMA layout.
"""

from __future__ import annotations

import torch
import transformers

from tests.tiny_transformers import VOCAB

COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64, "head_dim": 8,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
WINDOW = {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}
DECODERS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", WINDOW),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", WINDOW),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"attention_multiplier": 0.2, "residual_multiplier": 0.5}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "helium": ("HeliumConfig", "HeliumForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None, "head_dim": None}),
}
"""family -> (config class, model class, config overrides; None drops a common field)."""


def tiny_decoder(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-block causal LM of ``family`` (a key of :data:`DECODERS`) with random weights, in eval mode."""
    config_name, model_name, extra = DECODERS[family]
    fields = {**COMMON, **extra, **overrides}
    fields = {key: value for key, value in fields.items() if value is not None}
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**fields)
    return getattr(transformers, model_name)(config).eval()


ENCODERS = {
    "roberta": ("RobertaConfig", "RobertaModel", {}),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", {}),
    "distilbert": ("DistilBertConfig", "DistilBertModel", {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48}),
    "mpnet": ("MPNetConfig", "MPNetModel", {}),
    "modernbert": ("ModernBertConfig", "ModernBertModel", {"global_attn_every_n_layers": 2, "local_attention": 4,
                                                           "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1,
                                                           "sep_token_id": 2}),
}
"""Encoders: 2 blocks, hidden 32, 4 heads of 8, MLP 48; ModernBERT alternates global and local
(window 4) attention."""
ENCODER_COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 48, "max_position_embeddings": 64, "pad_token_id": 0}


def tiny_encoder(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-block encoder of ``family`` (a key of :data:`ENCODERS`) with random weights, in eval mode."""
    config_name, model_name, extra = ENCODERS[family]
    fields = {**ENCODER_COMMON, **extra}
    if family == "distilbert":
        fields = {key: value for key, value in fields.items() if key not in
                  ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**fields)
    return getattr(transformers, model_name)(config).eval()
