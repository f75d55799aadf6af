"""Saving never deletes what the tool did not write, the swap leaves a complete model (old or new) in
place, killed saves are cleaned up, files get the umask's modes; loading refuses edited or damaged
folders (dimensions above the dense model, aliases that tie separate layers, non-finite weights)
with ValueErrors naming ``directory`` and the file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import osscar_opt
from osscar_opt.io import META_FILE, WEIGHTS_FILE
from osscar_opt.io import folder as folder_io
from osscar_opt.io.folder import FORMAT, check_destination
from tests.tiny_transformers import output_of, tiny_model, token_ids

REPO = Path(__file__).resolve().parents[1]
IDS = token_ids(2)


def saved(tmp_path: Path, family: str = "bert", seed: int = 0) -> Path:
    osscar_opt.save_pruned(tiny_model(family, seed=seed), tmp_path / "model")
    return tmp_path / "model"


def loads_as(directory: Path, family: str, seed: int) -> bool:
    """True when ``directory`` reloads to the tiny ``family`` model of ``seed`` (identical outputs)."""
    return torch.equal(output_of(osscar_opt.load_pruned(directory), IDS), output_of(tiny_model(family, seed), IDS))


def edit_meta(directory: Path, **changes) -> dict:
    document = json.loads((directory / META_FILE).read_text())
    document.update(changes)
    (directory / META_FILE).write_text(json.dumps(document))
    return document


def edit_weights(directory: Path, change) -> None:
    state = load_file(str(directory / WEIGHTS_FILE))
    change(state)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})


# ------------------------------------------------------------------ 1. user files are never deleted
def test_the_saved_json_lists_the_files_the_save_wrote(tmp_path):
    directory = saved(tmp_path)
    files = json.loads((directory / META_FILE).read_text())["files"]
    assert files == sorted(entry.name for entry in directory.iterdir())
    assert {WEIGHTS_FILE, META_FILE, "config.json"} <= set(files)


def test_saving_over_a_saved_model_beside_user_files_refuses_and_keeps_them(tmp_path):
    directory = saved(tmp_path, seed=0)
    (directory / "notes.txt").write_text("user data")
    (directory / "runs").mkdir()
    with pytest.raises(ValueError, match=r"directory: .*model.*notes\.txt, runs"):
        check_destination(directory)  # what the CLI and oneshot call before pruning
    with pytest.raises(ValueError, match=r"directory: .*notes\.txt"):
        osscar_opt.save_pruned(tiny_model("bert", seed=1), directory)
    assert (directory / "notes.txt").read_text() == "user data" and (directory / "runs").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # refused before writing anything
    assert loads_as(directory, "bert", seed=0)


def test_a_model_saved_without_a_files_list_is_replaced_only_if_it_holds_known_names(tmp_path):
    directory = saved(tmp_path, seed=0)
    document = json.loads((directory / META_FILE).read_text())
    del document["files"]
    (directory / META_FILE).write_text(json.dumps(document))
    (directory / "tokenizer.json").write_text("{}")  # written by name by a save with a tokenizer
    (directory / "my_eval.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"directory: .*my_eval\.csv"):
        osscar_opt.save_pruned(tiny_model("bert", seed=1), directory)
    assert (directory / "my_eval.csv").read_text() == "1,2"
    (directory / "my_eval.csv").unlink()
    osscar_opt.save_pruned(tiny_model("bert", seed=1), directory)
    assert loads_as(directory, "bert", seed=1)


# ------------------------------------------------------------------ 2. left-overs, the swap, modes
def test_stale_temporary_and_set_aside_folders_of_the_destination_are_removed_on_the_next_save(tmp_path):
    directory = saved(tmp_path)
    dead = 2**22 + 12345  # above Linux's pid_max: no such process
    stale = [".model.abcd_123.tmp", f".model.{dead}-abcd_123.tmp", f".model.old-{dead}"]
    running = f".model.{os.getppid()}-abcd_123.tmp"  # a save of a live process is left alone
    others = [".model.v2.abcd_123.tmp", ".other.old-12", "model.old-12", ".model.notes"]
    for name in [*stale, running, *others]:
        (tmp_path / name).mkdir()
        (tmp_path / name / WEIGHTS_FILE).write_text("partial")
    osscar_opt.save_pruned(tiny_model("bert", seed=1), directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", running, *others])
    assert loads_as(directory, "bert", seed=1)


def _fail_second_replace(monkeypatch, tmp_path):
    """Make the second ``os.replace`` under ``tmp_path`` raise; the others run."""
    real, calls = os.replace, []

    def replace(source, destination, *args, **kwargs):
        if Path(source).parent == tmp_path or Path(destination).parent == tmp_path:
            calls.append((Path(source).name, Path(destination).name))
            if len(calls) == 2:
                raise OSError("injected fault: the second rename fails")
        return real(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_failing_rename_during_the_fallback_swap_puts_the_old_model_back(tmp_path, monkeypatch):
    directory = saved(tmp_path, seed=0)
    monkeypatch.setattr(folder_io, "_exchange", lambda first, second: False, raising=False)  # two renames
    calls = _fail_second_replace(monkeypatch, tmp_path)
    with pytest.raises(OSError, match="injected fault"):
        osscar_opt.save_pruned(tiny_model("bert", seed=1), directory)
    assert len(calls) == 3  # aside, in (fails), back
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or set-aside folder
    assert loads_as(directory, "bert", seed=0)


def test_a_failing_exchange_leaves_the_old_model_and_no_temporary_folder(tmp_path, monkeypatch):
    directory = saved(tmp_path, seed=0)

    def fail(first, second):
        raise OSError("injected fault: the exchange fails")

    monkeypatch.setattr(folder_io, "_exchange", fail, raising=False)
    with pytest.raises(OSError, match="injected fault"):
        osscar_opt.save_pruned(tiny_model("bert", seed=1), directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert loads_as(directory, "bert", seed=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_on_linux_an_existing_model_is_replaced_by_one_atomic_exchange(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if not folder_io._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    (tmp_path / "a").rmdir()
    (tmp_path / "b").rmdir()
    directory = saved(tmp_path, seed=0)
    calls = _fail_second_replace(monkeypatch, tmp_path)
    osscar_opt.save_pruned(tiny_model("bert", seed=1), directory)
    assert calls == []  # no rename: the destination was never missing
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert loads_as(directory, "bert", seed=1)


def test_a_save_killed_after_the_swap_leaves_the_new_model_and_the_next_save_cleans_up(tmp_path):
    directory = tmp_path / "model"
    script = textwrap.dedent(f"""
        import os, signal
        from tests.tiny_transformers import tiny_model
        import osscar_opt
        from osscar_opt.io import folder
        osscar_opt.save_pruned(tiny_model("bert", seed=0), {str(directory)!r})
        folder._remove = lambda path: os.kill(os.getpid(), signal.SIGKILL)  # dies before deleting the old one
        osscar_opt.save_pruned(tiny_model("bert", seed=1), {str(directory)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".model."), leftovers
    assert loads_as(directory, "bert", seed=1)
    osscar_opt.save_pruned(tiny_model("bert", seed=2), directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert loads_as(directory, "bert", seed=2)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_folders_and_files_get_the_modes_of_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        directory = saved(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask
    for path in directory.rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# ------------------------------------------------------------------ 3. loading trusts nothing
@pytest.fixture
def no_unchecked_resize(monkeypatch):
    """Fail (instead of allocating) when a structure would be resized above its dense width."""
    from osscar_opt.formulations import surgery

    real = surgery.resize_empty

    def guarded(structure, keep):
        assert isinstance(keep, int) and 1 <= keep <= structure.num_groups, f"resized to unchecked width {keep!r}"
        return real(structure, keep)

    monkeypatch.setattr(surgery, "resize_empty", guarded)


@pytest.mark.parametrize("mlp_neurons", [10**9, 49, 0, -3, 2.5, "24", True])
def test_saved_block_dims_outside_the_dense_model_are_refused_before_resizing(tmp_path, no_unchecked_resize,
                                                                               mlp_neurons):
    directory = saved(tmp_path)
    blocks = json.loads((directory / META_FILE).read_text())["blocks"]
    blocks[1]["mlp_neurons"] = mlp_neurons
    edit_meta(directory, blocks=blocks)
    with pytest.raises(ValueError, match=rf"directory: .*{META_FILE}.*block 1 mlp_neurons.*from 1 to 48"):
        osscar_opt.load_pruned(directory)


@pytest.mark.parametrize("blocks", [None, [], [{"attention_groups": 4}] * 2, "24"])
def test_malformed_block_records_are_value_errors_naming_the_file(tmp_path, blocks):
    directory = saved(tmp_path)
    edit_meta(directory, blocks=blocks)
    with pytest.raises(ValueError, match=rf"directory: .*{META_FILE}"):
        osscar_opt.load_pruned(directory)


def test_an_alias_naming_a_saved_tensor_is_refused(tmp_path):
    directory = saved(tmp_path)
    edit_meta(directory, aliases={"encoder.layer.0.output.dense.weight": "encoder.layer.1.output.dense.weight"})
    with pytest.raises(ValueError, match=rf"directory: .*{META_FILE}.*{WEIGHTS_FILE} holds a tensor"):
        osscar_opt.load_pruned(directory)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        # same shape: the weights would load, one layer's into another
        ("encoder.layer.1.output.dense.weight", rf"directory: .*{META_FILE}.*does not tie them"),
        # another shape: a ValueError naming the file, not a RuntimeError
        ("embeddings.word_embeddings.weight", rf"directory: .*{WEIGHTS_FILE}.*do not fit"),
    ],
    ids=["one-layer-into-another", "another-shape"],
)
def test_an_alias_the_model_does_not_tie_is_refused_naming_the_file(tmp_path, source, message):
    directory = saved(tmp_path)
    edit_meta(directory, aliases={"encoder.layer.0.output.dense.weight": source})
    edit_weights(directory, lambda state: state.pop("encoder.layer.0.output.dense.weight"))
    with pytest.raises(ValueError, match=message):
        osscar_opt.load_pruned(directory)


def test_an_alias_whose_source_is_missing_names_the_file(tmp_path):
    directory = saved(tmp_path, family="opt")  # OPT ties lm_head to the token embeddings
    document = json.loads((directory / META_FILE).read_text())
    assert document["aliases"] == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    edit_meta(directory, aliases={"lm_head.weight": "model.decoder.missing.weight"})
    with pytest.raises(ValueError, match=rf"directory: .*{WEIGHTS_FILE} lacks 'model.decoder.missing.weight'"):
        osscar_opt.load_pruned(directory)


def test_tied_weights_still_reload_tied(tmp_path):
    directory = saved(tmp_path, family="opt")
    reloaded = osscar_opt.load_pruned(directory)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.decoder.embed_tokens.weight.data_ptr()
    assert loads_as(directory, "opt", seed=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_file(tmp_path, value):
    directory = saved(tmp_path, family="llama")

    def spoil(state):
        state["model.layers.1.mlp.down_proj.weight"][3, 5] = value

    edit_weights(directory, spoil)
    with pytest.raises(ValueError, match=rf"directory: .*{WEIGHTS_FILE} holds non-finite.*down_proj"):
        osscar_opt.load_pruned(directory)


def test_an_unknown_dtype_is_a_value_error_naming_the_file(tmp_path):
    directory = saved(tmp_path)
    edit_meta(directory, dtype="nn")
    with pytest.raises(ValueError, match=rf"directory: .*{META_FILE}.*dtype"):
        osscar_opt.load_pruned(directory)
