"""What IMPPruner adds to a training step: mask enforcement against a plain ResNet-20 step, in one process.

IMPPruner's per-step work in ``on_train_batch_end`` is the mask enforcement (one fused multiply of every
prunable weight by its mask, :class:`lt_theory.measures.pruning.MaskEnforcer`) and adding the loss to a
running sum on the device (its finiteness is read once an epoch). This script times a plain training step of
ResNet-20 (forward, cross-entropy, backward, SGD with momentum 0.9 and weight decay 1e-4, batch 128) and that
per-step work with masks of 20% global magnitude pruning, interleaved, and prints the ratio of the medians.
For comparison it also times :func:`~lt_theory.measures.pruning.apply_masks` (one masked fill per tensor).

Run:
    python benchmarks/bench_imp.py                       # CPU, one thread
    python benchmarks/bench_imp.py --device cuda --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lt_theory.measures.pruning import MaskEnforcer, apply_masks, magnitude_masks
from lt_theory.models import CIFARResNet


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
    parser.add_argument("--repeats", type=int, default=10, help="timed training steps")
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

    def training_step() -> None:
        nonlocal running_loss
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        running_loss = loss.detach()

    def imp_per_step_work() -> None:
        nonlocal running_loss
        enforce()
        running_loss = running_loss + running_loss.detach().float()

    def apply_masks_per_step() -> None:
        apply_masks(model, masks)

    for _ in range(3):  # warm-up
        training_step()
        imp_per_step_work()
        apply_masks_per_step()
    steps, imp, fills = [], [], []
    for _ in range(args.repeats):
        steps.append(_timed(training_step, device))
        imp.append(min(_timed(imp_per_step_work, device) for _ in range(5)))
        fills.append(min(_timed(apply_masks_per_step, device) for _ in range(5)))
    step, extra, fill = statistics.median(steps), statistics.median(imp), statistics.median(fills)
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    print(
        f"ResNet-20, batch {args.batch_size}, {device}, {torch.get_num_threads()} thread(s); "
        f"{len(masks)} masked tensors, {100 * kept:.1f}% kept"
    )
    print(f"plain training step:                 {1e3 * step:9.3f} ms")
    print(f"IMPPruner per-step work (enforce):   {1e3 * extra:9.3f} ms  ratio {extra / step:.5f} of a step")
    print(f"apply_masks per step, for reference: {1e3 * fill:9.3f} ms  ratio {fill / step:.5f} of a step")


if __name__ == "__main__":
    main()
