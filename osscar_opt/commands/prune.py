"""``osscar prune``: prune a transformer (default all-MiniLM-L6-v2) or a torchvision network."""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path
from typing import Any

from osscar_opt.budget import check_sparsity
from osscar_opt.commands.options import (
    add_backend_arguments,
    add_calibration_arguments,
    add_runtime_arguments,
    check_backend,
    check_output_path,
    parse_backend_options,
    positive_int,
)
from osscar_opt.commands.targets import (
    add_target_arguments,
    aligned,
    attach_search,
    check_target_flags,
    check_target_met,
    collapse_advice,
    cost_target,
    describe_allocation,
    multiple_of_flag,
    search_flags,
)

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8
DEFAULT_IMAGE_BATCH_SIZE = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune", help="prune attention heads / MLP neurons (or conv channels) of a model",
        description="Prune a model one block at a time and print a before/after table. Without --model it prunes "
        "all-MiniLM-L6-v2 on English prose from the Python standard library's docstrings.",
    )
    parser.add_argument("--model", default=None,
                        help="all-minilm-l6-v2 (default), smollm2, a local Hugging Face folder, a .gguf file, "
                        "or a torchvision architecture name")
    parser.add_argument("--heads-sparsity", type=float, default=None,
                        help="fraction of attention heads (KV groups for GQA) removed per block (default 0.25)")
    parser.add_argument("--q-heads-sparsity", type=float, default=None,
                        help="fraction of the query heads of every KV group removed per block (GQA models; "
                        "after --heads-sparsity's KV groups; default 0: none)")
    parser.add_argument("--neurons-sparsity", type=float, default=None,
                        help="fraction of MLP neurons removed per block (default 0.25)")
    parser.add_argument("--channels-sparsity", type=float, default=None,
                        help="fraction of conv channels removed (torchvision models only)")
    parser.add_argument("--weights", default=None, help="torchvision weights file (torchvision models only)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="calibration image side in pixels (torchvision models only)")
    parser.add_argument("--calibration-images", default=None,
                        help="safetensors file with an 'images' tensor (N, 3, H, W) (torchvision models only)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="digits training epochs when no --weights are given (torchvision models only)")
    add_target_arguments(parser)
    add_backend_arguments(parser)
    add_calibration_arguments(parser)
    parser.add_argument("--samples", type=int, default=None, help=f"calibration samples (default {DEFAULT_SAMPLES})")
    parser.add_argument("--seq-len", type=int, default=None, help=f"tokens per sample (default {DEFAULT_SEQ_LEN})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"samples per forward pass (default {DEFAULT_BATCH_SIZE})")
    add_runtime_arguments(parser)
    parser.add_argument("--offload", action="store_true",
                        help="keep the model on the CPU and move one block (stage) at a time to --device (default: "
                        "cuda if available) for its calibration passes and solves: prunes a model larger than GPU "
                        "memory; the before/after evaluation then runs on the CPU (--no-eval skips it)")
    parser.add_argument("--calib-text", nargs="+", default=None, metavar="TEXT",
                        help="calibration text: a file, or wiki (default: Wikipedia summaries), shakespeare, stdlib, "
                        "licences; several: an equal share of the samples from each")
    parser.add_argument("--eval-text", nargs="+", default=None, metavar="TEXT",
                        help="evaluation texts (files or the names above; default: wiki, its held-out articles); "
                        "the table uses the first, and every text gets a quality row")
    parser.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    parser.add_argument("--output", default=None,
                        help="folder to save the pruned model to (with its tokenizer and kept ids); without it the "
                        "pruned model is not saved")
    parser.add_argument("--uniform-widths", action="store_true",
                        help="prune only widths the model family's stock config can state (the same keep in every "
                        "block; no heads where the head size is derived from the hidden size, e.g. BERT, OPT, "
                        "GPT-2), so stock from_pretrained reloads the saved model")
    parser.add_argument("--report", default=None, help="write the JSON report (per-layer loss and time) here")
    parser.add_argument("--plot", action="store_true",
                        help="write PNGs beside the report: per-layer relative loss and kept share (needs --report)")
    parser.add_argument("--save-problems", default=None, help="write every layer problem to this folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _check_common(args: argparse.Namespace) -> None:
    """Checks that hold for every family, made before any model is loaded."""
    for name in ("samples", "seq_len", "batch_size", "image_size", "epochs"):
        if getattr(args, name, None) is not None:
            positive_int(getattr(args, name), name)
    # an unknown backend, option name or option value fails before any model is loaded
    check_backend(args.backend, parse_backend_options(args.backend_option))
    if getattr(args, "offload", False) and getattr(args, "target_speedup", None) is not None:
        from torch import device as torch_device

        from osscar_opt.adapters.registry import vision_architectures
        from osscar_opt.models import parse_device

        compute = torch_device(args.device or "cpu") if args.model in vision_architectures() else parse_device(
            args.device)
        if compute.type != "cpu":
            raise ValueError("--offload: --target-speedup measures latency on the device the blocks run on, which "
                             "offload does not hold the model on; use --target-macs / --target-params with "
                             "--offload, or prune without it")
    if getattr(args, "workers", None) is not None and args.workers < 1:
        raise ValueError(f"--workers: expected a positive number of workers, got {args.workers}")
    if getattr(args, "ray", None) not in (None, "auto"):
        from osscar_opt.executors.ray_tasks import probe

        try:
            probe(args.ray)  # an unreachable cluster fails before the model is loaded
        except ValueError as exc:
            raise ValueError("--ray:" + str(exc).removeprefix("address:")) from None
    if args.plot and args.report is None:
        raise ValueError("--plot: the PNGs are written beside the report; give --report PATH too")
    # every output path is checked before any work: a folder where a file goes, a file where a folder
    # goes, or a folder that cannot be written
    check_output_path(args.output, "--output", kind="folder", replace=True)
    if args.output is not None:
        from osscar_opt.io.folder import check_destination

        check_destination(Path(args.output))  # a folder that is not a saved model is refused before pruning
    check_output_path(args.save_problems, "--save-problems", kind="folder")
    check_output_path(args.report, "--report")
    if args.report is not None:  # the PNGs drawn beside the report: the kept-share heat map (--plot or a target)
        targeted = any(getattr(args, f"target_{metric}", None) is not None for metric in ("macs", "params", "speedup"))
        if args.plot or targeted:
            check_output_path(Path(args.report).with_suffix(".keep.png"), "--report (its .keep.png)")
            if getattr(args, "search_evaluations", None) is not None:
                check_output_path(Path(args.report).with_suffix(".search.png"), "--report (its .search.png)")
        if args.plot:
            check_output_path(Path(args.report).with_suffix(".layers.png"), "--plot (the report's .layers.png)")


def _transformer_budgets(args: argparse.Namespace):
    if args.channels_sparsity is not None or args.weights is not None:
        from osscar_opt.adapters.registry import vision_architectures

        raise ValueError(
            f"model: --channels-sparsity and --weights apply to torchvision models only "
            f"({', '.join(vision_architectures())}), got {args.model!r}"
        )
    target = cost_target(args, ("heads_sparsity", "q_heads_sparsity", "neurons_sparsity"))
    check_target_flags(args, target)
    if target is not None:
        return target
    heads = check_sparsity(0.25 if args.heads_sparsity is None else args.heads_sparsity, "heads_sparsity")
    neurons = check_sparsity(0.25 if args.neurons_sparsity is None else args.neurons_sparsity, "neurons_sparsity")
    budgets = {"heads": heads, "kv_groups": heads, "neurons": neurons}
    if args.q_heads_sparsity is not None:
        budgets["q_heads"] = check_sparsity(args.q_heads_sparsity, "q_heads_sparsity")
    return budgets


def _prune_options(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    """Keyword arguments of :func:`osscar_opt.pipeline.prune` from the shared flags; with
    ``--offload`` also the compute device (``--device``, default cuda if available)."""
    options = {
        "backend": args.backend, "backend_options": parse_backend_options(args.backend_option),
        "refit_bias": args.refit_bias, "damp": args.damp, "target": args.target,
        "objective": args.objective, "batch_size": batch_size,
        "save_problems": args.save_problems, "progress": not args.quiet,
    }
    if getattr(args, "offload", False):
        from osscar_opt.models import parse_device

        options.update(offload=True, device=str(parse_device(args.device)))
    if getattr(args, "workers", None) is not None or getattr(args, "ray", None) is not None:
        options["executor"] = curve_executor(args)
    return options


def curve_executor(args: argparse.Namespace):
    """The executor of ``--workers`` / ``--ray`` for the loss curves, checked and connected
    (an unreachable --ray address fails here, before the model is loaded)."""
    from osscar_opt.executors import make_executor

    if args.ray is not None:
        try:
            return make_executor("ray", args.workers, address=None if args.ray == "auto" else args.ray)
        except ValueError as exc:
            raise ValueError("--ray:" + str(exc).removeprefix("address:")) from None
    return make_executor("processes", args.workers)


def _load_device(args: argparse.Namespace) -> str | None:
    """Where the model is loaded: the CPU under ``--offload`` (stages move to ``--device`` one at a
    time), else ``--device``."""
    return "cpu" if getattr(args, "offload", False) else args.device


def _uniform_widths(budgets: Any, adapter: Any, heads_given: bool) -> Any:
    """``--uniform-widths``: the budget restricted to widths the family's config can state.

    Kinds the config cannot state (heads of BERT / OPT / GPT-2) are left unpruned; asking for them
    explicitly (``--heads-sparsity``, ``--target-kinds heads``) is refused.
    """
    from osscar_opt.budget import CostTarget

    expressible = adapter.config_kinds()
    present = {structure.kind for structure in adapter.structures()}
    if isinstance(budgets, CostTarget):
        if budgets.reallocate:
            raise ValueError("--reallocate: re-allocation makes widths differ per block; not with --uniform-widths")
        refused = sorted(set(budgets.kinds()) & (present - expressible))
        if refused and heads_given:
            raise ValueError(f"--uniform-widths: this {adapter.architecture} model's config cannot state a pruned "
                             f"{refused[0]} count (its head size is hidden_size / heads); drop it from --target-kinds")
        kinds = sorted(set(budgets.kinds()) & expressible)
        return CostTarget(budgets.metric, budgets.value, kinds=kinds, min_keep=budgets.min_keep,
                          normalize=budgets.normalize, allocation="uniform", latency_cache=budgets.latency_cache)
    refused = sorted(kind for kind, value in budgets.items() if value > 0 and kind in present - expressible)
    if refused and heads_given:
        raise ValueError(f"--uniform-widths: this {adapter.architecture} model's config cannot state a pruned "
                         f"{refused[0]} count (its head size is hidden_size / heads); drop --heads-sparsity")
    return {kind: 0.0 if kind in refused else value for kind, value in budgets.items()}


def _progress(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


def _evaluate_domains(loaded: Any, domains: dict[str, Any], reference: dict[str, Any] | None,
                      quiet: bool) -> dict[str, Any]:
    """The first text with size and speed (the main table), every other text's quality only."""
    from osscar_opt import cross_domain, evaluate

    first, *others = domains
    results = {first: evaluate.evaluate_model(loaded.model, loaded.tokenizer, domains[first],
                                              reference=None if reference is None else reference[first],
                                              progress=not quiet)}
    rest = {key: domains[key] for key in others}
    return {**results, **cross_domain.quality(loaded.model, loaded.tokenizer, rest, reference, progress=not quiet)}


def _warn_overlap(calib_texts: list[str], eval_texts: dict[str, list[str]]) -> None:
    """A warning, with the share, for an evaluation text that overlaps the calibration text."""
    from osscar_opt import cross_domain

    for key, share in cross_domain.overlap_shares(calib_texts, eval_texts).items():
        if share > cross_domain.OVERLAP_WARNING:
            warnings.warn(f"eval_text: {share:.0%} of {key}'s {cross_domain.NGRAM}-word "
                          "sequences are also in the calibration text, so its quality row is partly in-sample",
                          UserWarning, stacklevel=2)


def prune_transformer(args: argparse.Namespace) -> dict[str, Any]:
    """Load, evaluate, prune, evaluate again, save; returns the report document."""
    from osscar_opt import cross_domain, evaluate, models
    from osscar_opt.adapters.registry import adapter_for
    from osscar_opt.data import text
    from osscar_opt.pipeline import prune

    budgets = _transformer_budgets(args)
    if args.uniform_widths and getattr(budgets, "allow_empty", False):
        raise ValueError("--allow-empty: removes sublayers in some blocks only, so widths differ per block; not with "
                         "--uniform-widths")
    search = search_flags(args)
    _check_common(args)
    multiple_of = multiple_of_flag(args)
    _progress(f"loading {args.model or models.DEFAULT_MODEL} ...", args.quiet)
    loaded = models.load_model(args.model, _load_device(args), args.dtype)
    adapter = adapter_for(loaded.model)
    if isinstance(budgets, dict) and args.heads_sparsity is None:  # the default attention sparsity: where there is one
        present = {structure.kind for structure in adapter.structures()}
        budgets = {kind: value for kind, value in budgets.items() if kind in present or kind in ("neurons", "q_heads")}
    if args.uniform_widths:
        budgets = _uniform_widths(budgets, adapter, args.heads_sparsity is not None or args.target_kinds is not None)
    budgets = aligned(budgets, multiple_of)
    seq_len = args.seq_len or DEFAULT_SEQ_LEN
    samples = args.samples or DEFAULT_SAMPLES
    models.check_seq_len(loaded.model, seq_len, "--seq-len")
    calib_sources = text.load_sources(args.calib_text or [None], "calib", loaded.causal, "calib_text")
    if search is not None:  # every 10th document of each source is the search's, never calibration
        split = [text.hold_out_documents(texts) for texts in calib_sources]
        calib_sources = [fit for fit, _ in split]
        attach_search(budgets, search, text.mixture_ids(loaded.tokenizer, [held for _, held in split],
                                                         search["samples"], seq_len, seed=text.SEED + 1))
        _progress(f"allocation search: {search['samples']} samples of held-out documents, at most "
                  f"{search['evaluations']} evaluations", args.quiet)
    calibration = text.mixture_ids(loaded.tokenizer, calib_sources, samples, seq_len)
    calib_texts = [passage for texts in calib_sources for passage in texts]
    calibrated_on = text.sources_name(args.calib_text or [None])
    _progress(f"calibration: {samples} samples x {seq_len} tokens from {calibrated_on}", args.quiet)
    domains, before, dense_copy = {}, {}, None
    if not args.no_eval:
        eval_texts = cross_domain.domain_texts(args.eval_text or [None], loaded.causal)
        _warn_overlap(calib_texts, eval_texts)
        domains = cross_domain.domain_data(loaded.tokenizer, eval_texts, loaded.causal, seq_len=seq_len)
        _progress("evaluating the dense model ...", args.quiet)
        before = _evaluate_domains(loaded, domains, None, args.quiet)
        if not getattr(args, "offload", False):  # timed against the pruned model, interleaved, afterwards
            dense_copy = copy.deepcopy(loaded.model)
    options = _prune_options(args, args.batch_size or DEFAULT_BATCH_SIZE)
    try:
        report = prune(loaded.model, calibration, budgets, **options)
    finally:
        if options.get("executor") is not None:
            options["executor"].close()
    report.settings["calibration_text"] = calibrated_on
    document: dict[str, Any] = {"model": loaded.name, "note": loaded.note, **report.to_dict()}
    print(f"\n{loaded.name}: pruned in {report.seconds:.1f} s with {args.backend}; {report.settings_line()}")
    if loaded.note:
        print(f"note: {loaded.note}")
    if domains:
        _progress("evaluating the pruned model ...", args.quiet)
        after = _evaluate_domains(loaded, domains, before, args.quiet)
        first = next(iter(domains))
        if dense_copy is not None:
            comparison = evaluate.time_against(dense_copy, loaded.model, domains[first])
            evaluate.record_comparison(before[first], after[first], comparison)
            del dense_copy
        document["dense"], document["pruned"] = evaluate.public(before[first]), evaluate.public(after[first])
        print(evaluate.format_table(before[first], after[first]))
        print(evaluate.measurement_note(after[first]))
        if len(domains) > 1:
            document["domains"] = {k: {"dense": evaluate.public(before[k]), "pruned": evaluate.public(v)}
                                   for k, v in after.items()}
            document["unseen_mean"] = cross_domain.unseen_mean(after, calibrated_on)
            print(f"\nquality per text (calibrated on {calibrated_on}):")
            print(cross_domain.format_table(before, after, calibrated_on))
        collapse = evaluate.collapse_warning(before[first], after[first], collapse_advice(report))
        if collapse:
            print(collapse)
            document["quality_collapsed"] = collapse
    check_target_met(report, args)
    stock = bool(report.settings.get("config_describes_pruned_model"))
    if args.output:
        from osscar_opt.io import save_pruned

        save_pruned(loaded.model, args.output, tokenizer=loaded.tokenizer, report=report)
        document["output"] = str(args.output)
        how = ("stock from_pretrained loads it (config.json states the pruned widths)" if stock else
               "load it with osscar_opt.load_pruned (widths differ between blocks or the config cannot state "
               "them; --uniform-widths for stock reload)")
        print(f"saved the pruned model, tokenizer and kept ids to {args.output}: {how}")
    else:
        print("the pruned model was not saved (give --output DIR to keep it)")
    return document


def prune_torchvision(args: argparse.Namespace) -> dict[str, Any]:
    """``--model <torchvision name>``: load or train on digits, prune a copy, compare, save.

    Without ``--weights`` the model is first trained on the digits data set (a few CPU minutes at
    most); with ``--weights PATH`` it is loaded from the checkpoint. Calibration images come from
    ``--calibration-images PATH`` when given, else from the digits training split. The digits test
    accuracy before and after pruning is reported when the model has 10 classes.
    """
    import torch

    from osscar_opt.adapters.registry import adapter_for
    from osscar_opt.data import digits
    from osscar_opt.io import torchvision as torchvision_io
    from osscar_opt.pipeline import prune_vision

    if args.heads_sparsity is not None or args.neurons_sparsity is not None or args.q_heads_sparsity is not None:
        raise ValueError("--heads-sparsity / --neurons-sparsity: torchvision models have conv channels only; "
                         "use --channels-sparsity or a --target-* flag")
    if args.uniform_widths:
        raise ValueError("--uniform-widths: applies to transformers models; pruned torchvision models reload with "
                         "osscar_opt.load_pruned")
    budgets = cost_target(args, ("channels_sparsity",))
    check_target_flags(args, budgets)
    if budgets is not None and "channels" not in budgets.kinds():
        raise ValueError(f"--target-kinds: torchvision models have conv channels only, got {args.target_kinds!r}")
    if budgets is None:
        if args.channels_sparsity is None:
            raise ValueError("channels_sparsity: required for torchvision models (--channels-sparsity, in [0, 1)), "
                             "or give --target-macs, --target-params or --target-speedup")
        budgets = {"channels": check_sparsity(args.channels_sparsity, "channels_sparsity")}
    search = search_flags(args)
    _check_common(args)
    budgets = aligned(budgets, multiple_of_flag(args))
    device = torch.device(args.device or "cpu")
    recipe = digits.TRAINING_DEFAULTS.get(args.model, digits.DEFAULT_TRAINING)
    image_size = args.image_size or (224 if args.weights else recipe["image_size"])
    document: dict[str, Any] = {"model": args.model}
    if args.weights:
        state = torchvision_io.load_state_dict(args.weights)
        model = torchvision_io.model_from_weights(args.model, state).to(device)
    else:
        epochs = args.epochs or 6
        print(f"no --weights: training {args.model} on the digits data set for {epochs} epochs ...")
        model, _, _, trained = digits.digits_model(args.model, image_size=image_size, epochs=epochs, device=device)
        document["train_seconds"] = trained["train_seconds"]
    train_split, test_split = digits.digits(image_size=image_size)
    images = torchvision_io.load_images(args.calibration_images) if args.calibration_images else train_split.images
    samples = args.samples or DEFAULT_SAMPLES
    if search is not None:  # images the calibration does not use
        held = images[samples: samples + search["samples"]]
        if held.shape[0] < search["samples"]:
            raise ValueError(f"--search-samples: {search['samples']} images after the {samples} calibration images are "
                             f"needed, the calibration set has {images.shape[0]}")
        attach_search(budgets, search, held.to(device))
    options = _prune_options(args, args.batch_size or DEFAULT_IMAGE_BATCH_SIZE)
    if options.get("offload"):  # the copy is pruned on the CPU, one stage at a time on the model's device
        options["device"] = str(device)
    try:
        pruned, report = prune_vision(model, images[:samples], budgets, **options)
    finally:
        if options.get("executor") is not None:
            options["executor"].close()
    document.update(report.to_dict())
    check_target_met(report, args)
    document["channels_before"] = sum(adapter_for(model).internal_channels().values())
    document["channels_after"] = sum(adapter_for(pruned).internal_channels().values())
    document["parameters_dense"] = sum(p.numel() for p in model.parameters())
    document["parameters_pruned"] = sum(p.numel() for p in pruned.parameters())
    if model.get_submodule(_classifier(model)).out_features == digits.NUM_CLASSES:
        document["digits_accuracy_dense"] = digits.accuracy(model, test_split)
        document["digits_accuracy_pruned"] = digits.accuracy(pruned, test_split)
    _print_vision_summary(document, args.backend, report.seconds)
    if args.output:
        from osscar_opt.io import save_pruned

        save_pruned(pruned, args.output, report=report)
        document["output"] = str(args.output)
        print(f"saved the pruned model and kept ids to {args.output} (load it with osscar_opt.load_pruned)")
    else:
        print("the pruned model was not saved (give --output DIR to keep it)")
    return document


def _classifier(model) -> str:
    import torch

    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)][-1]


def _print_vision_summary(document: dict[str, Any], backend: str, seconds: float) -> None:
    line = (
        f"{document['model']}: {document['channels_before']} -> {document['channels_after']} internal channels, "
        f"{document['parameters_dense']} -> {document['parameters_pruned']} parameters, "
        f"backend {backend}, {seconds:.1f}s"
    )
    if "digits_accuracy_pruned" in document:
        line += (
            f"; digits test accuracy {100 * document['digits_accuracy_dense']:.1f}% -> "
            f"{100 * document['digits_accuracy_pruned']:.1f}%"
        )
    print(line)


def describe_problem_folder(folder: Path) -> str:
    """``wrote 12 layer problems (365.2 MB) to problems/ ...``: where ``--save-problems`` wrote."""
    files = sorted(folder.glob("*.safetensors"))
    size = sum(path.stat().st_size for path in files)
    return (f"wrote {len(files)} layer problems ({size / 1e6:.1f} MB) to {folder}: re-solve them with "
            f"osscar solve {folder} --backend NAME, or certify them with osscar certify {folder}")


def run(args: argparse.Namespace) -> int:
    from osscar_opt.adapters.registry import vision_architectures

    if args.save_problems is not None:  # what a Ctrl-C leaves on disk
        args.interrupt_note = f"the layer problems written so far are in {args.save_problems}; nothing else was saved"
    if args.model is not None and args.model in vision_architectures():
        document = prune_torchvision(args)
    else:
        document = prune_transformer(args)
    saved = [f"the pruned model is in {args.output}"] if args.output else []
    if args.save_problems is not None:
        saved.append(f"the layer problems are in {args.save_problems}")
        print(describe_problem_folder(Path(args.save_problems)))
    if args.report:
        saved.append(f"{args.report} may be missing or incomplete")
    args.interrupt_note = "; ".join(saved) or "nothing was saved"
    allocation = document.get("settings", {}).get("allocation")
    if allocation is not None:
        print(describe_allocation(allocation))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(document, indent=1))
        print(f"wrote the report to {args.report}")
        if allocation is not None or args.plot:
            from osscar_opt.plots import keep_heatmap

            title = f"{document.get('model', '')} kept share"
            if allocation is not None:
                title += f", target {allocation['target']} {allocation['value']:g}"
            picture = keep_heatmap(document, Path(args.report).with_suffix(".keep.png"), title=title)
            print(f"wrote the kept-share heat map to {picture}")
            if allocation is not None and allocation.get("search"):
                from osscar_opt.plots import search_plot

                picture = search_plot(allocation, Path(args.report).with_suffix(".search.png"),
                                      title=f"{document.get('model', '')}: allocation search")
                print(f"wrote the allocation search plot to {picture}")
        if args.plot:
            from osscar_opt.plots import layer_plot

            picture = layer_plot(document, Path(args.report).with_suffix(".layers.png"),
                                 title=f"{document.get('model', '')}: per-layer loss and kept share")
            print(f"wrote the per-layer plot to {picture}")
    return 0
