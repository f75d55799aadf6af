"""A prune that fails part-way marks the model; calibration that is not text is refused or warned about."""

from __future__ import annotations

import os
import warnings

import pytest

from osscar_opt import backends, cli, save_pruned
from osscar_opt.backends.base import Backend
from osscar_opt.data import text
from osscar_opt.pipeline import INCOMPLETE, INCOMPLETE_MARKER, prune
from tests.tiny_transformers import tiny_model, token_ids


class FailsOnSecondLayer(Backend):
    """Keeps the first groups of the first layer, then fails (a solver error in a later layer)."""

    calls = 0

    def solve(self, problem, keep, **options):
        type(self).calls += 1
        if type(self).calls > 1:
            raise RuntimeError("solver crashed on a later layer")
        return tuple(range(keep))


def test_a_prune_that_fails_part_way_marks_the_model_incomplete_and_save_refuses_it(tmp_path, capsys):
    backends.register("fails-on-second-layer", FailsOnSecondLayer)
    FailsOnSecondLayer.calls = 0
    model = tiny_model("bert")
    try:
        with pytest.raises(RuntimeError, match="solver crashed"):
            prune(model, token_ids(8), {"heads": 0.5, "neurons": 0.5}, backend="fails-on-second-layer",
                  damp=0.01, progress=False, save_problems=tmp_path / "problems")
    finally:
        backends._REGISTERED.pop("fails-on-second-layer", None)
    assert (tmp_path / "problems" / INCOMPLETE_MARKER).is_file()  # the problems folder says so too
    assert cli.main(["solve", str(tmp_path / "problems"), "--backend", "greedy"]) == 0
    assert "is marked INCOMPLETE" in capsys.readouterr().err
    assert model.osscar_state == INCOMPLETE
    assert model.encoder.layer[0].attention.self.num_attention_heads == 2  # the first cut happened
    with pytest.raises(ValueError, match="pruning failed part-way"):
        save_pruned(model, tmp_path / "half")
    assert not (tmp_path / "half").exists()


def test_a_prune_refused_before_any_cut_leaves_no_mark():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="damp"):
        prune(model, token_ids(8), {"heads": 0.5}, damp=-1.0, progress=False)
    assert not hasattr(model, "osscar_state")


def test_a_calibration_file_of_random_bytes_is_refused_as_not_text(tmp_path):
    path = tmp_path / "garbage.txt"
    path.write_bytes(os.urandom(4000))
    with pytest.raises(ValueError, match="does not look like text"):
        text.load_texts(str(path))


def test_calibration_of_mostly_unknown_tokens_warns():
    from transformers import AutoTokenizer

    from osscar_opt.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    strange = " ".join(["\U00013000\U00013001\U00013002"] * 200)  # Egyptian hieroglyphs: [UNK] for this vocabulary
    with pytest.warns(UserWarning, match="unknown token"):
        text.calibration_ids(tokenizer, [strange], samples=2, seq_len=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary English text: no warning
        text.calibration_ids(tokenizer, text.load_texts(), samples=2, seq_len=16)


def test_a_finished_prune_leaves_no_incomplete_marker(tmp_path):
    prune(tiny_model("bert"), token_ids(8), {"heads": 0.5}, backend="greedy", damp=0.01, progress=False,
          save_problems=tmp_path / "problems")
    assert not (tmp_path / "problems" / INCOMPLETE_MARKER).exists()
    assert len(list((tmp_path / "problems").glob("*.safetensors"))) == 2
