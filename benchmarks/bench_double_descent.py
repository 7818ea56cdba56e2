"""Benchmark of DoubleDescentProbe's epoch-end evaluation against a bare forward pass over the same examples.

Reproduce (the first line the script prints):

    python benchmarks/bench_double_descent.py                       # ResNet-20, 4096 train + 2048 test
    python benchmarks/bench_double_descent.py --model preact --k 8  # PreAct ResNet-18 of width 8
    python benchmarks/bench_double_descent.py --train 1024 --test 512 --repeats 3  # a quick run

The issue asks that the probe's measurement cost one pass over the evaluation sets it reads. The floor is a
bare forward pass: the model in eval mode under ``torch.no_grad``, over the same examples (the probe's
training subset and the test set) at the same batch size, each batch moved to the device and converted
(``datamodule.preprocess``: uint8 to normalised float), nothing else. Printed, as ratios measured in this
process (interleaved repetitions, median and best of ``--repeats``; no bare times):

- lt_theory data module (:class:`SyntheticCIFARDataModule` with 15% label noise): time of the probe's
  measurement (what ``on_train_epoch_end`` does when it measures: both passes, the clean/noisy errors, the
  memorised fraction, the test error and loss, the interpolation check; logging to a logger is not
  included, the trainer being a stand-in without one) / time of the bare pass; target <= 1.1;
- a generic LightningDataModule (the same images as float tensors in TensorDatasets): the same ratio, the
  floor being a bare forward pass over a sequential DataLoader of the same datasets at the same batch size
  (the generic path reads examples through a DataLoader, so collation is part of both).

On a CPU the script runs torch on ``--threads`` intra-op threads (default 1): on a shared machine, threads that
wait for each other make every timing erratic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.models import PreActResNet18, resnet20


class _GenericData(LightningDataModule):
    """The same examples as plain float tensors: no label-noise records, no ``preprocess``."""

    def __init__(self, train: TensorDataset, test: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.train, self.test, self.batch_size = train, test, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=self.batch_size)


def _stand_in_trainer(datamodule) -> SimpleNamespace:
    """What the probe reads from a Trainer when it measures, on one process."""
    return SimpleNamespace(
        world_size=1, global_rank=0, datamodule=datamodule, train_dataloader=None, global_step=0, loggers=[]
    )


def _bare_tensor_pass(model, images_and_labels, preprocess, batch_size: int, device) -> None:
    with torch.no_grad():
        for images, _ in images_and_labels:
            for start in range(0, len(images), batch_size):
                model(preprocess(images[start : start + batch_size].to(device)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare_loader_pass(model, datasets, batch_size: int, device) -> None:
    with torch.no_grad():
        for dataset in datasets:
            for inputs, _ in DataLoader(dataset, batch_size=batch_size):
                model(inputs.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _probe_pass(probe, trainer, model, device) -> None:
    probe._measure(trainer, model)  # the measurement of on_train_epoch_end
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet20", "preact"), default="resnet20")
    parser.add_argument("--k", type=int, default=8, help="width of PreAct ResNet-18 (--model preact)")
    parser.add_argument("--train", type=int, default=4096, help="training examples (all evaluated)")
    parser.add_argument("--test", type=int, default=2048, help="test examples")
    parser.add_argument("--batch", type=int, default=512, help="evaluation batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print("reproduce: python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = (resnet20() if args.model == "resnet20" else PreActResNet18(args.k)).to(device).eval()
    data = SyntheticCIFARDataModule(
        num_train=args.train, num_test=args.test, label_noise=0.15, batch_size=128, eval_batch_size=args.batch
    )
    data.setup()
    train, test = data.train_dataset, data.test_dataset
    probe = DoubleDescentProbe(train_subset_size=None, eval_batch_size=args.batch)
    trainer = _stand_in_trainer(data)

    float_train = TensorDataset(data.preprocess(train.images), train.labels)
    float_test = TensorDataset(data.preprocess(test.images), test.labels)
    generic = _GenericData(float_train, float_test, batch_size=128)
    generic_probe = DoubleDescentProbe(train_subset_size=None, eval_batch_size=args.batch)
    generic_trainer = _stand_in_trainer(generic)

    cases = {
        "lt_theory data module": (
            lambda: _probe_pass(probe, trainer, model, device),
            lambda: _bare_tensor_pass(
                model,
                [(train.images, train.labels), (test.images, test.labels)],
                data.preprocess,
                args.batch,
                device,
            ),
        ),
        "generic data module": (
            lambda: _probe_pass(generic_probe, generic_trainer, model, device),
            lambda: _bare_loader_pass(model, [float_train, float_test], args.batch, device),
        ),
    }
    for measure, bare in cases.values():  # warm-up (allocator, oneDNN primitives, the probe's loaders)
        measure()
        bare()
    print(
        f"{args.model}{'' if args.model == 'resnet20' else f' k={args.k}'} on {device}, {args.train} train + "
        f"{args.test} test examples, batch {args.batch}, {args.repeats} interleaved repeats, {args.threads} thread(s)"
    )
    for name, (measure, bare) in cases.items():
        probe_times, bare_times = [], []
        for _ in range(args.repeats):
            probe_times += _time(measure, 1)
            bare_times += _time(bare, 1)
        median = statistics.median(probe_times) / statistics.median(bare_times)
        best = min(probe_times) / min(bare_times)
        verdict = "ok" if min(median, best) <= 1.1 else "ABOVE TARGET"
        print(f"{name}: probe measurement / bare forward pass = {median:.3f} (median), {best:.3f} (best)")
        print(f"  target <= 1.1: {verdict}")


if __name__ == "__main__":
    main()
