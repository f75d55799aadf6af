"""A Hugging Face tokenizer as GGUF metadata (``tokenizer.ggml.*``) that llama.cpp's vocabulary loader reads.

Carried over: byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2, LLaMA 3), written as
llama.cpp's ``gpt2`` tokenizer model with the token strings, merges, token types and special ids.
llama.cpp does not read the pre-tokenizer from the file: it reads a name
(``tokenizer.ggml.pre``) and applies its own built-in splitting rules for that name. The name is
chosen from the tokenizer's own pre-tokenizer (``tokenizer.json``) by :data:`PRE_TOKENIZERS`:
each entry is a pre-tokenizer that splits text exactly as llama.cpp's rules of that name do
(llama.cpp ``src/llama-vocab.cpp``). Anything else (SentencePiece / Unigram / WordPiece models,
another split rule, a normalizer other than NFC) is refused with a ValueError naming
``tokenizer``, rather than written into a file whose text llama.cpp would split differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# token types of llama.cpp's vocabulary (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

GPT2_SPLIT = None
"""A bare ByteLevel pre-tokenizer splits with GPT-2's own rule (``use_regex``)."""
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Signature:
    """What a tokenizer's pre-tokenizer does: single digits split first, a regex split, GPT-2's split."""

    single_digits: bool
    split_regex: str | None
    gpt2_regex: bool


PRE_TOKENIZERS = {
    Signature(single_digits=False, split_regex=None, gpt2_regex=True): "gpt-2",
    Signature(single_digits=True, split_regex=None, gpt2_regex=True): "smollm",
    Signature(single_digits=False, split_regex=QWEN2_SPLIT, gpt2_regex=False): "qwen2",
    Signature(single_digits=False, split_regex=LLAMA3_SPLIT, gpt2_regex=False): "llama-bpe",
}
"""Pre-tokenizer signature -> the ``tokenizer.ggml.pre`` name whose llama.cpp rules split the same way."""


@dataclass
class GGUFVocab:
    """The tokenizer fields of a GGUF file."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _refuse(reason: str) -> ValueError:
    return ValueError(f"tokenizer: cannot be carried over to GGUF: {reason}; llama.cpp would split text differently "
                      "from the model's own tokenizer. Supported: byte-level BPE tokenizers whose pre-tokenizer is "
                      "GPT-2's, SmolLM's (single digits, then GPT-2's), Qwen2's or LLaMA 3's")


def _signature(pre: dict[str, Any] | None) -> Signature:
    """The :class:`Signature` of a ``tokenizer.json`` pre-tokenizer; a ValueError for anything else."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    single_digits, regex, gpt2 = False, None, None
    for step in steps:
        kind = step.get("type")
        if kind == "Digits" and step.get("individual_digits") and regex is None and gpt2 is None:
            single_digits = True
        elif kind == "Split" and regex is None and gpt2 is None and step.get("behavior") == "Isolated" \
                and not step.get("invert"):
            regex = (step.get("pattern") or {}).get("Regex")
        elif kind == "ByteLevel" and gpt2 is None and not step.get("add_prefix_space"):
            gpt2 = bool(step.get("use_regex", True))
        else:
            raise _refuse(f"pre-tokenizer step {json.dumps(step, sort_keys=True)[:200]}")
    if gpt2 is None:
        raise _refuse("its pre-tokenizer has no ByteLevel step (not a byte-level BPE)")
    return Signature(single_digits, regex, gpt2)


def _behaviour(tokenizer: Any, text: str) -> tuple[bool, bool]:
    """Whether encoding ``text`` adds the BOS / the EOS token (as the tokenizer really does)."""
    with_special = list(tokenizer(text)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(with_special) > len(plain) and with_special[0] == bos and plain[:1] != [bos]
    add_eos = eos is not None and len(with_special) > len(plain) and with_special[-1] == eos
    return add_bos, add_eos


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer fields of a transformers fast ``tokenizer`` for a model with ``vocab_size``
    embedding rows (ids the tokenizer lacks are written as unused ``[PAD<id>]`` tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise _refuse(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    document = json.loads(backend.to_str())
    model = document.get("model") or {}
    if model.get("type") != "BPE":
        raise _refuse(f"its model is {model.get('type')!r}, not a BPE")
    if (document.get("decoder") or {}).get("type") != "ByteLevel":
        raise _refuse(f"its decoder is {(document.get('decoder') or {}).get('type')!r}, not ByteLevel")
    normalizer = document.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise _refuse(f"its normalizer is {normalizer.get('type')!r} (only none or NFC)")
    pre = PRE_TOKENIZERS.get(_signature(document.get("pre_tokenizer")))
    if pre is None:
        raise _refuse("its pre-tokenizer's split rule is not one of llama.cpp's")
    by_id: dict[int, tuple[str, int]] = {int(i): (token, NORMAL) for token, i in model["vocab"].items()}
    for added in document.get("added_tokens", []):
        by_id[int(added["id"])] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer: has token id {max(by_id)}, but the model has {vocab_size} embedding rows; "
                         "it is not this model's tokenizer")
    tokens, types = [], []
    for index in range(vocab_size):
        token, kind = by_id.get(index, (f"[PAD{index}]", UNUSED))
        tokens.append(token)
        types.append(kind)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    add_bos, add_eos = _behaviour(tokenizer, "Hello world")
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab(pre, tokens, types, merges, {k: int(v) for k, v in special.items() if v is not None},
                     add_bos, add_eos, template if isinstance(template, str) else None)


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add ``vocab`` to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, token_id in vocab.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
