"""Sample-quality metrics: feature extractors (Inception-v3, domain classifier), cached reference statistics,
FID / KID / Inception Score synced over DDP ranks (the FID callback), and the scorer of sample files behind
``diffusion-pl-eval`` (:mod:`diffusion_pl.metrics.evaluation`): FID, KID, IS, precision/recall, the real-data floor,
on-target share and CLIP score."""

from diffusion_pl.metrics.domain import ClassifierFeatures
from diffusion_pl.metrics.extractor import FeatureExtractor, Features
from diffusion_pl.metrics.feature_reference import FeatureReference
from diffusion_pl.metrics.features import extract_features, model_range
from diffusion_pl.metrics.frechet import GaussianMoments, frechet_distance
from diffusion_pl.metrics.generative import GenerativeMetrics
from diffusion_pl.metrics.inception import (
    InceptionFeatures,
    InceptionWeightsError,
    inception_input,
)
from diffusion_pl.metrics.inception_score import inception_score
from diffusion_pl.metrics.kernel_distance import kernel_distance
from diffusion_pl.metrics.on_target import OnTarget, on_target
from diffusion_pl.metrics.precision_recall import precision_recall
from diffusion_pl.metrics.real_data import RealData
from diffusion_pl.metrics.reference import (
    ReferenceStatistics,
    cached_reference,
    reference_statistics,
)
from diffusion_pl.metrics.scoring import RealReference, domain_reference
from diffusion_pl.metrics.super_resolution import consistency_error, psnr, ssim

__all__ = [
    "ClassifierFeatures",
    "FeatureExtractor",
    "FeatureReference",
    "Features",
    "GaussianMoments",
    "GenerativeMetrics",
    "InceptionFeatures",
    "InceptionWeightsError",
    "OnTarget",
    "RealData",
    "RealReference",
    "ReferenceStatistics",
    "cached_reference",
    "consistency_error",
    "domain_reference",
    "extract_features",
    "frechet_distance",
    "inception_input",
    "inception_score",
    "kernel_distance",
    "model_range",
    "on_target",
    "precision_recall",
    "psnr",
    "reference_statistics",
    "ssim",
]
