"""Benchmark: training speed of a config through the framework, against the same step as a bare PyTorch loop.

    python tools/benchmark_training.py --config configs/ddpm/fashion_mnist.yaml --steps 100 \
        [--image-folder DIR] [--streaming DIR] [--json out.json] [CLI overrides, e.g. --trainer.accelerator=gpu]

Framework and bare loop run interleaved in this process, step by step: after each step of the framework's ``fit``
(``--warmup`` untimed steps, then ``--steps``) comes one step of the bare loop, so both see the same machine load.
The bare loop is what a hand-written script does with the same parts: the DiffusionModule's net, loss, conditioner
and first stage on batches of a plain DataLoader over the same training set, the same optimizer and LR schedule,
gradient clipping, precision, flips, EMA decay and speed options (``TrainingSpeed``), and ``loss.item()`` every
``log_every_n_steps``. Each step's time includes its data loading.

Printed as one JSON object: images/s, step time (median, quartiles, 10th/90th percentiles), time to the first step,
peak memory (GPU: allocated; CPU: the process's peak RSS), training FLOPs per image (``torch.utils.flop_counter``,
forward and backward), model FLOP utilisation on a GPU (against ``--peak-tflops``, default a bf16 dense peak of known
GPUs), the framework/bare ratio (of the medians, and the median of step-by-step ratios), and for each data source
(the config's own; ``--image-folder`` in memory and lazily decoded; ``--streaming`` a converted dataset) the data
pipeline alone in a fresh process: time to the first batch (setup included), images/s and memory.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.flop_counter import FlopCounterMode

from diffusion_pl.callbacks import EMA
from diffusion_pl.callbacks.speed import TrainingSpeed
from diffusion_pl.cli import DiffusionCLI, build_cli
from diffusion_pl.core.spec import build as build_spec
from diffusion_pl.core.spec import spec_of
from diffusion_pl.data import ImageDataModule, ImageFolder, ImageFormat, Streaming
from diffusion_pl.models import DiffusionModule

#: bf16 dense peak FLOP/s by GPU name (substring match, first hit), for model FLOP utilisation.
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
                   ("L4", 121e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12))


def spread(times: list[float]) -> dict[str, float]:
    """Median and spread of step times in seconds."""
    ordered = sorted(times)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"median_s": median(ordered), "p25_s": quantile(0.25), "p75_s": quantile(0.75), "p10_s": quantile(0.1),
            "p90_s": quantile(0.9), "steps": len(ordered)}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """This process's resident memory (VmRSS) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: str, overrides: list[str], root: Path, max_steps: int) -> DiffusionCLI:
    """The CLI objects (model, data, trainer) of ``config`` for a run of ``max_steps`` steps without validation. The
    progress bar is off unless the overrides turn it on (its refresh reads the loss: a host sync every GPU step)."""
    return build_cli(["--config", config, "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                      *overrides, f"--trainer.default_root_dir={root}", f"--trainer.max_steps={max_steps}",
                      "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"], run=False)


def _callback(trainer: pl.Trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def cycle(loader: DataLoader) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


class BareLoop:
    """The framework's training step as a hand-written loop (see the module docstring), one step per call."""

    def __init__(self, cli: DiffusionCLI) -> None:
        model, data, trainer = cli.model, cli.datamodule, cli.trainer
        if not isinstance(model, DiffusionModule):
            raise SystemExit(f"the bare loop knows DiffusionModule configs only, not {type(model).__name__}")
        precision = str(trainer.precision)
        if precision not in ("32-true", "32", "bf16-mixed"):
            raise SystemExit(f"the bare loop runs precision 32-true or bf16-mixed, not {precision}")
        self.model, self.device, self.hp = model, trainer.strategy.root_device, data.hparams
        data.setup("fit")
        model.to(self.device).train()
        self.speed = _callback(trainer, TrainingSpeed)
        if self.speed is not None:
            self.speed.setup(trainer, model, "fit")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = model.optimizer_factory(self.params)
        self.scheduler = model.scheduler_factory(self.optimizer) if model.scheduler_factory is not None else None
        if self.scheduler is not None and getattr(self.scheduler, "total_steps", 0) is None:
            self.scheduler.total_steps = trainer.max_steps
        self.ema = _callback(trainer, EMA)
        self.live = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
        self.averaged = [t.detach().clone() for t in self.live]
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        iterable = isinstance(data.train_set, IterableDataset)
        loader = DataLoader(data.train_set, batch_size=self.hp.batch_size, shuffle=not iterable, drop_last=True,
                            num_workers=self.hp.num_workers, persistent_workers=self.hp.num_workers > 0,
                            pin_memory=self.device.type == "cuda")
        self.batches = cycle(loader)
        self.clip, self.log_every = trainer.gradient_clip_val, max(1, trainer.log_every_n_steps)
        self.steps = 0

    @torch.enable_grad()
    def step(self) -> None:
        model = self.model
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in next(self.batches).items()}
        images = batch["image"]
        if self.hp.random_flip:
            flip = torch.rand(len(images), 1, 1, 1, device=self.device) < 0.5
            images = torch.where(flip, images.flip(-1), images)
        if self.speed is not None and self.speed.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            with torch.no_grad():
                latents = model.first_stage.encode(images)
            cond = {} if model.conditioner is None else model.conditioner(batch, training=True)
            loss = model.loss_fn(model.denoiser, latents, **cond).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            torch._foreach_lerp_(self.averaged, [t.detach() for t in self.live], 1.0 - self.ema.decay)
        if self.steps % self.log_every == 0:
            loss.item()
        self.steps += 1


class Interleaved(pl.Callback):
    """After every framework step, one bare-loop step: both loops see the same machine load at the same moment.

    A framework step is timed from the end of the previous bare step to the end of its own ``on_train_batch_end``
    callbacks before this one (data loading, hooks, logging, EMA included); a bare step from there to its end.
    """

    def __init__(self, bare: BareLoop) -> None:
        self.bare = bare
        self.started = time.perf_counter()
        self.framework_ends: list[float] = []
        self.bare_ends: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        synchronize(pl_module.device)
        self.framework_ends.append(time.perf_counter())
        self.bare.step()
        synchronize(pl_module.device)
        self.bare_ends.append(time.perf_counter())

    def times(self, warmup: int) -> tuple[list[float], list[float]]:
        """(framework, bare) step times after ``warmup`` steps, paired in time order."""
        framework = [b - a for a, b in zip(self.bare_ends[warmup:], self.framework_ends[warmup + 1:])]
        bare = [b - a for a, b in zip(self.framework_ends[warmup + 1:], self.bare_ends[warmup + 1:])]
        return framework, bare


def flops_per_image(config: str, overrides: list[str], root: Path) -> float:
    """Training FLOPs (forward + backward of the loss) per image, counted by ``FlopCounterMode``."""
    cli = build(config, overrides, root, 1)
    model, data = cli.model, cli.datamodule
    data.setup("fit")
    batch = next(iter(DataLoader(data.train_set, batch_size=data.hparams.batch_size)))
    device = cli.trainer.strategy.root_device
    model.to(device).train()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        cond = {} if model.conditioner is None else model.conditioner(batch, training=True)
        model.loss_fn(model.denoiser, model.first_stage.encode(batch["image"]), **cond).mean().backward()
    return counter.get_total_flops() / len(batch["image"])


# --------------------------------------------------------------------------------------------------- data alone


def time_data(data_args: dict[str, Any], batches: int) -> dict[str, Any]:
    """The data pipeline alone (in a fresh process): setup + first batch, then ``batches`` batches. ``data_args``:
    the data module's hyperparameters (its parts as specs)."""
    before = rss_mb()
    start = time.perf_counter()
    dm = ImageDataModule(**{**build_spec(data_args), "image_format": ImageFormat(**data_args["image_format"])})
    dm.setup("fit")
    iterator = iter(dm.train_dataloader())
    next(iterator)
    first = time.perf_counter() - start
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["image"])
        if count >= batches * data_args["batch_size"]:
            break
    seconds = time.perf_counter() - start
    return {"time_to_first_batch_s": first, "images_per_s": count / seconds, "images": count,
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(), "rss_growth_mb": peak_rss_mb() - before}


def data_sources(args: argparse.Namespace, data_args: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Data arguments of each source to time: the config's own, or an image folder in memory and lazily decoded;
    and a converted dataset streamed (the config's image format, batching and workers)."""
    sources = {}
    if args.image_folder:
        sources["in_memory"] = {**data_args, "source": spec_of(ImageFolder(args.image_folder))}
        sources["lazy_folder"] = {**data_args, "source": spec_of(ImageFolder(args.image_folder, lazy=True))}
    else:
        sources["in_memory"] = data_args
    if args.streaming:
        sources["streaming"] = {**data_args, "source": spec_of(Streaming(args.streaming))}
    return sources


def time_sources(args: argparse.Namespace, data_args: dict[str, Any]) -> dict[str, dict[str, Any]]:
    results = {}
    for name, source_args in data_sources(args, data_args).items():
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: its memory is this source's
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            results[name] = pool.submit(time_data, source_args, args.data_batches).result()
    return results


# --------------------------------------------------------------------------------------------------- report


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def training_report(args: argparse.Namespace, overrides: list[str], root: Path, device: torch.device,
                    batch_size: int) -> dict[str, Any]:
    """The framework's fit with a bare-loop step after each of its steps; FLOPs and utilisation."""
    max_steps = args.warmup + args.steps + 1
    cli = build(args.config, overrides, root / "framework", max_steps)
    interleaved = Interleaved(BareLoop(build(args.config, overrides, root / "bare", max_steps)))
    cli.trainer.callbacks.append(interleaved)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    framework, bare = interleaved.times(args.warmup)
    flops = flops_per_image(args.config, overrides, root / "flops")
    images_per_s = batch_size / median(framework)
    peak = peak_flops(device, args.peak_tflops)
    return {
        "framework": {"images_per_s": images_per_s, "step": spread(framework),
                      "time_to_first_step_s": interleaved.framework_ends[0] - interleaved.started},
        "bare_loop": {"images_per_s": batch_size / median(bare), "step": spread(bare)},
        "overhead_ratio": median(framework) / median(bare),
        "overhead_ratio_paired": median(f / b for f, b in zip(framework, bare)),
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "peak_process_rss_mb": peak_rss_mb(),
        "flops_per_image": flops,
        "model_flop_utilisation": None if peak is None else flops * images_per_s / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=100, help="timed steps of each loop (0: the data alone)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--image-folder", default=None, help="time this image folder in memory and lazily decoded")
    parser.add_argument("--streaming", default=None, help="time this converted dataset streamed")
    parser.add_argument("--data-batches", type=int, default=50, help="batches per data-only timing")
    parser.add_argument("--no-data", action="store_true", help="skip the data-only timings")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for FLOP utilisation")
    parser.add_argument("--json", default=None, help="also write the report here")
    args, overrides = parser.parse_known_args()
    sys.argv[1:] = []  # the overrides reach the CLI as its args (LightningCLI warns when sys.argv holds more)
    root = Path(tempfile.mkdtemp(prefix="benchmark_training_"))
    cli = build(args.config, overrides, root / "info", 1)
    device, batch_size = cli.trainer.strategy.root_device, cli.datamodule.hparams.batch_size
    report: dict[str, Any] = {
        "config": args.config, "overrides": overrides, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "precision": str(cli.trainer.precision), "batch_size": batch_size,
        "log_every_n_steps": cli.trainer.log_every_n_steps,
    }
    if args.steps > 0:
        report.update(training_report(args, overrides, root, device, batch_size))
    if not args.no_data:
        data_args = {key: value for key, value in cli.datamodule.hparams.items() if not key.startswith("_")}
        report["data_pipeline"] = time_sources(args, data_args)
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.stdout.write(text + "\n")

if __name__ == "__main__":
    main()
