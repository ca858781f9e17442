"""Streaming source (LitData): a folder converted by tools/convert_dataset.py streams what the in-memory source holds,
two gloo processes each stream a disjoint half of an epoch, a resumed fit continues with the next unseen batch, and a
directory that is not a converted dataset is a clear error."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ddp_probe import DDPM_FASHION, TINY_OVERRIDES, read_steps, write_callbacks_config
from helpers import REPO, cli_process, fit_bare, run_cli, start_cli_process
from PIL import Image

from diffusion_pl.core.errors import DataError, UserError
from diffusion_pl.data import Digits, ImageDataModule, ImageFolder, ImageFormat, Streaming
from diffusion_pl.data.convert import convert_source
from diffusion_pl.data.streaming import dataset as streaming_dataset
from diffusion_pl.data.streaming import metadata as streaming_metadata
from diffusion_pl.data.streaming.dataset import StreamingImageDataset
from diffusion_pl.data.streaming.metadata import CHECKSUM_FILE, NotOptimizedError

PER_CLASS = 25  # 2 classes: 50 images, 2 held out for validation, 48 to train on
FORMAT = ImageFormat(image_size=8, channels=3, resize_mode="resize")


def make_folder(root: Path) -> Path:
    """Two classes of distinct images of varied sizes (landscape and portrait, so resize + crop matter), some with
    caption files."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            size = (12, 9) if i % 2 else (10, 16)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"{i:02d}.png")
            if i % 5 == 0:
                (root / name / f"{i:02d}.txt").write_text(f"{name} number {i}\n")
    return root


def convert_with_tool(folder: Path, output: Path, storage: str) -> None:
    command = [sys.executable, str(REPO / "tools" / "convert_dataset.py"), "--source", "diffusion_pl.data.ImageFolder",
               "--source.root", str(folder), "--source.lazy", "true", "--output", str(output),
               "--image_format.image_size", "8", "--image_format.resize_mode", "resize", "--storage", storage,
               "--val_fraction", "0.04"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def converted(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("converted") / "png"
    convert_with_tool(folder, output, "png")
    return output


def items(dataset: torch.utils.data.Dataset) -> list[tuple[int, str, bytes]]:
    """(label, caption, uint8 image bytes) of every item, sorted: the split as a multiset."""
    found = []
    for i in range(len(dataset)):
        item = dataset[i]
        pixels = ((item["image"] + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()
        found.append((int(item["label"]), item["caption"], pixels))
    return sorted(found)


def fingerprint(images: torch.Tensor) -> list[bytes]:
    """One key per image of a batch: its exact pixel values."""
    return [image.numpy().tobytes() for image in images]


# ------------------------------------------------------------------------------------------------ same data


@pytest.mark.parametrize("storage", ["png", "raw"])
def test_converted_folder_streams_the_in_memory_images_labels_and_captions(
        folder: Path, converted: Path, tmp_path: Path, storage: str) -> None:
    if storage == "png":
        root = converted
    else:
        root = tmp_path / "raw"
        convert_source(ImageFolder(str(folder)), str(root), FORMAT, storage="raw", val_fraction=0.04)
    memory = ImageDataModule(ImageFolder(str(folder)), FORMAT, val_fraction=0.04)
    streamed = ImageDataModule(Streaming(str(root)), FORMAT, val_fraction=0.04, batch_size=4)
    assert streamed.class_names == memory.class_names == ["cat", "dog"]
    memory.setup("fit")
    streamed.setup("fit")
    assert (len(streamed.train_set), len(streamed.val_set)) == (48, 2)
    assert items(streamed.train_set) == items(memory.train_set)
    assert items(streamed.val_set) == items(memory.val_set)  # the same hold-out
    captions = {caption for _, caption, _ in items(memory.train_set) + items(memory.val_set)}
    assert {f"cat number {i}" for i in range(0, PER_CLASS, 5)} <= captions and "a photo of a dog" in captions

    batches = list(streamed.train_dataloader())  # one shuffled epoch of batch dicts covers the train split
    assert len(batches) == 48 // 4 and batches[0]["image"].shape == (4, 3, 8, 8)
    assert batches[0]["label"].dtype == torch.int64 and len(batches[0]["caption"]) == 4
    images = ((torch.cat([batch["image"] for batch in batches]) + 1) * 127.5).round().to(torch.uint8)
    assert sorted(fingerprint(images)) == sorted(fingerprint(memory.train_set.data.images))


def test_whole_split_in_memory_for_reference_statistics(converted: Path, folder: Path) -> None:
    streamed = ImageDataModule(Streaming(str(converted)), FORMAT).load("train")
    memory = ImageDataModule(ImageFolder(str(folder)), FORMAT, val_fraction=0.04)
    memory.setup("fit")
    assert sorted(fingerprint(streamed.images)) == sorted(fingerprint(memory.train_set.data.images))


def test_an_array_source_converts_with_its_test_split(tmp_path: Path) -> None:
    """digits (an in-memory array source like Fashion-MNIST and CIFAR-10): raw storage is exact, JPEG close."""
    gray8 = ImageFormat(image_size=8, channels=1, resize_mode="resize")
    memory = ImageDataModule(Digits(), gray8)
    memory.setup(None)
    for storage in ("raw", "jpeg"):
        convert_source(Digits(), str(tmp_path / storage), gray8, storage=storage)
        streamed = ImageDataModule(Streaming(str(tmp_path / storage)), gray8)
        streamed.setup(None)
        assert streamed.class_names == memory.class_names
        for split in ("train_set", "val_set", "test_set"):
            ours, theirs = items(getattr(streamed, split)), items(getattr(memory, split))
            assert [(label, caption) for label, caption, _ in ours] == [(label, caption) for label, caption, _ in theirs]
            if storage == "raw":
                assert ours == theirs
        test = torch.stack([streamed.test_set[i]["image"] for i in range(len(streamed.test_set))])
        reference = torch.stack([memory.test_set[i]["image"] for i in range(len(memory.test_set))])
        assert len(test) == 297 and (test - reference).abs().mean() < (0.0 if storage == "raw" else 0.1) + 1e-6


def test_streaming_overlay_trains_through_the_command_line(converted: Path, tmp_path: Path) -> None:
    cli = run_cli("fit", DDPM_FASHION, "--config", str(REPO / "overlays" / "streaming.yaml"),
                  f"--data.init_args.source.url_or_dir={converted}", "--data.init_args.num_workers=0",
                  "--data.init_args.batch_size=4", "--trainer.fast_dev_run=true", root=tmp_path)
    assert isinstance(cli.datamodule.source, Streaming) and cli.datamodule.class_names == ["cat", "dog"]
    assert cli.trainer.global_step == 1 and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


# ------------------------------------------------------------------------------------------------ DDP shards


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stream_one_epoch(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """One gloo rank: stream one training epoch and save the fingerprints of what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        dm = ImageDataModule(Streaming(root), FORMAT, batch_size=4)
        dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, training=True)
        dm.setup("fit")
        seen = [key for batch in dm.train_dataloader() for key in fingerprint(batch["image"])]
        whole = fingerprint(dm.load("train").images)  # the whole split (FID reference statistics), not the shard
        torch.save((seen, whole), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_stream_disjoint_halves_of_an_epoch(converted: Path, tmp_path: Path) -> None:
    mp.start_processes(_stream_one_epoch, args=(2, _free_port(), str(converted), str(tmp_path)), nprocs=2,
                       start_method="fork")
    (rank0, whole0), (rank1, whole1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(rank0) == len(rank1) == 24
    assert not set(rank0) & set(rank1)
    single = ImageDataModule(Streaming(str(converted)), FORMAT, batch_size=4)
    single.setup("fit")
    everything = [key for batch in single.train_dataloader() for key in fingerprint(batch["image"])]
    assert sorted(rank0 + rank1) == sorted(everything) and len(everything) == 48
    assert sorted(whole0) == sorted(whole1) == sorted(fingerprint(single.load("train").images))
    assert len(set(whole0)) == 48


# ------------------------------------------------------------------------------------------------ exact resume


class Recorder(L.LightningModule):
    """Records the images of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[bytes]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(fingerprint(batch["image"]))
        return self.weight * batch["image"].mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_the_next_unseen_batch(converted: Path, tmp_path: Path, workers: int) -> None:
    def data() -> ImageDataModule:
        return ImageDataModule(Streaming(str(converted)), FORMAT, batch_size=4, num_workers=workers)

    dm = data()
    full = Recorder()
    fit_bare(full, dm, tmp_path / "full", every_n_steps=5, limit_val_batches=0)
    assert len(full.seen) == 2 * 12 and full.seen[:12] != full.seen[12:]  # two epochs, reshuffled
    for step in (5, 15):  # mid-epoch 0 and mid-epoch 1
        ckpt = next((tmp_path / "full").glob(f"*step={step}.ckpt"))
        dm = data()
        resumed = Recorder()
        fit_bare(resumed, dm, tmp_path / f"resume{step}", every_n_steps=5, ckpt_path=str(ckpt), limit_val_batches=0)
        assert resumed.seen == full.seen[step:]


@pytest.mark.slow
def test_killed_run_resumes_with_the_next_unseen_batch(converted: Path, tmp_path: Path) -> None:
    """A real SIGKILL mid-epoch; the run resumed from its last checkpoint streams the rest of that epoch, then the
    next epoch, in the order of two uninterrupted epochs."""
    callbacks = write_callbacks_config(tmp_path / "callbacks.yaml", every_n_steps=5)
    # ``python -m diffusion_pl fit`` of a tiny net on the converted data, the probe recording every step.
    fit = ["fit", "--config", DDPM_FASHION, "--config", str(callbacks), *TINY_OVERRIDES,
           "--data.init_args.source=diffusion_pl.data.Streaming", f"--data.init_args.source.url_or_dir={converted}",
           "--data.init_args.image_format.image_size=8", "--data.init_args.image_format.channels=3",
           "--data.init_args.batch_size=4", "--trainer.limit_val_batches=0"]
    killed = start_cli_process(*fit, f"--trainer.default_root_dir={tmp_path / 'killed'}", "--trainer.max_steps=10000",
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "killed").rglob("*step=5.ckpt")) and killed.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint at step 5"
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate()
    ckpt = next((tmp_path / "killed").rglob("*step=5.ckpt"))
    cli_process(*fit, f"--trainer.default_root_dir={tmp_path / 'resumed'}", "--trainer.max_steps=20",
                f"--ckpt_path={ckpt}", timeout=300)

    uninterrupted = ImageDataModule(Streaming(str(converted)), FORMAT, batch_size=4)  # seed 0, as the CLI
    uninterrupted.setup("fit")
    loader = uninterrupted.train_dataloader()
    sums = [float(batch["image"].sum()) for _ in range(2) for batch in loader]  # 2 epochs of 12 batches
    resumed = [(step, total) for _, step, _, total in read_steps(tmp_path / "resumed", 0)]
    assert [step for step, _ in resumed] == list(range(6, 21))
    assert [total for _, total in resumed] == pytest.approx(sums[5:20], abs=1e-4)


# ------------------------------------------------------------------------------------------------ errors


def test_a_directory_that_is_not_converted_is_a_clear_error(folder: Path, tmp_path: Path) -> None:
    for root in (folder, tmp_path / "absent"):
        with pytest.raises(NotOptimizedError, match="tools/convert_dataset.py") as error:
            ImageDataModule(Streaming(str(root)), FORMAT).setup("fit")
        assert isinstance(error.value, UserError) and str(root) in str(error.value)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        convert_source(ImageFolder(str(folder)), str(tmp_path / "out"), FORMAT)


# ------------------------------------------------------------------------------------------------ damaged chunks


@pytest.fixture(scope="module")
def chunked(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder in raw uint8 chunks of 2 kB (six train chunks): changed bytes still decode, to changed images."""
    output = tmp_path_factory.mktemp("chunked") / "raw"
    convert_source(ImageFolder(str(folder)), str(output), FORMAT, storage="raw", chunk_bytes="2kB", val_fraction=0.04)
    return output


def damaged_copy(chunked: Path, root: Path, damage: str) -> Path:
    """A copy of the converted data whose second train chunk has a flipped byte, lost its tail or is gone; the
    chunk's path."""
    shutil.copytree(chunked, root)
    chunk = sorted((root / "train").glob("*.bin"))[1]
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF  # a pixel of the chunk's last image
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(bytes(data[:-100]))
    else:
        chunk.unlink()
    return chunk


def read_split(root: Path) -> list[dict]:
    dataset = StreamingImageDataset(str(root), "train", FORMAT)
    return [dataset[i] for i in range(len(dataset))]


def test_conversion_records_the_sha256_of_every_chunk(chunked: Path) -> None:
    chunks = json.loads((chunked / "train" / "index.json").read_text())["chunks"]
    recorded = json.loads((chunked / "train" / CHECKSUM_FILE).read_text())["sha256"]
    assert len(chunks) == 6 and recorded == {
        chunk["filename"]: hashlib.sha256((chunked / "train" / chunk["filename"]).read_bytes()).hexdigest()
        for chunk in chunks}


@pytest.mark.parametrize(("damage", "problem"), [("flip", "is damaged: its SHA-256 differs from the one recorded"),
                                                 ("truncate", "is truncated: 1822 of its 1922 bytes are there"),
                                                 ("remove", "is missing")])
def test_a_damaged_truncated_or_missing_chunk_is_a_data_error_naming_it(chunked: Path, tmp_path: Path, damage: str,
                                                                         problem: str) -> None:
    """Before: a flipped byte trained on a changed image; a truncated or missing chunk was LitData's "timed out
    waiting for chunk ... a hung download" after 2 s (120 s for a remote dataset)."""
    chunk = damaged_copy(chunked, tmp_path / "data", damage)
    first = json.loads((chunked / "train" / "index.json").read_text())["chunks"][0]["chunk_size"]
    start = time.monotonic()
    with pytest.raises(DataError) as error:
        read_split(tmp_path / "data")
    assert time.monotonic() - start < 1.0
    assert str(error.value).startswith(f"streaming chunk file {chunk} {problem}")
    assert f"(item {first} is in it)" in str(error.value) and "tools/convert_dataset.py" in str(error.value)


def test_each_chunk_is_checked_once_per_process(chunked: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed, sha256 = [], streaming_dataset.file_sha256
    monkeypatch.setattr(streaming_dataset, "file_sha256", lambda path: hashed.append(path) or sha256(path))
    dataset = StreamingImageDataset(str(chunked), "train", FORMAT)
    for _ in range(2):
        for i in range(len(dataset)):
            dataset[i]
    assert len(hashed) == len(set(hashed)) == 6


def test_a_dataset_converted_before_checksums_streams_with_one_warning(chunked: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(chunked, tmp_path / "old")
    for split in ("train", "val"):
        (tmp_path / "old" / split / CHECKSUM_FILE).unlink()
    streaming_metadata.warn_unchecked.cache_clear()
    with caplog.at_level(logging.WARNING, logger="diffusion_pl.data.streaming.metadata"):
        old = ImageDataModule(Streaming(str(tmp_path / "old")), FORMAT, val_fraction=0.04)
        old.setup("fit")  # the train and val splits
    warnings = [r.getMessage() for r in caplog.records if CHECKSUM_FILE in r.getMessage()]
    assert len(warnings) == 1 and "converted before checksums" in warnings[0]
    assert items(old.train_set) == items(StreamingImageDataset(str(chunked), "train", FORMAT))
    (tmp_path / "old" / "train" / "chunk-0-1.bin").unlink()
    with pytest.raises(DataError, match="chunk-0-1.bin is missing"):  # sizes come from LitData's index
        read_split(tmp_path / "old")
