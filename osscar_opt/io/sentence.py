"""A pruned sentence-transformers encoder as a ``SentenceTransformer`` (:func:`load_sentence_transformer`).

:func:`osscar_opt.save_pruned` carries a sentence-transformers folder's module files (``modules.json``,
``1_Pooling/``, ``sentence_bert_config.json``) over to the pruned folder. When the pruned widths fit
the family's config (e.g. only MLP neurons pruned), ``SentenceTransformer(folder)`` loads it as it
is. When they do not (BERT heads: the head size is ``hidden_size / num_attention_heads``), the
transformer module is built around the model :func:`osscar_opt.load_pruned` rebuilds: the
sentence-transformers machinery (tokenizer, pooling, normalization) is loaded from a shell copy of
the folder whose encoder has no blocks, and its model is then replaced by the pruned one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from osscar_opt.io import WEIGHTS_FILE, load_pruned, read_meta
from osscar_opt.io.transformers import CONFIG_RECORD, read_config


def _sentence_transformers():
    try:
        import sentence_transformers
    except ModuleNotFoundError as exc:
        if exc.name != "sentence_transformers":
            raise
        raise ImportError(
            "load_sentence_transformer needs sentence-transformers: pip install 'osscar-opt[minilm]' "
            "(or pip install sentence-transformers)"
        ) from exc
    return sentence_transformers


def _write_shell(directory: Path, shell: Path) -> None:
    """A copy of ``directory`` whose config is the stock one with no blocks, and whose weights are the
    pruned model's tensors that such a model has (embeddings, pooler)."""
    from safetensors.torch import load_file, save_file

    def top_level_model_files(folder: str, names: list[str]) -> list[str]:
        return [name for name in names if Path(folder) == directory and name in (WEIGHTS_FILE, "config.json")]

    shutil.copytree(directory, shell, ignore=top_level_model_files)
    config = read_config(directory)
    config.num_hidden_layers = 0
    config.save_pretrained(str(shell))
    document = json.loads((shell / "config.json").read_text())
    document.pop(CONFIG_RECORD, None)
    (shell / "config.json").write_text(json.dumps(document, indent=2))
    import transformers

    wanted = set(transformers.AutoModel.from_config(config).state_dict())
    state = load_file(str(directory / WEIGHTS_FILE))
    save_file({key: value for key, value in state.items() if key in wanted}, str(shell / WEIGHTS_FILE),
              metadata={"format": "pt"})


def load_sentence_transformer(directory: str | os.PathLike, device: str | None = None) -> Any:
    """The ``SentenceTransformer`` of a pruned encoder saved by :func:`osscar_opt.save_pruned` from a
    sentence-transformers model (its folder has ``modules.json``); embeddings come from the pruned
    weights, tokenizer and pooling from the saved folder."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta.get("family") != "transformers" or not (directory / "modules.json").is_file():
        raise ValueError(
            f"directory: {directory} is not a pruned sentence-transformers model (no modules.json beside "
            "the weights; save a model loaded from a sentence-transformers folder)"
        )
    sentence_transformers = _sentence_transformers()
    config = json.loads((directory / "config.json").read_text())
    if CONFIG_RECORD not in config:
        return sentence_transformers.SentenceTransformer(str(directory), device=device)
    model = load_pruned(directory)
    with tempfile.TemporaryDirectory() as scratch:
        shell = Path(scratch) / directory.name
        _write_shell(directory, shell)
        encoder = sentence_transformers.SentenceTransformer(str(shell), device="cpu")
    encoder[0].model = model
    return encoder.to(device) if device is not None else encoder
