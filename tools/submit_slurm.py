#!/usr/bin/env python3
"""Submit ``diffusion-pl fit`` to SLURM as a preemptible, self-requeueing (multi-node) DDP job.

    python3 tools/submit_slurm.py --config configs/ddpm/cifar10.yaml --nodes 2 --gpus-per-node 4 \\
        --time 24:00:00 --partition gpu --account my_project -- --trainer.max_steps=800000

Writes ``<run_dir>/job.sbatch`` and submits it with ``sbatch`` (``--dry-run`` only writes and prints it). The job
runs one task per device (``--ntasks-per-node``) under ``srun``; Lightning's SLURMEnvironment turns the tasks
into DDP ranks. ``--signal=USR1@<seconds>`` warns the tasks before the time limit (or use
``scancel --signal=USR1 JOBID`` to preempt by hand): every rank then saves ``<run_dir>/hpc_ckpt_N.ckpt`` at the
end of its current step (``diffusion_pl.callbacks.preemption.SlurmRequeue``, added to the callbacks) and the job
is requeued (``--requeue``); SLURM starts the same script again, which resumes from that checkpoint in the same
run directory. Logs of all restarts are appended (``--open-mode=append``) to
``<run_dir>/slurm-<jobid>.out``; TensorBoard logs and checkpoints go to
``<run_dir>/lightning_logs/version_<jobid>/``, also the same across restarts. The job exits with srun's code.

Everything this command does not know (or everything after ``--``) is passed to ``diffusion-pl fit``.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

log = logging.getLogger("submit_slurm")

# Lightning does not treat jobs with these names as SLURM jobs (it assumes an interactive allocation).
RESERVED_JOB_NAMES = ("bash", "interactive")
# Replaces Lightning's SIGUSR1 handler, which saves from inside the handler and deadlocks DDP ranks.
PREEMPTION_CALLBACK = "diffusion_pl.callbacks.preemption.SlurmRequeue"


@dataclass
class JobSpec:
    """Everything the sbatch script depends on.

    Attributes:
        configs: ``diffusion-pl`` config files (absolute paths).
        job_name: SLURM job name (also the run directory's parent name).
        run_dir: Directory of the script, SLURM output, checkpoints and logs; the same for every restart.
        workdir: Working directory of the job.
        nodes: Number of nodes.
        devices: Tasks (= DDP processes = devices) per node.
        accelerator: Lightning accelerator (``gpu``, ``cpu``, ...).
        gpus_per_node: GPUs to request per node (0: none).
        cpus_per_task: CPU cores per task (None: the cluster's default).
        time: Time limit, e.g. ``24:00:00``.
        signal_seconds: Send SIGUSR1 to the tasks this many seconds before the time limit.
        partition: Partition, or None for the cluster's default.
        account: Account to charge, or None.
        sbatch_options: Extra ``#SBATCH --key[=value]`` lines (``key=value`` or ``key``).
        python: Python interpreter of the job.
        overrides: Extra ``diffusion-pl fit`` arguments, placed last so they win.
    """

    configs: list[str]
    job_name: str
    run_dir: Path
    workdir: Path
    nodes: int = 1
    devices: int = 1
    accelerator: str = "gpu"
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str = "24:00:00"
    signal_seconds: int = 120
    partition: str | None = None
    account: str | None = None
    sbatch_options: list[str] = field(default_factory=list)
    python: str = sys.executable
    overrides: list[str] = field(default_factory=list)

    @property
    def script_path(self) -> Path:
        return self.run_dir / "job.sbatch"

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices


def sbatch_directives(spec: JobSpec) -> list[str]:
    """The ``#SBATCH`` lines: one task per device, preemption signal, requeue, per-run output."""
    options = [f"job-name={spec.job_name}", f"nodes={spec.nodes}", f"ntasks-per-node={spec.devices}",
               f"time={spec.time}", f"signal=USR1@{spec.signal_seconds}", "requeue", "open-mode=append",
               f"output={spec.run_dir / 'slurm-%j.out'}", f"chdir={spec.workdir}"]
    if spec.gpus_per_node > 0:
        options.append(f"gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task is not None:
        options.append(f"cpus-per-task={spec.cpus_per_task}")
    if spec.partition:
        options.append(f"partition={spec.partition}")
    if spec.account:
        options.append(f"account={spec.account}")
    options.extend(option.lstrip("-") for option in spec.sbatch_options)
    return [f"#SBATCH --{option}" for option in options]


def fit_command(spec: JobSpec) -> list[str]:
    """``python -m diffusion_pl fit`` with the configs, the distributed trainer settings and the user's overrides."""
    command = [spec.python, "-m", "diffusion_pl", "fit"]
    for config in spec.configs:
        command += ["--config", config]
    command += [f"--trainer.default_root_dir={spec.run_dir}", f"--trainer.num_nodes={spec.nodes}",
                f"--trainer.devices={spec.devices}", f"--trainer.accelerator={spec.accelerator}"]
    if spec.world_size > 1:
        command.append("--trainer.strategy=ddp")
    return command + spec.overrides + [f"--trainer.callbacks+={PREEMPTION_CALLBACK}"]


def continued_lines(command: list[str]) -> str:
    """Shell-quoted ``command`` with one option (and its separate value, if any) per continued line."""
    groups: list[list[str]] = []
    for part in command:
        if not groups or (part.startswith("-") and groups[-1][0].startswith("-")) or part.startswith("--"):
            groups.append([part])
        else:
            groups[-1].append(part)
    return " \\\n    ".join(shlex.join(group) for group in groups)


def render_script(spec: JobSpec) -> str:
    """The sbatch script. SLURM runs it again from the top after a requeue, with the same run directory; once an
    HPC checkpoint exists there, ``--ckpt_path=hpc`` (last, so it wins over a user's ``--ckpt_path``) resumes it."""
    command = continued_lines(fit_command(spec))
    hpc_glob = shlex.quote(str(spec.run_dir)) + "/hpc_ckpt_*.ckpt"
    lines = ["#!/bin/bash", f"# Written by tools/submit_slurm.py on {datetime.now().isoformat(timespec='seconds')}.",
             *sbatch_directives(spec), "",
             'echo "[$(date -Is)] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}"']
    if spec.cpus_per_task is not None:
        # srun of Slurm >= 22.11 no longer inherits --cpus-per-task from the allocation.
        lines.append("export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK}")
    lines += ["resume=()",
              f"if compgen -G {hpc_glob} > /dev/null; then resume=(--ckpt_path=hpc); fi",
              f"srun --kill-on-bad-exit=1 {command} \\\n    \"${{resume[@]}}\"",
              "status=$?",
              'echo "[$(date -Is)] srun exited with status ${status}"',
              'exit "${status}"', ""]
    return "\n".join(lines)


def write_script(spec: JobSpec) -> Path:
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    spec.script_path.write_text(render_script(spec))
    spec.script_path.chmod(0o755)
    return spec.script_path


def submit(spec: JobSpec) -> str:
    """Write the script and submit it; returns the job id."""
    script = write_script(spec)
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


# ----------------------------------------------------------------------------------------------- command line


def default_job_name(config: str) -> str:
    """``ddpm_fashion_mnist`` for ``configs/ddpm/fashion_mnist.yaml``."""
    path = Path(config)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Unknown arguments and those after '--' go to 'diffusion-pl fit', e.g. --trainer.max_steps=1000.")
    parser.add_argument("--config", action="append", required=True, help="diffusion-pl config (repeatable)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task each")
    parser.add_argument("--devices", type=int, help="tasks (devices) per node; default --gpus-per-node, or 1")
    parser.add_argument("--accelerator", help="Lightning accelerator; default gpu with GPUs, else cpu")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    parser.add_argument("--signal-seconds", type=int, default=120,
                        help="SIGUSR1 this many seconds before the time limit (default 120); SLURM may send it up "
                             "to 60 s earlier")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--job-name", help="default: <config dir>_<config name>")
    parser.add_argument("--run-dir", help="default: runs/<job name>/<date-time>; stays the same across requeues")
    parser.add_argument("--sbatch-option", action="append", default=[], metavar="KEY[=VALUE]",
                        help="extra sbatch option, e.g. --sbatch-option qos=high --sbatch-option exclusive")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the job (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="write and print the script, do not submit")
    return parser


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split at the first ``--``: (arguments of this command, arguments for diffusion-pl fit)."""
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1:]
    return argv, []


def spec_from_args(argv: list[str]) -> tuple[JobSpec, bool]:
    """The job described by the command line, and whether it is a dry run."""
    own, passthrough = split_passthrough(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(own)
    job_name = args.job_name or default_job_name(args.config[0])
    if job_name in RESERVED_JOB_NAMES:
        parser.error(f"job name {job_name!r} makes Lightning ignore SLURM; choose another --job-name")
    devices = args.devices or args.gpus_per_node or 1
    accelerator = args.accelerator or ("gpu" if args.gpus_per_node > 0 else "cpu")
    if args.gpus_per_node > 0 and devices != args.gpus_per_node:
        parser.error(f"--devices {devices} differs from --gpus-per-node {args.gpus_per_node}: one task per GPU")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or Path("runs") / job_name / stamp).resolve()
    if any(char.isspace() for char in str(run_dir) + str(Path.cwd())):
        parser.error(f"#SBATCH paths cannot contain whitespace: {run_dir} (working directory {Path.cwd()})")
    spec = JobSpec(configs=[str(Path(c).resolve()) for c in args.config], job_name=job_name, run_dir=run_dir,
                   workdir=Path.cwd(), nodes=args.nodes, devices=devices, accelerator=accelerator,
                   gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
                   signal_seconds=args.signal_seconds, partition=args.partition, account=args.account,
                   sbatch_options=args.sbatch_option, python=args.python, overrides=unknown + passthrough)
    return spec, args.dry_run


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    spec, dry_run = spec_from_args(sys.argv[1:] if argv is None else argv)
    if dry_run:
        script = write_script(spec)
        print(script.read_text(), end="")
        log.info("dry run: script written to %s, not submitted", script)
        return 0
    try:
        job_id = submit(spec)
    except (RuntimeError, OSError) as error:
        log.error("%s", error)
        return 1
    print(f"job_id={job_id}")
    print(f"run_dir={spec.run_dir}")
    print(f"log={spec.run_dir / f'slurm-{job_id}.out'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
