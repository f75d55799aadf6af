"""Save -> reload of pruned models of every family (identical outputs, same class, atomic writes) and
the layer problems the pipeline saves (each with its budget)."""

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
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.io import META_FILE, WEIGHTS_FILE
from osscar_opt.pipeline import prune
from osscar_opt.problem import LayerProblem
from osscar_opt.solving import solve
from tests.tiny_models import MODELS, budgets, build, calibration, is_vision, output
from tests.tiny_transformers import output_of, tiny_model, token_ids

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=MODELS)
def pruned(request, tmp_path_factory):
    """``(name, model pruned at 50% of every kind, its report, the folder of its saved problems)``."""
    name = request.param
    problems = tmp_path_factory.mktemp(f"problems_{name}")
    model = build(name)
    backend = "magnitude" if is_vision(name) else "greedy"  # greedy on ResNet-50 costs half a minute
    report = prune(model, calibration(name), budgets(name, 0.5), backend=backend, batch_size=4,
                   save_problems=problems, progress=False)
    return name, model, report, problems


def test_reload_gives_identical_outputs_and_the_same_class(pruned, tmp_path):
    name, model, _, _ = pruned
    data = calibration(name, seed=3)[:3]
    osscar_opt.save_pruned(model, tmp_path / "model")
    reloaded = osscar_opt.load_pruned(tmp_path / "model")
    assert type(reloaded) is type(model) and not reloaded.training
    assert torch.equal(output(reloaded, data), output(model, data))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in reloaded.state_dict().items()} == shapes


def test_saved_folder_holds_safetensors_and_the_pruned_dimensions(pruned, tmp_path):
    name, model, _, _ = pruned
    osscar_opt.save_pruned(model, tmp_path / "model")
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {WEIGHTS_FILE, META_FILE} <= files
    assert not any(file.endswith((".bin", ".pt", ".pkl")) for file in files)
    meta = json.loads((tmp_path / "model" / META_FILE).read_text())
    if is_vision(name):
        assert meta["family"] == "torchvision" and meta["architecture"] == name
        assert meta["internal_channels"] == adapter_for(model).internal_channels()
    else:
        assert "config.json" in files
        assert meta["family"] == "transformers" and meta["class"] == type(model).__name__
        # 4 heads -> 2 (LLaMA: 2 KV groups -> 1), 48 neurons -> 24
        assert [block["attention_groups"] for block in meta["blocks"]] == [1 if name == "llama" else 2] * 2
        assert all(block["mlp_neurons"] == 24 for block in meta["blocks"])
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind


def test_saved_problems_carry_the_budget_and_the_layer_names(pruned):
    _, _, report, problems = pruned
    files = sorted(problems.glob("*.safetensors"))
    assert len(files) == len(report.layers) > 0
    for record in report.layers:  # named by stage and position in the stage (a q_heads structure not pruned skips one)
        [path] = problems.glob(f"{record.stage:03d}.[0-9]_{record.name}.safetensors")
        problem = LayerProblem.load(path)
        assert problem.keep == record.keep and type(problem.keep) is int
        assert problem.num_groups == record.groups
        assert problem.meta["name"] == record.name and problem.meta["kind"] == record.kind
        assert record.name.startswith(problem.meta["stage"] + ".") and "keep" not in problem.meta
        again = solve(problem, problem.keep, record.backend)  # the saved problem is the one that was solved
        assert list(again.support) == record.kept
        # damp="auto" (the default): the backend searched the fit samples with the held-out moments
        # attached; the record's loss is that of the re-fit on all samples at the chosen ridge.
        assert problem.heldout is not None and problem.heldout.rows > 0


# ------------------------------------------------------------------ transformers specifics
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
