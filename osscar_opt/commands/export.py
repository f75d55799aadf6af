"""``osscar export FOLDER OUT``: a saved (pruned or dense) model as a GGUF file for llama.cpp or an
ONNX file for ONNX Runtime (:mod:`osscar_opt.deploy`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from osscar_opt.deploy import FORMATS, OUTTYPES

    parser = subparsers.add_parser(
        "export", help="write a saved model as GGUF (llama.cpp) or ONNX (ONNX Runtime)",
        description="Write FOLDER (a model saved by osscar prune / save_pruned, or a Hugging Face model folder) to "
        "OUT. --format gguf: LLaMA-family causal LMs (llama, qwen2, mistral), the same widths in every block as "
        "llama.cpp's 'llama', per-layer widths as its 'deci' architecture, with the folder's tokenizer. --format "
        "onnx: BERT-family encoders and torchvision ResNet / MobileNetV2. The file is written under a temporary "
        "name and renamed into place.",
    )
    parser.add_argument("folder", help="saved model folder")
    parser.add_argument("out", help="output file (.gguf or .onnx)")
    parser.add_argument("--format", default=None, metavar="|".join(FORMATS),
                        help="file format (default: from OUT's suffix)")
    parser.add_argument("--outtype", default="f32", metavar="|".join(OUTTYPES),
                        help="GGUF weight type: f32 (default), f16 or q8_0 (matrices whose rows are not a multiple "
                        "of 32 stay f16)")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from osscar_opt.deploy import FORMATS, export

    fmt = args.format
    if fmt is None:
        fmt = Path(args.out).suffix.lower().lstrip(".")
        if fmt not in FORMATS:
            raise ValueError(f"--format: not given and OUT {args.out!r} does not end in .gguf or .onnx")
    if not Path(args.folder).is_dir():
        raise ValueError(f"folder: {args.folder} is not a folder (expected a saved model folder)")
    args.interrupt_note = f"nothing was written to {args.out}"
    result = export(args.folder, args.out, fmt, outtype=args.outtype)
    if args.json:
        print(json.dumps({"path": str(result.path), "format": result.format, "bytes": result.bytes,
                          "details": result.details, "notes": result.notes}, indent=1))
    else:
        print(result.summary())
    return 0
