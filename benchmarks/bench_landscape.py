"""Benchmark of LossLandscapeMonitor's training overhead on ResNet-20 at batch 128.

Reproduce (the first line the script prints):

    python benchmarks/bench_landscape.py                    # 3 warm measurements, one thread
    python benchmarks/bench_landscape.py --measurements 1   # a quick run
    python benchmarks/bench_landscape.py --sharpness-tol 0  # the worst case: every Lanczos step is taken

Printed, all as ratios measured in the same run (no bare times):

- one measurement (everything the callback does at a step where it measures: probe loss and gradient, PL ratio,
  sharpness by Lanczos warm-started from the previous measurement's vector, gradient-to-weight ratios,
  activation conditioning of every layer, logging to TensorBoard) divided by one ResNet-20 training step at
  batch 128 (forward, backward, SGD step; data loading and augmentation not included, which makes the ratio an
  upper bound), both timed in one short training run, with the Lanczos steps the measurements took (they stop
  at ``sharpness_tol``; ``--sharpness-tol 0`` times the worst case, every one of ``sharpness_iters`` steps);
- the first measurement (at fit start) for information: it also pays one-time costs (the probe's choice, the
  first eval-mode passes, the TensorBoard layout). The process's first Hessian-vector product (torch.func
  scripts helpers once, about a second) is done before the run, on two examples, and not counted;
- the amortised cost at the default ``every_n_steps``: measurement / (cadence x step), target <= 2%.

On a CPU the script runs torch on ``--threads`` intra-op threads (default 1): on a shared machine, threads that
wait for each other make every timing erratic.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import statistics
import time

import torch
from step_timing import StepTimer, quiet_lightning, synchronize, timed_fit

from lt_theory.callbacks import landscape
from lt_theory.callbacks.landscape import LossLandscapeMonitor
from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.models import resnet20
from lt_theory.module import ClassificationModule


def overhead(args: argparse.Namespace) -> dict[str, float]:
    """Time the monitor's measurements and the training steps of one short ResNet-20 run at batch 128."""
    torch.set_num_threads(args.threads)
    quiet_lightning()
    default_cadence = inspect.signature(LossLandscapeMonitor).parameters["every_n_steps"].default
    measure_every = 3
    steps = measure_every * args.measurements

    class TimedMonitor(LossLandscapeMonitor):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.durations: list[float] = []

        def _measure(self, trainer, pl_module):
            synchronize(args.device)
            start = time.perf_counter()
            super()._measure(trainer, pl_module)
            synchronize(args.device)
            self.durations.append(time.perf_counter() - start)

    monitor_kwargs = {"every_n_steps": measure_every}
    if args.probe_size is not None:
        monitor_kwargs["probe_size"] = args.probe_size
    if args.sharpness_tol is not None:
        monitor_kwargs["sharpness_tol"] = args.sharpness_tol
    timer, monitor = StepTimer(args.device, measure_every), TimedMonitor(**monitor_kwargs)
    iterations: list[int] = []
    torch.manual_seed(0)
    module = ClassificationModule(resnet20(), lr=0.1, schedule="constant")
    warm_up_torch_func(module, args.device)
    data = SyntheticCIFARDataModule(num_train=128 * (steps + 1), num_test=128, batch_size=128)
    with counting_lanczos_steps(iterations):
        timed_fit(module, data, [timer, monitor], args.device, steps)  # the timer first
    step = statistics.median(timer.durations[1:])  # the first step pays for lazy initialisation
    measurement = statistics.median(monitor.durations[1:])
    return {
        "cadence": default_cadence,
        "probe_size": monitor.probe.inputs.shape[0],
        "measurement_in_steps": measurement / step,
        "first_in_steps": monitor.durations[0] / step,
        "iterations": sorted(iterations[1:]),
        "overhead": measurement / (default_cadence * step),
    }


def warm_up_torch_func(module: torch.nn.Module, device: str) -> None:
    """One Hessian-vector product on two examples: torch.func's first ``jvp`` in a process scripts helpers
    (about a second, once per process), which is not the cost of a measurement."""
    inputs, targets = (
        torch.zeros(2, 3, 32, 32, device=device),
        torch.zeros(2, dtype=torch.long, device=device),
    )
    landscape.sharpness(module.to(device), torch.nn.functional.cross_entropy, [(inputs, targets)], iters=1)


@contextlib.contextmanager
def counting_lanczos_steps(iterations: list[int]):
    """Every call of the monitor's ``sharpness`` in the block appends its Lanczos steps to ``iterations``."""
    original = landscape.sharpness

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        iterations.append(result.iterations)
        return result

    landscape.sharpness = counted
    try:
        yield
    finally:
        landscape.sharpness = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measurements", type=int, default=3, help="warm measurements timed")
    parser.add_argument(
        "--probe-size", type=int, default=None, help="probe examples (default: the monitor's)"
    )
    parser.add_argument(
        "--sharpness-tol",
        type=float,
        default=None,
        help="Lanczos tolerance (default: the monitor's; 0: all steps)",
    )
    args = parser.parse_args()
    command = f"python benchmarks/bench_landscape.py --threads {args.threads} --device {args.device}"
    command += f" --measurements {args.measurements}"
    command += "" if args.probe_size is None else f" --probe-size {args.probe_size}"
    command += "" if args.sharpness_tol is None else f" --sharpness-tol {args.sharpness_tol:g}"
    print(f"# reproduce: {command}")
    print(
        f"# torch {torch.__version__} on {args.device} ({args.threads} intra-op thread(s) on CPU); ResNet-20"
    )
    result = overhead(args)
    verdict = "PASS" if result["overhead"] <= 0.02 else "FAIL"
    print(
        f"LossLandscapeMonitor ({result['probe_size']} probes): one measurement = "
        f"{result['measurement_in_steps']:.2f} training steps of ResNet-20 at batch 128 (Lanczos steps "
        f"{result['iterations']}); the first, with one-time costs: {result['first_in_steps']:.2f} steps"
    )
    print(
        f"at the default every_n_steps={result['cadence']}: measurement / ({result['cadence']} steps) = "
        f"{100 * result['overhead']:.2f}% (target <= 2%)  {verdict}"
    )


if __name__ == "__main__":
    main()
