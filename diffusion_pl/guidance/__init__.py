"""Guidance: DenoiseFn -> DenoiseFn wrappers that work unchanged with every sampler."""

from diffusion_pl.guidance.classifier import classifier_guidance, log_prob_gradient
from diffusion_pl.guidance.classifier_free import batched_classifier_free, classifier_free, combine_guided

__all__ = ["batched_classifier_free", "classifier_free", "classifier_guidance", "combine_guided",
           "log_prob_gradient"]
