"""The allocation search (issue 25): keeps at equal cost scored on the model's output. It never
leaves the target's cost and never returns a worse score than its start; a candidate assembled from
stored supports is exactly the cut model; every tiny family runs it through the pipeline and the
CLI; bad settings are refused before any work."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from osscar_opt import cli
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.allocate import Choices
from osscar_opt.allocation_search import AllocationSearch, search_allocation
from osscar_opt.budget import CostTarget
from osscar_opt.formulations.surgery import apply_solution, mask_solution
from osscar_opt.pipeline import prune
from osscar_opt.pipeline.search import Supernet
from osscar_opt.problem import LayerProblem
from osscar_opt.solving import solve
from tests.test_cli_prune_eval_solve import tiny_bert_folder  # noqa: F401 - the shared fixture
from tests.test_cost_targets import one_thread  # noqa: F401 - tiny tensors: one thread (autouse)
from tests.tiny_models import MODELS, build, calibration, images, is_vision, output


def synthetic(structures: int = 6, seed: int = 0):
    """Choices with linear costs, a start that fits the capacity and a score with interactions."""
    rng = random.Random(seed)
    choices = [Choices(f"s{i}", "neurons", list(range(2, 11)), [0.0] * 9, [float(k - 10) * (1 + i) for k in
                                                                            range(2, 11)]) for i in range(6)]
    choices = choices[:structures]
    costs = {c.name: dict(zip(c.keeps, c.costs, strict=True)) for c in choices}

    def cost_of(keep):
        return sum(costs[name][k] for name, k in keep.items())

    start = {c.name: 6 for c in choices}
    capacity = cost_of(start)
    weights = {c.name: rng.uniform(0.5, 2.0) for c in choices}

    def score(keep, share):
        value = sum(weights[n] / k for n, k in keep.items()) + 0.05 * keep["s0"] * keep.get("s1", 0) / 100
        return value + 0.01 * share, share

    return choices, start, cost_of, capacity, score


@pytest.mark.parametrize("method", ["moves", "evolution"])
def test_the_search_never_leaves_the_cost_target_and_never_scores_worse_than_its_start(method):
    for seed in range(4):
        choices, start, cost_of, capacity, score = synthetic(seed=seed)
        seen = []

        def recording(keep, share, seen=seen, score=score):
            seen.append(dict(keep))
            return score(keep, share)

        settings = AllocationSearch(torch.zeros(4, 2), evaluations=40, seed=seed, method=method)
        result = search_allocation(choices, start, cost_of, capacity, recording, settings)
        assert all(cost_of(keep) <= capacity + 1e-9 for keep in seen)
        assert result.score <= result.start_score
        assert result.score == pytest.approx(score(result.keep, 1.0)[0])
        assert cost_of(result.keep) <= capacity + 1e-9
        assert result.score < result.start_score  # the weights differ: moving budget helps
        bests = [t["best"] for t in result.trace]
        assert bests == sorted(bests, reverse=True)
        assert result.evaluations <= settings.evaluations
        assert result.trace[0]["score"] == result.start_score


def test_the_same_seed_gives_the_same_search_and_a_time_budget_stops_it():
    choices, start, cost_of, capacity, score = synthetic()
    settings = AllocationSearch(torch.zeros(4, 2), evaluations=30, seed=3)
    first = search_allocation(choices, start, cost_of, capacity, score, settings)
    second = search_allocation(choices, start, cost_of, capacity, score, settings)
    assert first.keep == second.keep and [t["score"] for t in first.trace] == [t["score"] for t in second.trace]
    timed = search_allocation(choices, start, cost_of, capacity, score,
                              AllocationSearch(torch.zeros(4, 2), evaluations=10**6, seconds=0.2))
    assert timed.stopped == "seconds" and timed.seconds < 5


def test_one_structure_has_no_move_and_a_start_above_the_capacity_is_refused():
    choices, start, cost_of, capacity, score = synthetic(structures=1)
    result = search_allocation(choices, start, cost_of, capacity, score, AllocationSearch(torch.zeros(4, 2)))
    assert result.stopped == "no moves" and result.keep == start
    choices, start, cost_of, capacity, score = synthetic()
    with pytest.raises(ValueError, match="above the capacity"):
        search_allocation(choices, start, cost_of, capacity - 1, score, AllocationSearch(torch.zeros(4, 2)))


@pytest.mark.parametrize("name", MODELS)
def test_a_masked_candidate_computes_exactly_what_the_cut_model_computes(name):
    """mask_solution (the supernet's assembly) against apply_solution (surgery) with the same supports and
    re-fit weights, on every structure of every tiny family at once."""
    model = build(name)
    data = images(4) if is_vision(name) else calibration(name)
    masked, cut = copy.deepcopy(model), copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    for left, right in zip(adapter_for(masked).structures(), adapter_for(cut).structures(), strict=True):
        if left.kind == "q_heads":  # shares kv_groups' consumer; not searched (refused below)
            continue
        n = left.num_groups
        keep = max(1, n // 2)
        support = sorted(torch.randperm(n, generator=generator)[:keep].tolist())
        weights = left.weight() * (1 + 0.1 * torch.randn(left.weight().shape, generator=generator))
        mask_solution(left, support, weights)
        apply_solution(right, support, weights)
    with torch.no_grad():
        assert torch.allclose(output(masked, data), output(cut, data), atol=1e-5, rtol=1e-4)


def test_the_supernet_assembles_a_stored_support_with_its_re_fit_weights_and_restores_the_dense_model():
    model = build("llama")
    data = calibration("llama")
    structures = adapter_for(model).structures()
    dense = output(model, data)
    supernet, expected = Supernet(), copy.deepcopy(model)
    keep = {}
    for structure, twin in zip(structures, adapter_for(expected).structures(), strict=True):
        if structure.kind == "q_heads":
            continue
        W = structure.weight().detach().double()
        X = torch.randn(64, W.shape[1], generator=torch.Generator().manual_seed(len(keep)), dtype=torch.float64)
        problem = LayerProblem.from_activations(X, W, structure.groups)
        keeps = list(range(1, structure.num_groups + 1))
        supports = [solve(problem, k, "greedy").support for k in keeps]
        supernet.add(structure, problem, keeps, supports)
        keep[structure.name] = max(1, structure.num_groups // 2)
        support = supports[keep[structure.name] - 1]
        apply_solution(twin, support, problem.to(dtype=torch.float32).weights(support).float())
    supernet.assemble(keep)
    with torch.no_grad():
        assert torch.allclose(output(model, data), output(expected, data), atol=1e-4, rtol=1e-3)
    supernet.restore()
    assert torch.equal(output(model, data), dense)


@pytest.mark.parametrize("name", MODELS)
def test_every_family_searches_its_allocation_within_the_target(name):
    model = build(name)
    vision = is_vision(name)
    data = images(8) if vision else calibration(name)
    held_out = images(8, seed=5) if vision else calibration(name, seed=7)
    value = 0.8 if name == "resnet50" else 0.7
    target = CostTarget("macs", value, normalize="relative",
                        search=AllocationSearch(held_out, evaluations=8, method="evolution", offspring=4))
    report = prune(model, data, target, backend="magnitude" if vision else "greedy", batch_size=4, progress=False)
    allocation = report.settings["allocation"]
    search = allocation["search"]
    assert allocation["target_met"] and allocation["achieved_fraction"] <= value + 1e-9
    assert search["fraction"] <= value + 1e-9
    assert search["score"] <= search["start_score"]
    assert allocation["keep"] == search["keep"]
    assert search["metric"] == ("1 - cosine" if name in ("bert",) else "kl")
    assert search["supernet_bytes"] > 0 and search["pruned_score"] >= -1e-6
    assert report.settings["budgets"]["search"]["evaluations"] == 8


def test_bad_search_settings_are_refused_before_any_work():
    samples = torch.zeros(4, 8, dtype=torch.int64)
    for value in (0, -3, 1.5, True, "8"):
        with pytest.raises(ValueError, match="evaluations: expected a positive integer"):
            AllocationSearch(samples, evaluations=value)
    with pytest.raises(ValueError, match="seconds"):
        AllocationSearch(samples, seconds=0)
    with pytest.raises(ValueError, match="method"):
        AllocationSearch(samples, method="anneal")
    with pytest.raises(ValueError, match="reallocate"):
        CostTarget("macs", 0.5, reallocate=True, search=AllocationSearch(samples))
    with pytest.raises(ValueError, match="q_heads"):
        CostTarget("macs", 0.5, kinds=["kv_groups", "q_heads"], search=AllocationSearch(samples))
    with pytest.raises(ValueError, match="uniform"):
        CostTarget("macs", 0.5, allocation="uniform", search=AllocationSearch(samples))
    model = build("llama")
    before = copy.deepcopy(model.state_dict())
    too_few = CostTarget("macs", 0.5, search=AllocationSearch(calibration("llama")[:3]))
    with pytest.raises(ValueError, match="at least 4 held-out samples, got 3"):
        prune(model, calibration("llama"), too_few, progress=False)
    with pytest.raises(ValueError, match="not with offload"):
        prune(model, calibration("llama"), CostTarget("macs", 0.5, search=AllocationSearch(calibration("llama"))),
              offload=True, device="cpu", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("argv, message", [
    (["--search-evaluations", "8"], "--search-evaluations: searches a cost target's allocation"),
    (["--target-macs", "0.6", "--search-evaluations", "0"], "--search-evaluations: expected a positive integer"),
    (["--target-macs", "0.6", "--search-evaluations", "4", "--search-samples", "2"], "at least 4 held-out samples"),
    (["--target-macs", "0.6", "--search-seconds", "5"], "--search-seconds: applies only with --search-evaluations"),
    (["--target-macs", "0.6", "--search-evaluations", "4", "--reallocate"], "give one or the other"),
])
def test_the_cli_refuses_bad_search_flags_before_loading_a_model(argv, message, capsys):
    assert cli.main(["prune", "--model", "/no/such/model/folder", "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_osscar_prune_searches_on_held_out_documents_and_draws_the_search(tiny_bert_folder, tmp_path, capsys):  # noqa: F811
    report = tmp_path / "run.json"
    argv = ["prune", "--model", str(tiny_bert_folder), "--target-macs", "0.7", "--samples", "8", "--seq-len", "16",
            "--backend", "greedy", "--quiet", "--report", str(report), "--search-evaluations", "6",
            "--search-samples", "4", "--calib-text", "stdlib", "--eval-text", "stdlib"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "allocation search (moves, 4 held-out samples): 1 - cosine" in out
    document = json.loads(report.read_text())
    search = document["settings"]["allocation"]["search"]
    assert search["evaluations"] <= 6 and search["score"] <= search["start_score"]
    assert report.with_suffix(".search.png").stat().st_size > 0


def test_held_out_documents_are_every_tenth_and_never_calibration():
    from osscar_opt.data import text

    passages = [f"document {i} " * 10 for i in range(30)]
    fit, held = text.hold_out_documents(passages)
    assert held == passages[9::10] and not set(fit) & set(held) and len(fit) + len(held) == 30
    one_text = "\n\n".join(f"paragraph number {i} with enough words in it to count" for i in range(12))
    fit, held = text.hold_out_documents([one_text])
    assert "paragraph number 9 " in held[0] and "paragraph number 9 " not in fit[0]
    with pytest.raises(ValueError, match="calib_text: 3 documents or paragraphs, too few"):
        text.hold_out_documents(["a b c d e f g h i"] * 3)
