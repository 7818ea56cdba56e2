"""Benchmark of LinearModeConnectivity's path evaluation against its floor.

Reproduce (the first line the script prints):

    python benchmarks/bench_lmc.py                                  # ResNet-20, 30 alphas, 512 + 512 examples
    python benchmarks/bench_lmc.py --alphas 5 --train 256 --test 256 --repeats 3   # a quick run
    python benchmarks/bench_lmc.py --bn interpolate                 # no BatchNorm reset
    python benchmarks/bench_lmc.py --trained-epochs 3               # coarse-to-fine vs the whole grid

What is timed is what the callback does for one spawn step once the sibling is trained (and for one
init-mode measurement): ``LinearModeConnectivity._paths``, the train and test paths between two networks by
:func:`lt_theory.measures.interpolation.linear_paths` (interpolated weights loaded at every alpha, BatchNorm
statistics re-estimated exactly on the training subset, both sets evaluated, barriers). The issue's floor is
``alphas x (one evaluation pass over the subset and the test set) + the BatchNorm reset passes``: here, for
every alpha, a bare forward pass in eval mode under ``torch.no_grad`` over the same train and test batches
and a bare forward pass in train mode (the reset pass, without statistics) over the same reset batches, each
batch converted by ``datamodule.preprocess`` as the callback does. Printed: the ratio measured / floor
(interleaved repetitions, median and best of ``--repeats``), goal <= 1.2.

With ``--trained-epochs N`` the second network is the first one trained for N epochs on the synthetic data
(plain SGD, lr 0.05, batch 128), so the path is the init path of a real run, and the script also prints the
coarse-to-fine path (``coarse_every=5``, the callback's default) against the whole grid: its time as a
ratio of the whole grid's, measured in the same run, and the train and test error and loss barriers of both.

Not timed, and stated in the callback's docstring: a spawn costs one sibling training per spawn step, from
``k`` to the end of training (for Frankle et al.'s five steps on ResNet-20, about five more trainings).

On a CPU the script runs torch on ``--threads`` intra-op threads (default 1): on a shared machine, threads
that wait for each other make every timing erratic.
"""

from __future__ import annotations

import argparse
import copy
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


def _trained(model, datamodule, epochs: int, device) -> torch.nn.Module:
    """A copy of ``model`` trained for ``epochs`` epochs by plain SGD on the data module's training set."""
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
    images, labels = datamodule.train_dataset.images, datamodule.train_dataset.labels
    generator = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 128):
            batch = order[start : start + 128]
            inputs = datamodule.preprocess(images[batch].to(device))
            loss = torch.nn.functional.cross_entropy(trained(inputs), labels[batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return trained.eval()


def _coarse_against_full(args, trainer, model_a, model_b, device) -> None:
    """Time and barriers of the coarse-to-fine path against the whole grid, interleaved."""
    settings = dict(num_alphas=args.alphas, bn=args.bn, train_subset_size=args.train, test_subset_size=args.test)
    full = LinearModeConnectivity(coarse_every=None, eval_batch_size=args.batch, **settings)
    coarse = LinearModeConnectivity(coarse_every=5, eval_batch_size=args.batch, **settings)
    times: dict[str, list[float]] = {"full": [], "coarse": []}
    results = {}
    for _ in range(args.repeats):
        for name, callback in (("full", full), ("coarse", coarse)):
            start = time.perf_counter()
            results[name] = _measured(callback, trainer, model_a, model_b, device)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(c / f for c, f in zip(times["coarse"], times["full"]))
    points = len(results["coarse"]["alphas"])
    print(f"coarse-to-fine ({points} of {args.alphas} points) / whole grid: median time ratio {ratio:.3f}x")
    for name in ("test_error_barrier", "train_error_barrier", "test_loss_barrier", "train_loss_barrier"):
        a, b = results["full"][name], results["coarse"][name]
        print(f"  {name}: whole grid {a:.6f}, coarse-to-fine {b:.6f}, difference {b - a:+.2e}")


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
    parser.add_argument("--trained-epochs", type=int, default=0, help="train the second network from the first")
    args = parser.parse_args(argv)
    print("reproduce: python benchmarks/bench_lmc.py " + " ".join(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    num_train = max(args.train, 2048 if args.trained_epochs else 64)
    datamodule = SyntheticCIFARDataModule(num_train=num_train, num_test=args.test, seed=0)
    datamodule.setup()
    trainer = SimpleNamespace(datamodule=datamodule)
    callback = LinearModeConnectivity(
        num_alphas=args.alphas,
        coarse_every=None,  # the floor is the whole grid's
        bn=args.bn,
        train_subset_size=args.train,
        test_subset_size=args.test,
        eval_batch_size=args.batch,
    )
    torch.manual_seed(0)
    model_a, model_b = resnet20().to(device), resnet20().to(device)
    if args.trained_epochs:
        model_b = _trained(model_a, datamodule, args.trained_epochs, device)
    batches = callback._measurement.paths.sets(trainer)["loaders"]

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
    if args.trained_epochs:
        _coarse_against_full(args, trainer, model_a, model_b, device)


if __name__ == "__main__":
    main()
