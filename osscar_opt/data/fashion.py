"""A vision workload that is not saturated: real Fashion-MNIST, and torchvision networks trained on it.

Digits leaves ResNet18 within a point of dense at every budget; Fashion-MNIST (Zalando's 70,000
28x28 grey images of clothing, 10 classes) does not. It is read from Debian's
``dataset-fashion-mnist`` package (``apt install dataset-fashion-mnist``: the original IDX files in
``/usr/share/datasets/fashion-mnist``; ``OSSCAR_FASHION_MNIST`` names another folder holding them).
Images are upsampled to ``image_size``, standardized with the training mean and std and repeated
over 3 channels (as :mod:`osscar_opt.data.digits`). A trained reference is cached as safetensors in
the cache folder (never in the repository), keyed by its whole recipe.
"""

from __future__ import annotations

import gzip
import os
import struct
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from osscar_opt.data.digits import ImageSplit, accuracy, build, train

FOLDER = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def folder() -> Path:
    """Where the IDX files are: ``$OSSCAR_FASHION_MNIST`` or Debian's package folder; a clear error
    (how to install it) when they are missing."""
    where = Path(os.environ.get("OSSCAR_FASHION_MNIST", FOLDER))
    missing = [name for pair in FILES.values() for name in pair if not (where / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST: {', '.join(missing)} not found in {where}; install Debian's package "
            "(sudo apt install dataset-fashion-mnist) or set OSSCAR_FASHION_MNIST to a folder with the four IDX files")
    return where


def _read_idx(path: Path, magic: int) -> torch.Tensor:
    """An IDX file (gzip) as a uint8 tensor, its header checked."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    found, count = struct.unpack(">II", data[:8])
    if found != magic:
        raise ValueError(f"Fashion-MNIST: {path} is not an IDX file of the expected kind (magic {found:#x})")
    if magic == 0x803:
        rows, columns = struct.unpack(">II", data[8:16])
        values = torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8)
        return values.reshape(count, rows, columns)
    return torch.frombuffer(bytearray(data[8:]), dtype=torch.uint8)[:count]


def fashion(image_size: int = 32, train_size: int | None = 10_000, test_size: int | None = 2_000,
            seed: int = 0) -> tuple[ImageSplit, ImageSplit]:
    """``(train, test)`` splits: the first ``train_size`` of a seeded shuffle of the 60,000 training
    images (None: all) and the first ``test_size`` of the 10,000 test images (None: all)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: expected an integer >= 8, got {image_size!r}")
    for name, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name}: expected a positive integer or None, got {size!r}")
    where = folder()
    images, labels = {}, {}
    for part, (image_file, label_file) in FILES.items():
        images[part] = _read_idx(where / image_file, 0x803)
        labels[part] = _read_idx(where / label_file, 0x801).to(torch.int64)
    order = torch.randperm(len(labels["train"]), generator=torch.Generator().manual_seed(seed))[:train_size]
    train_images, train_labels = images["train"][order], labels["train"][order]
    test_images, test_labels = images["test"][:test_size], labels["test"][:test_size]

    def scaled(values: torch.Tensor) -> torch.Tensor:
        pixels = values.to(torch.float32)[:, None] / 255.0
        return F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)

    train_pixels, test_pixels = scaled(train_images), scaled(test_images)
    mean, std = train_pixels.mean(), train_pixels.std()
    return (ImageSplit(((train_pixels - mean) / std).expand(-1, 3, -1, -1), train_labels),
            ImageSplit(((test_pixels - mean) / std).expand(-1, 3, -1, -1), test_labels))


def fashion_model(
    architecture: str,
    *,
    image_size: int = 32,
    epochs: int = 4,
    train_size: int = 10_000,
    width_mult: float = 0.5,
    seed: int = 0,
    cache: bool = True,
) -> tuple[nn.Module, ImageSplit, ImageSplit, dict[str, float]]:
    """A stock ``architecture`` trained on Fashion-MNIST: ``(model, train, test, info)``; from the
    cache when the same recipe was trained before (``info["cached"]``)."""
    from safetensors.torch import load_file, save_file

    from osscar_opt.data.text import cache_dir

    train_split, test_split = fashion(image_size, train_size, seed=seed)
    torch.manual_seed(seed)
    model = build(architecture, width_mult=width_mult)
    key = f"fashion_{architecture}_s{image_size}_e{epochs}_n{train_size}_w{width_mult:g}_seed{seed}"
    path = cache_dir() / "vision" / f"{key}.safetensors"
    info: dict[str, float] = {"cached": False, "train_seconds": 0.0}
    if cache and path.is_file():
        model.load_state_dict(load_file(path))
        info["cached"] = True
    else:
        start = time.perf_counter()
        train(model, train_split, epochs=epochs, seed=seed, augment=False)
        info["train_seconds"] = time.perf_counter() - start
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, partial)
            partial.replace(path)
    model.eval()
    info["test_accuracy"] = accuracy(model, test_split)
    return model, train_split, test_split, info
