"""Per layer: where does a support that fits the calibration text better lose off its domain?

Issue 23, item 3: for chosen layers of a model, every backend's support at one keep share is
re-fit exactly as the pipeline does (ridge chosen on the calibration's held-out samples) and its
relative reconstruction error ``||X (W - What)^T||^2 / ||X W^T||^2`` is reported on

- the calibration's fit samples (in-sample),
- the calibration's held-out samples (every 4th sample, as ``damp="auto"``),
- each calibration source's evaluation part (other articles, other plays, ...), and
- every other text (``--eval-texts``), with their mean as the headline ("unseen").

Each layer is calibrated on the dense model's own inputs (not sequentially on the pruned model's):
a per-layer diagnostic, not a prune. Variants: ``--search-damps`` (the ridge the support is searched
at, the pipeline's is 1e-2) and ``--local-search`` options.

    python benchmarks/domain_layers.py --model smollm2 --kind neurons --keep-share 0.75 \
        --layers 0 6 12 18 24 29 --out benchmarks/results/domain_layers_smollm2
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from osscar_opt import solve
from osscar_opt.accumulator import SplitAccumulator, StatsAccumulator, choose_damp
from osscar_opt.adapters.registry import adapter_for
from osscar_opt.data import text
from osscar_opt.models import load_model
from osscar_opt.pipeline.settings import HELDOUT_EVERY

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, minilm, or a folder")
    parser.add_argument("--kind", default="neurons", help="structure kind to study (neurons, kv_groups, heads)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="block indices (default: all)")
    parser.add_argument("--keep-share", type=float, default=0.75, help="share of groups kept (default 0.75)")
    parser.add_argument("--backends", nargs="+", default=["local-search", "activation", "greedy"])
    parser.add_argument("--local-search", default="{}", help="JSON options of local-search")
    parser.add_argument("--search-damps", type=float, nargs="+", default=[1e-2],
                        help="ridges the supports are searched at (the pipeline's: 1e-2)")
    parser.add_argument("--calib-text", nargs="+", default=[None],
                        help="calibration source(s), an equal share of windows from each (default wiki)")
    parser.add_argument("--eval-texts", nargs="+", default=["shakespeare", "stdlib", "licences"])
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    parser.add_argument("--eval-samples", type=int, default=32, help="windows per other text (default 32)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "domain_layers")
    args = parser.parse_args()
    if not 0.0 < args.keep_share < 1.0:
        parser.error(f"--keep-share: expected a share in (0, 1), got {args.keep_share}")
    return args


def block_index(name: str) -> int | None:
    """The first integer component of a qualified module name (its block), None when there is none."""
    match = re.search(r"\.(\d+)\.", name)
    return None if match is None else int(match.group(1))


def chosen_structures(adapter, kind: str, layers: list[int] | None) -> list:
    structures = [s for s in adapter.structures() if s.kind == kind]
    if not structures:
        raise SystemExit(f"--kind: the model has no {kind!r} structures")
    if layers is not None:
        structures = [s for s in structures if block_index(s.name) in set(layers)]
    return structures


def capture(model, structures, batches: torch.Tensor, accumulators: dict[str, Any], batch_size: int = 8) -> None:
    """Run the dense model on ``batches`` (samples, seq_len) and add every structure's input rows
    (sample first for a :class:`SplitAccumulator`) to its accumulator."""
    handles = []
    for structure in structures:
        accumulator = accumulators[structure.name]

        def hook(_module, inputs, structure=structure, accumulator=accumulator):
            x = inputs[0].detach().to(torch.float64)
            if isinstance(accumulator, SplitAccumulator):
                accumulator.add(x, None, input_rows=structure.input_rows)
            else:
                accumulator.add(structure.input_rows(x))

        handles.append(structure.consumer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, batches.shape[0], batch_size):
                model(input_ids=batches[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()


def relative(moments, columns: torch.Tensor, kept_t: torch.Tensor) -> float:
    return moments.error_on(columns, kept_t) / moments.y_square if moments.y_square > 0 else 0.0


def study_layer(structure, split: SplitAccumulator, others: dict[str, StatsAccumulator], keep: int,
                args: argparse.Namespace) -> list[dict[str, Any]]:
    W = structure.weight().detach().to(torch.float64)
    bias = None if structure.consumer.bias is None else structure.consumer.bias.detach()
    fit_moments = split.fit.moments(W, bias=bias)
    heldout_moments = split.heldout.moments(W, bias=bias)
    other_moments = {name: acc.moments(W, bias=bias) for name, acc in others.items()}
    rows = []
    for search_damp in args.search_damps:
        problem = split.fit.problem(W, structure.groups, damp=search_damp, bias=bias)
        problem.heldout = heldout_moments
        for backend in args.backends:
            options = json.loads(args.local_search) if backend == "local-search" else {}
            started = time.perf_counter()
            solution = solve(problem, keep, backend, **options)
            seconds = time.perf_counter() - started
            columns = problem.kept_columns(solution.support).to(problem.device)
            damp, _ = choose_damp(fit_moments, heldout_moments, columns)
            kept_t = fit_moments.ridge_fit(columns, damp)
            errors = {"in-sample": relative(fit_moments, columns, kept_t),
                      "held-out": relative(heldout_moments, columns, kept_t)}
            errors.update({name: relative(m, columns, kept_t) for name, m in other_moments.items()})
            unseen = [errors[name] for name in other_moments if not name.startswith("calib ")]
            rows.append({
                "layer": structure.name, "kind": structure.kind, "keep": keep, "groups": structure.num_groups,
                "backend": backend, "options": options, "search_damp": search_damp, "damp": damp,
                "seconds": seconds, "errors": errors, "unseen_mean": sum(unseen) / len(unseen),
                "candidate": solution.info.get("heldout_candidate"),
            })
            print(format_row(rows[-1], list(errors)), flush=True)
    return rows


def format_row(row: dict[str, Any], columns: list[str]) -> str:
    cells = [row["layer"], row["backend"], f"{row['search_damp']:g}", f"{row['damp']:g}"]
    cells += [f"{row['errors'][c]:.4f}" for c in columns] + [f"{row['unseen_mean']:.4f}", f"{row['seconds']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    args = parse_args()
    loaded = load_model(None if args.model == "minilm" else args.model, device="cpu")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    adapter = adapter_for(model)
    structures = chosen_structures(adapter, args.kind, args.layers)
    calibrated_on = text.sources_name(args.calib_text)
    calibration = text.mixture_ids(tokenizer, text.load_sources(args.calib_text, "calib", loaded.causal),
                                   args.samples, args.seq_len)
    other_windows = {f"calib {text.source_name(spec).split(' ')[0]} (held-out part)": text.calibration_ids(
        tokenizer, text.load_texts(spec, "eval", loaded.causal), args.eval_samples, args.seq_len)
        for spec in args.calib_text}
    for spec in args.eval_texts:
        other_windows[text.source_name(spec)] = text.calibration_ids(
            tokenizer, text.load_texts(spec, "eval", loaded.causal), args.eval_samples, args.seq_len)
    splits = {s.name: SplitAccumulator(s.in_features, None, every=HELDOUT_EVERY) for s in structures}
    capture(model, structures, calibration, splits)
    others: dict[str, dict[str, StatsAccumulator]] = {s.name: {} for s in structures}
    for name, windows in other_windows.items():
        accumulators = {s.name: StatsAccumulator(s.in_features) for s in structures}
        capture(model, structures, windows, accumulators)
        for s in structures:
            others[s.name][name] = accumulators[s.name]
    columns = ["in-sample", "held-out", *other_windows]
    header = ["layer", "backend", "search damp", "re-fit damp", *columns, "unseen mean", "s"]
    print(f"{loaded.name}, {args.kind}, keep {args.keep_share:g}, calibrated on {calibrated_on}, "
          f"{args.samples} x {args.seq_len} tokens; relative error per text (dense inputs)")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    rows: list[dict[str, Any]] = []
    for structure in structures:
        keep = max(1, round(args.keep_share * structure.num_groups))
        rows += study_layer(structure, splits.pop(structure.name), others.pop(structure.name), keep, args)
    summary = summarize(rows, columns)
    print("\nMean over layers")
    print("| backend | search damp | " + " | ".join(columns) + " | unseen mean |\n|" + "---|" * (len(columns) + 3))
    for line in summary:
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": loaded.name, "kind": args.kind, "keep_share": args.keep_share, "calibrated_on": calibrated_on,
               "samples": args.samples, "seq_len": args.seq_len, "rows": rows, "summary": summary}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out.with_suffix('.json')}")


def summarize(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = []
    for key in dict.fromkeys((r["backend"], r["search_damp"]) for r in rows):
        mine = [r for r in rows if (r["backend"], r["search_damp"]) == key]
        means = [sum(r["errors"][c] for r in mine) / len(mine) for c in columns]
        unseen = sum(r["unseen_mean"] for r in mine) / len(mine)
        lines.append(f"| {key[0]} | {key[1]:g} | " + " | ".join(f"{m:.4f}" for m in means) + f" | {unseen:.4f} |")
    return lines


if __name__ == "__main__":
    main()
