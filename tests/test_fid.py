"""Tests for ant_ray.fid: Fréchet distance against closed forms, streaming statistics against numpy, the
offline domain extractor on scikit-learn digits, the Inception pipeline against clean-fid's own per-image
path (with a stand-in network, since the real weights cannot be downloaded here), and caching."""

from __future__ import annotations

import time
import urllib.error
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from ant_ray.fid import (
    FEATURE_EXTRACTORS,
    DomainClassifierConfig,
    DomainFeatureExtractor,
    FeatureStats,
    InceptionFeatureExtractor,
    InceptionUnavailable,
    StreamingFeatureStats,
    batch_seed,
    build_feature_extractor,
    dataset_fingerprint,
    fid_from_sampler,
    fid_metric_name,
    frechet_distance,
    frechet_distance_torch,
    reference_stats,
    reference_stats_path,
)
from ant_ray.fid import extractors as extractors_module
from ant_ray.fid.extractors import INCEPTION_FILENAME, INCEPTION_URL, clean_resize_299


@dataclass
class StandInDataset:
    """Same attributes as ant_ray.data.ImageDataset (minus its fingerprint, to exercise the hash fallback)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None
    resolution: int


@pytest.fixture(scope="module")
def digits() -> StandInDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return StandInDataset("digits", images, torch.from_numpy(bunch.target).to(torch.int64), 8)


@pytest.fixture(scope="module")
def domain_cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("domain_cache")


@pytest.fixture(scope="module")
def domain_extractor(digits: StandInDataset, domain_cache) -> DomainFeatureExtractor:
    return build_feature_extractor("domain", dataset=digits, cache_dir=domain_cache)


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def eigen_frechet(mu1, s1, mu2, s2) -> float:
    """Independent reference: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), a symmetric PSD matrix."""
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


# ------------------------------------------------------------------------------------------ frechet


def test_frechet_matches_closed_form_for_diagonal_and_commuting_covariances():
    rng = np.random.default_rng(0)
    dim = 12
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # Commuting covariances share eigenvectors: rotating both by the same orthogonal Q keeps the closed form.
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_matches_eigen_decomposition_for_random_spd():
    rng = np.random.default_rng(1)
    for dim in (1, 5, 64):
        mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
        s1, s2 = random_spd(rng, dim), random_spd(rng, dim)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(eigen_frechet(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_of_identical_stats_is_zero_and_symmetric():
    rng = np.random.default_rng(2)
    stats = FeatureStats.from_features(rng.standard_normal((300, 32)) * 3 + 1)
    assert frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma) == pytest.approx(0.0, abs=1e-8)
    other = FeatureStats.from_features(rng.standard_normal((300, 32)))
    assert stats.frechet_distance(other) == pytest.approx(other.frechet_distance(stats), rel=1e-8)


def test_frechet_handles_singular_covariances():
    # Fewer samples than dimensions: both covariances have rank 9 out of 40.
    rng = np.random.default_rng(3)
    s1 = FeatureStats.from_features(rng.standard_normal((10, 40)))
    s2 = FeatureStats.from_features(rng.standard_normal((10, 40)) + 0.5)
    value = s1.frechet_distance(s2)
    assert np.isfinite(value) and value > 0
    eps = 1e-6
    offset = eps * np.eye(40)
    reference = eigen_frechet(s1.mu, s1.sigma + offset, s2.mu, s2.sigma + offset) - 2 * 40 * eps
    assert value == pytest.approx(reference, rel=1e-4)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# Eigendecomposition form (default) against scipy's sqrtm form, closed forms and the torch path.

# (dimensions, samples): full-rank covariances, and rank-deficient ones (fewer samples than dimensions, rank n-1).
COVARIANCE_SHAPES = [(1, 50), (7, 100), (64, 1000), (256, 400), (40, 10), (128, 30), (512, 100)]


def sample_gaussian_pair(rng: np.random.Generator, dim: int, samples: int):
    """Two feature sets with a decaying spectrum (as real features have), their stats, and the first set's
    centred, scaled features (S1 = X^T X)."""
    scales = 1.0 / np.sqrt(1.0 + np.arange(dim))
    first = rng.standard_normal((samples, dim)) * scales
    second = rng.standard_normal((samples, dim)) * scales * 1.2 + 0.05
    centred = (first - first.mean(axis=0)) / np.sqrt(samples - 1)
    return FeatureStats.from_features(first), FeatureStats.from_features(second), centred


@pytest.mark.parametrize("dim,samples", COVARIANCE_SHAPES)
def test_eigh_form_matches_sqrtm_form(dim, samples):
    s1, s2, _ = sample_gaussian_pair(np.random.default_rng(dim + samples), dim, samples)
    eigh_value = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    sqrtm_value = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma, method="sqrtm")
    assert eigh_value > 0
    # Full rank agrees to ~1e-13; a singular product leaves sqrtm ~1e-7 off (square roots of round-off).
    assert eigh_value == pytest.approx(sqrtm_value, rel=1e-6)


@pytest.mark.parametrize("dim,samples", [(40, 10), (256, 40)])
def test_eigh_form_is_accurate_for_rank_deficient_covariances(dim, samples):
    # With S1 = X^T X (X: samples x dim), S1 S2 has the nonzero eigenvalues of the small, well-conditioned
    # X S2 X^T: a reference that never takes the square root of a round-off-sized eigenvalue.
    s1, s2, centred = sample_gaussian_pair(np.random.default_rng(dim), dim, samples)
    small = centred @ s2.sigma @ centred.T
    root_trace = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    diff = s1.mu - s2.mu
    expected = diff @ diff + np.trace(s1.sigma) + np.trace(s2.sigma) - 2 * root_trace
    assert frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma) == pytest.approx(expected, rel=1e-7)


def frechet_by(path: str, mu1, s1, mu2, s2) -> float:
    if path == "torch":
        return frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2)))
    return frechet_distance(mu1, s1, mu2, s2, method=path)


@pytest.mark.parametrize("path", ["eigh", "sqrtm", "torch"])
def test_every_path_matches_closed_forms(path):
    rng = np.random.default_rng(6)
    dim = 128
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    # Commuting covariances (same eigenvectors): tr((S1 S2)^1/2) = sum sqrt(d1 d2). Zeros make both singular.
    d1, d2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    d1[:20] = 0.0
    d2[10:30] = 0.0
    expected = np.sum((mu1 - mu2) ** 2) + d1.sum() + d2.sum() - 2 * np.sqrt(d1 * d2).sum()
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    s1, s2 = (q * d1) @ q.T, (q * d2) @ q.T
    assert frechet_by(path, mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # Identical Gaussians, full rank or not, are at distance 0.
    for samples in (1000, 50):
        stats = FeatureStats.from_features(rng.standard_normal((samples, dim)) * 2 + 1)
        assert frechet_by(path, stats.mu, stats.sigma, stats.mu, stats.sigma) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dim,samples", [(64, 1000), (64, 20)])
def test_torch_path_equals_numpy_path(dim, samples):
    s1, s2, _ = sample_gaussian_pair(np.random.default_rng(7), dim, samples)
    numpy_value = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    tensors = [torch.from_numpy(x) for x in (s1.mu, s1.sigma, s2.mu, s2.sigma)]
    rel = 1e-10 if samples > dim else 1e-7  # singular: round-off-sized eigenvalues differ between LAPACK builds
    assert frechet_distance(*tensors) == pytest.approx(numpy_value, rel=rel)
    assert frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma, device="cpu") == pytest.approx(numpy_value, rel=rel)
    assert frechet_distance_torch(*tensors, device=torch.device("cpu")) == pytest.approx(numpy_value, rel=rel)
    # float32 statistics (as computed on a GPU) are promoted: the same value as numpy on the same float32 numbers.
    as_float32 = [x.to(torch.float32) for x in tensors]
    expected = frechet_distance(*(x.numpy() for x in as_float32))
    assert frechet_distance(*as_float32) == pytest.approx(expected, rel=rel)


def test_frechet_rejects_bad_method_asymmetric_covariance_and_sqrtm_on_tensors():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="method must be one of eigh, sqrtm"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), eye, method="svd")
    skewed = eye.copy()
    skewed[0, 1] = 0.5
    with pytest.raises(ValueError, match="sigma2 is not symmetric"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), skewed)
    with pytest.raises(ValueError, match="sigma2 is not symmetric"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), torch.from_numpy(skewed))
    with pytest.raises(ValueError, match="only 'eigh' runs in torch"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(3), method="sqrtm")
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="non-empty"):
        frechet_distance(np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))


def test_eigh_path_adds_eps_only_when_the_eigendecomposition_fails(monkeypatch):
    rng = np.random.default_rng(8)
    s1, s2, _ = sample_gaussian_pair(rng, 16, 100)
    exact = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    real_eigh, calls = np.linalg.eigh, []

    def eigh_failing_once(matrix):
        calls.append(matrix.copy())
        if len(calls) == 1:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real_eigh(matrix)

    monkeypatch.setattr(np.linalg, "eigh", eigh_failing_once)
    eps = 1e-3
    value = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma, eps=eps)
    np.testing.assert_allclose(calls[1], s1.sigma + eps * np.eye(16), rtol=1e-12)  # the retry's input
    # As in the sqrtm path, the traces keep the covariances as given: only the square-root term sees eps.
    offset = eps * np.eye(16)
    expected = eigen_frechet(s1.mu, s1.sigma + offset, s2.mu, s2.sigma + offset) - 2 * 16 * eps
    assert value == pytest.approx(expected, rel=1e-10)
    assert value != pytest.approx(exact, rel=1e-6)

    def eigh_never_converging(matrix):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(np.linalg, "eigh", eigh_never_converging)
    with pytest.raises(ValueError, match="did not converge even after adding eps"):
        frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma, eps=eps)


def test_streaming_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(4)
    # A large common offset is where a naive sum-of-squares formula loses digits.
    feats = rng.standard_normal((257, 16)) * rng.uniform(0.5, 2, 16) + 1e4
    running = StreamingFeatureStats(16)
    start = 0
    for size in (1, 0, 100, 3, 64, 89):
        running.update(feats[start:start + size])
        start += size
    assert start == feats.shape[0]
    stats = running.to_stats()
    assert stats.n == 257
    np.testing.assert_allclose(stats.mu, feats.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match="shape"):
        running.update(np.zeros((2, 15)))


def test_feature_stats_round_trip_npz_without_pickle(tmp_path):
    stats = FeatureStats.from_features(np.random.default_rng(5).standard_normal((20, 6)))
    path = tmp_path / "sub" / "stats.npz"
    stats.save(path)
    loaded = FeatureStats.load(path)  # loads with allow_pickle=False
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == 20
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind


# ------------------------------------------------------------------------------------------- naming


def test_fid_metric_names():
    assert fid_metric_name(5000, "inception") == "fid5k_inception"
    assert fid_metric_name(1000, "domain") == "fid1k_domain"
    assert fid_metric_name(500, "domain") == "fid500_domain"
    assert fid_metric_name(1500, "domain") == "fid1500_domain"
    assert fid_metric_name(50_000, "inception") == "fid50k_inception"
    with pytest.raises(ValueError, match="n must be"):
        fid_metric_name(0, "domain")
    with pytest.raises(ValueError, match="extractor_name"):
        fid_metric_name(100, "Dom ain")


def test_registry_lists_both_extractors_and_rejects_unknown():
    assert FEATURE_EXTRACTORS.names() == ["domain", "inception"]
    with pytest.raises(ValueError, match="domain, inception"):
        build_feature_extractor("vgg", cache_dir=None)
    with pytest.raises(ValueError, match="dataset="):
        build_feature_extractor("domain", cache_dir="unused")


# ------------------------------------------------------------------------------------------- domain


def test_domain_extractor_trains_accurately_and_is_cached(digits, domain_cache, domain_extractor):
    assert domain_extractor.name == "domain"
    assert domain_extractor.train_accuracy > 0.97
    feats = domain_extractor.features(digits.images[:10])
    assert feats.shape == (10, domain_extractor.feature_dim) and np.isfinite(feats).all()
    assert len(list(domain_cache.glob("*.safetensors"))) == 1 and len(list(domain_cache.glob("*.json"))) == 1

    start = time.perf_counter()
    again = build_feature_extractor("domain", dataset=digits, cache_dir=domain_cache)
    assert time.perf_counter() - start < 1.0  # loaded, not retrained (training takes seconds)
    assert again.cache_key == domain_extractor.cache_key
    np.testing.assert_array_equal(again.features(digits.images[:10]), feats)
    assert len(list(domain_cache.iterdir())) == 2  # same inputs -> same files reused


def test_domain_training_is_deterministic_and_leaves_global_state_alone(digits, tmp_path):
    config = DomainClassifierConfig(epochs=1)  # determinism does not need a well-trained model
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = DomainFeatureExtractor.build(digits, tmp_path / "a", config=config)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    second = DomainFeatureExtractor.build(digits, tmp_path / "b", config=config)
    state1, state2 = first.model.state_dict(), second.model.state_dict()
    assert state1.keys() == state2.keys()
    assert all(torch.equal(state1[k], state2[k]) for k in state1)
    assert first.cache_key == second.cache_key


def test_domain_extractor_needs_labels_and_matching_images(digits, domain_extractor, tmp_path):
    unlabelled = StandInDataset("folder", digits.images[:50], None, 8)
    with pytest.raises(ValueError, match="no labels") as err:
        build_feature_extractor("domain", dataset=unlabelled, cache_dir=tmp_path)
    assert "inception" in str(err.value) and "subfolder" in str(err.value)
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        domain_extractor.features(torch.zeros(2, 3, 8, 8))


def test_dataset_fingerprint_prefers_the_datasets_own(digits):
    @dataclass
    class WithFingerprint(StandInDataset):
        fingerprint: str = "abc123"

    assert dataset_fingerprint(WithFingerprint("d", digits.images, digits.labels, 8)) == "abc123"
    hashed = dataset_fingerprint(digits)
    assert hashed == dataset_fingerprint(StandInDataset("digits", digits.images.clone(), digits.labels, 8))
    changed = digits.images.clone()
    changed[0, 0, 0, 0] += 0.5
    assert hashed != dataset_fingerprint(StandInDataset("digits", changed, digits.labels, 8))


# ------------------------------------------------------------------------------------------ scoring


class CountingExtractor:
    """Wraps an extractor and counts the images it sees."""

    def __init__(self, inner):
        self.inner, self.seen = inner, 0
        self.name, self.feature_dim, self.cache_key = inner.name, inner.feature_dim, inner.cache_key

    def features(self, images):
        self.seen += images.shape[0]
        return self.inner.features(images)


def test_reference_stats_are_cached_on_disk_and_reused(digits, domain_extractor, tmp_path):
    counting = CountingExtractor(domain_extractor)
    stats = reference_stats(digits, counting, tmp_path)
    assert counting.seen == len(digits.images)
    assert reference_stats_path(digits, counting, tmp_path).exists()
    direct = FeatureStats.from_features(domain_extractor.features(digits.images))
    np.testing.assert_allclose(stats.mu, direct.mu, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats.sigma, direct.sigma, rtol=1e-8, atol=1e-8)

    again = reference_stats(digits, counting, tmp_path)
    assert counting.seen == len(digits.images)  # read from disk, not recomputed
    np.testing.assert_array_equal(again.sigma, stats.sigma)
    other = StandInDataset("digits", digits.images[:100], digits.labels[:100], 8)
    assert reference_stats_path(other, counting, tmp_path) != reference_stats_path(digits, counting, tmp_path)


def test_fid_from_sampler_streams_the_same_value_as_stored_features(digits, domain_extractor, tmp_path):
    ref = reference_stats(digits, domain_extractor, tmp_path)
    calls, seen = [], []

    def sample_fn(batch_size: int, generator_seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(generator_seed)
        index = torch.randint(0, len(digits.images), (batch_size,), generator=generator)
        images = digits.images[index] + 0.3 * torch.rand(digits.images[index].shape, generator=generator)
        calls.append(batch_size)
        seen.append(images)
        return images

    value = fid_from_sampler(sample_fn, 250, 64, domain_extractor, ref, seed=7)
    assert calls == [64, 64, 64, 58]
    expected = FeatureStats.from_features(domain_extractor.features(torch.cat(seen))).frechet_distance(ref)
    assert value == pytest.approx(expected, rel=1e-9)
    assert fid_from_sampler(sample_fn, 250, 64, domain_extractor, ref, seed=7) == value  # same seed, same FID
    assert fid_from_sampler(sample_fn, 250, 64, domain_extractor, ref, seed=8) != value
    assert batch_seed(0, 1) != batch_seed(1, 0)

    # Scoring the reference images themselves, in order, reproduces the reference statistics: FID 0.
    position = iter(range(0, len(digits.images), 100))
    replay = lambda b, s: digits.images[next(position):][:b]  # noqa: E731
    assert fid_from_sampler(replay, len(digits.images), 100, domain_extractor, ref, 0) == pytest.approx(0, abs=1e-6)
    # Noise is much further from digits than jittered digits are.
    noise = lambda b, s: torch.rand(b, 1, 8, 8, generator=torch.Generator().manual_seed(s)) * 2 - 1  # noqa: E731
    assert fid_from_sampler(noise, 250, 64, domain_extractor, ref, 0) > 3 * value
    with pytest.raises(ValueError, match="sample_fn"):
        fid_from_sampler(lambda b, s: torch.zeros(b + 1, 1, 8, 8), 10, 5, domain_extractor, ref, 0)


# ---------------------------------------------------------------------------------------- inception


def test_inception_fails_fast_offline_naming_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ANT_RAY_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("must not touch the network when ANT_RAY_OFFLINE=1")

    monkeypatch.setattr(extractors_module.urllib.request, "urlopen", no_network)
    with pytest.raises(InceptionUnavailable) as err:
        InceptionFeatureExtractor(weights_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / INCEPTION_FILENAME) in message and INCEPTION_URL in message and "domain" in message
    assert isinstance(err.value, RuntimeError)
    if not (extractors_module.Path(extractors_module.DEFAULT_INCEPTION_DIR) / INCEPTION_FILENAME).exists():
        with pytest.raises(InceptionUnavailable, match=f"/tmp/{INCEPTION_FILENAME}"):
            build_feature_extractor("inception", cache_dir=None)


def test_inception_download_failure_becomes_inception_unavailable(monkeypatch, tmp_path):
    monkeypatch.delenv("ANT_RAY_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(extractors_module.urllib.request, "urlopen", unreachable)
    with pytest.raises(InceptionUnavailable, match="unreachable"):
        InceptionFeatureExtractor(weights_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial file left where clean-fid would load it

    (tmp_path / INCEPTION_FILENAME).write_bytes(b"truncated download")
    with pytest.raises(InceptionUnavailable, match="could not be loaded"):
        InceptionFeatureExtractor(weights_dir=tmp_path)


def test_clean_resize_matches_clean_fid_per_image_resize():
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    generator = torch.Generator().manual_seed(0)
    for side in (8, 32, 299, 320):
        images = torch.rand(2, 3, side, side, generator=generator) * 255
        expected = np.stack([resize(im.numpy().transpose(1, 2, 0)).transpose(2, 0, 1) for im in images])
        # float32 round-off on the 0..255 scale; larger when shrinking (wider filter support)
        np.testing.assert_allclose(clean_resize_299(images).numpy(), expected, atol=2e-2)


class FakeInceptionLayers(nn.Module):
    """Stands in for the torchscript Inception's ``layers`` (same input and output shapes)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.project = nn.Linear(3 * 8 * 8, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(x).flatten(1)).view(x.shape[0], 2048, 1, 1)


class FakeInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = FakeInceptionLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_inception_pipeline_matches_clean_fid_generator_path(tmp_path):
    """Our batched path (grey -> RGB, [-1, 1] -> [0, 255], batched clean resize, clean-fid's InceptionV3W)
    against clean-fid's own per-image path for generators (fid.get_model_features), with a stand-in network
    saved as torchscript where the real weights would be."""
    from cleanfid.fid import get_model_features
    from cleanfid.inception_torchscript import InceptionV3W

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(FakeInception()), str(tmp_path / INCEPTION_FILENAME))
    extractor = InceptionFeatureExtractor(weights_dir=tmp_path, batch_size=3)
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = extractor.features(images)
    assert ours.shape == (5, 2048)

    clean_fid_model = InceptionV3W(str(tmp_path), download=False).eval()
    as_generator = lambda z: (images.repeat(1, 3, 1, 1) + 1) * 127.5  # noqa: E731  (clean-fid wants [0, 255])
    theirs = get_model_features(as_generator, clean_fid_model, mode="clean", z_dim=1, num_gen=5, batch_size=5,
                                device=torch.device("cpu"), verbose=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
