#!/usr/bin/env python3
"""Start, stop and report a real single-node SLURM cluster on loopback, for tests and for trying the SLURM workflow.

    sudo python3 tools/local_slurm.py start [--cpus N]     # installs slurmctld/slurmd/slurm-client/munge if missing
    eval "$(python3 tools/local_slurm.py env)"             # SLURM_CONF for sbatch, squeue, scontrol, ...
    python3 tools/local_slurm.py status                    # daemons, node and queue
    sudo python3 tools/local_slurm.py stop                 # cancels jobs, stops the daemons it started

The cluster is Debian's slurm 22.05 with munge authentication: one node (``NodeAddr=127.0.0.1``) in one default
partition, no accounting, no cgroups (``proctrack/linuxproc``, ``task/none``), and a 2-second scheduler so that a
requeued job restarts within seconds. Its configuration, state, pid and log files live in one state directory
(default ``/tmp/diffusion_pl_slurm``, or ``$DIFFUSION_PL_SLURM_DIR``); ``/etc/slurm/slurm.conf`` is linked to it
when no other configuration is installed there, so plain ``sbatch`` works too. Starting needs root (slurmd and
munged switch users); ``start`` is idempotent and ``stop`` only stops daemons this tool started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("local_slurm")

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel", "munged")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_PID_FILE = MUNGE_RUN_DIR / "munged.pid"
DEFAULT_STATE_DIR = Path(os.environ.get("DIFFUSION_PL_SLURM_DIR", "/tmp/diffusion_pl_slurm"))
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
    except OSError:
        return False
    return True


def default_node_name() -> str:
    """This machine's short hostname if it resolves, else ``localhost``."""
    host = socket.gethostname().split(".")[0]
    return host if resolves(host) else "localhost"


@dataclass
class Cluster:
    """Where the cluster's files live and what it offers.

    Attributes:
        state_dir: Directory of slurm.conf, daemon state, pid and log files.
        node: Node name (slurmd runs as ``slurmd -N node``); it must resolve to this machine, because Lightning
            takes the DDP main address from the job's node list. Defaults to the short hostname, or
            ``localhost`` when the hostname does not resolve.
        cpus: CPUs the node offers to jobs (may exceed the real count, e.g. to run several jobs at once).
        partition: Name of the single, default partition.
        ctld_port: slurmctld port.
        slurmd_port: slurmd port.
    """

    state_dir: Path = DEFAULT_STATE_DIR
    node: str = field(default_factory=lambda: default_node_name())
    cpus: int = os.cpu_count() or 1
    partition: str = "debug"
    ctld_port: int = 6817
    slurmd_port: int = 6818

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    def pid_file(self, daemon: str) -> Path:
        return self.state_dir / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.state_dir / f"{daemon}.log"

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM clients and daemons of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}


# ----------------------------------------------------------------------------------------------- processes


def find_binary(name: str) -> str | None:
    """Path of ``name`` on PATH or in the sbin directories (which a non-login root shell may lack)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def process_state(pid: int) -> str | None:
    """The one-letter state of process ``pid`` from /proc (``R``, ``S``, ``Z``, ...), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_alive(pid: int | None) -> bool:
    """Whether ``pid`` runs. A killed daemon whose parent does not reap it stays a zombie: that counts as dead."""
    return pid is not None and process_state(pid) not in (None, "Z", "X")


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def terminate(pid: int | None, timeout: float = 10.0) -> None:
    """SIGTERM ``pid``, then SIGKILL if it is still running after ``timeout`` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not is_alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        wait_for(lambda: not is_alive(pid), wait)


def run(cmd: list[str], cluster: Cluster | None = None, check: bool = True, env: dict[str, str] | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a command with captured text output (and this cluster's SLURM_CONF)."""
    if env is None and cluster is not None:
        env = cluster.env
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        message = result.stderr.strip() or result.stdout.strip()
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {message}")
    return result


# ----------------------------------------------------------------------------------------------- packages


def missing_binaries() -> list[str]:
    return [name for name in REQUIRED_BINARIES if find_binary(name) is None]


def ensure_packages() -> None:
    """Install the Debian SLURM and munge packages with apt-get when binaries are missing (root only)."""
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"SLURM is not installed (missing {', '.join(missing)}); as root run "
                           f"'apt-get install {' '.join(PACKAGES)}' or 'sudo python3 tools/local_slurm.py start'")
    log.info("installing %s with apt-get", " ".join(PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], env=env)
    if still := missing_binaries():
        raise RuntimeError(f"apt-get installed {' '.join(PACKAGES)} but {', '.join(still)} is still missing")


# ----------------------------------------------------------------------------------------------- munge


def munge_works() -> bool:
    """Whether a munged answers: a credential encoded and decoded through its socket."""
    munge, unmunge = find_binary("munge"), find_binary("unmunge")
    if munge is None or unmunge is None:
        return False
    encoded = subprocess.run([munge, "-n"], capture_output=True)
    if encoded.returncode != 0:
        return False
    return subprocess.run([unmunge], input=encoded.stdout, capture_output=True).returncode == 0


def ensure_munge_key() -> None:
    """Create the munge key (1 KiB of random bytes, owned by munge, mode 0400) when missing."""
    if MUNGE_KEY.exists():
        return
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    MUNGE_KEY.write_bytes(os.urandom(1024))
    MUNGE_KEY.chmod(0o400)
    shutil.chown(MUNGE_KEY, "munge", "munge")


def start_munge(cluster: Cluster) -> None:
    """Start munged as user munge unless one already answers (no systemd here to do it)."""
    if munge_works():
        return
    ensure_munge_key()
    for directory in (MUNGE_RUN_DIR, Path("/var/lib/munge"), Path("/var/log/munge")):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(directory, "munge", "munge")
    MUNGE_RUN_DIR.chmod(0o755)
    subprocess.run([find_binary("munged"), "--force"], user="munge", group="munge", check=True,
                   capture_output=True)
    if not wait_for(munge_works, 10):
        raise RuntimeError("munged did not start; see /var/log/munge/munged.log")
    (cluster.state_dir / "started_munged").write_text(str(read_pid(MUNGE_PID_FILE) or ""))


def stop_munge(cluster: Cluster) -> None:
    """Stop munged if this tool started it."""
    marker = cluster.state_dir / "started_munged"
    if marker.exists():
        terminate(read_pid(MUNGE_PID_FILE))
        marker.unlink()


# ----------------------------------------------------------------------------------------------- slurm


def node_line(cluster: Cluster) -> str:
    """The node: all its CPUs as cores of one socket, reached on 127.0.0.1."""
    return (f"NodeName={cluster.node} NodeAddr=127.0.0.1 CPUs={cluster.cpus} Sockets=1 "
            f"CoresPerSocket={cluster.cpus} ThreadsPerCore=1 State=UNKNOWN")


def slurm_conf(cluster: Cluster) -> str:
    """slurm.conf of a one-node cluster on 127.0.0.1 that needs neither cgroups nor accounting."""
    host = socket.gethostname().split(".")[0]
    d = cluster.state_dir
    return f"""# Written by tools/local_slurm.py: a single-node SLURM cluster on loopback.
ClusterName=localcluster
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={cluster.ctld_port}
SlurmdPort={cluster.slurmd_port}
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={cluster.pid_file("slurmctld")}
SlurmdPidFile={cluster.pid_file("slurmd")}
SlurmctldLogFile={cluster.log_file("slurmctld")}
SlurmdLogFile={cluster.log_file("slurmd")}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=5
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
{node_line(cluster)}
PartitionName={cluster.partition} Nodes={cluster.node} Default=YES MaxTime=INFINITE State=UP
"""


def daemon_pids(cluster: Cluster) -> dict[str, int | None]:
    """Running slurmctld/slurmd pids of this cluster (None when not running, zombies included)."""
    pids = {name: read_pid(cluster.pid_file(name)) for name in ("slurmctld", "slurmd")}
    return {name: pid if is_alive(pid) else None for name, pid in pids.items()}


def node_state(cluster: Cluster) -> str | None:
    """The node's state as sinfo reports it (``idle``, ``mixed``, ``down*``, ...), or None without a controller."""
    result = run(["sinfo", "-h", "-n", cluster.node, "-o", "%T"], cluster, check=False, timeout=20)
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def is_running(cluster: Cluster) -> bool:
    """Both daemons run and the node accepts jobs."""
    pids = daemon_pids(cluster)
    return all(pids.values()) and (node_state(cluster) or "").rstrip("*") in ("idle", "mixed", "allocated")


def link_system_conf(cluster: Cluster) -> None:
    """Point /etc/slurm/slurm.conf at this cluster's configuration when nothing else is installed there."""
    if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink() or os.geteuid() != 0:
        return
    SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SYSTEM_CONF.symlink_to(cluster.conf)
    (cluster.state_dir / "linked_system_conf").touch()


def unlink_system_conf(cluster: Cluster) -> None:
    marker = cluster.state_dir / "linked_system_conf"
    if marker.exists():
        if SYSTEM_CONF.is_symlink() and Path(os.readlink(SYSTEM_CONF)) == cluster.conf:
            SYSTEM_CONF.unlink()
        marker.unlink()


def start_daemons(cluster: Cluster) -> None:
    """Start slurmctld (with cleared state) and slurmd, then wait until the node is idle."""
    for sub in ("ctld", "spool"):
        (cluster.state_dir / sub).mkdir(parents=True, exist_ok=True)
    pids = daemon_pids(cluster)
    if pids["slurmctld"] is None:
        run([find_binary("slurmctld"), "-c"], cluster)
    if not wait_for(lambda: run(["scontrol", "ping"], cluster, check=False, timeout=20).stdout.count("UP") > 0, 30):
        raise RuntimeError(f"slurmctld did not come up; see {cluster.log_file('slurmctld')}")
    if pids["slurmd"] is None:
        run([find_binary("slurmd"), "-N", cluster.node], cluster)
    if not wait_for(lambda: (node_state(cluster) or "").rstrip("*") in ("idle", "mixed", "allocated"), 60, 1.0):
        raise RuntimeError(f"node {cluster.node} is {node_state(cluster)!r}, not idle; see "
                           f"{cluster.log_file('slurmd')} and {cluster.log_file('slurmctld')}")


def check_node_resolves(node: str) -> None:
    """Jobs find their DDP main address by resolving the node name: it must name this machine."""
    if not resolves(node):
        raise RuntimeError(f"node name {node!r} does not resolve; pass --node with a resolvable name "
                           f"(e.g. localhost) or add '127.0.0.1 {node}' to /etc/hosts")


def start(cluster: Cluster) -> None:
    """Install what is missing, start munged, slurmctld and slurmd; a running cluster is left as it is."""
    if os.geteuid() != 0:
        raise RuntimeError("starting the local SLURM cluster needs root (munged and slurmd switch users); "
                           "run 'sudo python3 tools/local_slurm.py start'")
    check_node_resolves(cluster.node)
    ensure_packages()
    cluster.state_dir.mkdir(parents=True, exist_ok=True)
    if is_running(cluster):
        log.info("local SLURM cluster already running (%s)", cluster.conf)
        return
    cluster.conf.write_text(slurm_conf(cluster))
    (cluster.state_dir / "cluster.json").write_text(json.dumps({k: str(v) for k, v in asdict(cluster).items()}))
    start_munge(cluster)
    start_daemons(cluster)
    link_system_conf(cluster)
    log.info("local SLURM cluster up: node %s with %d CPUs, partition %s (SLURM_CONF=%s)",
             cluster.node, cluster.cpus, cluster.partition, cluster.conf)


def cancel_jobs(cluster: Cluster, timeout: float = 30.0) -> None:
    """Cancel every job and wait until none runs (their slurmstepd processes then exit by themselves)."""
    if daemon_pids(cluster)["slurmctld"] is None:
        return
    jobs = run(["squeue", "-h", "-o", "%i"], cluster, check=False, timeout=20).stdout.split()
    if jobs:
        run(["scancel", *jobs], cluster, check=False, timeout=20)
        wait_for(lambda: not run(["squeue", "-h", "-o", "%i"], cluster, check=False, timeout=20).stdout.strip(),
                 timeout, 1.0)


def stop(cluster: Cluster) -> None:
    """Cancel all jobs, shut slurmctld and slurmd down, and stop munged if this tool started it."""
    cancel_jobs(cluster)
    pids = daemon_pids(cluster)
    if pids["slurmctld"] is not None:
        run(["scontrol", "shutdown"], cluster, check=False, timeout=20)
        wait_for(lambda: not any(daemon_pids(cluster).values()), 15)
    for pid in daemon_pids(cluster).values():
        terminate(pid)
    stop_munge(cluster)
    unlink_system_conf(cluster)
    log.info("local SLURM cluster stopped")


def status(cluster: Cluster) -> dict[str, object]:
    """Daemons (pid and process state), node state and queue of the cluster."""
    report: dict[str, object] = {"conf": str(cluster.conf), "installed": not missing_binaries(),
                                 "munge": munge_works()}
    for name in ("slurmctld", "slurmd"):
        pid = read_pid(cluster.pid_file(name))
        report[name] = {"pid": pid, "state": process_state(pid) if pid else None, "alive": is_alive(pid)}
    if report["slurmctld"]["alive"]:
        report["node"] = node_state(cluster)
        queue = run(["squeue", "-h", "-o", "%i %j %T %M %R"], cluster, check=False, timeout=20).stdout
        report["jobs"] = queue.strip().splitlines()
    report["running"] = is_running(cluster) if report["slurmctld"]["alive"] else False
    return report


# ----------------------------------------------------------------------------------------------- command line


def load_cluster(args: argparse.Namespace) -> Cluster:
    """The cluster described by the command line (``start``) or by the state directory's saved description."""
    cluster = Cluster(state_dir=Path(args.state_dir).resolve())
    saved = cluster.state_dir / "cluster.json"
    if args.command != "start" and saved.exists():
        fields = json.loads(saved.read_text())
        return Cluster(Path(fields["state_dir"]), fields["node"], int(fields["cpus"]), fields["partition"],
                       int(fields["ctld_port"]), int(fields["slurmd_port"]))
    for name in ("node", "cpus", "partition", "ctld_port", "slurmd_port"):
        if getattr(args, name, None) is not None:
            setattr(cluster, name, getattr(args, name))
    return cluster


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("command", choices=("start", "stop", "status", "env"))
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="config, state, pid and log files")
    parser.add_argument("--cpus", type=int, help="CPUs of the node (default: this machine's count)")
    parser.add_argument("--node", help="node name, resolving to this machine (default: the short hostname)")
    parser.add_argument("--partition", help="partition name (default debug)")
    parser.add_argument("--ctld-port", type=int, help="slurmctld port (default 6817)")
    parser.add_argument("--slurmd-port", type=int, help="slurmd port (default 6818)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    cluster = load_cluster(args)
    try:
        if args.command == "start":
            start(cluster)
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.command == "stop":
            stop(cluster)
        elif args.command == "env":
            print(f"export SLURM_CONF={cluster.conf}")
        else:
            report = status(cluster)
            print(json.dumps(report, indent=2))
            return 0 if report["running"] else 3
    except (RuntimeError, subprocess.SubprocessError, OSError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
