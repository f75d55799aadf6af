"""The LLaMA layout: decoders whose blocks are ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.

Recognized by structure, not by name: every block of ``model.base_model.layers`` must have those
seven ``nn.Linear`` modules. The listed ``model_type`` values (LLaMA, Qwen2/3, Mistral, Gemma 2,
Gemma 3 text, SmolLM3, Granite, OLMo 2 and the rest of :data:`LAYOUT_TYPES`) are known to fit;
another ``model_type`` with the same layout is pruned with a warning naming the layout it matched.

Structures of block ``layers.i`` (docs/families.md):

* attention: one group is one key-value head with all its query heads (input columns of
  ``o_proj``; rows of ``q_proj`` for those query heads and of ``k_proj`` / ``v_proj`` for that KV
  head; with as many KV heads as query heads this is plain ``heads``). Per-head ``q_norm`` /
  ``k_norm`` (Qwen3, Gemma 3, OLMo 3: one weight of ``head_dim`` shared by all heads) stay as they
  are. A norm over the whole projection (OLMo 2: ``q_norm`` of ``heads * head_dim``) couples the
  heads (the RMS of the kept heads differs), so such attention is not a structure: only the MLP is
  pruned;
* ``q_heads`` (GQA only): query heads inside each KV group (``o_proj`` columns, ``q_proj`` rows),
  equal counts per group; ``num_key_value_groups`` follows;
* neurons: input columns of ``mlp.down_proj`` with producers ``gate_proj`` and ``up_proj``.

Everything else (embeddings and a tied head, extra norms on the hidden size such as Gemma's and
OLMo 2's post-norms, Granite's multipliers) is never cut. Sliding-window layers are pruned like
global ones (a window only masks positions inside each head; the stock forward takes any head
count there); each block is calibrated with the mask and position embeddings of its own layer
type (:meth:`TransformerAdapter.stage_inputs`). The config has ``head_dim``,
``num_attention_heads`` and ``num_key_value_heads``, so uniform widths reload with the stock class.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from osscar_opt.adapters.base import size_setter
from osscar_opt.adapters.decoder import decoder_blocks, head_dim_of, norm_size, warn_unlisted
from osscar_opt.adapters.transformer import TransformerAdapter
from osscar_opt.formulations.attention import kv_group_structure, query_head_structure
from osscar_opt.formulations.empty import is_empty, replace_sublayer
from osscar_opt.formulations.mlp import neuron_structure
from osscar_opt.formulations.structures import Structure

LAYOUT = "self_attn.{q,k,v,o}_proj + mlp.{gate,up,down}_proj"
LAYOUT_TYPES: tuple[str, ...] = (
    "llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "granite", "olmo2", "olmo3",
)
"""The ``model_type`` values known to have the LLaMA layout (tested on tiny configs; see docs/families.md)."""
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


def _linears(module: nn.Module | None, names: tuple[str, ...]) -> bool:
    return module is not None and all(isinstance(getattr(module, name, None), nn.Linear) for name in names)


def has_llama_layout(model: nn.Module) -> bool:
    """True when every decoder block has ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``
    Linears (or, after pruning, an emptied sublayer in their place)."""
    def fits(module: nn.Module | None, names: tuple[str, ...]) -> bool:
        return is_empty(module) or _linears(module, names)

    blocks = decoder_blocks(model)
    return blocks is not None and all(
        fits(getattr(block, "self_attn", None), ATTENTION_PARTS) and fits(getattr(block, "mlp", None), MLP_PARTS)
        for block in blocks
    )


def sublayer_norms(block: nn.Module, sublayer: str) -> tuple[list[str], list[str]]:
    """The block's norms that go with its ``"attention"`` or ``"mlp"`` sublayer, as ``(pre, post)``:
    norms that feed only the sublayer, and norms that normalize only its output before the
    residual addition. Read from the norms the block has (the layouts of :data:`LAYOUT_TYPES`):

    * ``input_layernorm`` and ``post_attention_layernorm`` only (LLaMA, Qwen, Mistral, Granite):
      pre-norms of attention and of the MLP;
    * with ``pre_feedforward_layernorm`` (Gemma 2 / 3): ``post_attention_layernorm`` and
      ``post_feedforward_layernorm`` are the sublayers' post-norms;
    * without ``input_layernorm`` (OLMo 2 / 3): ``post_attention_layernorm`` and
      ``post_feedforward_layernorm`` are post-norms and there is no pre-norm.
    """
    names = {name for name, _ in block.named_children()}
    pre_norm = "input_layernorm" in names
    sandwich = "pre_feedforward_layernorm" in names
    post = "post_feedforward_layernorm" in names
    if sublayer == "attention":
        return (["input_layernorm"] if pre_norm else []), (
            ["post_attention_layernorm"] if (sandwich or not pre_norm) and "post_attention_layernorm" in names else [])
    mlp_pre = ["pre_feedforward_layernorm"] if sandwich else (
        ["post_attention_layernorm"] if pre_norm and "post_attention_layernorm" in names and not post else [])
    return mlp_pre, (["post_feedforward_layernorm"] if post else [])


class LlamaAdapter(TransformerAdapter):
    family = "llama"
    model_types = LAYOUT_TYPES
    causal_lm = True
    attention_parts: ClassVar[tuple[str, ...]] = ATTENTION_PARTS

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        warn_unlisted(self.config, self.model_types, "LLaMA", LAYOUT)

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """True for a transformers model with the LLaMA layout, whatever its ``model_type``."""
        return getattr(model, "config", None) is not None and has_llama_layout(model)

    def blocks(self) -> list[nn.Module]:
        return decoder_blocks(self.model) or []

    # ---------------------------------------------------------------- attention
    def head_dim(self, attention: nn.Module) -> int:
        return head_dim_of(attention, self.config)

    def whole_width_norm(self, attention: nn.Module) -> str | None:
        """The name of a norm inside ``attention`` that spans more than one head (OLMo 2's
        ``q_norm``), or None when every norm is per head."""
        head_dim = self.head_dim(attention)
        for name, module in attention.named_children():
            if name in self.attention_parts:
                continue
            size = norm_size(module)
            if size is not None and size != head_dim:
                return name
        return None

    def attention(self, block: nn.Module, prefix: str) -> Structure | None:
        attention = block.self_attn
        if is_empty(attention) or self.whole_width_norm(attention) is not None:
            return None
        structure = kv_group_structure(
            f"{prefix}.self_attn.o_proj", attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
            self.head_dim(attention),
        )
        pre, post = sublayer_norms(block, "attention")
        structure.on_empty = replace_sublayer(
            block, "self_attn", hidden=attention.o_proj.out_features, pre_norms=pre, post_norms=post, attention=True,
            head_dim=self.head_dim(attention), layer_idx=getattr(attention, "layer_idx", None))
        return structure

    def gqa(self) -> bool:
        """True when the model has fewer key-value heads than query heads (in its dense config)."""
        heads = int(self.config.num_attention_heads)
        return int(getattr(self.config, "num_key_value_heads", None) or heads) < heads

    def query_heads(self, block: nn.Module, prefix: str) -> Structure | None:
        attention = block.self_attn
        if is_empty(attention) or not self.gqa() or self.whole_width_norm(attention) is not None:
            return None
        head_dim = self.head_dim(attention)
        kv_heads = attention.k_proj.out_features // head_dim
        def resize(keep: int) -> None:
            attention.num_key_value_groups = keep // kv_heads  # the query heads each KV head serves

        return query_head_structure(
            f"{prefix}.self_attn.o_proj:q_heads", attention.q_proj, attention.o_proj, head_dim, kv_heads, resize,
        )

    # ---------------------------------------------------------------- MLP
    def mlp(self, block: nn.Module, prefix: str) -> Structure | None:
        mlp = block.mlp
        if is_empty(mlp):
            return None
        resize = size_setter(mlp, intermediate_size=1) if hasattr(mlp, "intermediate_size") else None
        structure = neuron_structure(f"{prefix}.mlp.down_proj", [mlp.gate_proj, mlp.up_proj], mlp.down_proj, resize)
        pre, post = sublayer_norms(block, "mlp")
        structure.on_empty = replace_sublayer(block, "mlp", hidden=mlp.down_proj.out_features, pre_norms=pre,
                                              post_norms=post)
        return structure

    def empty_dims(self, block: nn.Module) -> dict[str, int]:
        """Widths of the block's emptied sublayers: 0 KV groups (and query heads) for an emptied
        attention, 0 neurons for an emptied MLP."""
        dims = {}
        if is_empty(block.self_attn):
            dims["attention_groups"] = 0
            if self.gqa():
                dims["query_heads"] = 0
        if is_empty(block.mlp):
            dims["mlp_neurons"] = 0
        return dims

    # ---------------------------------------------------------------- config
    def config_fields(self, dims) -> dict[str, int] | None:
        """Heads, KV heads and head size are config fields: any uniform width is expressible."""
        block = self.blocks()[0]
        attention = block.self_attn
        head_dim = self.head_dim(attention)
        kv_heads = attention.k_proj.out_features // head_dim
        per_group = attention.o_proj.in_features // head_dim // kv_heads
        groups = dims.get("attention_groups", kv_heads)
        per_group = dims.get("query_heads", per_group)
        fields = {self.mlp_size_field: dims["mlp_neurons"]}
        if "attention_groups" in dims:
            fields.update(num_attention_heads=groups * per_group, num_key_value_heads=groups, head_dim=head_dim)
        return fields
