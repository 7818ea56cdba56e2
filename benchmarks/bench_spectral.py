"""Benchmark of SpectralNormMonitor and the spectral measures (issue 3), printing ratios measured in one run.

Reproduce (the first line the script prints):

    python benchmarks/bench_spectral.py            # the issue's sizes: PreAct ResNet-18 (k=64), batch 128
    python benchmarks/bench_spectral.py --quick    # smaller: ResNet-18 k=16, batch 32, fewer repeats

Printed, all measured in this process on the same device, interleaved, as medians over ``--repeats``:

1. A warm measurement of all layers of ResNet-18 (what the monitor does every ``every_n_steps`` steps, its
   own ``_layer_norms``: ``power_iterations=3`` warm power iterations per layer plus the warm reshaped-kernel
   norm) / one training step at batch 128 (forward, backward, SGD step). Target <= 5%.
2. The monitor's amortised cost at its default cadence on ResNet-20, CIFAR-shaped inputs, batch 128:
   (warm measurement / 100 + bound measurement / 2000) / training step, with the bound measurement what the
   monitor does every ``bound_every_n_steps`` (its ``_bounds``: Gram norms, the graph-aware and naive bounds,
   the Jacobian lower bound on a 64-example probe, the spectra, the complexity and the margins; plus the
   sigma_max-by-depth figure). Target <= 2%. Data loading and Lightning's own overhead are not in the step,
   which makes the ratio an upper bound.
3. Per method and per ResNet-18 layer: time / time of the warm measurement of that layer, and the relative
   error ``(reference - estimate) / reference``. The reference is the exact norm where there is one (the
   SVD of a Linear weight; the FFT blocks of a 1x1 convolution; the dense SVD where the operator matrix has
   at most 2^24 entries), else 300 Lanczos steps in float64 (a lower bound: the column ``gram-gap`` gives the
   certified Gram bound's distance above it, which includes the periodisation of zero padding).

On a CPU torch runs on ``--threads`` intra-op threads (default 1): on a shared machine, threads that wait for
each other make every timing erratic (tenfold slowdowns were seen with 2 threads on 2 busy cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lt_theory.callbacks.spectral import SpectralNormMonitor  # noqa: E402
from lt_theory.measures import (  # noqa: E402
    dense_operator,
    jacobian_lipschitz_lower_bound,
    lipschitz_upper_bound,
    naive_lipschitz_product,
    operator_norm,
    operator_spectrum,
    spectral_complexity,
)
from lt_theory.measures.operators import frequency_plan, linear_map  # noqa: E402
from lt_theory.models import PreActResNet18, resnet20  # noqa: E402
from lt_theory.module import ClassificationModule  # noqa: E402

DENSE_ENTRIES = 1 << 24


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args):
    synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    synchronize(device)
    return time.perf_counter() - start, result


class Setup:
    """A model in a ClassificationModule, an SGD optimiser, a batch, and a SpectralNormMonitor prepared on it
    exactly as in a run (setup, probe, input shapes, initial weights, first measurement)."""

    def __init__(self, net: nn.Module, batch: int, probe: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(0)
        self.device = device
        self.module = ClassificationModule(net).to(device)
        self.x = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
        self.y = torch.randint(0, 10, (batch,), generator=generator).to(device)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.01, momentum=0.9)
        self.trainer = SimpleNamespace(
            loggers=[], is_global_zero=True, global_step=0, strategy=None, datamodule=None
        )
        self.monitor = SpectralNormMonitor(probe_inputs=self.x[:probe], probe_targets=self.y[:probe])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no logger": nothing is recorded here
            self.monitor.setup(self.trainer, self.module, "fit")
        assert self.monitor._prepare(self.trainer, self.module)
        self.cold_time, _ = timed(device, self.warm)

    def step(self) -> None:
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.module(self.x), self.y).backward()
        self.optimizer.step()

    def warm(self) -> None:
        scalars = self.monitor._layer_norms()
        self.sigmas = [scalars[f"sigma_max/{name}"] for name in self.monitor.layers]

    def bounds(self) -> None:
        self.monitor._bounds(self.trainer, self.module)
        self.monitor._log_depth_figure(self.trainer, self.sigmas)  # built and closed: no TensorBoard here


def median(values: list[float]) -> float:
    return statistics.median(values)


def warm_vs_step(args, device: torch.device) -> None:
    k, batch = (16, 32) if args.quick else (64, 128)
    print(
        f"\n== 1. warm measurement of every layer of PreActResNet18(k={k}) / training step at batch {batch}"
    )
    setup = Setup(PreActResNet18(k=k), batch, probe=16, device=device)
    setup.step()  # warm-up
    steps, warms = [], []
    for _ in range(args.repeats):
        steps.append(timed(device, setup.step)[0])
        warms.append(timed(device, setup.warm)[0])
    ratios = [w / s for w, s in zip(warms, steps)]
    print(f"   layers: {len(setup.monitor.layers)}, power_iterations: {setup.monitor.power_iterations}")
    print(f"   first (cold, Lanczos) measurement / step: {setup.cold_time / median(steps):.3f}")
    print(
        f"   warm measurement / step: {median(warms) / median(steps):.4f}  "
        f"(per repeat: {min(ratios):.4f} .. {max(ratios):.4f}; target <= 0.05 at k=64, batch 128)"
    )


def amortised_cadence(args, device: torch.device) -> None:
    print(
        "\n== 2. amortised cost at the default cadence (every_n_steps=100, bound_every_n_steps=2000), ResNet-20"
    )
    setup = Setup(resnet20(), 128, probe=64, device=device)
    setup.step()
    steps, warms, bounds = [], [], []
    for r in range(args.repeats):
        steps.append(timed(device, setup.step)[0])
        warms.append(timed(device, setup.warm)[0])
        if r < args.bound_repeats:
            bounds.append(timed(device, setup.bounds)[0])
            steps.append(timed(device, setup.step)[0])
    step = median(steps)
    warm_part = median(warms) / 100 / step
    bound_part = median(bounds) / 2000 / step
    print(f"   warm measurement / step: {median(warms) / step:.4f}   -> / 100:  {warm_part:.5f}")
    print(
        f"   bound measurement / step: {median(bounds) / step:.2f}  -> / 2000: {bound_part:.5f}"
        f"   (first, cold Jacobian start: {bounds[0] / step:.2f})"
    )
    print(f"   amortised overhead: {warm_part + bound_part:.4f} of training time (target <= 0.02)")
    parts = profile_bounds(setup)
    total = sum(parts.values())
    print("   where a bound measurement goes: " + ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items()))


def profile_bounds(setup: Setup) -> dict[str, float]:
    """Time the pieces of one bound measurement, in the monitor's order (the measures it calls)."""
    mon, module, device = setup.monitor, setup.module, setup.device
    shape = tuple(mon.probe.inputs.shape[1:])
    parts = {}
    parts["gram norms"], certified = timed(
        device,
        lambda: {
            n: operator_norm(m, mon.input_shapes[n], method="gram").sigma_max for n, m in mon.layers.items()
        },
    )
    parts["graph bound"], _ = timed(device, lipschitz_upper_bound, module, shape, "gram", certified)
    parts["naive product"], _ = timed(device, naive_lipschitz_product, module, shape, "gram", certified)
    parts["jacobian lower"], _ = timed(
        device,
        lambda: jacobian_lipschitz_lower_bound(module, mon.probe.inputs, n_iter=mon.lower_bound_iterations),
    )
    parts["spectra"], _ = timed(
        device, lambda: [operator_spectrum(m, mon.input_shapes[n]) for n, m in mon.layers.items()]
    )
    parts["complexity"], _ = timed(device, spectral_complexity, module, mon.initial_weights, shape)
    return parts


def resnet18_bounds(args, device: torch.device) -> None:
    print("\n== 2b. one bound measurement of PreActResNet18(k=64) / training step at batch 128 (information)")
    setup = Setup(PreActResNet18(k=64), 128, probe=64, device=device)
    setup.step()
    step = median([timed(device, setup.step)[0] for _ in range(args.repeats)])
    warm = median([timed(device, setup.warm)[0] for _ in range(args.repeats)])
    parts = profile_bounds(setup)
    bound = sum(parts.values())
    amortised = (warm / 100 + bound / 2000) / step
    print(f"   bound measurement / step: {bound / step:.1f}; amortised at 100 / 2000: {amortised:.4f}")
    print("   where it goes: " + ", ".join(f"{k} {v / bound:.0%}" for k, v in parts.items()))


def per_method(args, device: torch.device) -> None:
    k = 8 if args.quick else 64
    print(
        f"\n== 3. per method and layer of PreActResNet18(k={k}): time / warm-measurement time, relative error"
    )
    batch = 32 if args.quick else 128
    setup = Setup(PreActResNet18(k=k), batch, probe=2, device=device)
    setup.step()
    step = median([timed(device, setup.step)[0] for _ in range(args.repeats)])
    print(f"   'warm': 3 warm power iterations on the layer / one training step at batch {batch}")
    perturb = torch.Generator().manual_seed(1)
    header = (
        f"   {'layer':22s} {'warm':>8s} | {'cold power':>17s} | {'lanczos':>17s} | {'warm power':>17s} | "
        f"{'fft':>17s} | {'gram':>17s} | {'reshape':>8s} | reference"
    )
    print(header)
    print(
        "   (each cell: time ratio / relative error; 'gram' error is its certified gap above the reference)"
    )
    for name, layer in setup.monitor.layers.items():
        shape = setup.monitor.input_shapes[name]
        op = linear_map(layer, shape)
        previous = operator_norm(layer, shape, method="lanczos").vector
        with torch.no_grad():  # one SGD-sized step of the weights since the previous measurement
            change = torch.randn(layer.weight.shape, generator=perturb).to(device)
            layer.weight.add_(1e-3 * layer.weight.norm() * change / change.norm())
        if isinstance(layer, nn.Linear) or frequency_plan(op).exact:
            reference, kind = operator_norm(layer, shape, method="fft").sigma_max, "exact (fft/svd)"
        elif op.in_numel * op.out_numel <= DENSE_ENTRIES:
            reference, kind = (
                torch.linalg.svdvals(dense_operator(layer, shape))[0].item(),
                "exact (dense svd)",
            )
        else:
            reference = operator_spectrum(layer, shape, method="lanczos", n_iter=300, tol=0.0).sigma_max
            kind = "lanczos-300 (lower bound)"
        t_warm, warm = timed(device, operator_norm, layer, shape, "power", 3, 0.0, previous)
        cells = []
        for method in ("power", "lanczos", "warm", "fft", "gram"):
            if method == "warm":
                t, result = t_warm, warm
            elif method == "fft" and not (isinstance(layer, nn.Linear) or frequency_plan(op).exact):
                cells.append(f"{'n/a':>17s}")
                continue
            else:
                t, result = timed(device, operator_norm, layer, shape, method)
            error = (reference - result.sigma_max) / reference
            if method == "gram":
                error = -error
            cells.append(f"{t / t_warm:7.1f} / {error:8.1e}")
        t_reshape, _ = timed(device, operator_norm, layer, shape, "reshape")
        print(
            f"   {name:22s} {t_warm / step:8.5f} | "
            + " | ".join(cells)
            + f" | {t_reshape / t_warm:8.1f} | {kind}"
        )
        sys.stdout.flush()
    print("   'warm' is 3 power iterations from the previous call's vector after a 0.1% weight step;")
    print("   'reshape' is the exact reshaped-kernel norm (float64), reported for comparison, not an error.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and batches, fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-methods", action="store_true", help="skip the per-method table (part 3)")
    parser.add_argument(
        "--resnet18-bounds",
        action="store_true",
        help="also time a ResNet-18 bound measurement (minutes on CPU)",
    )
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.bound_repeats = 2
    print("reproduce: python benchmarks/bench_spectral.py " + " ".join(sys.argv[1:]))
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    torch.manual_seed(0)
    warm_vs_step(args, device)
    amortised_cadence(args, device)
    if args.resnet18_bounds:
        resnet18_bounds(args, device)
    if not args.skip_methods:
        per_method(args, device)


if __name__ == "__main__":
    main()
