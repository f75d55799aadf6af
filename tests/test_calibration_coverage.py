"""Calibration counted honestly: repeated text and degenerate text are said before pruning, the plan
line states how much distinct text the windows hold, and errors name the caller's argument."""

from __future__ import annotations

import warnings

import pytest
import torch

from osscar_opt.data.coverage import coverage
from osscar_opt.pipeline import prune
from tests.tiny_models import build
from tests.tiny_transformers import VOCAB


def windows_from(stream_length: int, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    stream = torch.randint(3, VOCAB, (stream_length,), generator=generator)
    starts = torch.randint(0, stream_length - seq_len + 1, (samples,), generator=generator)
    return torch.stack([stream[start:start + seq_len] for start in starts.tolist()])


def test_windows_cut_from_a_short_text_count_its_repeats():
    counted = coverage(windows_from(200, samples=40, seq_len=50))
    assert 150 <= counted.distinct_tokens <= 200  # the 200 tokens of text, whatever the 2,000 positions
    assert counted.repeats == pytest.approx(2000 / counted.distinct_tokens)
    assert counted.overlapping_windows == 40 and "text repeated" in counted.describe()


def test_fresh_windows_are_all_distinct():
    generator = torch.Generator().manual_seed(1)
    counted = coverage(torch.randint(3, VOCAB, (16, 32), generator=generator))
    assert counted.distinct_share == 1.0 and counted.overlapping_windows == 0
    assert counted.describe() == "all distinct" and counted.warnings() == []


def test_repeated_calibration_warns_with_the_numbers_before_pruning():
    ids = windows_from(60, samples=12, seq_len=20)
    with pytest.warns(UserWarning, match=r"12 windows \(240 tokens\) hold only about \d+ tokens of distinct text: it "
                                         r"is repeated about [\d.]+x"):
        prune(build("llama"), ids, {"neurons": 0.5}, backend="magnitude", damp=0.01, progress=False)


def test_degenerate_calibration_warns():
    ids = torch.full((8, 10), 7)
    ids[:, ::3] = 9
    with pytest.warns(UserWarning, match="degenerate text: 2 distinct token ids"):
        prune(build("llama"), ids, {"neurons": 0.5}, backend="magnitude", damp=0.01, progress=False)


def test_plenty_of_distinct_text_prunes_without_a_warning():
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (12, 10), generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune(build("llama"), ids, {"neurons": 0.5}, backend="magnitude", damp=0.01, progress=False)


def test_the_cli_says_a_repeated_calibration_text_in_one_line(tiny_bert_folder, tmp_path, capsys):  # noqa: F811
    from osscar_opt import cli

    text = tmp_path / "short.txt"
    text.write_text("A short calibration text that is far too small for the windows asked of it. " * 3)
    assert cli.main(["prune", "--model", str(tiny_bert_folder), "--calib-text", str(text), "--samples", "16",
                     "--seq-len", "24", "--batch-size", "8", "--backend", "magnitude", "--no-eval", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "osscar prune: warning: calibration: 16 windows (384 tokens) hold only about" in err


def test_oneshot_names_its_own_argument_when_the_text_is_too_short():
    from transformers import AutoTokenizer

    from osscar_opt import oneshot
    from osscar_opt.models import minilm_path

    model = build("bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    with pytest.raises(ValueError, match=r"^calibration: only \d+ tokens, fewer than seq_len=64"):
        oneshot(model, ["too short"], tokenizer=tokenizer, samples=8, seq_len=64, progress=False)


from tests.test_cli_prune_eval_solve import tiny_bert_folder  # noqa: E402, F401 - the shared fixture
