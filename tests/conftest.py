"""Shared pytest setup: the test helpers (tests/analytic.py, tests/helpers.py) importable; one thread per xdist
worker; Inception weights that need no download; fixtures that several test files use; the time of the ``slow`` tier
printed at the end of the run.

The suite runs on 2 workers (``-n 2`` in setup.cfg's addopts, pytest-xdist). Each worker and the processes its tests
start use one thread (``OMP_NUM_THREADS=1``): two workers of two threads each on a 2-core machine run slower than
one worker, as PyTorch's threads then wait for each other.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from diffusion_pl.processes import DiscreteProcess

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module of small-tensor tests (``pytestmark = pytest.mark.usefixtures(...)``): several
    times faster than two on a shared 2-core machine when the suite runs in one process (``-n 0``)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict of torch-fidelity's FID Inception-v3 architecture with random (seeded) weights: the Inception
    code path offline (the real weights cannot be downloaded in the tests)."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *args, **kwargs: None)
        torch.manual_seed(0)
        net = fidelity_inception.FeatureExtractorInceptionV3("random", ["2048"])
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def process() -> DiscreteProcess:
    """The linear 1000-step DDPM process that the guidance tests (closed forms on Gaussian mixtures) share."""
    from diffusion_pl.processes import DiscreteProcess

    return DiscreteProcess(1000, "linear")


@pytest.fixture(scope="module")
def tiny_clip_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny CLIP (8x8 grayscale images, 32-wide embedding, one layer per tower, 8 tokens) built after
    ``torch.manual_seed(0)`` and exported: the path the Text conditioner and CLIP guidance take."""
    import torch

    from diffusion_pl.nets.clip import CLIPNet

    torch.manual_seed(0)
    net = CLIPNet(image_size=8, in_channels=1, embed_dim=32, vision_layers=1, context_length=8, transformer_layers=1)
    return str(net.export(tmp_path_factory.mktemp("clip") / "tiny_clip.pt"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the wall time the tests of the ``slow`` tier took together (their setup included), so every change
    sees what it costs."""
    reports = [report for key in ("passed", "failed", "") for report in terminalreporter.stats.get(key, [])
               if getattr(report, "when", "") in ("setup", "call") and "slow" in getattr(report, "keywords", {})]
    if reports:
        total = sum(report.duration for report in reports)
        count = len({report.nodeid for report in reports})
        terminalreporter.write_line(f"slow tier: {count} tests, {total:.0f} s of test time")
