"""Likelihoods: the probability-flow ODE log-likelihood, dequantization and bits/dim."""

from diffusion_pl.likelihood.evaluation import Likelihood
from diffusion_pl.likelihood.ode import bits_per_dim, dequantize, ode_log_likelihood

__all__ = ["Likelihood", "bits_per_dim", "dequantize", "ode_log_likelihood"]
