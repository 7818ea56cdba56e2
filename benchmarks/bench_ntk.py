"""Benchmark of ``empirical_ntk`` against the Jacobian-contraction baseline, and of NTKDrift's training overhead.

Reproduce (the first line the script prints):

    python benchmarks/bench_ntk.py --n 64            # the issue's setting: ResNet-20, CIFAR-shaped inputs, O = 10
    python benchmarks/bench_ntk.py --n 16 --repeats 1  # a quick run

Baseline: the method of PyTorch's "Neural Tangent Kernels" tutorial (torch.func): the Jacobians of the outputs
with respect to every parameter, ``vmap`` over examples of ``jacrev`` of ``functional_call``, for ``x1`` and for
``x2``, then one ``einsum`` per parameter over the flattened parameter axis, summed. It is written out below
(``baseline_full_kernel``) and called with ``x1 = x2 = x``.

Printed, all as ratios measured on the same machine in the same run (no bare times):

- time of ``empirical_ntk(kind="full")`` / time of the baseline (both in this process, interleaved, best of
  ``--repeats``), and peak memory / the baseline's peak memory, each method run in a fresh subprocess: on CPU
  ``ru_maxrss`` minus the resident set size after setup (model, inputs, a warm-up on two examples), on CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory allocated after setup; targets <= 1 and <= 0.25;
- the same for the cross-kernel path (``x2`` a copy of ``x``, so that the symmetry is not used), for
  information;
- baseline time / ``empirical_ntk(kind="pntk")`` time, target >= 15;
- NTKDrift's amortised cost: the time of one measurement (the hook of a step at which it measures: kernel,
  metrics, spectrum figure, logging to TensorBoard) divided by ``every_n_steps`` (its default, 200) times the
  time of one ResNet-20 training step at batch 128 (forward, backward, SGD step; data loading and augmentation
  not included, which makes the ratio an upper bound), both timed in one short training run; target <= 2%.

On a CPU the script runs torch on ``--threads`` intra-op threads (default 1): on a shared machine, threads that
wait for each other make every timing erratic (tenfold slowdowns were seen with 2 threads on 2 busy cores).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.func import functional_call, jacrev, vmap

from lt_theory.measures.ntk import DEFAULT_MEMORY_BUDGET, empirical_ntk
from lt_theory.models import resnet20

METHODS = ("baseline", "full", "full_cross", "pntk")


def baseline_full_kernel(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The full NTK (N1, N2, O, O) by the tutorial's Jacobian contraction, in eval mode as the model is."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def one_output(p, x):
        return functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)

    per_example_jacobian = vmap(jacrev(one_output), in_dims=(None, 0))
    left = [j.flatten(2) for j in per_example_jacobian(params, x1).values()]  # (N1, O, numel) per parameter
    right = [j.flatten(2) for j in per_example_jacobian(params, x2).values()]
    return sum(torch.einsum("iap,jbp->ijab", a, b) for a, b in zip(left, right))


def run_method(method: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if method == "baseline":
        return baseline_full_kernel(model, x, x)
    if method == "full":
        return empirical_ntk(model, x, kind="full")
    if method == "full_cross":
        return empirical_ntk(model, x, x.clone(), kind="full")
    return empirical_ntk(model, x, kind="pntk")


def setup(n: int, device: str, threads: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = resnet20(num_classes=10).to(device).eval()
    x = torch.randn(n, 3, 32, 32, generator=generator).to(device)
    return model, x


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def worker(method: str, n: int, device: str, threads: int) -> None:
    """Run one method once in this (fresh) process and print its peak memory above the setup's, as JSON."""
    model, x = setup(n, device, threads)
    run_method(method, model, x[:2])  # warm-up: lazy initialisation is not the method's memory
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
    kernel = run_method(method, model, x)
    synchronize(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = max_rss_bytes() - before
    print(json.dumps({"method": method, "peak_bytes": peak, "shape": list(kernel.shape)}))


def peak_memory(method: str, args: argparse.Namespace) -> int:
    command = [sys.executable, __file__, "--worker", method, "--n", str(args.n), "--device", args.device]
    command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def time_kernels(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Best time of each method over ``repeats`` interleaved rounds, and the relative errors against the baseline."""
    model, x = setup(args.n, args.device, args.threads)
    for method in METHODS:
        run_method(method, model, x[:2])
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    kernels: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for method in METHODS:
            synchronize(args.device)
            start = time.perf_counter()
            kernels[method] = run_method(method, model, x)
            synchronize(args.device)
            times[method].append(time.perf_counter() - start)
    reference = kernels["baseline"].double()
    errors = {}
    for method in ("full", "full_cross"):
        errors[method] = (
            torch.linalg.vector_norm(kernels[method].double() - reference) / reference.norm()
        ).item()
    pntk_reference = reference.sum(dim=(2, 3)) / reference.shape[-1]
    errors["pntk"] = (
        torch.linalg.vector_norm(kernels["pntk"].double() - pntk_reference) / pntk_reference.norm()
    ).item()
    return {method: min(values) for method, values in times.items()}, errors


def ntk_drift_overhead(args: argparse.Namespace) -> dict[str, float]:
    """Time NTKDrift's measurements and the training steps of one short ResNet-20 run at batch 128."""
    from step_timing import StepTimer, quiet_lightning, timed_fit

    from lt_theory.callbacks.ntk import NTKDrift
    from lt_theory.data import SyntheticCIFARDataModule
    from lt_theory.module import ClassificationModule

    torch.set_num_threads(args.threads)
    quiet_lightning()  # INFO lines and the NTKDrift verdict
    default_cadence = inspect.signature(NTKDrift).parameters["every_n_steps"].default
    measure_every = 3
    steps = measure_every * args.measurements

    class TimedNTKDrift(NTKDrift):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.durations: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            due = self.is_step_due(trainer)
            start = time.perf_counter()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            synchronize(args.device)
            if due:
                self.durations.append(time.perf_counter() - start)

    kwargs = {} if args.probe_size is None else {"probe_size": args.probe_size}
    timer, drift = StepTimer(args.device, measure_every), TimedNTKDrift(every_n_steps=measure_every, **kwargs)
    torch.manual_seed(0)
    module = ClassificationModule(resnet20(), lr=0.1, schedule="constant")
    data = SyntheticCIFARDataModule(num_train=128 * (steps + 1), num_test=128, batch_size=128)
    timed_fit(module, data, [timer, drift], args.device, steps)  # the timer first
    step = statistics.median(timer.durations[1:])  # the first step pays for lazy initialisation
    measurement = statistics.median(drift.durations)
    return {
        "cadence": default_cadence,
        "probe_size": drift.probe.inputs.shape[0],
        "kind": drift.kind,
        "measurement_in_steps": measurement / step,
        "overhead": measurement / (default_cadence * step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="probe examples N (the issue's setting: 64)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds; the best is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measurements", type=int, default=3, help="NTKDrift measurements timed")
    parser.add_argument("--probe-size", type=int, default=None, help="NTKDrift probe (default: its own)")
    parser.add_argument("--skip-drift", action="store_true", help="skip the NTKDrift overhead")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.n, args.device, args.threads)
        return

    command = f"python benchmarks/bench_ntk.py --n {args.n} --repeats {args.repeats} --threads {args.threads}"
    command += f" --device {args.device} --measurements {args.measurements}"
    command += "" if args.probe_size is None else f" --probe-size {args.probe_size}"
    command += " --skip-drift" if args.skip_drift else ""
    print(f"# reproduce: {command}")
    model, _ = setup(1, args.device, args.threads)
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"# torch {torch.__version__} on {args.device} ({args.threads} intra-op thread(s) on CPU); ResNet-20, "
        f"{num_params:,} parameters, N = {args.n}, O = 10, float32; empirical_ntk default memory_budget "
        f"{DEFAULT_MEMORY_BUDGET / 2**20:.0f} MiB"
    )

    peaks = {method: peak_memory(method, args) for method in METHODS}
    times, errors = time_kernels(args)
    print(f"{'kernel':<44}{'time / baseline':>16}{'peak memory / baseline':>24}{'rel. error':>12}")
    labels = {
        "baseline": "baseline: vmap(jacrev) + einsum, full",
        "full": 'empirical_ntk(x, kind="full")',
        "full_cross": 'empirical_ntk(x, x.clone(), kind="full")',
        "pntk": 'empirical_ntk(x, kind="pntk")',
    }
    for method in METHODS:
        error = "" if method == "baseline" else f"{errors[method]:.1e}"
        print(
            f"{labels[method]:<44}{times[method] / times['baseline']:>16.3f}"
            f"{peaks[method] / peaks['baseline']:>24.3f}{error:>12}"
        )
    time_ratio = times["full"] / times["baseline"]
    memory_ratio = peaks["full"] / peaks["baseline"]
    speedup = times["baseline"] / times["pntk"]
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print(f"full / baseline time      = {time_ratio:.3f}  (target <= 1)     {verdict(time_ratio <= 1)}")
    print(
        f"full / baseline peak mem  = {memory_ratio:.3f}  (target <= 0.25)  {verdict(memory_ratio <= 0.25)}"
    )
    print(f"baseline full / pntk time = {speedup:.1f}   (target >= 15)    {verdict(speedup >= 15)}")

    if not args.skip_drift:
        drift = ntk_drift_overhead(args)
        overhead = drift["overhead"]
        print(
            f"NTKDrift ({drift['kind']}, {drift['probe_size']} probes): one measurement = "
            f"{drift['measurement_in_steps']:.2f} training steps of ResNet-20 at batch 128; at the default "
            f"every_n_steps={drift['cadence']}: measurement / ({drift['cadence']} steps) = {100 * overhead:.2f}% "
            f"(target <= 2%)  {verdict(overhead <= 0.02)}"
        )


if __name__ == "__main__":
    main()
