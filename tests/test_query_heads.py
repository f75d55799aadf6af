"""Query heads inside KV groups (structure kind ``q_heads``): equal counts per group, the best balanced
support on small layers (checked against enumeration here), KV groups first, stock reload for equal
counts in every block, the remote-code module or ``load_pruned`` for per-block counts, the CLI flag,
a cost target, and every bad input."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
import transformers

import osscar_opt
from osscar_opt import balanced, cli
from osscar_opt.budget import CostTarget, PerLayerKeep
from osscar_opt.pipeline import prune
from osscar_opt.problem import LayerProblem
from tests.tiny_transformers import VOCAB, output_of, token_ids


def tiny_qwen3(heads: int = 8, kv_heads: int = 2, vocab: int = VOCAB) -> torch.nn.Module:
    """A 2-block Qwen3 with ``heads`` query heads of 8 over ``kv_heads`` KV heads (per-head q/k norms)."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, head_dim=8, intermediate_size=48,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.Qwen3ForCausalLM(config).eval()


def run(model, budgets, **options):
    return prune(model, token_ids(8), budgets, backend="greedy", damp=0.01, batch_size=4, progress=False, **options)


def brute_force(problem: LayerProblem, blocks: int, per_block: int) -> tuple[float, tuple[int, ...]]:
    """The best balanced support by trying every one (independent of osscar_opt.balanced)."""
    size = problem.num_groups // blocks
    best = None
    for parts in itertools.product(*[itertools.combinations(range(b * size, (b + 1) * size), per_block)
                                     for b in range(blocks)]):
        support = tuple(sorted(g for part in parts for g in part))
        loss = problem.loss(support)
        if best is None or loss < best[0]:
            best = (loss, support)
    return best


def test_each_kv_group_keeps_the_same_number_of_query_heads_the_best_of_all(tmp_path):
    model = tiny_qwen3()
    report = run(model, {"q_heads": 0.5}, save_problems=tmp_path)
    assert [(r.kind, r.groups, r.keep) for r in report.layers] == [("q_heads", 8, 4)] * 2
    for record in report.layers:
        problem = next(p for p in map(LayerProblem.load, tmp_path.glob("*.safetensors"))
                       if p.meta["name"] == record.name)
        loss, support = brute_force(problem, 2, 2)
        assert tuple(record.kept) == support and record.loss == pytest.approx(loss, rel=1e-9)
        assert [sum(1 for g in record.kept if g // 4 == block) for block in range(2)] == [2, 2]
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.num_key_value_groups) == (32, 16, 2)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)


def test_above_the_enumeration_limit_the_repaired_support_is_balanced_and_no_better_than_the_optimum(tmp_path,
                                                                                                     monkeypatch):
    run(tiny_qwen3(), {"q_heads": 0.5}, save_problems=tmp_path)
    problem = LayerProblem.load(sorted(tmp_path.glob("*.safetensors"))[0])
    optimum, _ = brute_force(problem, 2, 2)
    monkeypatch.setattr(balanced, "ENUMERATION_LIMIT", 0)
    solution = balanced.solve_balanced(problem, 2, 2, "greedy")
    assert solution.status == "heuristic" and solution.info["balanced"] == "repaired"
    assert [sum(1 for g in solution.support if g // 4 == block) for block in range(2)] == [2, 2]
    assert solution.loss >= optimum * (1 - 1e-9)
    assert solution.info["unbalanced_loss"] <= solution.loss * (1 + 1e-9)  # the constraint can only cost


def test_kv_groups_go_first_then_query_heads_of_the_groups_left(tmp_path):
    model = tiny_qwen3()
    report = run(model, {"kv_groups": 0.5, "q_heads": 0.5, "neurons": 0.25})
    assert [(r.kind, r.groups, r.keep) for r in report.layers[:3]] == [
        ("kv_groups", 2, 1), ("q_heads", 4, 2), ("neurons", 48, 36)]
    assert report.layers[1].name == "model.layers.0.self_attn.o_proj:q_heads"
    assert report.settings["config_describes_pruned_model"] is True
    osscar_opt.save_pruned(model, tmp_path / "saved", report=report)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (2, 1)
    ids = token_ids(3, seed=5)
    torch.testing.assert_close(output_of(stock, ids), output_of(model, ids), rtol=0, atol=1e-5)
    kept = json.loads((tmp_path / "saved" / "osscar_pruned.json").read_text())["kept"]
    assert kept["model.layers.0.self_attn.o_proj:q_heads"]["kind"] == "q_heads"


def test_per_block_query_head_counts_reload_with_trust_remote_code_and_load_pruned(tmp_path):
    model = tiny_qwen3()
    report = run(model, PerLayerKeep({"model.layers.0.self_attn.o_proj:q_heads": 1,
                                      "model.layers.1.self_attn.o_proj:q_heads": 3}))
    assert [r.keep for r in report.layers] == [2, 6]
    assert report.settings["config_describes_pruned_model"] is False
    osscar_opt.save_pruned(model, tmp_path / "saved", report=report)
    blocks = json.loads((tmp_path / "saved" / "config.json").read_text())["osscar_pruned"]["blocks"]
    assert [entry["query_heads"] for entry in blocks] == [1, 3]
    ids = token_ids(3, seed=5)
    expected = output_of(model, ids)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True).eval()
    torch.testing.assert_close(output_of(stock, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(output_of(osscar_opt.load_pruned(tmp_path / "saved"), ids), expected, rtol=0, atol=1e-5)


def test_a_macs_target_over_query_heads_and_neurons_is_met_with_equal_counts_per_group(tmp_path):
    model = tiny_qwen3()
    report = run(model, CostTarget("macs", 0.85, kinds=["q_heads", "neurons"], grid=8))
    assert report.settings["allocation"]["target_met"]
    for record in report.layers:
        if record.kind == "q_heads":
            assert record.keep % 2 == 0 and len({g // 4 for g in record.kept}) == 2
    osscar_opt.save_pruned(model, tmp_path / "saved", report=report)
    ids = token_ids(3, seed=5)
    torch.testing.assert_close(output_of(osscar_opt.load_pruned(tmp_path / "saved"), ids), output_of(model, ids),
                               rtol=0, atol=1e-5)


class Fixed:
    def __init__(self, keep) -> None:
        self.value = keep

    def keep(self, name: str, kind: str, num_groups: int):
        return self.value if kind == "q_heads" else None

    def kinds(self) -> set[str]:
        return {"q_heads"}


@pytest.mark.parametrize("keep", [0, 5, 2.0])
def test_a_keep_outside_one_to_the_heads_per_group_is_refused(keep):
    with pytest.raises(ValueError, match=r"keep for model.layers.0.self_attn.o_proj:q_heads must be an integer in "
                                         r"\[1, 4\] per KV group"):
        run(tiny_qwen3(), Fixed(keep))


def test_solve_balanced_refuses_fewer_than_one_head_per_group_and_uneven_blocks(tmp_path):
    run(tiny_qwen3(), {"q_heads": 0.5}, save_problems=tmp_path)
    problem = LayerProblem.load(sorted(tmp_path.glob("*.safetensors"))[0])
    with pytest.raises(ValueError, match="at least one query head per KV group"):
        balanced.solve_balanced(problem, 2, 0)
    with pytest.raises(ValueError, match="blocks: expected a positive divisor of the 8 groups"):
        balanced.solve_balanced(problem, 3, 1)


def test_a_model_without_gqa_has_no_query_heads_to_prune():
    with pytest.raises(ValueError, match=r"prune \['q_heads'\], but this qwen3 model has only \['heads', 'neurons'\] "
                                         r"\(q_heads needs GQA"):
        run(tiny_qwen3(heads=4, kv_heads=4), {"heads": 0.25, "q_heads": 0.5})


def test_a_float_budget_leaves_query_heads_alone():
    report = osscar_opt.oneshot(tiny_qwen3(), token_ids(8), budgets=0.5, backend="greedy", progress=False)
    assert {record.kind for record in report[1].layers} == {"kv_groups", "neurons"}


def test_the_cli_flag_prunes_query_heads_and_saves_a_stock_folder(tmp_path, capsys):
    from osscar_opt.models import minilm_path

    folder = tmp_path / "qwen3"
    tiny_qwen3(vocab=30522).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_path() / name).exists():
            shutil.copy(minilm_path() / name, folder / name)
    argv = ["prune", "--model", str(folder), "--heads-sparsity", "0", "--q-heads-sparsity", "0.5",
            "--neurons-sparsity", "0", "--samples", "8", "--seq-len", "16", "--batch-size", "4", "--backend",
            "greedy", "--quiet", "--no-eval", "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (4, 2)
    assert cli.main([*argv[:-1], str(tmp_path / "bad"), "--q-heads-sparsity", "1.5"]) == 2
    assert "q_heads_sparsity: expected a fraction in [0, 1)" in capsys.readouterr().err


def test_a_model_with_one_kv_head_prunes_its_query_heads_and_reloads_stock(tmp_path):
    # Gemma-3-270M's shape: one key-value head, so KV groups have nothing to give; query heads do
    from tests.tiny_families import tiny_decoder

    model = tiny_decoder("gemma3_text", num_key_value_heads=1)
    report = run(model, {"q_heads": 0.5, "neurons": 0.25})
    assert [(r.kind, r.groups, r.keep) for r in report.layers[:2]] == [("q_heads", 4, 2), ("neurons", 48, 36)]
    assert report.settings["config_describes_pruned_model"] is True
    osscar_opt.save_pruned(model, tmp_path / "saved", report=report)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (2, 1)
    ids = token_ids(3, seed=5)
    torch.testing.assert_close(output_of(stock, ids), output_of(model, ids), rtol=0, atol=1e-5)
