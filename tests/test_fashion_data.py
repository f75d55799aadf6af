"""Fashion-MNIST read from its IDX files (Debian's dataset-fashion-mnist): a clear refusal when they
are missing, headers checked, images scaled and standardized like digits."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from osscar_opt.data import fashion


def write_idx(folder, count: int = 12, magic_images: int = 0x803) -> None:
    generator = torch.Generator().manual_seed(0)
    for image_file, label_file in fashion.FILES.values():
        pixels = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        with gzip.open(folder / image_file, "wb") as stream:
            stream.write(struct.pack(">IIII", magic_images, count, 28, 28) + pixels.numpy().tobytes())
        with gzip.open(folder / label_file, "wb") as stream:
            stream.write(struct.pack(">II", 0x801, count) + labels.numpy().tobytes())


def test_missing_files_are_refused_with_the_apt_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSCAR_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt install dataset-fashion-mnist"):
        fashion.fashion()


def test_idx_files_become_standardized_three_channel_splits(tmp_path, monkeypatch):
    write_idx(tmp_path)
    monkeypatch.setenv("OSSCAR_FASHION_MNIST", str(tmp_path))
    train, test = fashion.fashion(image_size=16, train_size=8, test_size=5)
    assert train.images.shape == (8, 3, 16, 16) and test.images.shape == (5, 3, 16, 16)
    assert abs(float(train.images.mean())) < 1e-5 and float(train.images.std()) == pytest.approx(1.0, abs=1e-3)
    assert train.labels.dtype == torch.int64 and sorted(test.labels.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="train_size: expected a positive integer"):
        fashion.fashion(train_size=0)


def test_a_file_that_is_not_idx_is_refused(tmp_path, monkeypatch):
    write_idx(tmp_path, magic_images=0x1234)
    monkeypatch.setenv("OSSCAR_FASHION_MNIST", str(tmp_path))
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion.fashion()


@pytest.mark.skipif(not fashion.FOLDER.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_installed_package_holds_the_real_data_set():
    train, test = fashion.fashion(image_size=28, train_size=None, test_size=None)
    assert len(train.labels) == 60_000 and len(test.labels) == 10_000
    assert train.labels.bincount().tolist() == [6_000] * 10
