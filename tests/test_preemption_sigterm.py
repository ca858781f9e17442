"""SIGTERM during ``fit`` (Kubernetes, SLURM's time limit, ``kill``): a verified checkpoint at the next step
boundary, exit status 143, and the logged command resumes the run (issue 24)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from ddp_probe import last_step, read_steps
from helpers import DDPM_FASHION, run_trainer, start_cli_process, tiny_args

from diffusion_pl.callbacks.preemption import TERMINATED_STATUS, resume_command
from diffusion_pl.cli import main
from diffusion_pl.core.checkpoint_file import read_checkpoint

STEPS, SIGNAL_AFTER_STEP = 12, 2
RESUME = re.compile(r"resume with: (.+)$", re.MULTILINE)
# Batches of 16 and a 2-step sampler for the final sample grid: CPU time goes to starting the process.
SMALL = ["--data.init_args.batch_size=16", "--model.init_args.sampler.steps=2"]
# Training steps of at least 0.25 s (the signal arrives mid-run), no validation.
PACED = [*SMALL, f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0",
         "--trainer.callbacks+=ddp_probe.RankProbe", "--trainer.callbacks+=ddp_probe.Pace"]


def wait_for_step(process: subprocess.Popen, root: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while last_step(root) < step:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run did not reach step {step}:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_the_logged_command_resumes(tmp_path: Path) -> None:
    """A real ``kill -TERM`` mid-run: the step in progress ends, its checkpoint verifies, the process exits 143
    with one line naming the resume command; that command (run as logged, through the entry point in this
    process: the imports are paid once) trains on to ``max_steps``."""
    run = start_cli_process("fit", *tiny_args(tmp_path, *PACED))
    wait_for_step(run, tmp_path, SIGNAL_AFTER_STEP)
    os.kill(run.pid, signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    assert run.returncode == TERMINATED_STATUS, output[-3000:]
    [command] = RESUME.findall(output)
    program, *args = shlex.split(command)
    checkpoint = Path(args[args.index("--ckpt_path") + 1])
    saved = read_checkpoint(checkpoint)["global_step"]
    assert program == "diffusion-pl" and checkpoint.parent.name == "checkpoints"
    assert checkpoint.name == f"sigterm_step_{saved}.ckpt" and SIGNAL_AFTER_STEP <= saved < STEPS
    assert last_step(tmp_path) == saved, "the run stops right after the checkpointed step"
    main(args)  # returns: exit status 0
    assert [step for _, step, _, _ in read_steps(tmp_path, 0)] == list(range(1, STEPS + 1))
    assert read_checkpoint(tmp_path / "lightning_logs/version_1/checkpoints/last.ckpt")["global_step"] == STEPS


class SendSigterm(pl.Callback):
    """Sends SIGTERM to this process in the sanity check's first batch, or when training ends."""

    def __init__(self, when: str) -> None:
        self.when = when

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.when == "sanity check" and trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "train end":
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("when", ["sanity check", "train end"])
def test_sigterm_outside_training_steps(tmp_path: Path, when: str) -> None:
    """During the sanity check the signal is acted upon at the first step (checkpoint of step 1); after the last
    step the run just ends with 143. Either way SIGTERM's handler is the one from before ``fit`` afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:  # a 2-step fit in this process with SIGTERM sent at `when`
        run_trainer("fit", DDPM_FASHION, *SMALL, "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                    root=tmp_path, callbacks=[SendSigterm(when)])
    assert stopped.value.code == TERMINATED_STATUS
    assert signal.getsignal(signal.SIGTERM) is before
    written = sorted(p.name for p in tmp_path.rglob("sigterm_step_*.ckpt"))
    assert written == (["sigterm_step_1.ckpt"] if when == "sanity check" else [])


def test_resume_command_replaces_an_earlier_ckpt_path() -> None:
    args = ["fit", "--config", "a b.yaml", "--ckpt_path", "old.ckpt", "--ckpt_path=older.ckpt", "--trainer.max_steps=9"]
    assert resume_command(args, "/runs/x/sigterm_step_5.ckpt") == (
        "diffusion-pl fit --config 'a b.yaml' --trainer.max_steps=9 --ckpt_path /runs/x/sigterm_step_5.ckpt")
