"""Checkpoints and runs you can trust (issue 18): integrity, atomic writes, no NaN weights saved, one run per
directory, mismatched checkpoints refused, errors as messages."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from argparse import ArgumentError
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pytest
import torch
from helpers import DDPM_FASHION, REPO, cli_process, run_cli, run_cli_processes, start_cli_process, tiny_args
from PIL import Image

from diffusion_pl.callbacks import VerifiedCheckpointIO
from diffusion_pl.callbacks.run_directory import (
    LOCK_NAME,
    acquire_lock,
    claim_version,
    release_lock,
)
from diffusion_pl.cli.errors import message
from diffusion_pl.core.checkpoint_file import (
    TEMP_PREFIX,
    read_checkpoint,
    write_atomically,
    write_checkpoint,
)
from diffusion_pl.core.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    DataError,
    NonFiniteError,
    RunDirectoryInUseError,
    WriteError,
)
from diffusion_pl.core.owner import Owner
from diffusion_pl.core.spec import spec_of
from diffusion_pl.data import ImageFolder, ImageFormat
from diffusion_pl.data.sources import fashion_mnist
from diffusion_pl.models import DiffusionModule
from diffusion_pl.nets.classifier import EncoderClassifier, load_classifier_net
from diffusion_pl.nets.first_stage import Autoencoder
from diffusion_pl.nets.loading import load_checkpoint

VP = str(REPO / "configs" / "sde" / "vp_fashion_mnist.yaml")
# Checkpoints after every step (three of them and last.ckpt), no grids or validation: fast.
EVERY_STEP = """
trainer:
  max_steps: {steps}
  limit_val_batches: 0{trainer}
  callbacks:
    - class_path: diffusion_pl.callbacks.EMA
      init_args:
        decay: 0.9
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        save_last: true
        every_n_train_steps: 1
        save_top_k: -1
"""


def overlay(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def every_step(root: Path, steps: int = 3, trainer: str = "", text: str = "") -> Path:
    """The every-step checkpoint overlay (``overlays=[...]``, right after the config) of a run under ``root``, in a
    file of its own next to it (``trainer``: more lines of its trainer section, ``text``: more sections)."""
    handle, name = tempfile.mkstemp(suffix=".yaml", prefix=f"{root.name}_", dir=root.parent)
    os.close(handle)
    return overlay(Path(name), EVERY_STEP.format(steps=steps, trainer=trainer) + text)


def checkpoints(root: Path) -> Path:
    return next(root.rglob("last.ckpt")).parent


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step DDPM fit: checkpoints/epoch=0-step={1,2,3}.ckpt and last.ckpt."""
    root = tmp_path_factory.mktemp("ddpm") / "run"
    run_cli("fit", DDPM_FASHION, root=root, overlays=[every_step(root)])
    return root


@pytest.fixture(scope="module")
def vp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vp") / "run"
    run_cli("fit", VP, root=root, overlays=[every_step(root, steps=1)])
    return root


def damaged_copy(source: Path, target: Path, damage: str, offset: int) -> Path:
    """Copy the checkpoint folder and damage its last.ckpt: random bytes at ``offset``, or truncation there."""
    shutil.copytree(source, target)
    last = target / "last.ckpt"
    data = bytearray(last.read_bytes())
    if damage == "bytes":
        rng = np.random.default_rng(offset)
        data[offset:offset + 4096] = rng.integers(0, 256, len(data[offset:offset + 4096]), dtype=np.uint8).tobytes()
    else:
        del data[offset:]
    last.write_bytes(bytes(data))
    return last


# ------------------------------------------------------------------------------------------ integrity on load


def test_checkpoints_are_plain_torch_files_with_a_checksum(ddpm_run: Path) -> None:
    last = checkpoints(ddpm_run) / "last.ckpt"
    assert zipfile.ZipFile(last).comment.startswith(b"diffusion_pl sha256 ")
    assert torch.load(last, weights_only=True)["global_step"] == 3  # still loads without diffusion_pl
    assert read_checkpoint(last)["global_step"] == 3


@pytest.mark.parametrize("damage", ["bytes", "truncate"])
@pytest.mark.parametrize("where", [0.0, 0.001, 0.3, 0.5, 0.9, 0.99995, 1.0])
def test_damaged_checkpoint_is_refused_by_every_loader(ddpm_run: Path, tmp_path: Path, damage: str,
                                                        where: float) -> None:
    """Random bytes or truncation anywhere: the Trainer's loader, the nets loader (guiding classifier, FID
    extractor) and load_from_checkpoint refuse the file, name it and point at the previous checkpoint."""
    size = (checkpoints(ddpm_run) / "last.ckpt").stat().st_size
    offset = min(int(where * size), size - (1 if damage == "truncate" else 64))
    last = damaged_copy(checkpoints(ddpm_run), tmp_path / "ckpts", damage, offset)
    loaders = [lambda: VerifiedCheckpointIO().load_checkpoint(last), lambda: load_checkpoint(last),
               lambda: DiffusionModule.load_from_checkpoint(last)]
    for load in loaders:
        with pytest.raises(CheckpointCorruptError) as info:
            load()
        text = str(info.value)
        assert f"checkpoint {last} is damaged" in text
        assert f"--ckpt_path {last.parent / 'epoch=0-step=3.ckpt'}" in text  # the newest other one
        assert "epoch=0-step=1.ckpt" in text and len(text.splitlines()) <= 3


def test_a_good_checkpoint_loads_everywhere(ddpm_run: Path) -> None:
    last = checkpoints(ddpm_run) / "last.ckpt"
    model = DiffusionModule.load_from_checkpoint(last)
    assert torch.equal(model.state_dict()["denoiser.net.out.2.weight"],
                       load_checkpoint(last)["state_dict"]["denoiser.net.out.2.weight"])


# ------------------------------------------------------------------------------------------ atomic writes


def _save_forever(directory: Path, payloads: list[torch.Tensor], tmpdir: Path) -> None:
    """A forked child: save ``last.ckpt`` over and over (step k holds payloads[k % 4]) until killed."""
    try:
        os.environ["TMPDIR"] = str(tmpdir)
        tempfile.tempdir = None
        io, step = VerifiedCheckpointIO(), 0
        while True:
            step += 1
            io.save_checkpoint({"step": step, "w": payloads[step % len(payloads)]}, directory / "last.ckpt")
    finally:
        os._exit(0)


def test_damaged_checkpoints_hint_names_only_checkpoints_that_verify(tmp_path: Path) -> None:
    """Of a folder's other checkpoints, the damaged one is not offered for resuming; the good one is."""
    for name in ("good.ckpt", "also_damaged.ckpt", "last.ckpt"):
        write_checkpoint({"step": name}, tmp_path / name)
        time.sleep(0.01)  # distinct modification times: newest first
    for name in ("also_damaged.ckpt", "last.ckpt"):
        data = bytearray((tmp_path / name).read_bytes())
        data[100:104] = b"\xff\xfe\xfd\xfc"
        (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError) as info:
        read_checkpoint(tmp_path / "last.ckpt")
    assert f"--ckpt_path {tmp_path / 'good.ckpt'}" in str(info.value) and "also_damaged" not in str(info.value)


def test_loading_a_checkpoint_removes_temp_files_of_dead_writers_beside_it(tmp_path: Path) -> None:
    """A run resumed into a new version never saves into the old checkpoint folder again: the resume itself removes
    what killed writers left there (a live writer's file stays)."""
    write_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f"{TEMP_PREFIX}{dead.stdout.strip()}.abcd1234.{host}"
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}.abcd1234.{host}"
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    assert VerifiedCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")["step"] == 1
    assert not stale.exists() and live.exists()


def test_kill_during_saves_never_breaks_last_ckpt(tmp_path: Path) -> None:
    """kill -9 at 40 random moments of repeated 2 MB saves, with $TMPDIR on another filesystem (/dev/shm, a tmpfs):
    last.ckpt always verifies and holds one whole save; the killed writes' temp files are removed by the next save
    and nothing lands in $TMPDIR."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    shm = Path("/dev/shm")
    tmpdir = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else None))
    try:
        payloads = [torch.full((500_000,), float(k)) for k in range(4)]
        rng, loaded, steps = random.Random(0), 0, set()
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                _save_forever(directory, payloads, tmpdir)
            time.sleep(rng.uniform(0.005, 0.08))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if (directory / "last.ckpt").exists():
                checkpoint = read_checkpoint(directory / "last.ckpt")
                assert torch.equal(checkpoint["w"], payloads[checkpoint["step"] % 4])
                loaded += 1
                steps.add(checkpoint["step"])
        assert loaded >= 35 and len(steps) > 1
        assert not list(tmpdir.iterdir())
        assert set(p.name for p in directory.iterdir() if not p.name.startswith(TEMP_PREFIX)) == {"last.ckpt"}
        VerifiedCheckpointIO().save_checkpoint({"step": 0, "w": payloads[0]}, directory / "last.ckpt")
        assert [p.name for p in directory.iterdir()] == ["last.ckpt"]
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    """A full disk mid-write: the old last.ckpt is untouched, no temp file stays, the error says what to do."""
    path = tmp_path / "last.ckpt"
    write_checkpoint({"step": 1}, path)

    def chunks():
        yield b"partial"
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match="No space left on device.*previous file there is unchanged"):
        write_atomically(path, chunks())
    assert read_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ------------------------------------------------------------------------------------------ no NaN weights saved


def test_diverging_run_never_writes_non_finite_weights(tmp_path: Path) -> None:
    """lr = 1e4, checkpoints every step, loss checked every 25 steps: the run stops with the NaN error at the first
    checkpoint whose weights (raw or EMA) are not finite, and every written checkpoint is finite."""
    diverge = ("model:\n  init_args:\n    lr_scheduler: null\n    optimizer:\n      class_path: torch.optim.Adam\n"
               "      init_args:\n        lr: 10000.0\n")
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint with non-finite weights.*lower the "
                                             "learning rate"):
        run_cli("fit", DDPM_FASHION, root=tmp_path / "run", overlays=[every_step(
            tmp_path / "run", steps=30, text=diverge, trainer="\n  gradient_clip_val: null\n  log_every_n_steps: 25")])
    written = sorted((tmp_path / "run").rglob("*.ckpt"))
    assert written and any(p.name == "last.ckpt" for p in written)
    for path in written:
        checkpoint = read_checkpoint(path)
        for entry in ("state_dict", "current_model_state"):
            assert all(torch.isfinite(t).all() for t in checkpoint[entry].values() if t.is_floating_point()), path


# ------------------------------------------------------------------------------------------ one run, one directory


def test_versions_are_claimed_atomically(tmp_path: Path) -> None:
    barrier, claimed = threading.Barrier(8), []

    def claim() -> None:
        barrier.wait()
        claimed.append(claim_version(tmp_path))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == list(range(8))


@pytest.mark.slow
def test_two_fits_started_together_get_two_versions(tmp_path: Path) -> None:
    """Each version folder holds one run's files: its config (max_steps), its checkpoint, one event file."""
    (tmp_path / "shared").mkdir()
    runs = [start_cli_process("fit", *tiny_args(tmp_path / "shared",
                                                overlays=[every_step(tmp_path / "shared", steps=steps)]))
            for steps in (2, 4)]
    for process in runs:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    versions = sorted((tmp_path / "shared" / "lightning_logs").iterdir())
    assert [v.name for v in versions] == ["version_0", "version_1"]
    steps = set()
    for version in versions:
        max_steps = int(next(line.split(":")[1] for line in (version / "config.yaml").read_text().splitlines()
                             if line.strip().startswith("max_steps:")))
        assert read_checkpoint(version / "checkpoints" / "last.ckpt")["global_step"] == max_steps
        assert len(list(version.glob("events.out.tfevents.*"))) == 1 and (version / "hparams.yaml").is_file()
        assert not (version / LOCK_NAME).exists()
        steps.add(max_steps)
    assert steps == {2, 4}


def _lock_record(directory: Path, owner: Owner, job_id: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(json.dumps({**owner.as_dict(), "slurm_job_id": job_id,
                                                   "started": "2024-01-01 00:00:00", "command": "diffusion-pl fit"}))


def test_run_lock_refuses_live_runs_and_takes_over_stale_ones(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock_record(tmp_path / "a", Owner(socket.gethostname(), live.pid), job_id="77")
        with pytest.raises(RunDirectoryInUseError, match=f"in use by another run: pid {live.pid}"):
            acquire_lock(tmp_path / "a")
        with pytest.raises(RunDirectoryInUseError):  # a live process of the same SLURM job (another job step)
            acquire_lock(tmp_path / "a", job_id="77")
    finally:
        live.kill()
        live.wait()
    lock = acquire_lock(tmp_path / "a")  # its owner has ended: taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_lock(lock)
    assert not lock.exists()
    _lock_record(tmp_path / "b", Owner("another-node", 1234), job_id="77")
    with pytest.raises(RunDirectoryInUseError, match=f"delete {tmp_path / 'b' / LOCK_NAME}"):
        acquire_lock(tmp_path / "b")  # another host: liveness unknown
    assert acquire_lock(tmp_path / "b", job_id="77").is_file()  # a requeued SLURM job takes over its own lock


def test_fit_into_a_live_runs_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM names the version after the job: a live run's lock there refuses the fit; a restart of the same job
    (the requeue after preemption, possibly on another node) takes its old lock over and runs."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "diffusion")
    version = tmp_path / "run" / "lightning_logs" / "version_4242"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock_record(version, Owner(socket.gethostname(), live.pid))
        with pytest.raises(RunDirectoryInUseError, match=f"pid {live.pid}"):
            run_cli("fit", DDPM_FASHION, root=tmp_path / "run", overlays=[every_step(tmp_path / "run", steps=1)])
    finally:
        live.kill()
        live.wait()
    _lock_record(version, Owner("node-that-was-preempted", 99), job_id="4242")
    run_cli("fit", DDPM_FASHION, root=tmp_path / "run", overlays=[every_step(tmp_path / "run", steps=1)])
    assert (version / "checkpoints" / "last.ckpt").is_file() and not (version / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------ mismatches refused


def test_ddpm_checkpoint_under_the_sde_config_and_the_reverse(ddpm_run: Path, vp_run: Path, tmp_path: Path) -> None:
    for config, run, stored, configured in ((VP, ddpm_run, "DiscreteProcess(", "VPSDE("),
                                            (DDPM_FASHION, vp_run, "VPSDE(", "DiscreteProcess(")):
        ckpt = checkpoints(run) / "last.ckpt"
        with pytest.raises(CheckpointMismatchError) as info:
            run_cli("predict", config, "--data.init_args.predict.num=2", root=tmp_path / "predict",
                    ckpt_path=ckpt)
        text = str(info.value)
        assert f"process: {stored}" in text and f"in the checkpoint, {configured}" in text and "in the config" in text
        assert "net" not in text.split("\n")[1] and len(text.splitlines()) == 3
        assert f"--config {run / 'lightning_logs' / 'version_0' / 'config.yaml'}" in text


def test_width_mismatch_is_one_line_not_hundreds(ddpm_run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"net\.base_channels: 16 in the checkpoint, 32 in the config"):
        run_cli("fit", DDPM_FASHION, "--model.init_args.net.init_args.base_channels=32", "--trainer.max_steps=5",
                root=tmp_path, ckpt_path=checkpoints(ddpm_run) / "last.ckpt")


def test_sampling_options_may_differ_from_the_checkpoint(ddpm_run: Path, tmp_path: Path) -> None:
    options = ["--model.init_args.sampler=DDPM", "--model.init_args.sampler.steps=5",
               "--data.init_args.predict.num=2"]
    cli = run_cli("predict", DDPM_FASHION, *options, root=tmp_path, ckpt_path=checkpoints(ddpm_run) / "last.ckpt")
    assert cli.model.sampler.steps == 5


# ------------------------------------------------------------------------------------------ data and config errors


def _image_folder(root: Path) -> Path:
    """Two classes of three noise images; one PNG cut in half ("image file is truncated")."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    broken = root / "b" / "1.png"
    broken.write_bytes(broken.read_bytes()[:1500])
    return broken


def test_undecodable_image_is_named(tmp_path: Path) -> None:
    broken = _image_folder(tmp_path)
    with pytest.raises(DataError, match=f"cannot decode image {broken} .*truncated"):
        ImageFolder(str(tmp_path)).load("train", ImageFormat(image_size=8, channels=1))


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    bad = overlay(tmp_path / "bad.yaml", "trainer:\n  max_steps: [1\n  foo: 2\n")
    with pytest.raises(ConfigError, match=f"config file {bad} is not valid YAML: .* at line 3, column 6"):
        run_cli("fit", DDPM_FASHION, overlays=[bad], tiny=False)


def test_missing_explicit_fashion_mnist_root_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    system = tmp_path / "system"
    system.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (system / name).touch()
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", system)
    with caplog.at_level(logging.WARNING, logger="diffusion_pl.data.sources.fashion_mnist"):
        images, _ = fashion_mnist.resolve_fashion_mnist("train", root=str(tmp_path / "typo"), download=False)
    assert images.parent == system
    assert f"not found under the given root={str(tmp_path / 'typo')!r}" in caplog.text and str(system) in caplog.text


# ------------------------------------------------------------------------------------------ the command line


def poisoned_copy(run: Path, target: Path) -> tuple[Path, str]:
    """A copy of the run's last.ckpt with one NaN in one EMA weight, rewritten with a valid checksum (what a diverged
    run of older code, or another tool, leaves); the poisoned tensor's entry/name."""
    checkpoint = read_checkpoint(checkpoints(run) / "last.ckpt")
    name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    checkpoint["state_dict"][name].view(-1)[1] = float("nan")
    target.mkdir(parents=True, exist_ok=True)
    write_checkpoint(checkpoint, target / "nan.ckpt")
    return target / "nan.ckpt", f"state_dict/{name}"


def test_checkpoint_with_non_finite_weights_is_refused_when_loaded(ddpm_run: Path, tmp_path: Path) -> None:
    """Every way in (the file reader behind --ckpt_path and the part loaders, load_from_checkpoint) refuses it, naming
    the tensor and how many values are bad, instead of sampling blank images."""
    poisoned, name = poisoned_copy(ddpm_run, tmp_path)
    for load in (read_checkpoint, load_checkpoint, DiffusionModule.load_from_checkpoint):
        with pytest.raises(CheckpointError, match=f"non-finite weights \\(1 of \\d+ values in 1 tensors: {name}\\)"):
            load(poisoned)


def classifier_checkpoint(path: Path, *, lightning_cli: bool) -> Path:
    """A tiny ClassifierModule checkpoint as an older diffusion_pl wrote it (no module record: its net tells the
    kind), with LightningCLI's ``_instantiator``/``_class_path`` entries or without (built in Python)."""
    net = EncoderClassifier(image_size=8, in_channels=1, num_classes=10, base_channels=8, channel_mult=(1,),
                            num_res_blocks=1, attention_resolutions=())
    hparams: dict[str, Any] = {"net": spec_of(net), "image_size": 8, "channels": 1}
    if lightning_cli:
        hparams.update(_instantiator="lightning.pytorch.cli.instantiate_module",
                       _class_path="diffusion_pl.models.classifier.ClassifierModule")
    write_checkpoint({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": hparams,
                      "pytorch-lightning_version": lightning.__version__, "global_step": 1, "epoch": 0}, path)
    return path


@pytest.mark.parametrize("lightning_cli", [True, False])
def test_a_checkpoint_of_another_kind_says_which_kind_in_one_line(ddpm_run: Path, tmp_path: Path,
                                                                  lightning_cli: bool) -> None:
    """A classifier where a diffusion model is expected (a cascade stage), and a diffusion model where a classifier
    or an autoencoder is: one line naming both kinds, not Lightning's "blocked" or 3,900 characters of keys."""
    classifier = classifier_checkpoint(tmp_path / "classifier.ckpt", lightning_cli=lightning_cli)
    with pytest.raises(CheckpointMismatchError) as info:
        DiffusionModule.load_from_checkpoint(classifier)
    assert str(info.value) == (f"{classifier}: wrong kind of checkpoint: written by ClassifierModule, expected: "
                               "DiffusionModule checkpoint")
    ddpm = checkpoints(ddpm_run) / "last.ckpt"
    for load, expected in ((load_classifier_net, "ClassifierModule checkpoint (net EncoderClassifier)"),
                           (Autoencoder, "AutoencoderModule checkpoint")):
        with pytest.raises(CheckpointMismatchError) as info:
            load(str(ddpm))
        assert str(info.value) == f"{ddpm}: wrong kind of checkpoint: written by DiffusionModule, expected: {expected}"


@contextlib.contextmanager
def small_file_system(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (e.g. ``ro`` or ``size=32k``), unmounted afterwards; skips without root."""
    path.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small file system needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_folder_and_full_disk_are_one_message_and_leave_nothing_partial(ddpm_run: Path,
                                                                                tmp_path: Path) -> None:
    """fit into a read-only file system, and predict onto one that fills up while the samples are written: exit 2,
    one error line saying what could not be written; no partial prediction file, nor the refused run's folder, stays."""
    good = checkpoints(ddpm_run) / "last.ckpt"
    with small_file_system(tmp_path / "ro", "ro") as read_only, small_file_system(tmp_path / "full", "size=32k") as full:
        fit, predict = run_cli_processes([
            ["fit", *tiny_args(read_only / "run", "--trainer.max_steps=1")],
            ["predict", *tiny_args(full / "run", "--data.init_args.predict.num=600"), f"--ckpt_path={good}"]])
        leftovers = sorted(str(p.relative_to(full)) for p in full.rglob("*") if p.is_file())
    assert fit.returncode == 2 and "error: cannot write" in fit.stderr and "Read-only file system" in fit.stderr, \
        fit.stderr[-2000:]
    assert predict.returncode == 2, predict.stderr[-2000:]
    assert "error: could not write predictions" in predict.stderr and "No space left on device" in predict.stderr, \
        predict.stderr[-2000:]
    assert not leftovers, f"the refused runs left {leftovers}"
    assert "Traceback" not in fit.stderr + predict.stderr


def _bad_inputs(tmp_path: Path, ddpm_run: Path) -> dict[str, tuple[str, list[str], str]]:
    """name -> (config, subcommand and arguments, a phrase of the message)."""
    folder = tmp_path / "images"
    broken = _image_folder(folder)
    bad_yaml = overlay(tmp_path / "bad.yaml", "trainer:\n  max_steps: [1\n  foo: 2\n")
    old_data = overlay(tmp_path / "old_data.yaml", "data:\n  init_args:\n    source: image_folder\n    root: data/images\n"
                       "    lazy_decode: true\n    image_size: 16\n")
    corrupt = damaged_copy(checkpoints(ddpm_run), tmp_path / "corrupt", "bytes", 100_000)
    good = checkpoints(ddpm_run) / "last.ckpt"
    poisoned, _ = poisoned_copy(ddpm_run, tmp_path / "poisoned")
    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(random.Random(0).randbytes(5000))
    classifier = classifier_checkpoint(tmp_path / "classifier.ckpt", lightning_cli=True)
    large = tmp_path / "large_images"
    large.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(large / f"{i}.png")
    guided_by_ddpm = (f"--model.init_args.guidance=[{{class_path: diffusion_pl.guidance.Classifier, init_args: "
                      f"{{checkpoint: {good}}}}}]")
    fit, predict = ["fit", "--trainer.max_steps=1"], ["predict", "--data.init_args.predict.num=2"]
    return {
        "unknown source": (DDPM_FASHION, [*fit, "--data.init_args.source=imagenet"],
                           "Expected a dot import path string: imagenet"),
        "config of the old data module": (DDPM_FASHION, [*fit, "--config", str(old_data)],
                                          "source: {class_path: diffusion_pl.data.ImageFolder, init_args: {root: "
                                          "data/images, lazy: true}}"),
        "old data arguments": (DDPM_FASHION, ["predict", "--data.init_args.predict_num_samples=2",
                                              "--data.init_args.predict_from=test"],
                               "Write\n--data.init_args.predict=diffusion_pl.data.SplitImages "
                               "--data.init_args.predict.split=test --data.init_args.predict.num=2"),
        "image_size 33": (DDPM_FASHION, [*fit, "--data.init_args.image_format.image_size=33"],
                          "image_size=33 is not divisible"),
        "batch size 0": (DDPM_FASHION, [*fit, "--data.init_args.batch_size=0"], "batch sizes must be >= 1"),
        "sampler not fitting the process": (VP, [*fit, "--model.init_args.sampler=DDPM"],
                                            "DDPM samples a DiscreteProcess, got VPSDE"),
        "truncated PNG": (DDPM_FASHION,
                          [*fit, "--data.init_args.source=diffusion_pl.data.ImageFolder",
                           f"--data.init_args.source.root={folder}"],
                          f"cannot decode image {broken}"),
        "YAML syntax error": (DDPM_FASHION, [*fit, "--config", str(bad_yaml)],
                              f"config file {bad_yaml} is not valid YAML"),
        "predict num=0": (DDPM_FASHION, ["predict", "--data.init_args.predict.num=0"], "Seeds num must be >= 1"),
        "corrupted checkpoint": (DDPM_FASHION, [*predict, f"--ckpt_path={corrupt}"],
                                 f"checkpoint {corrupt} is damaged"),
        "mismatched checkpoint": (VP, [*predict, f"--ckpt_path={good}"],
                                  "process: DiscreteProcess(num_steps=100, schedule='cosine') in the checkpoint, "
                                  "VPSDE() in the config"),
        "checkpoint with a NaN weight": (DDPM_FASHION, [*predict, f"--ckpt_path={poisoned}"],
                                         f"checkpoint {poisoned} holds non-finite weights (1 of"),
        "random bytes as checkpoint": (DDPM_FASHION, [*predict, f"--ckpt_path={random_bytes}"],
                                       f"checkpoint {random_bytes} is damaged: it does not load: it is truncated, "
                                       "damaged or not a checkpoint at all"),
        "classifier as the model": (DDPM_FASHION, [*predict, f"--ckpt_path={classifier}"],
                                    f"{classifier}: wrong kind of checkpoint: written by ClassifierModule, expected: "
                                    "DiffusionModule checkpoint"),
        "diffusion model as the guiding classifier": (DDPM_FASHION, [*predict, guided_by_ddpm, f"--ckpt_path={good}"],
                                                      f"{good}: wrong kind of checkpoint: written by DiffusionModule"),
        "predict images of another size": (DDPM_FASHION, [
            *predict, "--model.init_args.predict_task=diffusion_pl.pipelines.Inpaint",
            "--data.init_args.predict=diffusion_pl.data.ImageFiles", f"--data.init_args.predict.path={large}",
            f"--ckpt_path={good}"],
            "UNet expected 8x8 inputs (image_size=8), got 16x16; give images of that size"),
        "missing checkpoint": (DDPM_FASHION, [*predict, f"--ckpt_path={tmp_path / 'nope.ckpt'}"],
                               "nope.ckpt not found"),
    }


def test_bad_input_exits_2_with_one_screen_message(ddpm_run: Path, tmp_path: Path) -> None:
    """Each bad input, run as ``python -m diffusion_pl`` (a process of its own): exit status 2, no traceback, the
    framework's message and its fix; the whole output fits a screen."""
    cases = _bad_inputs(tmp_path, ddpm_run)
    commands = [[subcommand, *tiny_args(tmp_path / "runs" / name.replace(" ", "_"), *args, config=config)]
                for name, (config, (subcommand, *args), _) in cases.items()]
    for (name, (_, _, phrase)), result in zip(cases.items(), run_cli_processes(commands)):
        output = result.stdout + result.stderr
        message = result.stderr[result.stderr.find("error: "):] if "error: " in result.stderr else ""
        assert result.returncode == 2, f"{name}: exit {result.returncode}\n{output[-3000:]}"
        assert "Traceback" not in output and phrase in message, f"{name}:\n{output[-3000:]}"
        assert len(message.splitlines()) <= 8 and len(output.splitlines()) <= 25, f"{name}:\n{output}"
    leftovers = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "runs").rglob("version_*"))
    assert not leftovers, f"refused runs left version folders: {leftovers}"


def test_messages_drop_wrappers_dumps_and_worker_tracebacks() -> None:
    wrapped = ArgumentError(None, 'Parser key "model":\n  Does not validate against any of the Union subtypes\n  '
                                  "Subtypes: [<class 'LightningModule'>]\n  Errors:\n    - Option 'base_chanels' is not "
                                  "accepted\n  Given value type: <class 'Namespace'>\n  Given value: Namespace(...)")
    text = message(wrapped)
    assert "base_chanels" in text and "Namespace" not in text and "Subtypes" not in text
    from_worker = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                            "last):\n  File \"x.py\", line 1, in f\ndiffusion_pl.core.errors.DataError: cannot decode x.png")
    assert message(from_worker).startswith("error: cannot decode x.png\n")


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = cli_process("fit", *tiny_args(tmp_path, "--data.init_args.batch_size=0"), "--debug", check=False)
    assert result.returncode == 1 and "Traceback" in result.stderr and "batch sizes must be >= 1" in result.stderr
