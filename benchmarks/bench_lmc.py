"""Benchmark of LinearModeConnectivity's path evaluation against its floor.

Reproduce (the first line the script prints):

    python benchmarks/bench_lmc.py                                  # ResNet-20, 30 alphas, 512 + 512 examples
    python benchmarks/bench_lmc.py --alphas 5 --train 256 --test 256 --repeats 3   # a quick run
    python benchmarks/bench_lmc.py --bn interpolate                 # no BatchNorm reset
    python benchmarks/bench_lmc.py --trained-epochs 3               # coarse-to-fine vs the whole grid
    python benchmarks/bench_lmc.py --versus-training                # mode="init" with its defaults vs training

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

With ``--versus-training`` the script times what ``LinearModeConnectivity(mode="init")`` costs against the
training it watches, with the callback's default arguments (``--every-n-epochs``, default 10, the README's
cadence) on a CIFAR-10-sized setting: ResNet-20, 50,000 training images (``--epoch-steps 391`` steps of 128), a
10,000-image test set. Interleaved repetitions time one init-path measurement (the path from a fresh network to
one trained ``--trained-epochs`` epochs, default 2, and its figure) and ``--train-steps`` training steps (SGD with
momentum, batch 128, forward, backward and update); the printed cost is ``1 + measurement / (every_n_epochs x
epoch_steps x median step)`` (goal <= 1.02x), with the default path's barriers against the whole 30-point grid
on the same subsets and against the former default sets (1,000 training examples, the whole test set).

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
from lt_theory.figures import error_along_path_figure
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


def _training_step_time(model, datamodule, steps: int, device) -> float:
    """Median seconds of a ResNet-20 training step at batch 128 (SGD with momentum, on a copy of ``model``)."""
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.9)
    images, labels = datamodule.train_dataset.images, datamodule.train_dataset.labels
    times = []
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        batch = slice(128 * step % (len(labels) - 128), 128 * step % (len(labels) - 128) + 128)
        inputs = datamodule.preprocess(images[batch].to(device))
        loss = torch.nn.functional.cross_entropy(trained(inputs), labels[batch].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _init_measurement_time(callback, trainer, model_a, model_b, device) -> tuple[float, dict]:
    """Seconds of one init-path measurement: the path with the callback's settings and its figure."""
    start = time.perf_counter()
    record = _measured(callback, trainer, model_a, model_b, device)
    error_along_path_figure(record, "initial weights -> current weights")
    return time.perf_counter() - start, record


def _versus_training(args, device) -> None:
    """mode="init" with its defaults against the training time of ``every_n_epochs`` CIFAR-10 epochs."""
    datamodule = SyntheticCIFARDataModule(num_train=4096, num_test=10_000, seed=0)
    datamodule.setup()
    trainer = SimpleNamespace(datamodule=datamodule)
    torch.manual_seed(0)
    initial = resnet20().to(device)
    current = _trained(initial, datamodule, args.trained_epochs or 2, device)
    default = LinearModeConnectivity(mode="init")
    measurement, step = [], []
    record = _init_measurement_time(default, trainer, initial, current, device)[1]  # warm-up
    for _ in range(args.repeats):
        measurement.append(_init_measurement_time(default, trainer, initial, current, device)[0])
        step.append(_training_step_time(current, datamodule, args.train_steps, device))
    training = args.every_n_epochs * args.epoch_steps * statistics.median(step)
    print(
        f"device={device} threads={args.threads} ResNet-20, mode='init' defaults "
        f"({len(record['alphas'])} of {default.num_alphas} points, train subset {default.train_subset_size}, "
        f"test subset {default.test_subset_size}), every_n_epochs="
        f"{args.every_n_epochs} x {args.epoch_steps} steps, repeats={args.repeats}"
    )
    print(
        f"training step {statistics.median(step) * 1e3:.1f} ms (median), one measurement "
        f"{statistics.median(measurement):.2f} s (median): cost "
        f"{1 + statistics.median(measurement) / training:.4f}x of training (goal <= 1.02x)"
    )
    references = {
        "the whole 30-point grid on the same subsets": dict(coarse_every=None),
        "1,000 training and all 10,000 test examples": dict(train_subset_size=1000, test_subset_size=None),
    }
    for title, settings in references.items():
        reference = _measured(LinearModeConnectivity(mode="init", **settings), trainer, initial, current, device)
        print(f"default path against {title}:")
        for name in ("test_error_barrier", "train_error_barrier", "test_loss_barrier", "train_loss_barrier"):
            a, b = reference[name], record[name]
            print(f"  {name}: {a:.4f} there, {b:.4f} by default, difference {b - a:+.4f}")


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
    parser.add_argument("--versus-training", action="store_true", help="mode='init' defaults vs training time")
    parser.add_argument("--every-n-epochs", type=int, default=10)
    parser.add_argument("--epoch-steps", type=int, default=391, help="steps per epoch (CIFAR-10 at batch 128)")
    parser.add_argument("--train-steps", type=int, default=10, help="training steps timed per repetition")
    args = parser.parse_args(argv)
    print("reproduce: python benchmarks/bench_lmc.py " + " ".join(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.versus_training:
        _versus_training(args, device)
        return

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
