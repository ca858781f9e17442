"""DDP with 2 CPU processes (gloo), run as the real command line: ``python -m diffusion_pl fit|predict``.

Lightning's DDP launcher starts rank 1 by re-running the command line, so the runs are subprocesses. One fit
(8 steps, validation, sample grids and checkpoints every 4 steps) is shared by the checks below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp_probe import DDPM_FASHION, TINY_OVERRIDES, read_steps, scalar_steps_per_file, write_callbacks_config
from helpers import cli_process

pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 4
BATCH_PER_DEVICE = 64  # TINY_OVERRIDES
TIMEOUT_S = 600  # a hang (a collective on one rank only) fails the test instead of blocking the suite (cli_process)
DDP_ARGS = ["--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2"]


@dataclass
class Run:
    """A finished subprocess run: its root directory and combined output."""

    root: Path
    output: str

    @property
    def log_dir(self) -> Path:
        return self.root / "lightning_logs" / "version_0"


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("ddp_fit")
    callbacks = write_callbacks_config(root / "callbacks.yaml", every_n_steps=EVERY)
    result = cli_process("fit", "--config", DDPM_FASHION, "--config", str(callbacks),
                         f"--trainer.default_root_dir={root}", *TINY_OVERRIDES, *DDP_ARGS, f"--trainer.max_steps={STEPS}",
                         f"--trainer.val_check_interval={EVERY}", timeout=TIMEOUT_S)
    return Run(root, result.stdout + result.stderr)


def test_checkpoint_and_tensorboard_written(fit_run: Run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt = torch.load(fit_run.log_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS
    assert len(ckpt["callbacks"]["ResumeRNGState"]["per_rank"]) == 2, "RNG states of both ranks are checkpointed"
    assert scalar_steps_per_file(fit_run.log_dir) == [list(range(STEPS))]
    accumulator = EventAccumulator(str(fit_run.log_dir))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("val/loss")] == [EVERY - 1, STEPS - 1]


def test_effective_batch_size_is_logged(fit_run: Run) -> None:
    effective = 2 * BATCH_PER_DEVICE
    assert re.search(rf"effective batch size {effective}\b", fit_run.output), fit_run.output[-3000:]
    assert f"effective_batch_size: {effective}" in (fit_run.log_dir / "hparams.yaml").read_text()


def test_ema_and_weights_identical_across_ranks(fit_run: Run) -> None:
    """Each rank updates its own EMA copy from the all-reduced weights, so the copies must agree bit for bit,
    and the checkpoint (written by rank 0) holds that average."""
    rank0, rank1 = (torch.load(fit_run.root / "probe" / f"rank{r}_weights.pt") for r in (0, 1))
    for kind in ("ema", "raw"):
        assert rank0[kind].keys() == rank1[kind].keys()
        for name in rank0[kind]:
            assert torch.equal(rank0[kind][name], rank1[kind][name]), f"{kind} weight {name} differs across ranks"
    state = torch.load(fit_run.log_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in state.items():
        torch.testing.assert_close(value, rank0["ema"][name], rtol=0, atol=0)
    floating = [k for k, v in rank0["raw"].items() if v.is_floating_point()]
    assert any(not torch.equal(rank0["ema"][k], rank0["raw"][k]) for k in floating), "the EMA never moved"


def test_ranks_get_different_data_and_noise(fit_run: Run) -> None:
    """The distributed sampler shards the images, and each rank draws its own timesteps and noise."""
    rank0, rank1 = read_steps(fit_run.root, 0), read_steps(fit_run.root, 1)
    assert [s for _, s, _, _ in rank0] == [s for _, s, _, _ in rank1] == list(range(1, STEPS + 1))
    assert all(a[3] != b[3] for a, b in zip(rank0, rank1, strict=True)), "both ranks trained on the same images"
    assert rank0[0][2] != rank1[0][2], "both ranks drew the same noise at the first step"


def test_sample_grid_written_once_per_grid_step(fit_run: Run) -> None:
    """Grids come from rank 0 alone: one PNG per grid step, one log line and one TensorBoard image per grid."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [p.name for p in (fit_run.root / "lightning_logs").iterdir()] == ["version_0"]
    pngs = sorted(p.name for p in (fit_run.log_dir / "samples").glob("*.png"))
    assert pngs == [f"step_{s:07d}.png" for s in range(EVERY, STEPS + 1, EVERY)]
    assert fit_run.output.count("sample grid written to") == STEPS // EVERY  # the end of training adds none at STEPS
    accumulator = EventAccumulator(str(fit_run.log_dir), size_guidance={"images": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Images("samples")] == [*range(EVERY, STEPS + 1, EVERY)]


def test_predict_with_two_processes_matches_one(fit_run: Run, tmp_path: Path) -> None:
    """Each rank writes its share of the seeds; every image equals the single-process image of its seed."""
    ckpt = str(fit_run.log_dir / "checkpoints" / "last.ckpt")
    num_samples = 5
    common = ["predict", "--config", DDPM_FASHION, *TINY_OVERRIDES, f"--ckpt_path={ckpt}",
              f"--data.init_args.predict.num={num_samples}", "--data.init_args.predict.batch_size=2"]
    outputs = {}
    for name, extra in (("single", []), ("ddp", DDP_ARGS)):
        out = tmp_path / name
        cli_process(*common, *extra, f"--trainer.default_root_dir={out}",
                    "--trainer.callbacks=diffusion_pl.callbacks.SampleWriter",
                    f"--trainer.callbacks.output_dir={out / 'predictions'}", timeout=TIMEOUT_S)
        outputs[name] = out / "predictions"
    single = np.load(outputs["single"] / "samples.npz")["samples"]
    assert single.shape[0] == num_samples
    for rank in (0, 1):
        shard = np.load(outputs["ddp"] / f"samples_rank{rank}.npz")["samples"]
        # Lightning's DistributedSampler gives rank r the seeds r, r + 2, ... (padded by wrapping around).
        expected = [single[i % num_samples] for i in range(rank, rank + 2 * len(shard), 2)]
        np.testing.assert_array_equal(shard, np.stack(expected))
