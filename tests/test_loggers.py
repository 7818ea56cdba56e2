"""The shared logging module: scalars reach every logger, extras reach TensorBoard, layouts merge."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402

from lt_theory import loggers  # noqa: E402


def _fake_trainer(logger_list, rank_zero=True, step=7):
    return SimpleNamespace(loggers=logger_list, is_global_zero=rank_zero, global_step=step)


def _events(tb: TensorBoardLogger) -> EventAccumulator:
    tb.experiment.flush()
    accumulator = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_reach_every_logger_at_the_step(tmp_path):
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    trainer = _fake_trainer([tb, csv_logger], step=7)
    loggers.log_scalars(trainer, {"ntk/trace": torch.tensor(2.5), "ntk/eig_max": 1.25})
    csv_logger.save()
    scalars = _events(tb).Scalars("ntk/trace")
    assert [(s.step, s.value) for s in scalars] == [(7, 2.5)]
    rows = list(csv.DictReader(open(f"{csv_logger.log_dir}/metrics.csv")))
    assert rows == [{"step": "7", "ntk/eig_max": "1.25", "ntk/trace": "2.5"}]


def test_other_ranks_write_nothing(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = _fake_trainer([tb], rank_zero=False)
    before = loggers.emitted_writes
    loggers.log_scalars(trainer, {"a/b": 1.0})
    loggers.log_text(trainer, "a/text", "hello")
    loggers.add_custom_scalar_charts(trainer, "a", {"chart": ["a/b"]})
    assert loggers.emitted_writes == before


def test_figure_histogram_text_reach_tensorboard(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = _fake_trainer([tb], step=3)
    figure = plt.figure()
    loggers.log_figure(trainer, "x/figure", figure)
    loggers.log_histogram(trainer, "x/hist", torch.tensor([1.0, 2.0, float("nan"), 4.0]))
    loggers.log_text(trainer, "x/text", "**verdict**")
    assert not plt.fignum_exists(figure.number)
    events = _events(tb)
    assert events.Images("x/figure")[0].step == 3
    histogram = events.Histograms("x/hist")[0].histogram_value
    assert (histogram.num, histogram.sum, histogram.min, histogram.max) == (3, 7.0, 1.0, 4.0)
    assert "x/text" in "".join(events.Tags()["tensors"])


def test_layouts_from_two_callbacks_merge_into_one(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = _fake_trainer([tb])
    loggers.add_custom_scalar_charts(trainer, "spectral", {"Lipschitz": ["spectral/lipschitz_upper"]})
    loggers.add_custom_scalar_charts(trainer, "ntk", {"Drift": ["ntk/relative_change", "ntk/velocity"]})
    loggers.add_custom_scalar_charts(
        trainer, "spectral", {"Bracket": ["spectral/l", "spectral/m", "spectral/u"]}, kind="Margin"
    )
    last = _events(tb).Tensors("custom_scalars__config__")[-1]
    layout = layout_pb2.Layout()
    layout.ParseFromString(last.tensor_proto.string_val[0])
    titles = {c.title: [chart.title for chart in c.chart] for c in layout.category}
    assert titles == {"spectral": ["Lipschitz", "Bracket"], "ntk": ["Drift"]}
    drift = layout.category[[c.title for c in layout.category].index("ntk")].chart[0]
    assert list(drift.multiline.tag) == ["ntk/relative_change", "ntk/velocity"]


def test_margin_chart_needs_three_tags(tmp_path):
    trainer = _fake_trainer([TensorBoardLogger(tmp_path)])
    with pytest.raises(ValueError, match="three tags"):
        loggers.add_custom_scalar_charts(trainer, "x", {"m": ["a", "b"]}, kind="Margin")
