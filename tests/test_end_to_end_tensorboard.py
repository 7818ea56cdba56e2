"""End to end: the quick start recipe, briefly, then TensorBoard's own server reads what it wrote.

The recipe runs as a user runs it (the script and its YAML, overrides on the command line); TensorBoard is
started on 127.0.0.1 over the log directory and queried through its HTTP API for the run, the scalar tags,
the images, and the merged custom-scalars layout.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Tags the quick start must write; each callback issue adds the tags of its callback.
EXPECTED_SCALARS = {
    "train/loss_step",
    "train/acc_step",
    "train/loss_epoch",
    "val/loss",
    "val/acc",
    "lr",
    "ntk/relative_change",
    "ntk/distance_from_init",
    "ntk/velocity",
    "ntk/alignment",
    "ntk/trace",
    "ntk/eig_max",
    "ntk/effective_rank",
    "spectral/sigma_max/net.conv1",
    "spectral/sigma_max_reshaped/net.layer1.0.conv1",
    "spectral/lipschitz_upper",
    "spectral/lipschitz_lower",
    "spectral/lipschitz_naive_product",
    "spectral/complexity",
    "spectral/condition_lower/net.layer1.0.conv2",
    "spectral/stable_rank/net.fc",
    "spectral/margin_normalized/p50",
    "dd/train_error",
    "dd/train_error_clean",
    "dd/test_error",
    "dd/test_loss",
    "lmc/test_error_barrier",
    "lmc/train_error_barrier",
    "lmc/test_loss_barrier",
    "lmc/train_loss_barrier",
}
EXPECTED_IMAGES = {
    "ntk/eigenspectrum",
    "spectral/sigma_max_by_depth",
    "dd/curves",
    "lmc/error_along_path",
    "lmc/stability",
}
EXPECTED_HISTOGRAMS = {"spectral/margins_normalized"}
EXPECTED_TEXT = {
    "ntk/verdict/text_summary",
    "dd/summary/text_summary",
    "lmc/summary/text_summary",
}  # torch's add_text appends /text_summary
EXPECTED_LAYOUT_CATEGORIES = {"training", "ntk", "spectral", "dd", "lmc"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def quickstart_logs(tmp_path_factory) -> tuple[Path, str]:
    save_dir = tmp_path_factory.mktemp("runs")
    config = yaml.safe_load((REPO / "recipes/configs/quickstart.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:  # measure often in this short run
        for cadence, value in (("every_n_steps", 2), ("bound_every_n_steps", 2), ("every_n_epochs", 1)):
            if cadence in callback.get("init_args", {}):
                callback["init_args"][cadence] = value
    config_file = save_dir.parent / "quickstart_short.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        "recipes/resnet_cifar.py",
        "fit",
        "--config",
        str(config_file),
        "--trainer.max_epochs",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--data.init_args.num_train",
        "256",
        "--data.init_args.num_test",
        "128",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"tensorboard --logdir {save_dir}" in result.stdout
    return save_dir, result.stdout


@pytest.fixture(scope="module")
def tensorboard_url(quickstart_logs):
    save_dir, _ = quickstart_logs
    port = _free_port()
    server_log = open(save_dir.parent / "tensorboard.log", "w+")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(save_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get_json(f"{url}/data/runs"):
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                server_log.seek(0)
                raise RuntimeError(f"TensorBoard did not serve the run: {server_log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        server_log.close()


def test_run_and_scalar_tags_are_served(tensorboard_url):
    runs = _get_json(f"{tensorboard_url}/data/runs")
    assert runs == ["quickstart/version_0"]
    tags = _get_json(f"{tensorboard_url}/data/plugin/scalars/tags")["quickstart/version_0"]
    assert EXPECTED_SCALARS <= set(tags), sorted(set(EXPECTED_SCALARS) - set(tags))
    assert "hp_metric" not in tags  # the recipes turn Lightning's placeholder -1 off


def test_images_are_served(tensorboard_url):
    tags = _get_json(f"{tensorboard_url}/data/plugin/images/tags").get("quickstart/version_0", {})
    assert EXPECTED_IMAGES <= set(tags), sorted(EXPECTED_IMAGES - set(tags))


def test_histograms_are_served(tensorboard_url):
    tags = _get_json(f"{tensorboard_url}/data/plugin/histograms/tags").get("quickstart/version_0", {})
    assert EXPECTED_HISTOGRAMS <= set(tags), sorted(EXPECTED_HISTOGRAMS - set(tags))


def test_text_is_served(tensorboard_url):
    tags = _get_json(f"{tensorboard_url}/data/plugin/text/tags").get("quickstart/version_0", [])
    assert EXPECTED_TEXT <= set(tags), sorted(EXPECTED_TEXT - set(tags))


def test_custom_scalar_layout_is_merged(tensorboard_url):
    layout = _get_json(f"{tensorboard_url}/data/plugin/custom_scalars/layout")
    categories = {category["title"]: category for category in layout["category"]}
    assert EXPECTED_LAYOUT_CATEGORIES <= set(categories), sorted(categories)
    charts = {chart["title"]: chart for chart in categories["training"]["chart"]}
    assert charts["Loss: train vs val"]["multiline"]["tag"] == ["train/loss_epoch", "val/loss"]
