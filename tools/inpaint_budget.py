"""Inpainting at a budget: how close each inpainting setting comes to the exact conditional law, per network
evaluation, on data whose denoiser is exact.

The data are correlated Gaussian images of SIDE x SIDE pixels (default 4 x 4 = 16) with covariance
rho^(|di| + |dj|) between pixels (di, dj) apart (neighbour correlation rho = 0.9). Their denoiser
E[x0 | x_t] = a C (a^2 C + s^2 I)^-1 x_t is exact at every t, so every error below is the sampler's. The left half is
known (every known pixel 1.0, one prior standard deviation) and the right half filled in; its exact law is
N(mu, S), mu = C_uk C_kk^-1 x_k, S = C_uu - C_uk C_kk^-1 C_ku (Gaussian conditioning). Each setting inpaints
``--samples`` images on a DiscreteProcess (T = 1000) and gives a Markdown row: network evaluations (counted calls of
the denoiser), the mean error max_j |mean_j - mu_j| / sqrt(S_jj) in conditional standard deviations, the variance
ratio var_j / S_jj (smallest-largest over the filled-in pixels) and seconds.

Settings (``--settings``, or the default study): ``replace:SAMPLER`` (the known region reset to q(x_s | x_known)
after every step: ``ddpm``, ``ddim50``, ``dpmpp20``); ``repaint:S/j/r/variance`` (RePaint on the chain respaced to S
steps, S = ``all`` for T, jump j, r resamplings, fixed variance ``beta`` or ``posterior``);
``chunks:SAMPLER/j/r`` (a fast sampler with replacement, each j-step piece of its grid run r times, the sample sent
back up the piece by the forward kernel in between: RePaint's resampling on ``ddim50``, ``ddim50eta1``, ``dpmpp20``).

    python tools/inpaint_budget.py --schedule linear cosine --samples 20000
    python tools/inpaint_budget.py --settings repaint:25/5/5/beta repaint:50/1/10/beta chunks:dpmpp20/1/10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.core.tensors import append_dims
from diffusion_pl.nets.first_stage import FirstStage, IdentityStage
from diffusion_pl.parameterization import DenoiseFn, Prediction, eps_from_x0
from diffusion_pl.pipelines import inpaint
from diffusion_pl.pipelines.inpainting import replacement
from diffusion_pl.processes import DiscreteProcess, ForwardProcess
from diffusion_pl.samplers import DDIM, DDPM, DPMSolverPP, Sampler, Trailing

SAMPLERS: dict[str, Callable[[], Sampler]] = {
    "ddpm": DDPM, "ddim50": lambda: DDIM(50), "ddim50eta1": lambda: DDIM(50, eta=1.0),
    "dpmpp20": lambda: DPMSolverPP(20, Trailing()),
}
STUDY = [
    "replace:ddpm", "replace:ddim50", "replace:dpmpp20",
    "repaint:all/10/10/beta", "repaint:100/10/10/beta", "repaint:25/5/5/beta",
    "repaint:25/1/10/beta", "repaint:35/1/8/beta", "repaint:40/1/8/beta", "repaint:40/1/10/beta",
    "repaint:50/1/10/beta", "repaint:50/1/10/posterior",
    "chunks:ddim50/1/5", "chunks:ddim50eta1/1/5", "chunks:dpmpp20/1/10",
]


def covariance(side: int, rho: float) -> Tensor:
    """C[(i, j), (k, l)] = rho^(|i - k| + |j - l|), float64, (side^2, side^2)."""
    steps = torch.arange(side)
    apart = (steps[:, None] - steps[None, :]).abs()
    return (rho ** (apart[:, None, :, None] + apart[None, :, None, :]).double()).reshape(side * side, side * side)


def exact_conditional(cov: Tensor, known: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance of the unknown pixels given the known ones (boolean ``known``, their ``values``)."""
    unknown = ~known
    c_kk, c_uk = cov[known][:, known], cov[unknown][:, known]
    mean = c_uk @ torch.linalg.solve(c_kk, values)
    return mean, cov[unknown][:, unknown] - c_uk @ torch.linalg.solve(c_kk, c_uk.T)


@dataclass
class ExactModel:
    """A "trained model" (what the pipelines need of a DiffusionModule) whose denoiser is the exact one of zero-mean
    Gaussian images with covariance ``cov``; ``calls`` counts its network evaluations."""

    process: ForwardProcess
    sampler: Sampler
    cov: Tensor
    first_stage: FirstStage = field(default_factory=IdentityStage)
    device: torch.device = torch.device("cpu")
    calls: int = 0

    def sampling_denoiser(self, process: ForwardProcess, batch: dict[str, Any],
                          generator: torch.Generator | None = None) -> DenoiseFn:
        eye = torch.eye(len(self.cov), dtype=torch.float64)

        def denoise(x_t: Tensor, t: Tensor) -> Prediction:
            self.calls += 1
            a, s = process.alpha(t[:1]).double(), process.sigma(t[:1]).double()  # one time per call (samplers)
            gain = a * self.cov @ torch.linalg.inv(a**2 * self.cov + s**2 * eye)
            x0 = (x_t.reshape(len(x_t), -1).double() @ gain.T).to(x_t.dtype).reshape(x_t.shape)
            return Prediction(x0=x0, eps=eps_from_x0(x0, x_t, t, process))

        return denoise


def resampled(model: ExactModel, images: Tensor, mask: Tensor, jump: int, resample: int,
              generator: torch.Generator) -> Tensor:
    """The model's sampler with replacement, each ``jump``-step piece of its grid (counted from the last step up,
    as RePaint's schedule) run ``resample`` times, the sample sent back up the piece by q(x_t | x_s) in between."""
    process = model.sampler.sampling_process(model.process)
    grid = model.sampler.grid(process)
    denoise = model.sampling_denoiser(process, {})
    project = replacement(images, mask, process, generator)
    bounds = list(range(len(grid) - 1, 0, -jump))[::-1]
    pieces = [(0, bounds[0])] + list(zip(bounds, bounds[1:]))
    x = process.prior_sample(images.shape, generator=generator)
    for first, last in pieces:
        piece = grid[first:last + 1]
        repeats = resample if last < len(grid) - 1 else 1  # the step to the data is taken once, as in RePaint
        for k in range(repeats):
            x = model.sampler.sample(denoise, process, x, grid=piece, generator=generator, project=project)
            if k < repeats - 1:
                t, s = (torch.full((len(x),), piece[i].item(), dtype=piece.dtype) for i in (0, -1))
                a, v = (value.to(x.dtype) for value in process.transition(s, t))
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                x = append_dims(a, x.ndim) * x + append_dims(v.clamp(min=0).sqrt(), x.ndim) * noise
    return mask * images + (1 - mask) * x


def run(setting: str, process: DiscreteProcess, cov: Tensor, images: Tensor, mask: Tensor,
        seed: int) -> tuple[Tensor, int, float]:
    """Inpaint ``images`` with one setting; (samples, network evaluations, seconds)."""
    kind, _, options = setting.partition(":")
    parts = options.split("/")
    generator = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    if kind == "replace":
        model = ExactModel(process, SAMPLERS[parts[0]](), cov)
        out = inpaint(model, images, mask, method="replace", generator=generator)
    elif kind == "repaint":
        steps, jump, resample, variance = parts
        model = ExactModel(process, DDPM(), cov)
        out = inpaint(model, images, mask, method="repaint", generator=generator,
                      steps=None if steps == "all" else int(steps), jump_length=int(jump), resample=int(resample),
                      variance=variance)  # type: ignore[arg-type]
    elif kind == "chunks":
        model = ExactModel(process, SAMPLERS[parts[0]](), cov)
        out = resampled(model, images, mask, int(parts[1]), int(parts[2]), generator)
    else:
        raise SystemExit(f"unknown setting {setting!r}: replace:SAMPLER, repaint:S/j/r/variance or chunks:SAMPLER/j/r")
    return out, model.calls, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=STUDY, help="settings to measure (module docstring)")
    parser.add_argument("--schedule", nargs="+", default=["linear", "cosine"], choices=["linear", "cosine"])
    parser.add_argument("--samples", type=int, default=20000, help="inpainted images per setting")
    parser.add_argument("--side", type=int, default=4, help="image side (side^2 pixels, the left half known)")
    parser.add_argument("--rho", type=float, default=0.9, help="correlation of neighbouring pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cov = covariance(args.side, args.rho)
    mask = torch.zeros(1, 1, args.side, args.side)
    mask[..., : args.side // 2] = 1.0
    images = mask.expand(args.samples, 1, args.side, args.side).clone()  # known pixels 1.0
    known = mask.flatten().bool()
    mean, var = exact_conditional(cov, known, torch.ones(int(known.sum()), dtype=torch.float64))
    sd = var.diagonal().sqrt()
    print(f"{args.side}x{args.side} Gaussian images, neighbour correlation {args.rho}, left half known (1.0), "
          f"{args.samples} samples, seed {args.seed}\n")
    print("| schedule | setting | network evaluations | mean error (cond. std) | variance ratio | seconds |")
    print("|---|---|---|---|---|---|")
    for schedule in args.schedule:
        process = DiscreteProcess(1000, schedule)
        for setting in args.settings:
            out, calls, seconds = run(setting, process, cov, images, mask, args.seed)
            filled = out.reshape(len(out), -1)[:, ~known].double()
            error = float(((filled.mean(0) - mean) / sd).abs().max())
            ratio = filled.var(0) / var.diagonal()
            print(f"| {schedule} | {setting} | {calls} | {error:.3f} | {float(ratio.min()):.2f}-"
                  f"{float(ratio.max()):.2f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
