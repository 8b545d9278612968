"""FID for model selection: Fréchet distance, feature extractors (clean-fid Inception, or an offline
classifier trained on the dataset), cached reference statistics and streaming scoring of a sampler."""

from ant_ray.fid.domain_classifier import DomainClassifier, DomainClassifierConfig, load_or_train_domain_classifier
from ant_ray.fid.extractors import (
    FEATURE_EXTRACTORS,
    DomainFeatureExtractor,
    FeatureExtractor,
    InceptionFeatureExtractor,
    InceptionUnavailable,
    build_feature_extractor,
    dataset_fingerprint,
    ensure_inception_weights,
)
from ant_ray.fid.frechet import (
    FeatureStats,
    StreamingFeatureStats,
    frechet_distance,
    frechet_distance_torch,
)
from ant_ray.fid.score import (batch_seed, extend_feature_stream, fid_from_sampler, fid_metric_name, reference_stats,
                              reference_stats_path)

__all__ = [
    "FEATURE_EXTRACTORS",
    "DomainClassifier",
    "DomainClassifierConfig",
    "DomainFeatureExtractor",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionFeatureExtractor",
    "InceptionUnavailable",
    "StreamingFeatureStats",
    "batch_seed",
    "build_feature_extractor",
    "dataset_fingerprint",
    "ensure_inception_weights",
    "extend_feature_stream",
    "fid_from_sampler",
    "fid_metric_name",
    "frechet_distance",
    "frechet_distance_torch",
    "load_or_train_domain_classifier",
    "reference_stats",
    "reference_stats_path",
]
