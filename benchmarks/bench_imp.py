"""What IMPPruner adds to a training step of ResNet-20: full training steps with and without its mask work.

IMPPruner's per-step work on a pruned level is, in the order Lightning runs it:

* ``on_before_optimizer_step`` (after the backward pass, before clipping and the step): the gradients of the
  pruned weights set to zero, one fused multiply (:meth:`lt_theory.measures.pruning.MaskEnforcer.mask_gradients`);
* ``on_train_batch_end``: the pruned weights set to ``+0.0``, one fused multiply and one fused addition
  (:class:`~lt_theory.measures.pruning.MaskEnforcer`), and the loss added to a running sum on the device.

This script times full training steps of ResNet-20 (forward, cross-entropy, backward, SGD with momentum 0.9
and weight decay 1e-4, batch 128) without and with that work (the real ``MaskEnforcer`` on masks of 20%
global magnitude pruning), interleaved in pairs whose order alternates, on the same model, and prints the
ratio of the medians (with / without) against the goal of at most 2% added, with the median of the per-pair
ratios. On a shared CPU those ratios carry a noise of a percent or two; the mask work is therefore also timed
alone within each pair (the two fused multiplies and the addition, on the gradients and weights the step left),
and its median is given as a ratio of the plain step's median. Bare times are printed only next to ratios.

Run:
    python benchmarks/bench_imp.py                              # CPU, one thread, 20 pairs
    python benchmarks/bench_imp.py --device cuda --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lt_theory.measures.pruning import MaskEnforcer, magnitude_masks
from lt_theory.models import CIFARResNet

GOAL = 0.02  # the bound on what mask enforcement adds to a training step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20, help="timed pairs of training steps")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    model = CIFARResNet(depth=20).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    inputs = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    masks = magnitude_masks(model, 0.2)
    enforce = MaskEnforcer(model, masks)
    running_loss = torch.zeros((), device=device)

    def step(with_imp: bool) -> None:
        nonlocal running_loss
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        if with_imp:
            enforce.mask_gradients()  # on_before_optimizer_step
        optimizer.step()
        if with_imp:  # on_train_batch_end
            enforce()
            running_loss = running_loss + loss.detach().float()

    for _ in range(3):  # warm-up
        step(False)
        step(True)

    def mask_work() -> None:
        nonlocal running_loss
        enforce.mask_gradients()
        enforce()
        running_loss = running_loss + running_loss.detach().float()

    plain, imp, alone = [], [], []
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        for with_imp in order:
            (imp if with_imp else plain).append(_timed(lambda w=with_imp: step(w), device))
        alone.append(min(_timed(mask_work, device) for _ in range(5)))
    ratio = statistics.median(imp) / statistics.median(plain)
    pair_ratio = statistics.median(i / p for i, p in zip(imp, plain))
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    print(" ".join(["python", *sys.argv]))
    print(
        f"ResNet-20, batch {args.batch_size}, {device}, {torch.get_num_threads()} thread(s), {args.repeats} "
        f"interleaved pairs; {len(masks)} masked tensors, {100 * kept:.1f}% kept"
    )
    print(
        f"ratio of medians, step with / without IMPPruner's mask work: {ratio:.4f} "
        f"({100 * (ratio - 1):+.2f}%; goal <= +{100 * GOAL:.0f}%: {'met' if ratio - 1 <= GOAL else 'NOT met'}); "
        f"median per-pair ratio {pair_ratio:.4f}"
    )
    work = statistics.median(alone) / statistics.median(plain)
    print(f"mask work timed alone, as a fraction of a plain step: {work:.5f} ({100 * work:.3f}%)")
    print(
        f"  (medians: {1e3 * statistics.median(plain):.2f} ms without, {1e3 * statistics.median(imp):.2f} ms "
        f"with, ratio {ratio:.4f}; mask work alone {1e3 * statistics.median(alone):.3f} ms, ratio {work:.5f})"
    )


if __name__ == "__main__":
    main()
