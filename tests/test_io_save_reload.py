"""Save -> reload of pruned tiny transformers: identical outputs, same class, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import osscar_opt
from osscar_opt.driver import prune
from osscar_opt.io import META_FILE
from tests.tiny_transformers import FAMILIES, output_of, tiny_model, token_ids

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=FAMILIES)
def pruned(request):
    model = tiny_model(request.param)
    prune(model, token_ids(), heads_sparsity=0.5, neurons_sparsity=0.5, backend="greedy", progress=False)
    return model


def test_reload_gives_identical_outputs_and_the_same_class(pruned, tmp_path):
    ids = token_ids(3)
    osscar_opt.save_pruned(pruned, tmp_path / "model")
    reloaded = osscar_opt.load_pruned(tmp_path / "model")
    assert type(reloaded) is type(pruned)
    assert torch.equal(output_of(reloaded, ids), output_of(pruned, ids))
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in reloaded.state_dict().items()} == shapes


def test_saved_folder_holds_safetensors_config_and_per_block_dims(pruned, tmp_path):
    osscar_opt.save_pruned(pruned, tmp_path / "model")
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"model.safetensors", "config.json", META_FILE} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    meta = json.loads((tmp_path / "model" / META_FILE).read_text())
    assert meta["family"] == "transformers" and meta["class"] == type(pruned).__name__
    assert [block["attention_groups"] for block in meta["blocks"]] == [2, 2] or meta["adapter"] == "llama"
    assert all(block["mlp_neurons"] == 24 for block in meta["blocks"])
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind


def test_tied_embeddings_are_written_once_and_tied_again(tmp_path):
    model = tiny_model("opt")  # OPT ties lm_head to the token embeddings
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    osscar_opt.save_pruned(model, tmp_path / "model")
    reloaded = osscar_opt.load_pruned(tmp_path / "model")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.decoder.embed_tokens.weight.data_ptr()
    assert torch.equal(output_of(reloaded, token_ids(2)), output_of(model, token_ids(2)))


def test_saving_again_replaces_an_earlier_saved_model(tmp_path):
    first, second = tiny_model("bert", seed=0), tiny_model("bert", seed=1)
    osscar_opt.save_pruned(first, tmp_path / "model")
    osscar_opt.save_pruned(second, tmp_path / "model")
    reloaded = osscar_opt.load_pruned(tmp_path / "model")
    assert torch.equal(output_of(reloaded, token_ids(2)), output_of(second, token_ids(2)))


def test_a_killed_save_leaves_nothing_at_the_destination(tmp_path):
    destination = tmp_path / "model"
    script = textwrap.dedent(f"""
        import os, signal
        import safetensors.torch
        from tests.tiny_transformers import tiny_model
        import osscar_opt
        real_save = safetensors.torch.save_file
        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)          # the weights are half of the folder...
            os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies before the rest
        safetensors.torch.save_file = save_then_die
        osscar_opt.save_pruned(tiny_model("bert"), {str(destination)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert not destination.exists()
    with pytest.raises(ValueError, match="not a saved pruned model"):
        osscar_opt.load_pruned(destination)


def test_bad_destinations_and_sources_are_value_errors(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("user data")
    with pytest.raises(ValueError, match="directory"):
        osscar_opt.save_pruned(tiny_model("bert"), tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="not a saved pruned model"):
        osscar_opt.load_pruned(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot save"):
        osscar_opt.save_pruned(torch.nn.Linear(2, 2), tmp_path / "linear")
