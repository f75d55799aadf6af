"""Saved pruned transformers reload with stock ``from_pretrained`` wherever the family's config can
state the pruned widths, and fail with a message naming ``osscar_opt.load_pruned`` where it cannot;
the folder is complete (tokenizer, sentence-transformers modules, kept ids); ``oneshot`` in one call."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import osscar_opt
from osscar_opt import cli
from osscar_opt.budget import PerLayerKeep
from osscar_opt.io import META_FILE
from osscar_opt.pipeline import prune
from tests.test_cli_prune_eval_solve import tiny_bert_folder  # noqa: F401 - a fixture
from tests.tiny_transformers import VOCAB, output_of, tiny_model, token_ids

GQA_FAMILIES = ("llama", "qwen2", "mistral")
DERIVED_HEAD_FAMILIES = ("bert", "opt", "gpt2")


def build(family: str) -> torch.nn.Module:
    """A tiny 2-block model of ``family`` (Qwen2 and Mistral: 4 query heads over 2 KV heads)."""
    if family not in ("qwen2", "mistral"):
        return tiny_model(family)
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return MistralForCausalLM(MistralConfig(**common)).eval()


def stock_class(family: str):
    return transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM


def pruned(family: str, budgets) -> tuple[torch.nn.Module, osscar_opt.PruneReport]:
    model = build(family)
    report = prune(model, token_ids(8), budgets, backend="greedy", damp=0.01, batch_size=4, progress=False)
    return model, report


@pytest.mark.parametrize("family", GQA_FAMILIES + DERIVED_HEAD_FAMILIES)
def test_uniform_widths_reload_with_stock_from_pretrained_and_identical_outputs(family, tmp_path):
    # GQA families state heads in their config; the others only the MLP width
    budgets = {"kv_groups": 0.5, "neurons": 0.5} if family in GQA_FAMILIES else {"neurons": 0.5}
    model, report = pruned(family, budgets)
    assert report.settings["config_describes_pruned_model"] is True
    osscar_opt.save_pruned(model, tmp_path / "model", report=report)
    stock = stock_class(family).from_pretrained(tmp_path / "model").eval()
    assert type(stock) is type(model)
    ids = token_ids(3, seed=5)
    torch.testing.assert_close(output_of(stock, ids), output_of(model, ids), rtol=0, atol=1e-6)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in stock.state_dict().items()} == shapes
    mlp_field = {"opt": "ffn_dim", "gpt2": "n_inner"}.get(family, "intermediate_size")
    assert getattr(stock.config, mlp_field) == 24 == getattr(model.config, mlp_field)
    if family in GQA_FAMILIES:
        assert (stock.config.num_key_value_heads, stock.config.num_attention_heads) == (1, 2)


def assert_remote_code_reload(family: str, folder, model) -> None:
    """Stock ``from_pretrained`` refuses the folder naming trust_remote_code, reloads it with it, and
    ``load_pruned`` reloads it too; all three models give the same outputs."""
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        stock_class(family).from_pretrained(folder)
    stock = stock_class(family).from_pretrained(folder, trust_remote_code=True).eval()
    assert isinstance(stock, type(model))  # the module's class subclasses the family's stock class
    ids = token_ids(3, seed=5)
    assert torch.equal(output_of(stock, ids), output_of(model, ids))
    assert torch.equal(output_of(osscar_opt.load_pruned(folder), ids), output_of(model, ids))


@pytest.mark.parametrize("family", DERIVED_HEAD_FAMILIES)
def test_pruned_heads_of_derived_head_size_families_reload_with_trust_remote_code(family, tmp_path):
    model, report = pruned(family, {"heads": 0.5, "neurons": 0.25})
    assert report.settings["config_describes_pruned_model"] is False
    osscar_opt.save_pruned(model, tmp_path / "model", report=report)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["osscar_pruned"]["blocks"] == [{"attention_groups": 2, "mlp_neurons": 36}] * 2
    assert "osscar_opt.load_pruned" in config["model_type"]
    assert_remote_code_reload(family, tmp_path / "model", model)


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_per_layer_widths_reload_with_trust_remote_code_and_with_load_pruned(family, tmp_path):
    model = build(family)
    keep = {"model.layers.0.mlp.down_proj": 12, "model.layers.1.mlp.down_proj": 40,
            "model.layers.1.self_attn.o_proj": 1}
    report = prune(model, token_ids(8), PerLayerKeep(keep), backend="greedy", damp=0.01, batch_size=4,
                   progress=False)
    assert report.settings["config_describes_pruned_model"] is False
    assert model.config.intermediate_size == 48  # the dense config is left alone
    osscar_opt.save_pruned(model, tmp_path / "model")
    assert_remote_code_reload(family, tmp_path / "model", model)


def test_a_folder_stock_classes_can_read_has_no_remote_code_and_resaving_drops_it(tmp_path):
    model = build("llama")
    prune(model, token_ids(8), PerLayerKeep({"model.layers.0.mlp.down_proj": 12}), backend="greedy", damp=0.01,
          batch_size=4, progress=False)
    osscar_opt.save_pruned(model, tmp_path / "per-layer")
    assert (tmp_path / "per-layer" / "osscar_pruned_modeling.py").is_file()
    reloaded = osscar_opt.load_pruned(tmp_path / "per-layer")
    assert not hasattr(reloaded.config, "auto_map")  # the module belongs to that folder, not to the model
    uniform = build("llama")
    prune(uniform, token_ids(8), {"neurons": 0.5}, backend="greedy", damp=0.01, batch_size=4, progress=False)
    uniform.config.auto_map = {"AutoConfig": "stale.Config"}
    osscar_opt.save_pruned(uniform, tmp_path / "uniform")
    config = json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert "auto_map" not in config and not (tmp_path / "uniform" / "osscar_pruned_modeling.py").exists()


def test_saved_metadata_records_the_kept_ids_of_every_pruned_layer(tmp_path):
    model, report = pruned("llama", {"kv_groups": 0.5, "neurons": 0.5})
    osscar_opt.save_pruned(model, tmp_path / "model", report=report)
    kept = json.loads((tmp_path / "model" / META_FILE).read_text())["kept"]
    assert set(kept) == {record.name for record in report.layers}
    for record in report.layers:
        entry = kept[record.name]
        assert entry["kept"] == sorted(record.kept) and entry["kind"] == record.kind
        assert len(entry["kept"]) == record.keep and all(0 <= i < entry["groups"] for i in entry["kept"])


def test_saved_config_drops_stale_quantization_and_names_the_architecture(tmp_path):
    model, report = pruned("llama", {"kv_groups": 0.5})
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "gone.gguf"}
    osscar_opt.save_pruned(model, tmp_path / "model", report=report)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "quantization_config" not in config and "_name_or_path" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_empty_budget_is_refused_instead_of_a_silent_no_op():
    with pytest.raises(ValueError, match="prunes nothing"):
        prune(build("bert"), token_ids(8), {"heads": 0.0}, backend="greedy", progress=False)
    with pytest.raises(ValueError, match="prunes nothing"):
        prune(build("bert"), token_ids(8), {}, backend="greedy", progress=False)


# ---------------------------------------------------------------- real MiniLM folders


@pytest.fixture(scope="module")
def minilm():
    from osscar_opt.data import text
    from osscar_opt.models import load_model

    loaded = load_model(None, device="cpu")
    return loaded, text.calibration_ids(loaded.tokenizer, text.load_texts(), samples=8, seq_len=24)


def embeddings(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


SENTENCES = ["The cat sat on the mat.", "Pruning keeps the heads that matter.", "A third, longer sentence here."]


@pytest.mark.slow
@pytest.mark.parametrize("budgets", [{"neurons": 0.25}, {"heads": 0.25, "neurons": 0.25}], ids=["stock", "heads"])
def test_pruned_minilm_stays_a_sentence_transformers_folder_with_its_tokenizer(minilm, budgets, tmp_path):
    import copy

    from sentence_transformers import SentenceTransformer

    loaded, calibration = minilm
    model = copy.deepcopy(loaded.model)
    model.name_or_path = loaded.model.name_or_path
    report = prune(model, calibration, budgets, backend="magnitude", progress=False)
    folder = osscar_opt.save_pruned(model, tmp_path / "minilm", tokenizer=loaded.tokenizer, report=report)
    assert {"modules.json", "sentence_bert_config.json", "1_Pooling"} <= {p.name for p in folder.iterdir()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer("pruned models")["input_ids"] == loaded.tokenizer("pruned models")["input_ids"]
    encoder = osscar_opt.load_sentence_transformer(folder)
    expected = embeddings(model, loaded.tokenizer, SENTENCES)
    torch.testing.assert_close(encoder.encode(SENTENCES, convert_to_tensor=True), expected, rtol=0, atol=1e-5)
    if "heads" in budgets:
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            SentenceTransformer(str(folder))
        stock = SentenceTransformer(str(folder), trust_remote_code=True)
        torch.testing.assert_close(stock.encode(SENTENCES, convert_to_tensor=True), expected, rtol=0, atol=1e-5)
    else:
        stock = SentenceTransformer(str(folder))
        torch.testing.assert_close(stock.encode(SENTENCES, convert_to_tensor=True), expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_oneshot_prunes_minilm_from_a_list_of_strings_and_saves_a_complete_folder(tmp_path):
    from osscar_opt.data.text import load_texts

    model, report = osscar_opt.oneshot("all-minilm-l6-v2", load_texts()[:200], samples=16, seq_len=32,
                                       output_dir=tmp_path / "out", progress=False)
    assert report.settings["backend"] == "local-search" and report.settings["samples"] == 16
    assert {record.keep for record in report.layers if record.kind == "heads"} == {9}  # default sparsity 0.25
    assert report.settings["output_dir"] == str(tmp_path / "out")
    reloaded = osscar_opt.load_pruned(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(embeddings(reloaded, tokenizer, SENTENCES), embeddings(model, tokenizer, SENTENCES))


def test_oneshot_takes_a_batch_encoding_and_a_float_budget(minilm):
    import copy

    loaded, calibration = minilm
    model = copy.deepcopy(loaded.model)
    encoding = loaded.tokenizer(["a first calibration passage of words"] * 4 + ["another one, as long!"] * 4,
                                padding=False, truncation=True, max_length=7)
    encoding = {"input_ids": torch.tensor([ids[:7] for ids in encoding["input_ids"]]),
                "attention_mask": torch.ones(8, 7, dtype=torch.int64)}
    _, report = osscar_opt.oneshot(model, encoding, budgets=0.5, backend="magnitude", progress=False)
    kinds = {record.kind: record.keep / record.groups for record in report.layers}
    assert kinds == {"heads": 0.5, "neurons": 0.5}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budgets": 1.5}, r"budgets: expected a fraction in \[0, 1\)"),
        ({"budgets": 0.0}, "budgets: 0 prunes nothing"),
        ({"calibration": []}, "calibration: the list is empty"),
        ({"calibration": ["", "  "]}, "calibration: every string is empty"),
        ({"calibration": "no/such/file.txt"}, "calibration: 'no/such/file.txt' is not a file"),
        ({"calibration": {"input_ids": torch.ones(2, 4, dtype=torch.int64),
                          "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}}, "padded positions"),
        ({"samples": 0}, "samples: expected a positive integer"),
        ({"seq_len": 100_000}, "seq_len: 100000 tokens per sample, but the model has 512 positions"),
        ({"backend": "nope"}, "nope"),
    ],
)
def test_oneshot_bad_input_is_a_clear_error_before_pruning(minilm, kwargs, message):
    loaded, _ = minilm
    arguments = {"calibration": ["some text to calibrate on"] * 4, "tokenizer": loaded.tokenizer, **kwargs}
    calibration = arguments.pop("calibration")
    before = {key: value.clone() for key, value in loaded.model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        osscar_opt.oneshot(loaded.model, calibration, progress=False, **arguments)
    assert all(torch.equal(value, before[key]) for key, value in loaded.model.state_dict().items())


def test_oneshot_refuses_an_empty_calibration_file_and_text_without_a_tokenizer(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="calibration: .*empty"):
        osscar_opt.oneshot(build("bert"), tmp_path / "empty.txt", progress=False)
    with pytest.raises(ValueError, match="tokenizer: text calibration needs a tokenizer"):
        osscar_opt.oneshot(build("bert"), ["some text"], progress=False)


def test_oneshot_refuses_an_output_folder_that_is_not_a_saved_model_before_pruning(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own file")
    model = build("bert")
    before = output_of(model, token_ids(2))
    with pytest.raises(ValueError, match="not a saved pruned model"):
        osscar_opt.oneshot(model, token_ids(8), output_dir=tmp_path / "mine", progress=False)
    assert torch.equal(output_of(model, token_ids(2)), before)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my own file"


# ---------------------------------------------------------------- the CLI


def test_cli_uniform_widths_saves_a_stock_loadable_bert_and_says_so(tiny_bert_folder, tmp_path, capsys):  # noqa: F811
    argv = ["prune", "--model", str(tiny_bert_folder), "--uniform-widths", "--samples", "8", "--seq-len", "16",
            "--batch-size", "4", "--backend", "greedy", "--quiet", "--no-eval", "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "stock from_pretrained loads it" in out and "sparsity neurons 0.25" in out
    stock = transformers.AutoModel.from_pretrained(tmp_path / "out")
    assert stock.config.num_attention_heads == 4 and stock.config.intermediate_size == 36
    transformers.AutoTokenizer.from_pretrained(tmp_path / "out")


def test_cli_says_when_the_pruned_model_was_not_saved(tiny_bert_folder, capsys):  # noqa: F811
    argv = ["prune", "--model", str(tiny_bert_folder), "--samples", "8", "--seq-len", "16", "--batch-size", "4",
            "--backend", "greedy", "--quiet", "--no-eval"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "the pruned model was not saved (give --output DIR to keep it)" in out
    assert "8 calibration samples of 16" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--uniform-widths", "--heads-sparsity", "0.5"], "--uniform-widths: this bert model's config cannot state"),
        (["--plot"], "--plot: the PNGs are written beside the report"),
        (["--seq-len", "100"], "--seq-len: 100 tokens per sample, but the model has 64 positions"),
    ],
)
def test_cli_uniform_widths_and_plot_refusals(tiny_bert_folder, extra, message, capsys):  # noqa: F811
    argv = ["prune", "--model", str(tiny_bert_folder), "--samples", "8", "--quiet", "--no-eval", *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
