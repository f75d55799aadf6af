"""Pruned models in the engines people serve them with: SmolLM2 in llama.cpp (GGUF), MiniLM and
MobileNetV2 in ONNX Runtime, each against eager torch and against the dense model in the same engine.

SmolLM2-135M rows: dense; uniform (1 of 3 KV groups and 25% of the neurons removed per block);
allocated at 0.7 (and, without ``--quick``, 0.5) of the dense MACs; each pruned row with and
without ``--multiple-of`` (kept neurons in multiples of N). For each: torch perplexity, llama.cpp
perplexity of the f32 and f16 GGUF files on the same windows, llama.cpp prompt and generation
tokens / second (f32 and f16 files; median and range of repeated runs), the file sizes.
MiniLM (25% heads and neurons) and MobileNetV2 (30% channels): latency per batch in torch and ONNX
Runtime, dense and pruned.

    python benchmarks/deploy.py --quick          # SmolLM2 dense / uniform / 0.7 (N = 1, 64), small runs
    python benchmarks/deploy.py                  # the full table

Writes ``benchmarks/results/deploy.json``, ``deploy.md`` (the table) and ``deploy.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from osscar_opt import evaluate  # noqa: E402
from osscar_opt.budget import CostTarget, UniformSparsity  # noqa: E402
from osscar_opt.engines import measure  # noqa: E402
from osscar_opt.engines.timing import spread  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FAST_LOCAL_SEARCH = {"restarts": 0, "stages": 1, "max_swaps": 3}


def load_text(name: str) -> list[str]:
    from osscar_opt.data import text

    return text.load_texts(None, name, True)


def smollm2_budgets(args: argparse.Namespace) -> list[tuple[str, Any, int]]:
    """(label, budget, multiple_of) of every pruned SmolLM2 row."""
    rows: list[tuple[str, Any, int]] = []
    for multiple in [1, *args.multiples]:
        suffix = "" if multiple == 1 else f", N={multiple}"
        if multiple == 1 or not args.quick:
            rows.append((f"uniform 1/3 KV + 25% neurons{suffix}",
                         UniformSparsity({"kv_groups": 0.34, "neurons": 0.25}, multiple_of=multiple), multiple))
        for value in args.macs:
            rows.append((f"allocated {value:g} MACs{suffix}", CostTarget("macs", value, multiple_of=multiple),
                         multiple))
    return rows


def smollm2_row(label: str, model: torch.nn.Module, tokenizer: Any, windows: torch.Tensor, prompt: list[int],
                args: argparse.Namespace, workdir: Path, seconds: float) -> dict[str, Any]:
    """One SmolLM2 row: torch and llama.cpp perplexity, llama.cpp speed (f32 and f16), sizes."""
    row: dict[str, Any] = {"model": "SmolLM2-135M", "row": label, "prune_seconds": seconds,
                           "torch_perplexity": evaluate.perplexity(model, windows.reshape(-1), windows.shape[1],
                                                                   max_windows=None)}
    name = label.replace(" ", "_").replace("/", "-").replace(",", "")
    for outtype in ("f32", "f16"):
        result = measure.measure_llm(model, tokenizer, "llama.cpp", windows, prompt, args.generate, workdir=workdir,
                                     outtype=outtype, repeats=args.repeats, threads=args.threads, name=name)
        row[f"llama_cpp_{outtype}"] = {key: result[key] for key in ("perplexity", "prompt_tokens_per_s",
                                                                    "generation_tokens_per_s", "file_bytes")}
        row[f"_file_{outtype}"] = str(Path(workdir) / f"{name}-{outtype}.gguf")
        row["arch"] = result["arch"]
    row["widths"] = sorted({(b.self_attn.k_proj.out_features // b.self_attn.head_dim, b.mlp.down_proj.in_features)
                            for b in model.model.layers})[:3]
    print(f"  {label}: torch ppl {row['torch_perplexity']:.2f}, llama.cpp f32 ppl "
          f"{row['llama_cpp_f32']['perplexity']:.2f}, f16 {row['llama_cpp_f16']['perplexity']:.2f}; generation "
          f"f32 {row['llama_cpp_f32']['generation_tokens_per_s']['median']:.1f} tok/s", flush=True)
    return row


def run_smollm2(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    from osscar_opt.data import text
    from osscar_opt.models import load_model
    from osscar_opt.pipeline import prune

    loaded = load_model("smollm2", device="cpu")
    calibration = text.calibration_ids(loaded.tokenizer, load_text("calib"), args.samples, args.seq_len)
    stream = text.token_stream(loaded.tokenizer, load_text("eval"))
    windows = measure.windows_of(stream, 128, args.windows)
    prompt = stream[: args.prompt_tokens].tolist()
    rows = [smollm2_row("dense", loaded.model, loaded.tokenizer, windows, prompt, args, workdir, 0.0)]
    for label, budget, _ in smollm2_budgets(args):
        model = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        prune(model, calibration, budget, backend="local-search", backend_options=FAST_LOCAL_SEARCH, batch_size=8,
              progress=False)
        rows.append(smollm2_row(label, model, loaded.tokenizer, windows, prompt, args, workdir,
                                time.perf_counter() - start))
        del model
    interleaved(rows, prompt, args)
    return rows


def interleaved(rows: list[dict[str, Any]], prompt: list[int], args: argparse.Namespace) -> None:
    """Every row's f32 and f16 generation speed timed again, interleaved with the dense file's
    (llama_cpp.generation_rounds): the speed-up over dense as the median and range of per-round ratios."""
    from osscar_opt.engines import llama_cpp

    for outtype in ("f32", "f16"):
        results = llama_cpp.generation_rounds([row[f"_file_{outtype}"] for row in rows], prompt, args.generate,
                                              rounds=args.rounds, threads=args.threads)
        for row, result in zip(rows, results, strict=True):
            row[f"llama_cpp_{outtype}"]["interleaved"] = {k: result[k] for k in ("generation_tokens_per_s",
                                                                                 "against_first", "rounds")}
    for row in rows:
        for outtype in ("f32", "f16"):
            del row[f"_file_{outtype}"]


def batch_rows(name: str, dense: torch.nn.Module, pruned: torch.nn.Module, inputs: Any, args: argparse.Namespace,
               workdir: Path) -> list[dict[str, Any]]:
    rows = []
    for label, model in (("dense", dense), ("pruned", pruned)):
        row = {"model": name, "row": label}
        for engine in ("torch", "onnxruntime"):
            result = measure.measure_batch(model, engine, inputs, workdir=workdir, repeats=args.repeats,
                                           threads=args.threads, name=f"{name}-{label}")
            row[engine] = {key: result[key] for key in ("latency_ms", "batch", "threads") if key in result}
            if engine == "onnxruntime":
                row[engine]["max_abs_difference_to_torch"] = result["max_abs_difference_to_torch"]
                row[engine]["file_bytes"] = result["file_bytes"]
        print(f"  {name} {label}: torch {row['torch']['latency_ms']['median']:.1f} ms, onnxruntime "
              f"{row['onnxruntime']['latency_ms']['median']:.1f} ms", flush=True)
        rows.append(row)
    return rows


def run_minilm(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    from osscar_opt.data import text
    from osscar_opt.models import load_model
    from osscar_opt.pipeline import prune

    loaded = load_model(None, device="cpu")
    texts = text.load_texts(None, "calib", False)
    calibration = text.calibration_ids(loaded.tokenizer, texts, args.samples, args.seq_len)
    pruned = copy.deepcopy(loaded.model)
    prune(pruned, calibration, {"heads": 0.25, "neurons": 0.25}, backend="local-search", progress=False)
    ids = text.calibration_ids(loaded.tokenizer, text.load_texts(None, "eval", False), args.batch, 128, seed=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return batch_rows("all-MiniLM-L6-v2 (25% heads + neurons)", loaded.model, pruned, inputs, args, workdir)


def run_mobilenet(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    import torchvision

    from osscar_opt.pipeline import prune_vision

    torch.manual_seed(0)
    dense = torchvision.models.mobilenet_v2(num_classes=1000).eval()
    calibration = torch.randn(16, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    pruned, _ = prune_vision(dense, calibration, {"channels": 0.3}, backend="magnitude", batch_size=16,
                             progress=False)
    images = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return batch_rows("MobileNetV2 (30% channels, random weights)", dense, pruned, images, args, workdir)


def fmt(value: dict[str, Any], digits: int = 1) -> str:
    return f"{value['median']:.{digits}f} ({value['min']:.{digits}f}-{value['max']:.{digits}f})"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of every row."""
    lines = []
    llm = [r for r in rows if "torch_perplexity" in r]
    if llm:
        lines += ["| SmolLM2-135M | GGUF arch | torch ppl | llama.cpp ppl f32 | f16 | prompt tok/s f32 | "
                  "generation tok/s f32 | x dense f32 (interleaved) | generation tok/s f16 | x dense f16 "
                  "(interleaved) | MiB f32 / f16 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in llm:
            f32, f16 = r["llama_cpp_f32"], r["llama_cpp_f16"]
            speeds = []
            for result in (f32, f16):  # interleaved rounds when they ran, else the row's own runs
                timed = result.get("interleaved", {})
                speeds += [fmt(timed.get("generation_tokens_per_s", result["generation_tokens_per_s"])),
                           fmt(timed["against_first"], 2) if timed else "-"]
            lines.append(
                f"| {r['row']} | {r['arch']} | {r['torch_perplexity']:.2f} | {f32['perplexity']:.2f} | "
                f"{f16['perplexity']:.2f} | {fmt(f32['prompt_tokens_per_s'])} | {' | '.join(speeds)} | "
                f"{f32['file_bytes'] / 2**20:.0f} / {f16['file_bytes'] / 2**20:.0f} |")
    batch = [r for r in rows if "onnxruntime" in r]
    if batch:
        lines += ["", "| model | row | batch | torch ms | ONNX Runtime ms | max abs diff ORT - torch |",
                  "|---|---|---|---|---|---|"]
        for r in batch:
            shape = " x ".join(map(str, r["onnxruntime"]["batch"]))
            lines.append(f"| {r['model']} | {r['row']} | {shape} | {fmt(r['torch']['latency_ms'], 2)} | "
                         f"{fmt(r['onnxruntime']['latency_ms'], 2)} | "
                         f"{r['onnxruntime']['max_abs_difference_to_torch']:.1e} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Generation tokens / second against llama.cpp perplexity (f32) of the SmolLM2 rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    llm = [r for r in rows if "torch_perplexity" in r]
    if not llm:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in llm:
        result = r["llama_cpp_f32"]
        speed = result.get("interleaved", {}).get("generation_tokens_per_s", result["generation_tokens_per_s"])
        ax.errorbar(r["llama_cpp_f32"]["perplexity"], speed["median"],
                    yerr=[[speed["median"] - speed["min"]], [speed["max"] - speed["median"]]], fmt="o", capsize=3)
        ax.annotate(r["row"], (r["llama_cpp_f32"]["perplexity"], speed["median"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("llama.cpp perplexity (f32 GGUF, held-out Shakespeare windows)")
    ax.set_ylabel("llama.cpp generation tokens / s (f32; interleaved rounds)")
    ax.set_title("SmolLM2-135M in llama.cpp: dense, uniform and allocated widths")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.7 MACs only, N = 64 only, fewer samples and windows")
    parser.add_argument("--only", nargs="+", default=["smollm2", "minilm", "mobilenet"],
                        choices=["smollm2", "minilm", "mobilenet"])
    parser.add_argument("--macs", type=float, nargs="+", default=None)
    parser.add_argument("--multiples", type=int, nargs="+", default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--generate", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the generation comparison")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None,
                        help="engine threads (default 1: on a shared machine spinning threads wait on each other)")
    parser.add_argument("--out", default=str(RESULTS / "deploy"))
    args = parser.parse_args(argv)
    args.macs = args.macs or ([0.7] if args.quick else [0.7, 0.5])
    args.multiples = args.multiples or [64]
    args.samples = args.samples or (16 if args.quick else 64)
    args.windows = args.windows or (8 if args.quick else 16)
    args.threads = args.threads or 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="osscar-deploy-") as workdir:
        for name, run in (("smollm2", run_smollm2), ("minilm", run_minilm), ("mobilenet", run_mobilenet)):
            if name in args.only:
                print(f"{name} ...", flush=True)
                rows += run(args, Path(workdir))
                document = {"settings": vars(args), "load_at_start": load_start, "rows": rows}
                out.with_suffix(".json").write_text(json.dumps(document, indent=1))
    load_end = os.getloadavg()[0]
    text = table(rows)
    note = (f"\n\n{args.threads} threads; median (range) of {args.repeats} runs after 1 warm-up; load average "
            f"{load_start:.2f} at the start, {load_end:.2f} at the end")
    out.with_suffix(".md").write_text(text + note + "\n")
    document = {"settings": vars(args), "load_at_start": load_start, "load_at_end": load_end, "rows": rows,
                "summary": {"dense_generation_f32": spread([rows[0]["llama_cpp_f32"]["generation_tokens_per_s"][
                    "median"]]) if rows and "llama_cpp_f32" in rows[0] else None}}
    out.with_suffix(".json").write_text(json.dumps(document, indent=1))
    try:
        plot(rows, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no PNG (pip install 'osscar-opt[plot]')")
    print(text + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
