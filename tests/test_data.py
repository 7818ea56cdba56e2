"""Tests of lt_theory.data: official CIFAR files served over loopback HTTP, label noise, augmentation,
the synthetic data set and the DataModules (split, probes, resumption, no global RNG)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import os
import pickle
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lt_theory.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_ARCHIVES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDownloadError,
    CIFARIntegrityError,
    SyntheticCIFARDataModule,
    apply_label_noise,
    channel_statistics,
    cifar_files,
    download_cifar,
    make_synthetic_cifar,
    normalize,
    random_crop,
    random_horizontal_flip,
    read_cifar_class_names,
    read_cifar_split,
)

# --------------------------------------------------------------------------------------------------------
# A miniature of the official release, in the exact official format, served over loopback HTTP
# --------------------------------------------------------------------------------------------------------

TRAIN_PER_BATCH = 20
NUM_TEST = 10


def _pickle_bytes(content: dict) -> bytes:
    return pickle.dumps(content, protocol=2)


def _data_batch(rng: np.random.Generator, count: int, label_key: bytes, num_classes: int, title: bytes):
    data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=count).tolist()
    content = {
        b"batch_label": title,
        label_key: labels,
        b"data": data,
        b"filenames": [f"image_{i}.png".encode() for i in range(count)],
    }
    if label_key == b"fine_labels":
        content[b"coarse_labels"] = [label % 20 for label in labels]
    return content, data, labels


def _official_layout(rows: np.ndarray) -> torch.Tensor:
    """(N, 3, 32, 32) from 3072-byte rows by the documented formula: index = c * 1024 + h * 32 + w."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return torch.from_numpy(rows[:, c * 1024 + h * 32 + w])


def _write_official_tarball(directory: Path, name: str, seed: int) -> dict:
    archive = CIFAR_ARCHIVES[name]
    num_classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(seed)
    members, train_rows, train_labels = {}, [], []
    for index, file in enumerate(archive.train_files):
        count = TRAIN_PER_BATCH * (5 if name == "cifar100" else 1)
        title = f"training batch {index + 1}".encode()
        members[file], rows, labels = _data_batch(rng, count, archive.label_key, num_classes, title)
        train_rows.append(rows)
        train_labels += labels
    members["test_batch" if name == "cifar10" else "test"], test_rows, test_labels = _data_batch(
        rng, NUM_TEST, archive.label_key, num_classes, b"testing batch 1 of 1"
    )
    class_names = [f"{name}_class_{i}" for i in range(num_classes)]
    if name == "cifar10":
        members["batches.meta"] = {
            b"num_cases_per_batch": TRAIN_PER_BATCH,
            b"label_names": [n.encode() for n in class_names],
            b"num_vis": 3072,
        }
    else:
        members["meta"] = {
            b"fine_label_names": [n.encode() for n in class_names],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
        }
    payloads = {file: _pickle_bytes(content) for file, content in members.items()}
    tar_path = directory / Path(archive.url).name
    with tarfile.open(tar_path, "w:gz") as tar:
        folder = tarfile.TarInfo(archive.folder)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for file, payload in {**payloads, "readme.html": b"<html></html>"}.items():
            info = tarfile.TarInfo(f"{archive.folder}/{file}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {
        "file": tar_path.name,
        "md5": hashlib.md5(tar_path.read_bytes()).hexdigest(),
        "train_images": _official_layout(np.concatenate(train_rows)),
        "train_labels": torch.tensor(train_labels),
        "test_images": _official_layout(test_rows),
        "test_labels": torch.tensor(test_labels),
        "class_names": class_names,
        "file_md5": tuple((file, hashlib.md5(payload).hexdigest()) for file, payload in payloads.items()),
    }


def _write_tarball(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for member, payload in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """Official-format CIFAR-10/100 miniatures (and broken archives) behind a loopback HTTP server."""
    served = tmp_path_factory.mktemp("mirror")
    releases = {name: _write_official_tarball(served, name, seed) for seed, name in enumerate(CIFAR_ARCHIVES)}
    (served / "garbage.tar.gz").write_bytes(b"this is not a gzip file" * 10)
    releases["garbage"] = {"md5": hashlib.md5((served / "garbage.tar.gz").read_bytes()).hexdigest()}
    releases["unsafe"] = {
        "md5": _write_tarball(served / "unsafe.tar.gz", {"cifar-10-batches-py/../../escaped": b"boo"})
    }
    releases["wrong_folder"] = {"md5": _write_tarball(served / "wrong_folder.tar.gz", {"other/file": b"x"})}
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            requests.append(self.path)
            if self.path.endswith("?slow"):  # a download long enough for concurrent clients to overlap
                time.sleep(4)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield SimpleNamespace(releases=releases, requests=requests, url=lambda file: f"{base}/{file}")
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def miniature_digests(mirror, monkeypatch):
    """The miniature releases stand for the official ones: their files' digests replace the official ones
    (as a user registers files they re-packed), so every read below is md5-checked."""
    for name in CIFAR_ARCHIVES:
        archive = dataclasses.replace(CIFAR_ARCHIVES[name], file_md5=mirror.releases[name]["file_md5"])
        monkeypatch.setitem(CIFAR_ARCHIVES, name, archive)


def _tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")) if root.exists() else ["<absent>"]


def _download(mirror, root: Path, name: str):
    release = mirror.releases[name]
    return download_cifar(root, name, url=mirror.url(release["file"]), md5=release["md5"])


# --------------------------------------------------------------------------------------------------------
# Official files: download, md5, extraction, reading
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_download_and_read_give_back_the_written_pixels_and_labels(mirror, tmp_path, name):
    release = mirror.releases[name]
    folder = _download(mirror, tmp_path / "data", name)
    assert folder == tmp_path / "data" / CIFAR_ARCHIVES[name].folder
    assert _tree(tmp_path / "data")[0] == CIFAR_ARCHIVES[name].folder  # nothing else, no temporary files
    assert all(not part.startswith(".") for part in _tree(tmp_path / "data"))
    for split in ("train", "test"):
        images, labels = read_cifar_split(tmp_path / "data", name, split)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, release[f"{split}_images"])
        assert torch.equal(labels, release[f"{split}_labels"])
    assert read_cifar_class_names(tmp_path / "data", name) == release["class_names"]


@pytest.mark.parametrize(
    "damage",
    ["truncated", "flipped_byte", "substituted"],
)
def test_a_file_that_is_not_the_released_one_is_refused_before_it_is_unpickled(mirror, tmp_path, damage):
    folder = _download(mirror, tmp_path, "cifar10")
    batch = folder / "data_batch_1"
    original = batch.read_bytes()
    if damage == "truncated":
        batch.write_bytes(original[: len(original) // 2])
    elif damage == "flipped_byte":
        batch.write_bytes(original[:-10] + bytes([original[-10] ^ 1]) + original[-9:])
    else:  # a valid pickle of the right shape, other content: it would be read without the check
        content = pickle.loads(original, encoding="bytes")
        content[b"labels"] = [0] * len(content[b"labels"])
        batch.write_bytes(_pickle_bytes(content))
    expected = dict(CIFAR_ARCHIVES["cifar10"].file_md5)["data_batch_1"]
    found = hashlib.md5(batch.read_bytes()).hexdigest()
    with pytest.raises(CIFARIntegrityError) as error:
        read_cifar_split(tmp_path, "cifar10", "train")
    message = str(error.value)
    assert str(batch) in message and expected in message and found in message
    assert "download=True" in message and "verify" in message
    module = CIFAR10DataModule(root=tmp_path, batch_size=8)
    with pytest.raises(CIFARIntegrityError, match="data_batch_1"):
        module.setup("fit")
    if damage == "substituted":  # the opt-out for files one re-packed: read as they are
        images, labels = read_cifar_split(tmp_path, "cifar10", "train", verify=False)
        assert labels[: len(content[b"labels"])].eq(0).all()
    if damage == "truncated":  # unchecked, a truncated pickle still names the file
        with pytest.raises(CIFARIntegrityError, match="data_batch_1"):
            read_cifar_split(tmp_path, "cifar10", "train", verify=False)


def test_each_file_is_hashed_once_per_process_until_it_changes(mirror, tmp_path, monkeypatch):
    folder = _download(mirror, tmp_path, "cifar10")
    hashed = []
    real_md5 = hashlib.md5

    def counting_md5(*args, **kwargs):
        hashed.append(1)
        return real_md5(*args, **kwargs)

    monkeypatch.setattr(cifar_files.hashlib, "md5", counting_md5)
    read_cifar_split(tmp_path, "cifar10", "test")
    read_cifar_split(tmp_path, "cifar10", "test")  # a second data module in the same process
    assert len(hashed) == 1
    test_batch = folder / "test_batch"
    content = test_batch.read_bytes()
    test_batch.write_bytes(content)
    os.utime(test_batch, ns=(test_batch.stat().st_atime_ns, test_batch.stat().st_mtime_ns + 10**9))
    read_cifar_split(tmp_path, "cifar10", "test")  # same bytes, newer file: hashed again, still accepted
    assert len(hashed) == 2


def test_pixel_layout_is_channel_then_row_then_column(mirror, tmp_path):
    _download(mirror, tmp_path, "cifar10")
    images, _ = read_cifar_split(tmp_path, "cifar10", "test")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as file:
        rows = pickle.load(file, encoding="bytes")[b"data"]
    for n, c, h, w in [(0, 0, 0, 0), (3, 2, 31, 0), (9, 1, 5, 17), (7, 0, 0, 31)]:
        assert int(images[n, c, h, w]) == int(rows[n, c * 1024 + h * 32 + w])


def test_data_already_present_is_not_downloaded_again(mirror, tmp_path):
    release = mirror.releases["cifar10"]
    _download(mirror, tmp_path, "cifar10")
    requests_after_first = len(mirror.requests)
    _download(mirror, tmp_path, "cifar10")
    datamodule = CIFAR10DataModule(root=tmp_path, download=True, url=mirror.url(release["file"]))
    datamodule.prepare_data()
    datamodule.setup()
    assert len(mirror.requests) == requests_after_first
    assert torch.equal(datamodule.test_dataset.images, release["test_images"])


def test_md5_mismatch_raises_and_leaves_the_root_as_it_was(mirror, tmp_path):
    (tmp_path / "keep.txt").write_text("user file")
    before = _tree(tmp_path)
    url = mirror.url(mirror.releases["cifar10"]["file"])
    with pytest.raises(CIFARDownloadError) as error:
        download_cifar(tmp_path, "cifar10", url=url, md5="0" * 32)
    message = str(error.value)
    assert "md5" in message and url in message
    assert "0" * 32 in message and mirror.releases["cifar10"]["md5"] in message
    assert _tree(tmp_path) == before


def test_http_404_raises_and_leaves_nothing(mirror, tmp_path):
    root = tmp_path / "new" / "data"
    url = mirror.url("missing.tar.gz")
    with pytest.raises(CIFARDownloadError, match="404") as error:
        download_cifar(root, "cifar10", url=url, md5="0" * 32)
    assert url in str(error.value)
    assert _tree(tmp_path) == []  # not even the root directories it created


@pytest.mark.parametrize(
    "file, match",
    [
        ("garbage.tar.gz", "could not be extracted"),
        ("unsafe.tar.gz", "unsafe path"),
        ("wrong_folder.tar.gz", "has no cifar-10-batches-py/ folder"),
    ],
)
def test_bad_archives_raise_and_leave_nothing(mirror, tmp_path, file, match):
    name = file.removesuffix(".tar.gz")
    with pytest.raises(CIFARDownloadError, match=match):
        download_cifar(tmp_path / "data", "cifar10", url=mirror.url(file), md5=mirror.releases[name]["md5"])
    assert _tree(tmp_path) == []
    assert not (tmp_path.parent / "escaped").exists()


def test_missing_files_without_download_name_the_directory_and_the_ways_out(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        CIFAR10DataModule(root=tmp_path, download=False).setup()
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "download=True" in message and "SyntheticCIFARDataModule" in message


def test_datamodule_downloads_through_an_overridden_archive_table(mirror, tmp_path, monkeypatch):
    release = mirror.releases["cifar100"]
    mirrored = dataclasses.replace(
        CIFAR_ARCHIVES["cifar100"], url=mirror.url(release["file"]), md5=release["md5"]
    )
    monkeypatch.setitem(CIFAR_ARCHIVES, "cifar100", mirrored)
    datamodule = CIFAR100DataModule(root=tmp_path, download=True, val_size=10, augment=False)
    datamodule.prepare_data()
    datamodule.setup()
    assert datamodule.num_classes == 100 and datamodule.mean == CIFAR100_MEAN
    assert len(datamodule.train_dataset) == 90 and len(datamodule.val_dataset) == 10
    assert torch.equal(datamodule.test_dataset.labels, release["test_labels"])
    kept = datamodule.train_dataset.source_indices
    assert torch.equal(datamodule.train_dataset.images, release["train_images"][kept])
    expected = (
        release["test_images"][:4].float() / 255 - torch.tensor(CIFAR100_MEAN)[:, None, None]
    ) / torch.tensor(CIFAR100_STD)[:, None, None]
    torch.testing.assert_close(datamodule.preprocess(release["test_images"][:4]), expected)


# --------------------------------------------------------------------------------------------------------
# Label noise
# --------------------------------------------------------------------------------------------------------


def test_label_noise_changes_exactly_the_chosen_labels_to_other_classes():
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    noisy, indices = apply_label_noise(labels, 0.25, 10, seed=3)
    assert len(indices) == 250 and len(indices.unique()) == 250
    assert bool((noisy[indices] != labels[indices]).all())
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(noisy[untouched], labels[untouched])
    assert int((noisy != labels).sum()) == 250
    assert len(apply_label_noise(labels[:10], 0.3333, 10, seed=0)[1]) == 3  # round(3.333)


def test_label_noise_is_deterministic_per_seed():
    labels = torch.arange(500) % 10
    first, first_indices = apply_label_noise(labels, 0.4, 10, seed=7)
    again, again_indices = apply_label_noise(labels, 0.4, 10, seed=7)
    other, other_indices = apply_label_noise(labels, 0.4, 10, seed=8)
    assert torch.equal(first, again) and torch.equal(first_indices, again_indices)
    assert not torch.equal(first_indices, other_indices)


def test_new_labels_are_uniform_over_the_other_classes():
    num_classes, count = 10, 90_000
    labels = torch.arange(count) % num_classes
    noisy, _ = apply_label_noise(labels, 1.0, num_classes, seed=0)
    transitions = torch.zeros(num_classes, num_classes)
    transitions.index_put_((labels, noisy), torch.ones(count), accumulate=True)
    assert float(transitions.diagonal().sum()) == 0
    off_diagonal = transitions[~torch.eye(num_classes, dtype=torch.bool)]
    expected = count / (num_classes * (num_classes - 1))  # 1000 per cell
    chi_square = float(((off_diagonal - expected) ** 2 / expected).sum())
    assert chi_square < 160  # 89 degrees of freedom: mean 89, sd 13.3; 160 is ~5 sd


def test_label_noise_zero_fraction_and_bad_fractions():
    labels = torch.tensor([1, 2, 3])
    noisy, indices = apply_label_noise(labels, 0.0, 5, seed=0)
    assert torch.equal(noisy, labels) and noisy.data_ptr() != labels.data_ptr()
    assert indices.shape == (0,) and indices.dtype == torch.int64
    for fraction in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            apply_label_noise(labels, fraction, 5, seed=0)


# --------------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------------


def test_random_crop_matches_a_per_image_pad_and_slice_reference():
    images = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    crops = random_crop(images, padding=4, generator=torch.Generator().manual_seed(1))
    top, left = torch.randint(0, 9, (2, 32), generator=torch.Generator().manual_seed(1))
    assert len(set(zip(top.tolist(), left.tolist()))) > 10  # offsets are drawn per image
    for i in range(32):
        padded = F.pad(images[i], [4, 4, 4, 4])
        assert torch.equal(crops[i], padded[:, top[i] : top[i] + 32, left[i] : left[i] + 32])


def test_random_crop_fills_the_padding_with_zeros_for_uint8():
    images = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    crops = random_crop(images, padding=4, generator=torch.Generator().manual_seed(2))
    top, left = torch.randint(0, 9, (2, 64), generator=torch.Generator().manual_seed(2))
    rows_out, cols_out = (top - 4).abs(), (left - 4).abs()
    expected_zeros = 3 * (32 * rows_out + 32 * cols_out - rows_out * cols_out)
    assert crops.dtype == torch.uint8
    assert torch.equal((crops == 0).sum(dim=(1, 2, 3)), expected_zeros)
    assert set(crops.unique().tolist()) <= {0, 200}


def test_random_horizontal_flip_matches_a_per_image_reference():
    images = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    flipped = random_horizontal_flip(images, generator=torch.Generator().manual_seed(5))
    coins = torch.rand(40, generator=torch.Generator().manual_seed(5)) < 0.5
    assert 5 < int(coins.sum()) < 35
    for i in range(40):
        assert torch.equal(flipped[i], images[i].flip(-1) if coins[i] else images[i])
    assert torch.equal(random_horizontal_flip(images, p=0.0), images)
    assert torch.equal(random_horizontal_flip(images, p=1.0), images.flip(-1))


def test_normalize_matches_the_formula_per_channel():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = normalize(images, CIFAR10_MEAN, CIFAR10_STD)
    for c in range(3):
        torch.testing.assert_close(result[:, c], (images[:, c] - CIFAR10_MEAN[c]) / CIFAR10_STD[c])
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    assert CIFAR100_MEAN == (0.5071, 0.4865, 0.4409) and CIFAR100_STD == (0.2673, 0.2564, 0.2762)
    with pytest.raises(ValueError, match="one entry per channel"):
        normalize(images, (0.5, 0.5), (0.2, 0.2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augmentation_on_cuda_matches_the_cpu_reference_given_the_same_offsets():
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    crops = random_crop(images, 4, torch.Generator(device="cuda").manual_seed(1))
    top, left = torch.randint(
        0, 9, (2, 16), generator=torch.Generator(device="cuda").manual_seed(1), device="cuda"
    )
    for i in range(16):
        padded = F.pad(images[i], [4, 4, 4, 4])
        assert torch.equal(crops[i], padded[:, top[i] : top[i] + 32, left[i] : left[i] + 32])


# --------------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------------


def test_synthetic_data_shapes_determinism_and_balance():
    threads = torch.get_num_threads()
    first = make_synthetic_cifar(1000, 205, num_classes=10, seed=0)
    assert torch.get_num_threads() == threads  # generation runs on one thread, then restores the setting
    again = make_synthetic_cifar(1000, 205, num_classes=10, seed=0)
    other = make_synthetic_cifar(1000, 205, num_classes=10, seed=1)
    train_images, train_labels, test_images, test_labels = first
    assert train_images.shape == (1000, 3, 32, 32) and test_images.shape == (205, 3, 32, 32)
    assert train_images.dtype == torch.uint8 and train_labels.dtype == torch.int64
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(train_images, other[0]) and not torch.equal(test_images, other[2])
    assert train_labels.bincount().tolist() == [100] * 10
    assert sorted(test_labels.bincount().tolist()) == [20] * 5 + [21] * 5
    # the training set does not depend on the size of the test set
    assert torch.equal(make_synthetic_cifar(1000, 7, seed=0)[0], train_images)


def test_synthetic_classes_differ_in_texture_not_in_a_pixel_template():
    train_images, train_labels, test_images, test_labels = make_synthetic_cifar(2000, 500, seed=0)

    def nearest_centroid_accuracy(train_features, test_features):
        centroids = torch.stack([train_features[train_labels == c].mean(0) for c in range(10)])
        predictions = torch.cdist(test_features, centroids).argmin(1)
        return float((predictions == test_labels).float().mean())

    pixels, test_pixels = train_images.flatten(1).float() / 255, test_images.flatten(1).float() / 255

    def spectrum(images):  # translation-invariant: amplitude of the low spatial frequencies per channel
        amplitude = torch.fft.fft2(images.float() / 255).abs()[:, :, :4, :4]
        return amplitude.flatten(1).log1p()

    within_class_std = float(pixels[train_labels == 0].std(0).mean())
    assert within_class_std > 0.1  # not one colour per class
    assert nearest_centroid_accuracy(pixels, test_pixels) < 0.3  # chance is 0.1
    assert nearest_centroid_accuracy(spectrum(train_images), spectrum(test_images)) > 0.6


# --------------------------------------------------------------------------------------------------------
# DataModules
# --------------------------------------------------------------------------------------------------------


def _synthetic(**overrides) -> SyntheticCIFARDataModule:
    arguments = dict(num_train=300, num_test=100, batch_size=32, seed=0) | overrides
    datamodule = SyntheticCIFARDataModule(**arguments)
    datamodule.setup()
    return datamodule


def test_train_validation_split_sizes_disjointness_and_clean_validation_labels():
    datamodule = _synthetic(val_size=50, label_noise=0.2)
    _, labels, _, _ = make_synthetic_cifar(300, 100, seed=0)
    train, val = datamodule.train_dataset, datamodule.val_dataset
    assert (len(train), len(val), len(datamodule.test_dataset)) == (250, 50, 100)
    assert set(train.source_indices.tolist()).isdisjoint(val.source_indices.tolist())
    assert sorted(train.source_indices.tolist() + val.source_indices.tolist()) == list(range(300))
    assert torch.equal(val.labels, labels[val.source_indices])
    assert torch.equal(train.clean_labels, labels[train.source_indices])
    assert len(train.noisy_indices) == 50
    assert torch.equal(torch.nonzero(train.labels != train.clean_labels).flatten(), train.noisy_indices)
    no_split = _synthetic()
    assert no_split.val_dataset is no_split.test_dataset and len(no_split.train_dataset) == 300


def test_train_split_gives_disjoint_equal_parts_of_one_noisy_training_set():
    full = _synthetic(val_size=20, label_noise=0.25)
    parts = [_synthetic(val_size=20, label_noise=0.25, train_split=(i, 3)) for i in range(3)]
    sources = [part.train_dataset.source_indices for part in parts]
    assert [len(s) for s in sources] == [280 // 3] * 3
    assert len(set(torch.cat(sources).tolist())) == 3 * (280 // 3)  # disjoint
    assert set(torch.cat(sources).tolist()) <= set(full.train_dataset.source_indices.tolist())
    position = {int(s): i for i, s in enumerate(full.train_dataset.source_indices)}
    noisy_in_full = set(full.train_dataset.noisy_indices.tolist())
    for part in parts:
        train = part.train_dataset
        rows = torch.tensor([position[int(s)] for s in train.source_indices])
        # the same images, noisy labels and clean labels as the full data module, and the noise records follow
        assert torch.equal(train.images, full.train_dataset.images[rows])
        assert torch.equal(train.labels, full.train_dataset.labels[rows])
        assert torch.equal(train.clean_labels, full.train_dataset.clean_labels[rows])
        expected = [i for i, row in enumerate(rows.tolist()) if row in noisy_in_full]
        assert train.noisy_indices.tolist() == expected
        assert torch.equal(part.test_dataset.labels, full.test_dataset.labels)
        assert torch.equal(part.val_dataset.source_indices, full.val_dataset.source_indices)
    again = _synthetic(val_size=20, label_noise=0.25, train_split=(1, 3))
    assert torch.equal(again.train_dataset.source_indices, sources[1])
    other_seed = _synthetic(val_size=20, label_noise=0.25, train_split=(1, 3), seed=1)
    assert not torch.equal(other_seed.train_dataset.source_indices, sources[1])


@pytest.mark.parametrize("value", [(0, 1), (3, 3), (-1, 2), (0,), (0.0, 2), "0,2", (True, 2)])
def test_bad_train_split_raises_naming_the_argument(value):
    with pytest.raises(ValueError, match="`train_split`"):
        SyntheticCIFARDataModule(train_split=value)
    with pytest.raises(ValueError, match="`train_split`.*at most 300"):
        _synthetic(train_split=(0, 301))


def test_setup_is_idempotent():
    datamodule = _synthetic(val_size=20)
    datasets = (datamodule.train_dataset, datamodule.val_dataset, datamodule.test_dataset)
    datamodule.setup("fit")
    datamodule.setup("test")
    assert datasets == (datamodule.train_dataset, datamodule.val_dataset, datamodule.test_dataset)


def test_probe_is_stable_across_calls_and_instances():
    first = _synthetic(val_size=60, label_noise=0.3)
    x, y, indices = first.probe(25, split="val", seed=4)
    again = first.probe(25, split="val", seed=4)
    fresh = _synthetic(val_size=60, label_noise=0.3).probe(25, split="val", seed=4)
    assert all(torch.equal(a, b) for a, b in zip((x, y, indices), again))
    assert all(torch.equal(a, b) for a, b in zip((x, y, indices), fresh))
    assert len(indices.unique()) == 25 and torch.equal(indices, indices.sort().values)
    assert torch.equal(x, first.preprocess(first.val_dataset.images[indices]))
    assert torch.equal(y, first.val_dataset.labels[indices])
    assert not torch.equal(indices, first.probe(25, split="val", seed=5)[2])
    _, train_y, train_indices = first.probe(240, split="train")
    assert torch.equal(train_y, first.train_dataset.labels[train_indices])  # the (noisy) labels in use
    with pytest.raises(ValueError, match="size"):
        first.probe(61, split="val")
    with pytest.raises(ValueError, match="split"):
        first.probe(5, split="validation")


def test_preprocess_normalises_with_the_training_statistics():
    datamodule = _synthetic()
    mean, std = channel_statistics(datamodule.train_dataset.images)
    as_float = datamodule.train_dataset.images.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), as_float.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(
        torch.tensor(std, dtype=torch.float64), as_float.permute(1, 0, 2, 3).flatten(1).std(1, correction=0)
    )
    normalised = datamodule.preprocess(datamodule.train_dataset.images)
    torch.testing.assert_close(normalised.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_augmentation_only_while_training_and_only_when_enabled():
    datamodule = _synthetic()
    images = datamodule.train_dataset.images[:16]
    batch = (images, datamodule.train_dataset.labels[:16])
    datamodule.trainer = SimpleNamespace(training=False, global_rank=0)
    assert torch.equal(datamodule.on_after_batch_transfer(batch, 0)[0], datamodule.preprocess(images))
    datamodule.trainer = SimpleNamespace(training=True, global_rank=0)
    augmented = datamodule.on_after_batch_transfer(batch, 0)[0]
    assert not torch.equal(augmented, datamodule.preprocess(images))
    plain = _synthetic(augment=False)
    plain.trainer = SimpleNamespace(training=True, global_rank=0)
    assert torch.equal(plain.on_after_batch_transfer(batch, 0)[0], plain.preprocess(images))


def _first_epoch_then_state(datamodule):
    for images, labels in datamodule.train_dataloader():
        datamodule.on_after_batch_transfer((images, labels), 0)
    return datamodule.state_dict()


def _next_batch(datamodule):
    images, labels = next(iter(datamodule.train_dataloader()))
    return datamodule.on_after_batch_transfer((images, labels), 0)


def test_state_dict_round_trip_reproduces_the_next_augmented_batch():
    training = SimpleNamespace(training=True, global_rank=0)
    original = _synthetic()
    original.trainer = training
    state = _first_epoch_then_state(original)
    expected_images, expected_labels = _next_batch(original)

    resumed = _synthetic()
    resumed.trainer = training
    resumed.load_state_dict(state)
    images, labels = _next_batch(resumed)
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)

    not_resumed = _synthetic()
    not_resumed.trainer = training
    assert not torch.equal(_next_batch(not_resumed)[1], expected_labels)


def test_datamodule_never_touches_the_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    datamodule = _synthetic(val_size=40, label_noise=0.5, num_workers=0)
    datamodule.trainer = SimpleNamespace(training=True, global_rank=0)
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()):
        for batch in loader:
            datamodule.on_after_batch_transfer(batch, 0)
    datamodule.probe(10, split="train")
    datamodule.load_state_dict(datamodule.state_dict())
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "argument, value",
    [
        ("batch_size", 0),
        ("eval_batch_size", -1),
        ("num_workers", -1),
        ("val_size", -5),
        ("val_size", 1.5),
        ("label_noise", 1.2),
        ("label_noise", -0.1),
        ("augment", "yes"),
        ("seed", -1),
        ("num_train", 0),
        ("num_classes", 1),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        SyntheticCIFARDataModule(**{argument: value})


def test_bad_cifar_arguments_and_too_large_validation_split(tmp_path):
    with pytest.raises(ValueError, match="`download`"):
        CIFAR10DataModule(root=tmp_path, download="yes")
    with pytest.raises(ValueError, match="`val_size`"):
        _synthetic(val_size=300)


class _RecordingModel(pl.LightningModule):
    """Records a digest of every training batch it receives."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 10)
        self.seen: list[tuple[float, float]] = []

    def training_step(self, batch, batch_index):
        images, labels = batch
        self.seen.append(
            (float(images.double().sum()), float(labels.double() @ torch.arange(len(labels)).double()))
        )
        return F.cross_entropy(self.layer(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(max_epochs, root, ckpt_path=None):
    model = _RecordingModel()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        enable_checkpointing=False,
    )
    trainer.fit(
        model,
        datamodule=SyntheticCIFARDataModule(num_train=64, num_test=16, batch_size=16),
        ckpt_path=ckpt_path,
    )
    return model, trainer


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_trainer_resume_continues_the_same_order_and_augmentation(tmp_path):
    full, _ = _fit(2, tmp_path)
    _, first_half = _fit(1, tmp_path)
    first_half.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = _fit(2, tmp_path, ckpt_path=tmp_path / "epoch1.ckpt")
    assert len(full.seen) == 8 and len(resumed.seen) == 4
    assert resumed.seen == full.seen[4:]
    assert full.seen[:4] != full.seen[4:]


class _CheckpointAt(pl.Callback):
    """Writes a checkpoint after the optimizer step ``step`` (in mid-epoch), or before it (``at_start``)."""

    def __init__(self, step, path, at_start=False):
        self.step, self.path, self.at_start = step, path, at_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.at_start and trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.at_start and trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.parametrize("step, at_start", [(2, False), (0, True), (5, True)])
def test_trainer_resume_in_mid_epoch_continues_the_epoch(tmp_path, step, at_start):
    """4 batches per epoch: the rest of the epoch, then the next ones, exactly as without the interruption
    (the replayed permutation skips the examples done; a batch augmented but not trained on is augmented
    again)."""
    path = tmp_path / "mid.ckpt"
    model = _RecordingModel()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        callbacks=[_CheckpointAt(step, path, at_start)],
    )
    trainer.fit(model, datamodule=SyntheticCIFARDataModule(num_train=64, num_test=16, batch_size=16))
    resumed, _ = _fit(2, tmp_path, ckpt_path=path)
    assert len(model.seen) == 8 and resumed.seen == model.seen[step:]


def test_reseed_order_changes_only_the_order_and_the_augmentation():
    training = SimpleNamespace(training=True, global_rank=0)
    default, same, other = (_synthetic(label_noise=0.2) for _ in range(3))
    same.reseed_order(0)  # the default streams
    other.reseed_order(1)
    for datamodule in (default, same, other):
        datamodule.trainer = training
    assert torch.equal(other.train_dataset.labels, default.train_dataset.labels)  # same split and noise
    first = [_next_batch(datamodule) for datamodule in (default, same, other)]
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])
    assert not torch.equal(first[0][1], first[2][1])
    images = default.train_dataset.images[:8]
    seed_one = _synthetic(label_noise=0.2, seed=1)
    seed_one.transform_batch(images, training=True)  # its first augmented batch; `other` augmented one too
    assert torch.equal(other.transform_batch(images, True), seed_one.transform_batch(images, True))
    assert not torch.equal(other.transform_batch(images, True), default.transform_batch(images, True))
    # a checkpoint of another stream keeps the re-seeded order; of the same stream, it is continued
    state = _first_epoch_then_state(default)
    reseeded = _synthetic(label_noise=0.2)
    reseeded.trainer = training
    reseeded.reseed_order(1)
    reseeded.load_state_dict(state)
    assert reseeded.state_dict()["augmented_batches"] == state["augmented_batches"]
    fresh = _synthetic(label_noise=0.2)
    fresh.trainer = training
    fresh.reseed_order(1)
    assert torch.equal(_next_batch(reseeded)[1], _next_batch(fresh)[1])
    continued = _synthetic(label_noise=0.2)
    continued.trainer = training
    continued.reseed_order(0)
    continued.load_state_dict(state)
    assert torch.equal(_next_batch(continued)[1], _next_batch(default)[1])
    with pytest.raises(ValueError, match="order_seed"):
        default.reseed_order(-1)


def test_global_batch_size_is_shared_by_the_devices_of_a_ddp_run():
    """He et al.'s batch of 128 stays 128 on 8 GPUs: 16 per device; on one device, 128."""
    from types import SimpleNamespace

    datamodule = SyntheticCIFARDataModule(num_train=256, num_test=8, batch_size=7, global_batch_size=128)
    assert next(iter(datamodule.train_dataloader()))[0].shape[0] == 128  # no trainer: one device
    for world, per_device in ((1, 128), (4, 32), (8, 16)):
        datamodule.trainer = SimpleNamespace(world_size=world)
        assert datamodule.train_batch_size == per_device
        assert next(iter(datamodule.train_dataloader()))[0].shape[0] == per_device
    datamodule.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ValueError, match="`global_batch_size`=128 must be a multiple of the 3 devices"):
        datamodule.train_dataloader()
    plain = SyntheticCIFARDataModule(num_train=256, num_test=8, batch_size=7)
    plain.trainer = SimpleNamespace(world_size=8)
    assert plain.train_batch_size == 7  # Lightning's convention: batch_size per device
    with pytest.raises(ValueError, match="global_batch_size"):
        SyntheticCIFARDataModule(global_batch_size=0)


def test_concurrent_downloads_fetch_the_archive_once(mirror, tmp_path):
    """Four processes downloading into one folder at once (a job array sharing `download: true`): one request,
    every process gets the data."""
    release = mirror.releases["cifar10"]
    before = len(mirror.requests)
    script = (
        "import sys; from lt_theory.data.cifar_files import download_cifar; "
        "print(download_cifar(sys.argv[1], 'cifar10', url=sys.argv[2], md5=sys.argv[3]))"
    )
    args = [str(tmp_path / "shared"), mirror.url(release["file"]) + "?slow", release["md5"]]
    workers = [
        subprocess.Popen(  # from the repository root: the lt_theory under test, not another installed one
            [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
        )
        for _ in range(4)
    ]
    outputs = [worker.communicate(timeout=120)[0].strip() for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4
    assert len(set(outputs)) == 1 and outputs[0].endswith("cifar-10-batches-py")
    assert len(mirror.requests) - before == 1
    images, _ = read_cifar_split(tmp_path / "shared", "cifar10", "test")
    assert torch.equal(images, release["test_images"])
