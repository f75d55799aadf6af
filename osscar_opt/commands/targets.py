"""``osscar prune``'s cost-target flags: parsing them into a :class:`~osscar_opt.budget.CostTarget`,
``--multiple-of``, refusing target options without a target, and saying what the target achieved."""

from __future__ import annotations

import argparse
from typing import Any

from osscar_opt.allocation_search import SEARCH_METHODS
from osscar_opt.budget import DEFAULT_MIN_KEEP, DEFAULT_NORMALIZATION, KINDS, LATENCY_CACHE_MODES, NORMALIZATIONS

DEFAULT_SEARCH_SAMPLES = 16
SEARCH_FLAGS = ("search_evaluations", "search_seconds", "search_samples", "search_seed", "search_method")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``--target-macs`` / ``--target-params`` / ``--target-speedup`` and the allocation options."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--target-macs", type=float, default=None, metavar="FRACTION",
                       help="keep this fraction of the dense MACs (calibration batch shape); per-layer keeps are "
                       "allocated from loss curves instead of a uniform sparsity")
    group.add_argument("--target-params", type=float, default=None, metavar="FRACTION",
                       help="keep this fraction of the dense parameters (allocated per layer)")
    group.add_argument("--target-speedup", type=float, default=None, metavar="X",
                       help="dense latency / pruned latency on this device, >= 1 (latency table measured per block "
                       "shape and cached; allocated per layer)")
    parser.add_argument("--target-kinds", default=None, metavar="KINDS",
                        help="comma-separated structure kinds a target may prune (default: all the model has: "
                        f"{', '.join(KINDS)})")
    parser.add_argument("--min-keep", type=float, default=None, metavar="FRACTION",
                        help="with a target: fraction of every structure's groups always kept (default "
                        f"{DEFAULT_MIN_KEEP:g}; 0: down to one group)")
    parser.add_argument("--allow-empty", action="store_true",
                        help="with a target: a structure may keep no group, removing its whole attention layer or MLP "
                        "where the family can (LLaMA layout); the saved model then reloads with osscar_opt.load_pruned "
                        "and exports to GGUF as deci")
    parser.add_argument("--multiple-of", type=int, default=None, metavar="N",
                        help="kept neurons and channels in multiples of N (uniform sparsities and targets alike; "
                        "heads and KV groups as asked), for the kernels of serving engines (e.g. 32 for GGUF q8_0)")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default=DEFAULT_NORMALIZATION,
                        help="with a target: loss-curve normalization, relative (loss / layer output energy) or stage "
                        f"(loss / block output energy); default {DEFAULT_NORMALIZATION}")
    parser.add_argument("--reallocate", action="store_true",
                        help="with a target: re-allocate the remaining budget after each block from curves on the "
                        "pruned model's inputs")
    parser.add_argument("--strict-target", action="store_true",
                        help="with a target: fail (exit code 4, nothing saved) when the pruned model misses the target "
                        "beyond the measured spread; without it a miss is a warning line")
    parser.add_argument("--latency-cache", choices=LATENCY_CACHE_MODES, default="use",
                        help="with --target-speedup: use the cached latency tables after re-timing a point of each "
                        "(use, default), measure them all again (refresh), or cache nothing (off)")
    parser.add_argument("--search-evaluations", type=int, default=None, metavar="N",
                        help="with a target: after the dynamic program, search per-layer keeps at the same cost, "
                        "scoring at most N candidate models on their output (KL to the dense model's next-token "
                        "distributions; embedding cosine for encoders; logits for CNNs) on held-out samples of "
                        "documents the calibration does not use")
    parser.add_argument("--search-seconds", type=float, default=None, metavar="S",
                        help="with --search-evaluations: stop the search after S seconds")
    parser.add_argument("--search-samples", type=int, default=None, metavar="N",
                        help=f"with --search-evaluations: held-out samples candidates are scored on (default "
                        f"{DEFAULT_SEARCH_SAMPLES})")
    parser.add_argument("--search-seed", type=int, default=None, help="with --search-evaluations: its seed (default 0)")
    parser.add_argument("--search-method", choices=SEARCH_METHODS, default=None,
                        help="with --search-evaluations: moves (one budget move at a time, default) or evolution "
                        "(EvoPress-style generations)")
    parser.add_argument("--workers", type=int, default=None,
                        help="with a target: compute the loss curves on this many local worker processes")
    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help="with a target: compute the loss curves as Ray tasks ('auto': a local cluster or "
                        "RAY_ADDRESS's; host:port or ray://host:port; needs pip install 'osscar-opt[ray]')")


def cost_target(args: argparse.Namespace, uniform_flags: tuple[str, ...]):
    """The :class:`CostTarget` the flags ask for, or None; a target given together with a uniform
    sparsity flag is refused, naming both."""
    from osscar_opt.budget import CostTarget

    given = [(name, getattr(args, f"target_{name}")) for name in ("macs", "params", "speedup")]
    given = [(name, value) for name, value in given if value is not None]
    if not given:
        return None
    metric, value = given[0]
    for flag in uniform_flags:
        if getattr(args, flag) is not None:
            raise ValueError(
                f"--target-{metric} and --{flag.replace('_', '-')}: a global target chooses every layer's sparsity; "
                "give one or the other"
            )
    kinds = None if args.target_kinds is None else [k.strip() for k in args.target_kinds.split(",") if k.strip()]
    if kinds is not None and "heads" in kinds and "kv_groups" not in kinds:
        kinds.append("kv_groups")  # as --heads-sparsity: KV groups for GQA models
    if args.latency_cache != "use" and metric != "speedup":
        raise ValueError(f"--latency-cache: applies only with --target-speedup, got --target-{metric}")
    min_keep = DEFAULT_MIN_KEEP if args.min_keep is None else args.min_keep
    if args.search_evaluations is not None and args.reallocate:
        raise ValueError("--search-evaluations and --reallocate: the search chooses one allocation of the whole model, "
                         "reallocation replaces it block by block; give one or the other")
    return CostTarget(metric, value, kinds=kinds, min_keep=min_keep, normalize=args.normalize,
                      reallocate=args.reallocate, latency_cache=args.latency_cache, allow_empty=args.allow_empty)


def multiple_of_flag(args: argparse.Namespace) -> int:
    """``--multiple-of``: a positive integer (1 when not given)."""
    from osscar_opt.budget import check_multiple_of

    return 1 if args.multiple_of is None else check_multiple_of(args.multiple_of, "--multiple-of")


def aligned(budgets: Any, multiple_of: int) -> Any:
    """``budgets`` with kept neurons and channels in multiples of ``multiple_of`` (a sparsity mapping
    becomes a ``UniformSparsity``; a ``CostTarget`` gets its ``multiple_of``)."""
    from osscar_opt.budget import CostTarget, UniformSparsity

    if multiple_of == 1:
        return budgets
    if isinstance(budgets, CostTarget):
        budgets.multiple_of = multiple_of
        return budgets
    return UniformSparsity({kind: value for kind, value in budgets.items() if value}, multiple_of=multiple_of)


def search_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--search-*`` flags checked (before any model is loaded): None without
    ``--search-evaluations``; its other flags alone are refused."""
    if args.search_evaluations is None:
        for flag in SEARCH_FLAGS[1:]:
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')}: applies only with --search-evaluations")
        return None
    for flag in ("search_evaluations", "search_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a positive integer, got {value}")
    if args.search_seconds is not None and not args.search_seconds > 0:
        raise ValueError(f"--search-seconds: expected a positive number of seconds, got {args.search_seconds}")
    samples = DEFAULT_SEARCH_SAMPLES if args.search_samples is None else args.search_samples
    from osscar_opt.allocation_search import MIN_SCORE_SAMPLES

    if samples < MIN_SCORE_SAMPLES:
        raise ValueError(f"--search-samples: the search scores candidates on at least {MIN_SCORE_SAMPLES} held-out "
                         f"samples, got {samples}")
    return {"evaluations": args.search_evaluations, "seconds": args.search_seconds, "samples": samples,
            "seed": 0 if args.search_seed is None else args.search_seed, "method": args.search_method or "moves"}


def attach_search(target, flags: dict[str, Any] | None, samples: Any) -> None:
    """Give the cost target its :class:`AllocationSearch` over the held-out ``samples``."""
    from osscar_opt.allocation_search import AllocationSearch

    if flags is not None:
        options = {key: value for key, value in flags.items() if key != "samples"}
        target.set_search(AllocationSearch(samples, **options))


def check_target_flags(args: argparse.Namespace, target) -> None:
    if target is None:
        for flag in SEARCH_FLAGS:
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')}: searches a cost target's allocation; applies only with "
                                 "--target-macs, --target-params or --target-speedup")
        for flag, default in (("target_kinds", None), ("min_keep", None), ("normalize", DEFAULT_NORMALIZATION),
                              ("reallocate", False), ("workers", None), ("ray", None), ("strict_target", False),
                              ("latency_cache", "use"), ("allow_empty", False)):
            if getattr(args, flag) != default:
                raise ValueError(f"--{flag.replace('_', '-')}: applies only with --target-macs, --target-params "
                                 "or --target-speedup")


def collapse_advice(report: Any) -> str:
    """What the quality-collapse warning advises: with a cost target, a cheaper target or a higher
    floor (the allocation may have cut layers to their floor); else a smaller or allocated sparsity."""
    allocation = report.settings.get("allocation")
    if not allocation:
        return "prune less, or with a cost target"
    ask = "a smaller speed-up" if allocation.get("target") == "speedup" else "a larger fraction"
    return (f"ask for {ask}, or raise --min-keep (now {allocation.get('min_keep', 0):g}) if structures sit at "
            "their floor")


def check_target_met(report: Any, args: argparse.Namespace) -> None:
    """A missed cost target: a warning line, or with ``--strict-target`` an error (exit code 4)
    before anything is saved."""
    if report.target_met is not False:
        return
    missed = report.settings["allocation"].get("missed", "the cost target was missed")
    if args.strict_target:
        raise RuntimeError(f"--strict-target: {missed}; nothing was saved")
    print(f"warning: {missed}")


def describe_allocation(allocation: dict[str, Any]) -> str:
    """Target against predicted and achieved cost, in one paragraph for the summary."""
    metric, value = allocation["target"], allocation["value"]
    unit = {"macs": "MACs", "params": "parameters", "latency": "latency"}[allocation["metric"]]

    def share(fraction: float) -> str:
        return f"{1 / fraction:.2f}x speed-up" if metric == "speedup" else f"{fraction:.3f} of dense {unit}"

    wanted = f"{value:.2f}x speed-up" if metric == "speedup" else f"{value:.3f} of dense {unit}"
    line = f"target {wanted}: allocated {share(allocation['predicted_fraction'])} (predicted)"
    if "achieved_speedup_range" in allocation:
        low, high = allocation["achieved_speedup_range"]
        line += (f", {allocation['achieved_speedup']:.2f}x measured on the calibration batch (range {low:.2f}-"
                 f"{high:.2f}x, timed interleaved with the dense model)")
    elif "achieved_fraction" in allocation:
        line += f", {share(allocation['achieved_fraction'])} measured on the calibration batch"
    kinds: dict[str, list[float]] = {}
    for curve in allocation["curves"]:
        keep = allocation["keep"].get(curve["name"], curve["num_groups"])
        kinds.setdefault(curve["kind"], []).append(keep / curve["num_groups"])
    spread = "; ".join(f"{kind} kept {min(v):.2f}-{max(v):.2f} per layer" for kind, v in sorted(kinds.items()))
    text = f"{line}\n{spread} (loss curves and allocation {allocation['seconds']:.1f} s)"
    search = allocation.get("search")
    if search:
        changed = sum(search["keep"][name] != keep for name, keep in search["start_keep"].items())
        text += (f"\nallocation search ({search['method']}, {search['samples']} held-out samples): {search['metric']} "
                 f"{search['start_score']:.5f} (dynamic program) -> {search['score']:.5f} (searched, {changed} "
                 f"structures changed) in {search['evaluations']:.0f} evaluations, {search['seconds']:.1f} s "
                 f"(stopped: {search['stopped']})")
        if "pruned_score" in search:
            text += f"; the pruned model, re-fit on its own inputs: {search['pruned_score']:.5f}"
        starts = search.get("start_scores") or {}
        if starts:
            chosen = min(starts, key=starts.get)
            text += (f"\nsearch start: the program's allocation with removed sublayers scored "
                     f"{starts['program']:.5f}, without {starts['program_without_empty']:.5f}; started from the "
                     f"{'first' if chosen == 'program' else 'second'}")
    emptied = allocation.get("emptied") or []
    if emptied:
        text += f"\n{len(emptied)} sublayers removed whole (--allow-empty): {_first_names(emptied)}"
    floor = allocation.get("at_floor") or []
    if floor:
        text += (f"\n{len(floor)} structures sit at their smallest allowed keep (min_keep {allocation['min_keep']:g}, "
                 f"{'or removed' if allocation.get('allow_empty') else 'at least one group'}): {_first_names(floor)}")
    return text


def _first_names(names: list[str], shown: int = 4) -> str:
    """The first ``shown`` names, and how many more."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
