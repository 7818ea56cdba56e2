"""Benchmark of LinearModeConnectivity's path evaluation against its floor.

Reproduce (the first line the script prints):

    python benchmarks/bench_lmc.py                                  # ResNet-20, 30 alphas, 512 + 512 examples
    python benchmarks/bench_lmc.py --alphas 5 --train 256 --test 256 --repeats 3   # a quick run
    python benchmarks/bench_lmc.py --bn interpolate                 # no BatchNorm reset

What is timed is what the callback does for one spawn step once the sibling is trained (and for one
init-mode measurement): ``LinearModeConnectivity._paths``, the train and test paths between two networks by
:func:`lt_theory.measures.interpolation.linear_paths` (interpolated weights loaded at every alpha, BatchNorm
statistics re-estimated exactly on the training subset, both sets evaluated, barriers). The issue's floor is
``alphas x (one evaluation pass over the subset and the test set) + the BatchNorm reset passes``: here, for
every alpha, a bare forward pass in eval mode under ``torch.no_grad`` over the same train and test batches
and a bare forward pass in train mode (the reset pass, without statistics) over the same reset batches, each
batch converted by ``datamodule.preprocess`` as the callback does. Printed: the ratio measured / floor
(interleaved repetitions, median and best of ``--repeats``), goal <= 1.2.

Not timed, and stated in the callback's docstring: a spawn costs one sibling training per spawn step, from
``k`` to the end of training (for Frankle et al.'s five steps on ResNet-20, about five more trainings).

On a CPU the script runs torch on ``--threads`` intra-op threads (default 1): on a shared machine, threads
that wait for each other make every timing erratic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from lt_theory.callbacks.lmc import LinearModeConnectivity
from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.models import resnet20


def _floor(model, batches, datamodule, alphas: int, reset: bool, device) -> None:
    """alphas x (eval passes over the train and test batches + a train-mode pass over the reset batches)."""
    with torch.no_grad():
        for _ in range(alphas):
            if reset:
                model.train()
                for x, _ in batches["train"]:
                    model(datamodule.preprocess(x.to(device)))
            model.eval()
            for split in ("train", "test"):
                for x, _ in batches[split]:
                    model(datamodule.preprocess(x.to(device)))
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measured(callback, trainer, model_a, model_b, device) -> dict:
    result = callback._paths(trainer, model_a, model_b, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=int, default=30)
    parser.add_argument("--train", type=int, default=512, help="training subset (also the reset batches)")
    parser.add_argument("--test", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bn", default="reset", choices=["reset", "interpolate"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print("reproduce: python benchmarks/bench_lmc.py " + " ".join(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    datamodule = SyntheticCIFARDataModule(num_train=max(args.train, 64), num_test=args.test, seed=0)
    datamodule.setup()
    trainer = SimpleNamespace(datamodule=datamodule)
    callback = LinearModeConnectivity(
        num_alphas=args.alphas,
        bn=args.bn,
        train_subset_size=args.train,
        test_subset_size=args.test,
        eval_batch_size=args.batch,
    )
    torch.manual_seed(0)
    model_a, model_b = resnet20().to(device), resnet20().to(device)
    batches = callback._evaluation_sets(trainer)["loaders"]

    _measured(callback, trainer, model_a, model_b, device)  # warm-up of both
    _floor(model_a, batches, datamodule, 1, args.bn == "reset", device)
    measured, floor = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _measured(callback, trainer, model_a, model_b, device)
        measured.append(time.perf_counter() - start)
        start = time.perf_counter()
        _floor(model_a, batches, datamodule, args.alphas, args.bn == "reset", device)
        floor.append(time.perf_counter() - start)
    ratios = [m / f for m, f in zip(measured, floor)]
    print(
        f"device={device} threads={args.threads} ResNet-20 alphas={args.alphas} train={args.train} "
        f"test={args.test} batch={args.batch} bn={args.bn} repeats={args.repeats}"
    )
    best = min(measured) / min(floor)
    print(
        "path evaluation / floor (alphas x eval passes + reset passes): "
        f"median {statistics.median(ratios):.3f}x, best {best:.3f}x (goal <= 1.2x)"
    )


if __name__ == "__main__":
    main()
