"""SLURM submission on a real single-node cluster (tools/local_slurm.py) and the submission script itself.

The session fixture installs (as root, with apt-get) and starts slurmctld, slurmd and munged on loopback, and stops
them at the end unless they were already running. Two 2-task CPU DDP jobs go through tools/submit_slurm.py at
the same time: one runs uninterrupted; the other gets ``scancel --signal=USR1`` (what ``--signal=USR1@T`` sends
near the time limit) once it has trained a few steps, saves an HPC checkpoint, requeues itself, resumes and
must reproduce the uninterrupted job's losses step for step.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import torch

from ddp_probe import DDPM_FASHION, REPO, TINY_OVERRIDES, last_step, read_steps, scalar_steps_per_file, \
    subprocess_env, write_callbacks_config
from helpers import run_trainer

log = logging.getLogger(__name__)

LOCAL_SLURM = REPO / "tools" / "local_slurm.py"
SUBMIT = REPO / "tools" / "submit_slurm.py"
STEPS, EVERY = 28, 4  # 11 steps per epoch: the preempted job resumes across epoch boundaries
SIGNAL_AFTER_STEP = 5
JOB_TIMEOUT_S = 600
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def load_tool(path: Path) -> ModuleType:
    """Import a script from tools/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- cluster and jobs


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """Environment (SLURM_CONF, PYTHONPATH) for clients and jobs of a running local cluster."""
    tool = load_tool(LOCAL_SLURM)
    if os.geteuid() != 0:
        missing = tool.missing_binaries()
        reason = (f"SLURM is not installed (missing {', '.join(missing)}) and installing it needs root"
                  if missing else "starting a local SLURM cluster needs root (munged and slurmd switch users)")
        pytest.skip(reason)
    command = [sys.executable, str(LOCAL_SLURM)]
    was_running = subprocess.run([*command, "status"], capture_output=True).returncode == 0
    # 4 CPUs declared (SlurmdParameters=config_overrides), so the two 2-task jobs run side by side.
    started = subprocess.run([*command, "start", "--cpus", str(max(4, os.cpu_count() or 1))],
                             capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        if tool.missing_binaries():
            pytest.skip(f"the SLURM packages could not be installed: {started.stderr.strip()[-2000:]}")
        pytest.fail(f"local SLURM cluster did not start:\n{started.stderr[-3000:]}")
    conf = re.search(r"SLURM_CONF=(\S+)", started.stdout).group(1)
    yield {**subprocess_env(), "SLURM_CONF": conf}
    if not was_running:
        subprocess.run([*command, "stop"], capture_output=True, timeout=300)


@dataclass
class Job:
    """A submitted job: id, run directory, submission time and (once final) its scontrol record."""

    job_id: str
    run_dir: Path
    submitted: float
    info: dict[str, str] | None = None
    turnaround_s: float | None = None

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "lightning_logs" / f"version_{self.job_id}"

    @property
    def output(self) -> str:
        path = self.run_dir / f"slurm-{self.job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""


def submit(env: dict[str, str], run_dir: Path, *overrides: str, name: str = "diffusion_pl_test") -> Job:
    """Submit a 2-task CPU DDP fit of the tiny demo through tools/submit_slurm.py."""
    command = [sys.executable, str(SUBMIT), "--config", DDPM_FASHION, "--devices", "2", "--cpus-per-task", "1",
               "--time", "20", "--job-name", name, "--run-dir", str(run_dir), "--", *overrides]
    submitted = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"^job_id=(\S+)$", result.stdout, re.MULTILINE).group(1)
    return Job(job_id, run_dir, submitted)


def job_info(env: dict[str, str], job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); empty if unknown."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout)) if result.returncode == 0 else {}


def wait_until(condition: Callable[[], bool], timeout: float, what: str, job: Job, env: dict[str, str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job.job_id], env=env)
            pytest.fail(f"job {job.job_id}: {what} not reached in {timeout:.0f} s; {job_info(env, job.job_id)}\n"
                        f"{job.output[-5000:]}")
        time.sleep(0.5)


def wait_for_end(env: dict[str, str], job: Job) -> Job:
    """Wait until the job is in a final state (a requeued job passes through PENDING again)."""
    def final() -> bool:
        info = job_info(env, job.job_id)
        return info.get("JobState") in FINAL_STATES

    wait_until(final, JOB_TIMEOUT_S, "a final state", job, env)
    job.turnaround_s = time.monotonic() - job.submitted
    job.info = job_info(env, job.job_id)
    return job


@pytest.fixture(scope="module")
def jobs(slurm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """An uninterrupted and a preempted job of the same run, submitted together and waited for."""
    root = tmp_path_factory.mktemp("slurm")
    callbacks = write_callbacks_config(root / "callbacks.yaml", every_n_steps=EVERY)
    overrides = ["--config", str(callbacks), *TINY_OVERRIDES, f"--trainer.max_steps={STEPS}",
                 f"--trainer.val_check_interval={EVERY}"]
    plain = submit(slurm_env, root / "plain", *overrides)
    preempted = submit(slurm_env, root / "preempted", *overrides)
    wait_until(lambda: last_step(preempted.run_dir) >= SIGNAL_AFTER_STEP, JOB_TIMEOUT_S,
               f"step {SIGNAL_AFTER_STEP}", preempted, slurm_env)
    subprocess.run(["scancel", "--signal=USR1", preempted.job_id], env=slurm_env, check=True)
    finished = {"plain": wait_for_end(slurm_env, plain), "preempted": wait_for_end(slurm_env, preempted)}
    for name, job in finished.items():
        log.info("SLURM job %s (%s): submit -> %s in %.1f s, %s restart(s)", job.job_id, name,
                 job.info.get("JobState"), job.turnaround_s, job.info.get("Restarts"))
    return finished


# ------------------------------------------------------------------------------------------- real cluster tests


@pytest.mark.slow
def test_ddp_job_completes_with_checkpoint_and_tensorboard(jobs: dict[str, Job]) -> None:
    job = jobs["plain"]
    assert job.info["JobState"] == "COMPLETED", job.output[-5000:]
    assert job.info["ExitCode"] == "0:0" and job.info["Restarts"] == "0"
    assert "All distributed processes registered. Starting with 2 processes" in job.output
    assert "srun exited with status 0" in job.output
    ckpt = torch.load(job.log_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS
    assert scalar_steps_per_file(job.log_dir) == [list(range(STEPS))]
    rank0, rank1 = (torch.load(job.run_dir / "probe" / f"rank{r}_weights.pt") for r in (0, 1))
    assert all(torch.equal(rank0["ema"][k], rank1["ema"][k]) for k in rank0["ema"])


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_exactly(jobs: dict[str, Job]) -> None:
    job, plain = jobs["preempted"], jobs["plain"]
    assert job.info["JobState"] == "COMPLETED", job.output[-5000:]
    assert job.info["ExitCode"] == "0:0" and job.info["Restarts"] == "1", job.info
    assert re.search(rf"job {job.job_id} restart 1 on", job.output)
    hpc = torch.load(job.run_dir / "hpc_ckpt_1.ckpt", weights_only=False)
    saved_at = hpc["global_step"]
    assert SIGNAL_AFTER_STEP <= saved_at < STEPS
    assert f"Restoring states from the checkpoint path at {job.run_dir / 'hpc_ckpt_1.ckpt'}" in job.output
    assert torch.load(job.log_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS
    # TensorBoard: the first run logged steps up to the checkpoint, the requeued run continues from there.
    assert scalar_steps_per_file(job.log_dir) == [list(range(saved_at)), list(range(saved_at, STEPS))]
    for rank in (0, 1):
        steps = read_steps(job.run_dir, rank)
        assert [(r, s) for r, s, _, _ in steps] == [(0, s) for s in range(1, saved_at + 1)] + \
            [(1, s) for s in range(saved_at + 1, STEPS + 1)]
        reference = {s: loss for _, s, loss, _ in read_steps(plain.run_dir, rank)}
        assert [loss for _, _, loss, _ in steps] == [reference[s] for _, s, _, _ in steps], \
            f"rank {rank}: losses after the requeue differ from the uninterrupted job's"


@pytest.mark.slow
def test_failing_job_passes_srun_exit_status_through(slurm_env: dict[str, str], tmp_path: Path) -> None:
    job = wait_for_end(slurm_env, submit(slurm_env, tmp_path / "bad", "--trainer.max_steps=not_a_number",
                                         name="diffusion_pl_bad"))
    assert job.info["JobState"] == "FAILED"
    status = int(job.info["ExitCode"].split(":")[0])
    assert status != 0 and f"srun exited with status {status}" in job.output


# ------------------------------------------------------------------------------------------- no cluster needed


class SendSignal(pl.Callback):
    """Sends SIGUSR1 to this process at the end of step ``at``, as ``scancel --signal=USR1`` would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_preemption_checkpoint_is_taken_at_a_step_boundary_and_resumes_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a cluster: the signal is recorded, the checkpoint saved at the end of that step, training stops
    before the next one, and ``--ckpt_path=hpc`` continues with the uninterrupted run's losses."""
    from diffusion_pl.callbacks.preemption import SlurmRequeue

    steps, signal_at = 10, 3
    # Tiny fits in this process with the probe's callbacks (every EVERY steps) and SlurmRequeue, not requeueing.
    callbacks = write_callbacks_config(tmp_path / "callbacks.yaml", every_n_steps=EVERY)
    fit = [*TINY_OVERRIDES, f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={EVERY}"]
    run_trainer("fit", DDPM_FASHION, *fit, root=tmp_path / "full", overlays=[callbacks], tiny=False,
                prepend=[SlurmRequeue(requeue=False)])
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with monkeypatch.context() as env:
            env.setenv("SLURM_NTASKS", "1")  # after the Trainer exists: only the callback sees a SLURM job
            env.delenv("SLURM_JOB_NAME", raising=False)
            with pytest.raises(SystemExit) as stopped:
                run_trainer("fit", DDPM_FASHION, *fit, root=tmp_path / "cut", overlays=[callbacks], tiny=False,
                            prepend=[SendSignal(signal_at), SlurmRequeue(requeue=False)])
        assert stopped.value.code == 0
        assert torch.load(tmp_path / "cut" / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == signal_at
        assert [s for _, s, _, _ in read_steps(tmp_path / "cut", 0)] == list(range(1, signal_at + 1))
        run_trainer("fit", DDPM_FASHION, *fit, root=tmp_path / "cut", overlays=[callbacks], tiny=False,
                    ckpt_path="hpc", prepend=[SlurmRequeue(requeue=False)])
    finally:
        signal.signal(signal.SIGUSR1, previous)
    resumed = [(s, loss) for _, s, loss, _ in read_steps(tmp_path / "cut", 0)]
    assert resumed == [(s, loss) for _, s, loss, _ in read_steps(tmp_path / "full", 0)]


def dry_run(tmp_path: Path, *args: str) -> str:
    submit_tool = load_tool(SUBMIT)
    assert submit_tool.main(["--config", DDPM_FASHION, "--run-dir", str(tmp_path / "run"), "--dry-run", *args]) == 0
    return (tmp_path / "run" / "job.sbatch").read_text()


def test_submit_script_for_multi_node_gpu_job(tmp_path: Path) -> None:
    script = dry_run(tmp_path, "--nodes", "2", "--gpus-per-node", "4", "--time", "24:00:00", "--partition", "gpu",
                     "--account", "proj", "--signal-seconds", "300", "--sbatch-option", "qos=high",
                     "--sbatch-option", "exclusive", "--trainer.max_steps=1000", "--", "--model.init_args.sampler.eta=0.5")
    for directive in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=24:00:00", "--partition=gpu",
                      "--account=proj", "--signal=USR1@300", "--requeue", "--open-mode=append", "--qos=high",
                      "--exclusive", f"--output={tmp_path / 'run'}/slurm-%j.out", "--job-name=ddpm_fashion_mnist"):
        assert f"#SBATCH {directive}\n" in script
    for argument in ("--trainer.num_nodes=2", "--trainer.devices=4", "--trainer.accelerator=gpu",
                     "--trainer.strategy=ddp", f"--trainer.default_root_dir={tmp_path / 'run'}",
                     "--trainer.max_steps=1000", "--model.init_args.sampler.eta=0.5",
                     "--trainer.callbacks+=diffusion_pl.callbacks.preemption.SlurmRequeue"):
        assert argument in script
    assert "srun --kill-on-bad-exit=1" in script and script.rstrip().endswith('exit "${status}"')
    assert "--ckpt_path=hpc" in script
    completed = subprocess.run(["bash", "-n", str(tmp_path / "run" / "job.sbatch")], capture_output=True)
    assert completed.returncode == 0, completed.stderr


def test_submit_rejects_job_names_lightning_ignores(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        dry_run(tmp_path, "--job-name", "interactive")


def test_dead_daemons_count_as_stopped_even_as_zombies() -> None:
    """A killed daemon whose parent does not reap it stays in the process table as a zombie."""
    tool = load_tool(LOCAL_SLURM)
    child = subprocess.Popen(["true"])
    assert tool.wait_for(lambda: tool.process_state(child.pid) == "Z", 10)
    assert not tool.is_alive(child.pid)
    child.wait()
    assert not tool.is_alive(child.pid) and tool.is_alive(os.getpid())


def test_slurm_conf_has_what_a_single_node_cluster_needs(tmp_path: Path) -> None:
    tool = load_tool(LOCAL_SLURM)
    conf = tool.slurm_conf(tool.Cluster(state_dir=tmp_path, node="n1", cpus=3))
    for line in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MailProg=/bin/true",
                 "AuthInfo=cred_expire=10", "SchedulerParameters=sched_interval=2,bf_interval=2",
                 "NodeName=n1 NodeAddr=127.0.0.1 CPUs=3 Sockets=1 CoresPerSocket=3"):
        assert line in conf
