"""What the network predicts: the :class:`Prediction` every sampler and guidance reads, the parameterization parts
that produce it from a network's output (and give its training target), and the :class:`Denoiser` that wires a
network, a process and a parameterization."""

from diffusion_pl.parameterization.denoiser import Denoiser
from diffusion_pl.parameterization.parts import (
    EDM,
    PREDICTION_KINDS,
    X0,
    Eps,
    LearnedVariance,
    Parameterization,
    V,
    Velocity,
    from_prediction_kind,
)
from diffusion_pl.parameterization.prediction import (
    UNCLIPPED_EPS_LIMIT,
    ConditionalDenoiseFn,
    DenoiseFn,
    Prediction,
    clip_denoised,
    coefficients,
    eps_from_x0,
    probability_flow,
    score_from_eps,
    warn_unclipped_eps,
    x0_from_eps,
    x0_from_guided_eps,
)

__all__ = ["EDM", "PREDICTION_KINDS", "UNCLIPPED_EPS_LIMIT", "X0", "ConditionalDenoiseFn", "DenoiseFn", "Denoiser",
           "Eps", "LearnedVariance", "Parameterization", "Prediction", "V", "Velocity", "clip_denoised",
           "coefficients", "eps_from_x0", "from_prediction_kind", "probability_flow", "score_from_eps",
           "warn_unclipped_eps", "x0_from_eps", "x0_from_guided_eps"]
