"""Figures as PNG files (the README's figures): the sweep's aggregate writes every figure it logs to
``<sweep>/aggregate/figures/`` with the same pixels as TensorBoard's image, its sample-wise figure marks the
EMC and the peak; docs/figures/make_figures.py draws find_peaks on the textbook curves and IMPPruner's figure
for several runs read back from their event files."""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lt_theory.sweep import AGGREGATE_DIR, RESULT_FILE, aggregate
from lt_theory.sweep.report import FIGURES_DIR, figure_filename

ROOT = Path(__file__).resolve().parents[1]
SIZE = "data.init_args.num_train"
WIDTH = "model.net.init_args.net.init_args.hidden"


def _make_figures():
    """docs/figures/make_figures.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "docs" / "figures" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def _pixels(data: bytes | Path) -> np.ndarray:
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    return np.asarray(image.convert("RGB"))


# a sample-wise sweep by hand: interpolated up to n = 400 (EMC at epsilon 0.01), test error up from 200 to 400
_TRAIN_SIZES = [100, 200, 400, 800, 1600]
_TRAIN_ERRORS = [0.0, 0.0, 0.005, 0.05, 0.1]
_TEST_ERRORS = [0.40, 0.38, 0.45, 0.36, 0.30]


def _write_sample_wise(directory: Path, scalars: bool = True) -> None:
    for n, train, test in zip(_TRAIN_SIZES, _TRAIN_ERRORS, _TEST_ERRORS):
        folder = directory / f"num_train_{n:05d}"
        folder.mkdir(parents=True)
        record = {
            "axes": {SIZE: n},
            "num_parameters": 3786,
            "train_size": n,
            "num_test": 10_000,
            "metrics": {"train_error": train, "test_error": test},
        }
        if scalars:
            record["final_scalars"] = {"ntk/relative_change": 1.0 / math.sqrt(n)}
        (folder / RESULT_FILE).write_text(json.dumps(record))


def test_figure_filename_replaces_slashes_and_odd_characters():
    assert figure_filename("dd/error_by_train_size") == "dd_error_by_train_size.png"
    assert figure_filename("dd/modelwise_curve/label_noise=0.2,k=8") == "dd_modelwise_curve_label_noise=0.2,k=8.png"
    assert figure_filename("a b/c:d*e") == "a_b_c_d_e.png"


def test_aggregate_writes_every_logged_figure_as_a_png_with_tensorboards_pixels(tmp_path):
    _write_sample_wise(tmp_path)
    aggregate(tmp_path, epsilon=0.01)
    events = _events(tmp_path / AGGREGATE_DIR)
    tags = events.Tags()["images"]
    assert sorted(tags) == ["dd/error_by_train_size", "ntk/relative_change_by_train_size_loglog"]
    folder = tmp_path / AGGREGATE_DIR / FIGURES_DIR
    assert sorted(p.name for p in folder.iterdir()) == sorted(figure_filename(t) for t in tags)
    for tag in tags:
        (image,) = events.Images(tag)
        logged = _pixels(image.encoded_image_string)
        written = _pixels(folder / figure_filename(tag))
        assert written.shape == logged.shape == (image.height, image.width, 3) == (400, 700, 3)
        assert np.array_equal(written, logged), tag  # the same figure, not merely a file of that name


def test_model_wise_pngs_have_tensorboards_pixels_with_a_peak_at_the_top_of_the_axes(tmp_path):
    """The model-wise figure labels its peak above the highest point, outside the axes: the constrained
    layout moves between a first and a second drawing, and the file must still show TensorBoard's pixels."""
    widths, train, test = [2, 4, 8, 16, 32], [0.5, 0.3, 0.0, 0.0, 0.0], [0.5, 0.45, 0.6, 0.4, 0.35]
    for k, a, b in zip(widths, train, test):
        folder = tmp_path / f"hidden_{k:04d}"
        folder.mkdir()
        record = {"axes": {WIDTH: k}, "num_parameters": 60 * k, "train_size": 1000, "num_test": 10_000,
                  "metrics": {"train_error": a, "test_error": b}}
        (folder / RESULT_FILE).write_text(json.dumps(record))
    curve = aggregate(tmp_path).model_wise
    assert [p.position for p in curve.peaks] == [8]
    events = _events(tmp_path / AGGREGATE_DIR)
    assert sorted(events.Tags()["images"]) == ["dd/error_by_width", "dd/modelwise_curve"]
    for tag in events.Tags()["images"]:
        (image,) = events.Images(tag)
        written = _pixels(tmp_path / AGGREGATE_DIR / FIGURES_DIR / figure_filename(tag))
        assert np.array_equal(written, _pixels(image.encoded_image_string)), tag


def test_aggregate_again_replaces_the_pngs_of_figures_no_longer_drawn(tmp_path):
    _write_sample_wise(tmp_path)
    aggregate(tmp_path)
    folder = tmp_path / AGGREGATE_DIR / FIGURES_DIR
    assert (folder / "ntk_relative_change_by_train_size_loglog.png").is_file()
    for path in tmp_path.glob(f"num_train_*/{RESULT_FILE}"):  # the runs lose their callback scalar
        record = json.loads(path.read_text())
        del record["final_scalars"]
        path.write_text(json.dumps(record))
    aggregate(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["dd_error_by_train_size.png"]


def test_sample_wise_figure_marks_the_emc_and_the_peak(tmp_path, monkeypatch):
    from lt_theory import loggers

    figures = []
    original = loggers.log_figure

    def spy(target, tag, figure, **kwargs):
        figures.append((tag, figure))
        return original(target, tag, figure, **kwargs)

    monkeypatch.setattr(loggers, "log_figure", spy)
    _write_sample_wise(tmp_path, scalars=False)
    curve = aggregate(tmp_path, epsilon=0.01).curve("train_size")
    hand_emc = max(n for n, e in zip(_TRAIN_SIZES, _TRAIN_ERRORS) if e <= 0.01)
    assert curve.emc == hand_emc == 400
    assert [p.position for p in curve.peaks] == [400]
    [(_, figure)] = [(t, f) for t, f in figures if t == "dd/error_by_train_size"]
    axis = figure.axes[0]
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert list(lines["test error"].get_ydata()) == _TEST_ERRORS
    emc = lines["EMC = 400"]
    assert list(emc.get_xdata()) == [400, 400]
    (peak,) = [t for t in axis.texts if t.get_text() == "peak"]
    assert peak.xy == (400, 0.45)


def test_find_peaks_figure_marks_the_peak_find_peaks_returns_on_each_curve(monkeypatch):
    """The closed forms by hand, and the peaks marked where find_peaks puts them. The 20-seed random-features
    curve takes a minute on a loaded 2-core machine and its peak is test_find_peaks_curves.py's subject: here
    the regression is replaced by a hand-made mean curve with its standard errors, passed on to find_peaks."""
    make_figures = _make_figures()
    # the closed form against Hastie et al.'s Theorem 1 by hand: sigma^2 gamma / (1 - gamma) below 1
    assert make_figures.ridgeless_risk(0.25, 2.0, 3.0) == pytest.approx(3.0 * 0.25 / 0.75)
    assert make_figures.ridgeless_risk(4.0, 2.0, 3.0) == pytest.approx(2.0 * 0.75 + 3.0 / 3.0)
    theta2 = 0.1 / 2.1  # 2 = gamma, 0.1 = c: the unobserved signal
    expected = theta2 + 1 * (1 - theta2) * 0.5 + (0.5 + theta2) / 1.0
    assert make_figures.ordered_features_risk(2.0, noise=0.5, c=0.1) == pytest.approx(expected, rel=1e-12)

    risk = [0.6, 0.55, 0.5, 0.48, 0.47, 0.47, 0.5, 0.7, 30.0, 0.9, 0.6, 0.5, 0.45, 0.42, 0.4, 0.38, 0.37]
    errors = [0.01] * 17
    calls = []

    def hand_curve(widths, train, seeds):
        calls.append((list(widths), train, list(seeds)))
        return risk, errors

    monkeypatch.setattr(make_figures, "random_features_risks", hand_curve)
    figure, peaks = make_figures.find_peaks_figure(points=21, train=100, seeds=range(3))
    assert calls == [([round(100 * 10 ** (-1 + k / 8)) for k in range(17)], 100, [0, 1, 2])]
    assert calls[0][0][8] == 100 and calls[0][0][0] == 10 and calls[0][0][-1] == 1000
    (ridgeless,) = peaks["ridgeless"]
    assert ridgeless.index == 10 and ridgeless.position == pytest.approx(1.05)
    assert [(p.position, p.value) for p in peaks["random_features"]] == [(100, 30.0)]  # p = n
    for axis, name in zip(figure.axes, ("ridgeless", "random_features")):
        (star,) = [line for line in axis.get_lines() if line.get_label() == "peak found"]
        assert (star.get_xdata()[0], star.get_ydata()[0]) == (peaks[name][0].position, peaks[name][0].value)


def test_random_features_risk_against_the_pseudo_inverse():
    """The min-norm fit is the pseudo-inverse's; checked on one seed by an independent computation."""
    make_figures = _make_figures()
    widths, train, dim = [3, 10, 40], 10, 5
    risks, errors = make_figures.random_features_risks(widths, train=train, seeds=[7], dim=dim)
    assert errors == [0.0] * 3 or all(math.isnan(e) for e in errors)  # one seed: no spread
    teacher = torch.randn(dim, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    teacher = teacher / teacher.norm()
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(train, dim, generator=generator, dtype=torch.float64)
    x_test = torch.randn(2000, dim, generator=generator, dtype=torch.float64)
    y = torch.tanh(2 * x @ teacher) + 0.4 * torch.randn(train, generator=generator, dtype=torch.float64)
    w = torch.randn(40, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    for p, risk in zip(widths, risks):
        features = torch.relu(x @ w[:p].T)
        fit = torch.linalg.pinv(features) @ y
        hand = float(((torch.relu(x_test @ w[:p].T) @ fit - torch.tanh(2 * x_test @ teacher)) ** 2).mean())
        assert risk == pytest.approx(hand, rel=1e-6), p


def _write_imp_run(folder: Path, rewind_step: int, accuracy: list[float], test: list[float], train: list[float]):
    """The tags an IMPPruner(stability=True) run logs, for 4 levels of 50% pruning of 48 steps."""
    folder.mkdir(parents=True)
    config = {"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {}},
        {"class_path": "lt_theory.IMPPruner", "init_args": {"rewind_step": rewind_step, "levels": 3}},
    ]}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    writer = SummaryWriter(str(folder))
    for level, (a, b, c) in enumerate(zip(accuracy, test, train)):
        end = 48 * (level + 1) - (1 if level else 0)  # level-end steps, not multiples of anything
        bp = round(10_000 * 0.5**level)
        writer.add_scalar("imp/accuracy", a, end)
        writer.add_scalar("imp/accuracy_by_remaining_bp", a, bp)
        writer.add_scalar("imp/test_error_barrier_by_remaining_bp", b, bp)
        writer.add_scalar("imp/train_error_barrier", c, end)
    writer.close()


def test_imp_stability_figure_reads_every_run_and_labels_it_by_its_rewind_step(tmp_path, capsys):
    make_figures = _make_figures()
    late = ([0.9, 0.91, 0.88], [0.01, 0.02, 0.0], [0.005, 0.0, 0.01])
    early = ([0.9, 0.85, 0.8], [0.08, 0.1, 0.12], [0.07, 0.09, 0.2])
    _write_imp_run(tmp_path / "k12", 12, *late)
    _write_imp_run(tmp_path / "k0", 0, *early)
    out = tmp_path / "figure.png"
    found = make_figures.main(["imp_stability", str(tmp_path / "k12"), str(tmp_path / "k0"), "--out", str(out)])
    remaining = [1.0, 0.5, 0.25]
    for label, (accuracy, test, train) in (("k = 12", late), ("k = 0", early)):
        assert found[label]["accuracy"] == [(r, pytest.approx(a)) for r, a in zip(remaining, accuracy)]
        assert found[label]["test"] == [(r, pytest.approx(b)) for r, b in zip(remaining, test)]
        assert found[label]["train"] == [(r, pytest.approx(c)) for r, c in zip(remaining, train)]
    assert "k = 0 test (percent): 100.00%: 8.00, 50.00%: 10.00, 25.00%: 12.00" in capsys.readouterr().out
    image = _pixels(out)
    assert image.shape == (380, 1100, 3)
    figure, _ = make_figures.imp_stability_figure([tmp_path / "k12", tmp_path / "k0"])
    accuracy_axis, barrier_axis = figure.axes
    lines = {line.get_label(): line for line in barrier_axis.get_lines()}
    assert list(lines["train, k = 0"].get_ydata()) == pytest.approx([7.0, 9.0, 20.0])
    assert list(lines["test, k = 12"].get_xdata()) == [100.0, 50.0, 25.0]
    dense = {line.get_label(): line for line in accuracy_axis.get_lines()}["dense"]
    assert list(dense.get_ydata()) == pytest.approx([90.0, 90.0])


def test_imp_stability_refuses_a_folder_without_imp_tags(tmp_path):
    make_figures = _make_figures()
    SummaryWriter(str(tmp_path)).close()
    with pytest.raises(ValueError, match="not an IMPPruner run"):
        make_figures.imp_stability_curves(tmp_path)


def test_two_tags_with_one_file_name_are_both_written(tmp_path):
    from lt_theory.figures import new_figure
    from lt_theory.loggers import LoggerTarget
    from lt_theory.sweep.report import _log_figure

    tags = ["dd/error_by_k/k=[1, 2]", "dd/error_by_k/k=(1, 2)"]
    assert figure_filename(tags[0]) == figure_filename(tags[1])
    for value, tag in enumerate(tags):
        figure, axis = new_figure(3, 2)
        axis.plot([0, 1], [value, value])
        _log_figure(LoggerTarget([]), tag, figure, tmp_path)
    stem = figure_filename(tags[0])[: -len(".png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.png", f"{stem}_2.png"]
    assert (tmp_path / f"{stem}.png").read_bytes() != (tmp_path / f"{stem}_2.png").read_bytes()
