"""The default calibration text (Wikipedia summaries, split by article), named text sources, and quality
measured per text: `osscar eval` / `osscar prune` with several --eval-text, overlap warnings, bad texts."""

from __future__ import annotations

import json

import pytest
import torch

from osscar_opt import cli, cross_domain
from osscar_opt.data import text, wiki
from tests.test_cli_prune_eval_solve import tiny_bert_folder  # noqa: F401 - the shared fixture


def test_wiki_calibration_and_evaluation_share_no_article():
    calib_titles = {title for title, _ in wiki.articles() if not wiki.in_eval_part(title)}
    eval_titles = {title for title, _ in wiki.articles() if wiki.in_eval_part(title)}
    assert not calib_titles & eval_titles
    assert len(calib_titles) + len(eval_titles) == len(wiki.articles()) > 9000
    assert 0.15 < len(eval_titles) / len(wiki.articles()) < 0.25
    calib, evaluation = text.load_texts(None, "calib"), text.load_texts(None, "eval")
    assert len(calib) == len(calib_titles) and len(evaluation) == len(eval_titles)
    assert not set(calib) & set(evaluation)
    assert cross_domain.overlap_share(calib, evaluation) < 0.01


def test_the_default_text_is_wiki_for_causal_models_and_encoders():
    assert text.DEFAULT_SOURCE == "wiki" and text.source_name(None) == "wiki (default)"
    assert text.load_texts(None, "eval", causal=True) == text.load_texts("wiki", "eval", causal=False)


def test_named_sources_give_disjoint_parts_and_paragraphs_for_encoders():
    for source in ("shakespeare", "licences"):
        calib, evaluation = text.load_texts(source, "calib", True), text.load_texts(source, "eval", True)
        assert len(calib) == len(evaluation) == 1 and calib[0] and evaluation[0] and calib != evaluation
        passages = text.load_texts(source, "eval", False)
        assert len(passages) > 10 and all(len(p.split()) >= 8 and "\n" not in p for p in passages)


def test_unseen_mean_leaves_out_the_calibration_text():
    results = {"wiki": {"perplexity": 10.0}, "licences": {"perplexity": 30.0}, "notes.txt": {"perplexity": 50.0}}
    assert cross_domain.unseen_mean(results, "wiki (default)") == 40.0
    assert cross_domain.unseen_mean(results, "shakespeare") == 30.0
    table = cross_domain.format_table(results, {k: {"perplexity": 2 * v["perplexity"]} for k, v in results.items()},
                                      "wiki (default)")
    assert "wiki (calibration's, held out)" in table and table.splitlines()[-1].split()[-1] == "2.000"


def test_eval_gives_one_row_per_text(tiny_bert_folder, tmp_path, capsys):  # noqa: F811
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"Paragraph {i} of the notes says something different about item {i} today."
                                 for i in range(12)))
    argv = ["eval", str(tiny_bert_folder), "--reference", str(tiny_bert_folder), "--seq-len", "16",
            "--eval-text", "wiki", "licences", str(notes)]
    assert cli.main([*argv, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert list(document["domains"]) == ["wiki", "licences", "notes.txt"]
    assert all(row["cosine_to_dense"] == pytest.approx(1.0) for row in document["domains"].values())
    assert document["calibrated_on"] == "wiki (default)" and document["unseen_mean"] == pytest.approx(1.0)
    assert cli.main(argv) == 0
    table = capsys.readouterr().out.split("quality per text")[1].splitlines()
    assert [row.split()[0] for row in table[2:]] == ["wiki", "licences", "notes.txt", "mean"]


@pytest.mark.parametrize(("content", "message"), [
    ("", "is empty"),
    ("\x00\x01\x02\x03" * 50, "does not look like text"),
])
def test_an_empty_or_binary_eval_text_is_refused_naming_the_file(tiny_bert_folder, tmp_path, content, message,  # noqa: F811
                                                                capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    assert cli.main(["eval", str(tiny_bert_folder), "--eval-text", "wiki", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "eval_text:" in err and str(bad) in err and message in err


def test_the_same_eval_text_twice_is_refused(tiny_bert_folder, capsys):  # noqa: F811
    assert cli.main(["eval", str(tiny_bert_folder), "--eval-text", "wiki", "wiki"]) == 2
    assert "eval_text: 'wiki' is given twice" in capsys.readouterr().err


def test_an_eval_text_that_overlaps_the_calibration_warns_with_the_share(tiny_bert_folder, tmp_path, capsys):  # noqa: F811
    shared = tmp_path / "shared.txt"
    shared.write_text("\n\n".join(f"The calibration and the evaluation both hold sentence number {i} of this file."
                                  for i in range(400)))
    argv = ["prune", "--model", str(tiny_bert_folder), "--neurons-sparsity", "0.5", "--heads-sparsity", "0",
            "--samples", "4", "--seq-len", "16", "--backend", "magnitude", "--quiet",
            "--calib-text", str(shared), "--eval-text", str(shared), "wiki"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "warning: eval_text: 100% of shared.txt's 8-word sequences are also in the calibration text" in captured.err
    assert "wiki's" not in captured.err
    assert "calibrated on shared.txt" in captured.out and "shared.txt (calibration's, held" in captured.out


def test_a_mixture_draws_an_equal_share_of_every_source_in_a_shuffled_order():
    from transformers import AutoTokenizer

    from osscar_opt.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    mixed = text.mixture_ids(tokenizer, text.load_sources(["stdlib", "licences"]), samples=9, seq_len=16)
    stdlib = text.calibration_ids(tokenizer, text.load_texts("stdlib"), 5, 16, text.SEED)
    licences = text.calibration_ids(tokenizer, text.load_texts("licences"), 4, 16, text.SEED + 1)
    rows = {tuple(r) for r in mixed.tolist()}
    assert mixed.shape == (9, 16) and rows == {tuple(r) for r in torch.cat([stdlib, licences]).tolist()}
    assert not torch.equal(mixed[:5], stdlib)  # shuffled: a split of every k-th sample sees both sources
    assert torch.equal(text.mixture_ids(tokenizer, text.load_sources(["stdlib"]), 5, 16), stdlib)
    with pytest.raises(ValueError, match="given twice"):
        text.load_sources(["stdlib", "stdlib"])
    with pytest.raises(ValueError, match="at least one window per source"):
        text.mixture_ids(tokenizer, text.load_sources(["stdlib", "licences"]), 1, 16)
    assert text.sources_name(["stdlib", None]) == "stdlib + wiki (default)"


def test_prune_calibrates_on_a_mixture_and_leaves_its_sources_out_of_the_unseen_mean(tiny_bert_folder, tmp_path,  # noqa: F811
                                                                                     capsys):
    argv = ["prune", "--model", str(tiny_bert_folder), "--neurons-sparsity", "0.5", "--heads-sparsity", "0",
            "--samples", "8", "--seq-len", "16", "--backend", "magnitude", "--quiet",
            "--report", str(tmp_path / "run.json"),
            "--calib-text", "stdlib", "licences", "--eval-text", "stdlib", "shakespeare", "licences"]
    assert cli.main(argv) == 0
    assert "calibrated on stdlib + licences" in capsys.readouterr().out
    document = json.loads((tmp_path / "run.json").read_text())
    assert document["settings"]["calibration_text"] == "stdlib + licences"
    assert document["unseen_mean"] == pytest.approx(document["domains"]["shakespeare"]["pruned"]["cosine_to_dense"])
    assert cross_domain.same_source("licences", "stdlib + licences")
    assert not cross_domain.same_source("shakespeare", "stdlib + licences")
    assert cli.main([*argv[:-7], "--calib-text", "stdlib", "stdlib"]) == 2
    assert "calib_text: a source is given twice" in capsys.readouterr().err
