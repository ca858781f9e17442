"""tools/benchmark_training.py: runs on a tiny config, interleaving the framework and a bare loop, and prints JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DDPM_FASHION, REPO, TINY_DISCRETE, TINY_NET

TOOL = REPO / "tools" / "benchmark_training.py"
TINY = [*TINY_NET, *TINY_DISCRETE, "--data.init_args.source=diffusion_pl.data.Digits",
        "--data.init_args.image_format.image_size=8", "--data.init_args.image_format.channels=1",
        "--data.init_args.image_format.resize_mode=resize", "--data.init_args.batch_size=32"]


def test_benchmark_runs_on_a_tiny_config_and_prints_its_json(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    command = [sys.executable, str(TOOL), "--config", DDPM_FASHION, "--steps", "6", "--warmup", "1",
               "--data-batches", "2", "--json", str(out), *TINY]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    framework, bare = report["framework"], report["bare_loop"]
    assert framework["step"]["steps"] == bare["step"]["steps"] == 6
    for loop in (framework, bare):
        step = loop["step"]
        assert 0 < step["p10_s"] <= step["p25_s"] <= step["median_s"] <= step["p75_s"] <= step["p90_s"]
        assert loop["images_per_s"] == pytest.approx(32 / step["median_s"])
    assert report["overhead_ratio"] == pytest.approx(framework["step"]["median_s"] / bare["step"]["median_s"])
    assert 0.2 < report["overhead_ratio"] < 5 and 0.2 < report["overhead_ratio_paired"] < 5
    assert framework["time_to_first_step_s"] > framework["step"]["median_s"]
    assert report["device"] == "cpu" and report["model_flop_utilisation"] is None
    assert report["flops_per_image"] > 1e5 and report["peak_process_rss_mb"] > 0
    data = report["data_pipeline"]["in_memory"]
    assert data["images"] == 2 * 32 and data["images_per_s"] > 0 and data["time_to_first_batch_s"] > 0
