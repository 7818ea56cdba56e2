r"""The README's figures that no single training command writes as a PNG file.

Two subcommands, each drawing with :mod:`lt_theory.figures` (the figures TensorBoard shows) and writing one PNG:

- ``find_peaks``: :func:`lt_theory.measures.risk.find_peaks` with its default arguments on two textbook
  double-descent curves, the peaks it returns marked. Left, the limiting test risk of min-norm ("ridgeless")
  least squares against :math:`\gamma = p / n` (Hastie, Montanari, Rosset & Tibshirani 2019, "Surprises in
  high-dimensional ridgeless least squares interpolation", Theorem 1 for isotropic features,
  :math:`\sigma^2 \gamma / (1 - \gamma)` below 1 and :math:`r^2 (1 - 1/\gamma) + \sigma^2 / (\gamma - 1)`
  above), with the features ordered by importance and only the first :math:`p` observed (the unobserved signal
  :math:`\theta^2 = c / (\gamma + c)` acts as noise and adds to the risk: a small first descent, then the
  divergence at :math:`\gamma = 1`); the isotropic curve itself, which has no first descent, is drawn dashed
  with the peak found when none is asked for (``require_descent_before=False``). Right, min-norm least
  squares on :math:`p` random ReLU features of :math:`n = 100` noisy examples (Belkin, Hsu, Ma & Mandal 2019),
  the test risk against the clean teacher averaged over seeds with its standard errors, given to
  ``find_peaks`` as ``standard_errors``. Float64, seeded: the same figure on every machine, in seconds.
- ``imp_stability``: the accuracy and the test and train error barriers of every IMP level against the
  weights remaining (:func:`lt_theory.figures.accuracy_vs_remaining_figure`, IMPPruner's own figure), read from
  the TensorBoard event files of one or more ``IMPPruner(stability=True)`` runs, one curve per run, labelled
  with the run's rewind step when its ``config.yaml`` names it (so that rewinding to 0 and to k can be
  compared in one figure).

Usage::

    python docs/figures/make_figures.py find_peaks --out docs/figures/find_peaks.png
    python docs/figures/make_figures.py imp_stability runs/imp_stability_quick/version_0 \
        runs/imp_stability_quick_k0/version_0 --out docs/figures/imp_stability.png
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from lt_theory.figures import DPI, FONT_SIZE, accuracy_vs_remaining_figure, new_figure
from lt_theory.measures.risk import find_peaks

# ----------------------------------------------------------------------------------------------------------
# find_peaks on textbook curves


def ridgeless_risk(gamma: float, signal: float, noise: float) -> float:
    r"""The limiting excess test risk of min-norm least squares with isotropic features (Hastie et al. 2019,
    Theorem 1).

    Args:
        gamma: :math:`p / n`, not 1.
        signal: :math:`r^2 = \|\beta\|^2`.
        noise: :math:`\sigma^2`, the label noise's variance.

    Returns:
        :math:`\sigma^2 \gamma / (1 - \gamma)` for :math:`\gamma < 1`, else
        :math:`r^2 (1 - 1/\gamma) + \sigma^2 / (\gamma - 1)`.

    Example:
        >>> ridgeless_risk(0.5, 1.0, 1.0), ridgeless_risk(2.0, 1.0, 1.0)
        (1.0, 1.5)
    """
    if gamma < 1:
        return noise * gamma / (1 - gamma)
    return signal * (1 - 1 / gamma) + noise / (gamma - 1)


def ordered_features_risk(gamma: float, noise: float = 0.5, c: float = 0.1) -> float:
    r"""The test risk when only the first :math:`p = \gamma n` features, the most important, are observed: they
    carry the signal :math:`\gamma / (\gamma + c)` of a total 1, and the unobserved part
    :math:`\theta^2 = c / (\gamma + c)` is noise to the fit and to the test point, so Theorem 1 applies with
    :math:`r^2 = 1 - \theta^2` and :math:`\sigma^2 + \theta^2`, and :math:`\theta^2` is added.

    Args:
        gamma: :math:`p / n`, not 1.
        noise: the label noise's variance :math:`\sigma^2`.
        c: how slowly the features' importance decays (the unobserved signal at :math:`\gamma` is
            :math:`c / (\gamma + c)`).

    Returns:
        The test risk.

    Example:
        >>> round(ordered_features_risk(2.0), 4)
        1.0714
    """
    unobserved = c / (gamma + c)
    return unobserved + ridgeless_risk(gamma, 1 - unobserved, noise + unobserved)


def random_features_risks(
    widths: Sequence[int], train: int = 100, seeds: Sequence[int] = range(20), dim: int = 20
) -> tuple[list[float], list[float]]:
    """Mean test risk and its standard error over ``seeds`` of min-norm least squares on ``p`` random ReLU
    features, for each ``p`` in ``widths``.

    Data: :math:`x \\sim N(0, I_{dim})`, labels :math:`\\tanh(2 \\langle u, x \\rangle) + 0.4\\,\\xi` for one
    fixed unit teacher :math:`u`; features :math:`\\mathrm{relu}(W x)`, :math:`W_{ij} \\sim N(0, 1/dim)`, the
    first ``p`` of ``max(widths)``; the fit is ``torch.linalg.lstsq`` (``gelsd``: the minimum-norm solution for
    ``p > train``), its risk the mean squared error against the clean teacher on 2,000 test points. Float64.

    Args:
        widths: the numbers of features ``p``, increasing.
        train: the number of training examples ``n``.
        seeds: one draw of data and features per seed.
        dim: the input dimension.

    Returns:
        ``(mean risks, standard errors)``, one per width.
    """
    teacher = torch.randn(dim, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    teacher = teacher / teacher.norm()
    runs = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(train, dim, generator=generator, dtype=torch.float64)
        x_test = torch.randn(2000, dim, generator=generator, dtype=torch.float64)
        y = torch.tanh(2 * x @ teacher) + 0.4 * torch.randn(train, generator=generator, dtype=torch.float64)
        clean_test = torch.tanh(2 * x_test @ teacher)
        w = torch.randn(max(widths), dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
        features, test_features = torch.relu(x @ w.T), torch.relu(x_test @ w.T)
        risks = []
        for p in widths:
            fit = torch.linalg.lstsq(features[:, :p], y[:, None], driver="gelsd").solution[:, 0]
            risks.append(float(((test_features[:, :p] @ fit - clean_test) ** 2).mean()))
        runs.append(risks)
    table = torch.tensor(runs, dtype=torch.float64)
    return table.mean(0).tolist(), (table.std(0) / math.sqrt(len(runs))).tolist()


def find_peaks_figure(points: int = 21, train: int = 100, seeds: Sequence[int] = range(20)):
    """The two curves of the module docstring with the peaks :func:`find_peaks` returns marked.

    Args:
        points: the number of points of the geometric :math:`\\gamma` grid from 0.105 to 10.5 (odd, so that
            its middle point is 1.05, never 1).
        train: the number of training examples of the random-features regression (its grid of ``p`` runs
            from ``train / 10`` to ``10 train``, 17 points, ``p = train`` among them).
        seeds: the seeds of the random-features regression, averaged.

    Returns:
        ``(figure, {"ridgeless": peaks, "ridgeless_isotropic": peaks, "random_features": peaks})``, the
        peaks as :func:`find_peaks` returns them.
    """
    figure, (left, right) = new_figure(11, 4, ncols=2)
    gammas = [1.05 * 10 ** (-1 + 2 * k / (points - 1)) for k in range(points)]
    ordered = [ordered_features_risk(g) for g in gammas]
    isotropic = [ridgeless_risk(g, 1.0, 1.0) for g in gammas]
    peaks = {
        "ridgeless": find_peaks(ordered, gammas),
        "ridgeless_isotropic": find_peaks(isotropic, gammas, require_descent_before=False),
    }
    left.plot(gammas, ordered, "o-", markersize=4, label="ordered features (defaults)")
    left.plot(gammas, isotropic, "--", color="grey", label="isotropic (no first descent)")
    _mark(left, peaks["ridgeless"], "peak found")
    _mark(left, peaks["ridgeless_isotropic"], "peak, require_descent_before=False", marker="x")
    left.axvline(1.0, color="grey", linestyle=":", linewidth=0.8)
    left.set(xscale="log", yscale="log", xlabel="gamma = p / n", ylabel="test risk")
    left.set_title("ridgeless least squares (Hastie et al., closed form)", fontsize=FONT_SIZE + 1)
    left.legend(fontsize=FONT_SIZE)

    widths = [round(train * 10 ** (-1 + k / 8)) for k in range(17)]
    risk, errors = random_features_risks(widths, train, seeds)
    peaks["random_features"] = find_peaks(risk, widths, standard_errors=errors)
    right.errorbar(widths, risk, yerr=errors, fmt="o-", markersize=4, capsize=2, label=f"mean of {len(seeds)} seeds")
    _mark(right, peaks["random_features"], "peak found")
    right.axvline(train, color="grey", linestyle=":", linewidth=0.8, label=f"p = n = {train}")
    right.set(xscale="log", yscale="log", xlabel="random ReLU features p", ylabel="test risk (MSE)")
    right.set_title("min-norm random features (simulated)", fontsize=FONT_SIZE + 1)
    right.legend(fontsize=FONT_SIZE)
    return figure, peaks


def _mark(axis, peaks, label: str | None, marker: str = "*") -> None:
    """Each peak as a large red marker (one legend entry, ``label``)."""
    for i, peak in enumerate(peaks):
        axis.plot(
            [peak.position], [peak.value], marker, color="red", markersize=14 if marker == "*" else 10,
            label=label if i == 0 else None,
        )


# ----------------------------------------------------------------------------------------------------------
# IMPPruner(stability=True) runs


def _rewind_step(run: Path) -> int | None:
    """The IMPPruner's ``rewind_step`` in the run's ``config.yaml`` (LightningCLI's copy), or None."""
    path = run / "config.yaml"
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text()) or {}
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("IMPPruner"):
            return (callback.get("init_args") or {}).get("rewind_step")
    return None


def imp_stability_curves(run: str | Path) -> dict[str, list[tuple[float, float]]]:
    """The per-level numbers of an ``IMPPruner(stability=True)`` run, read from its TensorBoard event files.

    Args:
        run: the run's log folder (``runs/imp_stability_quick/version_0``).

    Returns:
        ``{"accuracy": [...], "test": [...], "train": [...]}``, each ``[(remaining_fraction, value), ...]``
        level by level: ``imp/accuracy_by_remaining_bp`` and ``imp/test_error_barrier_by_remaining_bp``
        (step = remaining weights in basis points), and ``imp/train_error_barrier`` (logged at each level's
        end step, matched to the level whose ``imp/accuracy`` was logged at that step).

    Raises:
        ValueError: when the folder holds no ``imp/accuracy_by_remaining_bp``.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    if "imp/accuracy_by_remaining_bp" not in tags:
        raise ValueError(f"{str(run)!r} holds no imp/accuracy_by_remaining_bp: not an IMPPruner run's folder")

    def by_bp(tag: str) -> list[tuple[float, float]]:
        return [(e.step / 10_000, e.value) for e in events.Scalars(tag)] if tag in tags else []

    curves = {
        "accuracy": by_bp("imp/accuracy_by_remaining_bp"),
        "test": by_bp("imp/test_error_barrier_by_remaining_bp"),
    }
    level_end = {e.step: i for i, e in enumerate(sorted(events.Scalars("imp/accuracy"), key=lambda e: e.step))}
    if "imp/train_error_barrier" in tags:
        curves["train"] = [
            (curves["accuracy"][level_end[e.step]][0], e.value)
            for e in events.Scalars("imp/train_error_barrier")
            if e.step in level_end and level_end[e.step] < len(curves["accuracy"])
        ]
    return curves


def imp_stability_figure(runs: Sequence[str | Path], labels: Sequence[str] | None = None):
    """IMPPruner's figure (:func:`accuracy_vs_remaining_figure`) with one curve per run.

    Args:
        runs: the log folders of ``IMPPruner(stability=True)`` runs.
        labels: one label per run; default ``rewind to step k`` from the run's ``config.yaml``, else its path.

    Returns:
        ``(figure, {label: curves})``, the curves of :func:`imp_stability_curves`.
    """
    if labels is None:
        labels = []
        for run in runs:
            k = _rewind_step(Path(run))
            labels.append(str(run) if k is None else f"k = {k}")
    data = {label: imp_stability_curves(run) for label, run in zip(labels, runs)}
    accuracy = {f"IMP, {label}": curves["accuracy"] for label, curves in data.items()}
    barriers = {
        f"{split}, {label}": curves[split]
        for label, curves in data.items()
        for split in ("test", "train")
        if curves.get(split)
    }
    first = next(iter(data.values()))["accuracy"]
    dense = first[0][1] if first and first[0][0] == 1.0 else None
    return accuracy_vs_remaining_figure(accuracy, dense, barriers), data


# ----------------------------------------------------------------------------------------------------------


def main(args: Sequence[str] | None = None) -> dict:
    """The command line (module docstring).

    Args:
        args: the arguments; default ``sys.argv[1:]``.

    Returns:
        What the figure shows: the peaks found (``find_peaks``) or each run's curves (``imp_stability``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    peaks = commands.add_parser("find_peaks", help="find_peaks on the textbook double-descent curves")
    peaks.add_argument("--out", default="docs/figures/find_peaks.png")
    imp = commands.add_parser("imp_stability", help="IMP levels' accuracy and error barriers, several runs")
    imp.add_argument("runs", nargs="+", help="log folders of IMPPruner(stability=True) runs")
    imp.add_argument("--labels", nargs="+", default=None, help="one per run (default: its rewind step)")
    imp.add_argument("--out", default="docs/figures/imp_stability.png")
    options = parser.parse_args(args)
    if options.command == "find_peaks":
        figure, found = find_peaks_figure()
        for name, peaks in found.items():
            shown = ", ".join(
                f"peak at {p.position:.4g} (value {p.value:.4g}, bases {p.left_base:.4g} .. {p.right_base:.4g})"
                for p in peaks
            )
            print(f"{name}: {shown or 'no peak'}")
    else:
        if options.labels is not None and len(options.labels) != len(options.runs):
            parser.error(f"give one label per run: {len(options.runs)} runs, {len(options.labels)} labels")
        figure, found = imp_stability_figure(options.runs, options.labels)
        for label, curves in found.items():
            for name, points in curves.items():
                shown = ", ".join(f"{100 * r:.2f}%: {100 * v:.2f}" for r, v in points)
                print(f"{label} {name} (percent): {shown}")
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(options.out, dpi=DPI)
    print(f"wrote {options.out}")
    return found


if __name__ == "__main__":
    main()
