"""Sample-quality metrics: feature extractors (Inception-v3, domain classifier), cached reference statistics,
and FID / KID / Inception Score synced over DDP ranks."""

from diffusion_pl.metrics.domain import ClassifierFeatures
from diffusion_pl.metrics.extractor import FeatureExtractor, Features
from diffusion_pl.metrics.generative import GenerativeMetrics
from diffusion_pl.metrics.inception import InceptionFeatures, InceptionWeightsError, inception_input
from diffusion_pl.metrics.reference import ReferenceStatistics, cached_reference, reference_statistics
from diffusion_pl.metrics.super_resolution import consistency_error, psnr, ssim

__all__ = [
    "ClassifierFeatures",
    "FeatureExtractor",
    "Features",
    "GenerativeMetrics",
    "InceptionFeatures",
    "InceptionWeightsError",
    "ReferenceStatistics",
    "cached_reference",
    "consistency_error",
    "inception_input",
    "psnr",
    "reference_statistics",
    "ssim",
]
