"""Guidance: DenoiseFn -> DenoiseFn wrappers that work unchanged with every sampler, and the configured parts."""

from diffusion_pl.guidance.classifier import classifier_guidance, log_prob_gradient
from diffusion_pl.guidance.clip import CLIP, Cutouts, clip_guidance, clip_log_prob
from diffusion_pl.guidance.classifier_free import batched_classifier_free, classifier_free, combine_guided
from diffusion_pl.guidance.parts import PROCESS_MARGINALS_KEY, Classifier, ClassifierFree, Guidance

__all__ = ["CLIP", "Classifier", "ClassifierFree", "Cutouts", "Guidance", "PROCESS_MARGINALS_KEY",
           "batched_classifier_free", "classifier_free", "classifier_guidance", "clip_guidance", "clip_log_prob",
           "combine_guided", "log_prob_gradient"]
