"""ANT clustered-MTL training: per-cluster losses and timestep sampling against hand counts, one step against
brute-force autograd (k full backward passes), every method under bf16/fp16 + clipping with absent clusters,
exact resume, bucket affinity against a closed-form gradient, cluster resolution against a planted block
structure, and on real Ray: 2 workers equal 1 worker (UW through the whole driver with MLflow and FID; PCGrad, Nash).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_ray
import torch
from mlflow.tracking import MlflowClient
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file

from ant_ray.ant.affinity import bucket_bounds
from ant_ray.ant.affinity_stage import AffinityBatch, bucket_affinity, draw_affinity_batch
from ant_ray.ant.clustering import interval_clustering
from ant_ray.ant.train import (ClusteredStep, cluster_counts, cluster_losses, sample_cluster_timesteps,
                               train_ant)
from ant_ray.cli import build_parser, main as cli_main
from ant_ray.config import load_config
from ant_ray.diffusion import NoiseSchedule, build_model, build_weighting, diffusion_loss, model_denoiser
from ant_ray.mtl import MTL_METHODS, build_mtl_method, flat_grad
from ant_ray.stages.ant_train import resolve_clusters, run_ant

K = 5
INTERVALS = interval_clustering(K, "timestep", T=1000)  # five equal intervals of 200
TINY = ["device=cpu", "ant.batch_size=8", "ant.log_every=1", "ant.lr=0.001", "ant.resources.cpu=1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two oversubscribed OpenMP threads on a shared 2-core machine are ~20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ant_config(*overrides: str, tmp: Path | None = None):
    extra = [f"output_dir={tmp}", f"tracking.uri=sqlite:///{tmp}/mlflow.db"] if tmp else []
    return load_config(None, TINY + list(overrides) + extra)


def loop_config(cfg, out: Path, intervals=INTERVALS, **extra) -> dict:
    return {"pipeline": cfg.model_dump(mode="json"), "intervals": [list(iv) for iv in intervals],
            "init_model": None, "output_dir": str(out), "tracking": None, "seed": cfg.seed, "name": "test", **extra}


def train_local(cfg, out: Path, **extra):
    """train_ant in Ray Train's local mode (in-process, no cluster)."""
    return TorchTrainer(train_ant, train_loop_config=loop_config(cfg, out, **extra),
                        scaling_config=ScalingConfig(num_workers=0)).fit()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "diffusion_pytorch_model.safetensors")


# ------------------------------------------------------------------------------------------------ pure helpers


def test_cluster_losses_hand_computed_with_absent_clusters():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    ids = torch.tensor([0, 2, 2, 0, 2])
    losses, counts = cluster_losses(per_sample, ids, 4)
    torch.testing.assert_close(losses, torch.tensor([2.5, 0.0, 10 / 3, 0.0]))
    assert counts.tolist() == [2, 0, 3, 0] and counts.dtype == torch.int64
    assert torch.isfinite(losses).all()
    losses[2].backward()
    torch.testing.assert_close(per_sample.grad, torch.tensor([0.0, 1 / 3, 1 / 3, 0.0, 1 / 3]))
    with pytest.raises(ValueError, match=r"cluster_ids must lie in \[0, 4\)"):
        cluster_counts(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="negative"):
        cluster_counts(torch.tensor([-1, 0]), 4)
    with pytest.raises(ValueError, match="integer tensor"):
        cluster_losses(per_sample.detach(), ids.float(), 4)


def test_uniform_timesteps_cover_the_range_deterministically():
    draw = lambda seed: sample_cluster_timesteps(4000, INTERVALS, "uniform", torch.Generator().manual_seed(seed))  # noqa: E731
    t = draw(0)
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) < 1000
    assert torch.equal(t, draw(0)) and not torch.equal(t, draw(1))
    counts = cluster_counts(torch.as_tensor(np.repeat(np.arange(K), 200))[t], K)
    assert all(abs(c - 800) < 4 * math.sqrt(800) for c in counts.tolist())  # ~uniform over equal clusters


def test_stratified_timesteps_balance_unequal_clusters():
    intervals = [(0, 10), (10, 100), (100, 1000)]
    lookup = torch.as_tensor(np.repeat([0, 1, 2], [10, 90, 900]))
    generator = torch.Generator().manual_seed(0)
    extra_counts = np.zeros(3)
    within = np.zeros(10)  # position inside the smallest cluster: should be uniform over its 10 timesteps
    for _ in range(300):
        t = sample_cluster_timesteps(10, intervals, "stratified", generator)
        counts = cluster_counts(lookup[t], 3).numpy()
        assert counts.sum() == 10 and set(counts.tolist()) <= {3, 4}  # 10 = 3 + 3 + 3 + one extra
        extra_counts += counts == 4
        np.add.at(within, t[t < 10].numpy(), 1)
    assert all(60 < e < 140 for e in extra_counts)  # the extra sample goes to each cluster ~100 times of 300
    assert within.min() > 0.5 * within.mean()
    # batch < k: some clusters absent, none twice
    t = sample_cluster_timesteps(2, intervals, "stratified", generator)
    assert sorted(cluster_counts(lookup[t], 3).tolist()) == [0, 1, 1]
    with pytest.raises(ValueError, match="timestep_sampling must be one of"):
        sample_cluster_timesteps(4, intervals, "sorted", generator)
    with pytest.raises(ValueError, match="contiguous"):
        sample_cluster_timesteps(4, [(0, 5), (6, 10)], "uniform", generator)


# ------------------------------------------------------------------------------------------------ one step


def _step_problem(method_name: str, options: dict | None = None):
    """A tiny UNet, a batch whose timesteps hit clusters 0, 1 and 3 only (2 and 4 absent), and an SGD(lr=1)
    optimizer, so the parameter change of one step is minus the gradient the step wrote."""
    model = build_model("tiny", resolution=8, channels=1, seed=0)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(6, 1, 8, 8, generator=generator)
    t = torch.tensor([10, 650, 250, 199, 700, 300])  # clusters 0, 3, 1, 0, 3, 1
    method = build_mtl_method(method_name, K, options)
    schedule = NoiseSchedule.create("linear", 1000)
    weighting = build_weighting("p2", gamma=1.0, k=1.0)  # a non-uniform weighting, combined with the method
    loss_fn = lambda denoise, a, b, c: diffusion_loss(denoise, a, b, c, schedule, target="epsilon",  # noqa: E731
                                                      weighting=weighting)
    return model, method, (x0, t, noise), schedule, loss_fn


def _brute_force_direction(model, method, batch, loss_fn, step):
    """The textbook way: one forward over the whole batch, k backward passes of the cluster means."""
    x0, t, noise = batch
    per_sample = loss_fn(model_denoiser(model), x0, t, noise)
    ids = torch.as_tensor(np.repeat(np.arange(K), 200))[t]
    losses, counts = cluster_losses(per_sample, ids, K)
    present = counts > 0
    params = list(model.parameters())
    if not method.needs_grads:  # backward() also gives the method's own parameters (UW) their .grad
        method.weighted_loss(losses, present).backward()
        return torch.cat([p.grad.reshape(-1) for p in params]), None
    grads = torch.stack([flat_grad(losses[i], params) if present[i] else torch.zeros(sum(p.numel() for p in params))
                         for i in range(K)])
    return method.combine(grads, losses.detach(), present, step), grads


@pytest.mark.parametrize("method_name,micro_batch", [("uw", 6), ("uw", 4), ("pcgrad", 6), ("pcgrad", 4),
                                                     ("gradnorm", 4), ("uw_pcgrad", 6)])
def test_step_equals_brute_force_per_cluster_gradients(method_name, micro_batch):
    model, method, batch, schedule, loss_fn = _step_problem(method_name)
    reference_model, reference_method = copy.deepcopy(model), copy.deepcopy(method)
    expected, _ = _brute_force_direction(reference_model, reference_method, batch, loss_fn, step=0)

    optimizer = torch.optim.SGD([{"params": list(model.parameters())}, {"params": list(method.parameters())}],
                                lr=1.0)
    step = ClusteredStep(model=model, ddp_model=model, method=method, optimizer=optimizer,
                         scaler=torch.amp.GradScaler("cpu", enabled=False), schedule=schedule, loss_fn=loss_fn,
                         intervals=INTERVALS, micro_batch=micro_batch, grad_clip=None, world_size=1,
                         autocast_dtype=None)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    counts = cluster_counts(step.cluster_ids(batch[1]), K)
    stats = step(*batch, counts, 0)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(before - after, expected, rtol=1e-4, atol=1e-6)
    assert stats.counts.tolist() == [2, 2, 0, 2, 0] and stats.per_cluster_grads == method.needs_grads
    for p, q in zip(method.parameters(), reference_method.parameters()):  # UW log-variances, GradNorm weights
        torch.testing.assert_close(p.detach(), q.detach() - q.grad if q.grad is not None else q.detach(),
                                   rtol=1e-4, atol=1e-6)


def test_nash_fast_path_equals_combine_with_cached_weights():
    """Between refreshes Nash-MTL needs one backward, not k: the result must equal combine's."""
    model, method, batch, schedule, loss_fn = _step_problem("nash_mtl", {"update_every": 5, "max_norm": 0.05})
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    step = ClusteredStep(model=model, ddp_model=model, method=method, optimizer=optimizer,
                         scaler=torch.amp.GradScaler("cpu", enabled=False), schedule=schedule, loss_fn=loss_fn,
                         intervals=INTERVALS, micro_batch=6, grad_clip=None, world_size=1, autocast_dtype=None)
    counts = cluster_counts(step.cluster_ids(batch[1]), K)
    assert step(*batch, counts, 0).per_cluster_grads  # step 0 refreshes the weights
    reference_model, reference_method = copy.deepcopy(model), copy.deepcopy(method)
    expected, grads = _brute_force_direction(reference_model, reference_method, batch, loss_fn, step=1)
    assert int(reference_method.last_refresh_step) == 0  # combine reused the cached weights too
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert not step(*batch, counts, 1).per_cluster_grads
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(before - after, expected, rtol=1e-4, atol=1e-7)
    assert float(expected.norm()) == pytest.approx(0.05, rel=1e-3)  # the max_norm clip was applied


# ------------------------------------------------------------------------------------------------ the loop


@pytest.mark.parametrize("method_name", MTL_METHODS.names())
def test_every_method_trains_under_mixed_precision_with_clipping(method_name, tmp_path):
    """Batch 4 over 5 clusters: every step has an absent cluster. fp16's scaler starts at 2^16, overflows and backs
    off on the first steps (skipped, as in plain training), then steps; bf16 needs no scaler."""
    base = weights(_initial_model(tmp_path))
    for precision, steps in (("bf16", 2), ("fp16", 4)):
        cfg = ant_config(f"ant.method={method_name}", f"ant.mixed_precision={precision}", "ant.grad_clip=0.5",
                         "ant.batch_size=4", f"ant.steps={steps}", "ant.checkpoint_every=100")
        result = train_local(cfg, tmp_path / precision)
        trained = weights(tmp_path / precision / "model")
        assert all(torch.isfinite(v).all() for v in trained.values())
        assert any(not torch.equal(trained[k], base[k]) for k in base), f"{precision}: no step was taken"
        assert result.metrics["step"] == steps and math.isfinite(result.metrics["loss"])
        assert sum(result.metrics[f"count_cluster_{i}"] for i in range(K)) == 4
        state = json.loads((tmp_path / precision / "checkpoint" / "state.json").read_text())
        if precision == "fp16":
            assert state["extra"]["scaler"]["scale"] < 65536.0  # it backed off at least once
        else:
            assert state["extra"]["scaler"] == {}


def _initial_model(tmp_path: Path) -> Path:
    from ant_ray.diffusion import save_model

    return save_model(build_model("tiny", resolution=8, channels=1, seed=0), tmp_path / "init")


@pytest.mark.parametrize("method_name,options,precision", [
    ("uw_pcgrad", {}, "bf16"),  # learnable log-variances and a projection-order RNG
    ("nash_mtl", {"update_every": 2}, "no"),  # cached weights and refresh bookkeeping in buffers
    ("rlw", {}, "fp16"),  # the method's own generator and the grad scaler (its first steps overflow and back off)
])
def test_resume_reproduces_the_uninterrupted_run(method_name, options, precision, tmp_path):
    settings = [f"ant.method={method_name}", f"ant.method_options={json.dumps(options)}",
                f"ant.mixed_precision={precision}", "ant.checkpoint_every=2", "ant.timestep_sampling=stratified"]
    if precision == "no":
        settings.remove("ant.mixed_precision=no")
    straight = tmp_path / "straight"
    train_local(ant_config(*settings, "ant.steps=6"), straight)
    first = tmp_path / "first"
    train_local(ant_config(*settings, "ant.steps=3"), first)
    resumed = tmp_path / "resumed"
    result = train_local(ant_config(*settings, "ant.steps=6"), resumed, resume_from=str(first / "checkpoint"))
    assert result.return_value["start_step"] == 3
    for sub in ("model", "ema"):
        a, b = weights(straight / sub), weights(resumed / sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    a = load_file(straight / "checkpoint" / "extra.safetensors")
    b = load_file(resumed / "checkpoint" / "extra.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the MTL method's state
    a = load_file(straight / "checkpoint" / "optimizer.safetensors")
    b = load_file(resumed / "checkpoint" / "optimizer.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((straight / "checkpoint" / "state.json").read_text())["extra"]["scaler"]
            == json.loads((resumed / "checkpoint" / "state.json").read_text())["extra"]["scaler"])


def test_loop_rejects_intervals_that_do_not_match_the_config(tmp_path):
    with pytest.raises(ValueError, match="intervals must be ant.k=5"):
        train_local(ant_config("ant.steps=1"), tmp_path, intervals=[(0, 500), (500, 1000)])


# ------------------------------------------------------------------------------------------------ affinity


class LinearDenoiser(torch.nn.Module):
    """prediction = a * x_t + b: its loss gradient has a closed form."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(-0.2, dtype=torch.float64))

    def forward(self, x_t, t):
        return self.a * x_t + self.b


def test_bucket_affinity_matches_closed_form_gradients():
    schedule = NoiseSchedule.create("linear", 100)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 1, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(5, 1, 4, 4, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([[0, 3, 7, 9, 1], [20, 25, 31, 39, 22], [55, 60, 61, 70, 79], [90, 95, 99, 91, 93]])
    batch = AffinityBatch(x0, noise, timesteps)
    model = LinearDenoiser()

    # d/da mean_n mean_pix (a x_t + b - eps)^2 = mean 2 r x_t,  d/db = mean 2 r  (epsilon target, uniform weights)
    abar = schedule.alphas_cumprod.numpy()
    grads = []
    for row in timesteps.numpy():
        a_t = np.sqrt(abar[row])[:, None, None, None]
        s_t = np.sqrt(1 - abar[row])[:, None, None, None]
        x_t = a_t * x0.numpy() + s_t * noise.numpy()
        r = 0.3 * x_t - 0.2 - noise.numpy()
        grads.append([np.mean(2 * r * x_t), np.mean(2 * r)])
    grads = np.array(grads)
    expected = grads @ grads.T / np.outer(np.linalg.norm(grads, axis=1), np.linalg.norm(grads, axis=1))

    for chunk in (None, 2):
        got = bucket_affinity(model, model.parameters(), batch, schedule, target="epsilon",
                              weighting=build_weighting("uniform"), chunk_size=chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)  # the loss is float32


def test_affinity_batch_draws_inside_each_bucket():
    images = torch.rand(30, 1, 8, 8)
    batch = draw_affinity_batch(images, 1000, buckets=7, samples_per_bucket=12, seed=3)
    assert batch.x0.shape == batch.noise.shape == (12, 1, 8, 8) and batch.timesteps.shape == (7, 12)
    for row, (start, end) in zip(batch.timesteps.tolist(), bucket_bounds(7, 1000)):
        assert all(start <= t < end for t in row)
    again = draw_affinity_batch(images, 1000, buckets=7, samples_per_bucket=12, seed=3)
    assert torch.equal(batch.timesteps, again.timesteps) and torch.equal(batch.noise, again.noise)
    assert len({tuple(x.flatten().tolist()) for x in batch.x0}) == 12  # distinct images when there are enough
    with pytest.raises(ValueError, match="samples_per_bucket"):
        draw_affinity_batch(images, 1000, buckets=7, samples_per_bucket=0, seed=3)


# ------------------------------------------------------------------------------------------------ clusters


def test_resolve_clusters_recovers_planted_affinity_blocks():
    cfg = load_config(None, ["diffusion.T=30", "ant.k=3", "ant.clustering=gradient", "ant.min_size=1",
                             "ant.max_size=30", "sampler.steps=10"])
    block = np.kron(np.eye(3), np.ones((2, 2)))  # buckets {0,1}, {2,3}, {4,5} agree; across blocks orthogonal
    assert resolve_clusters(cfg, affinity=block * 0.9 + np.eye(6) * 0.1) == [(0, 10), (10, 20), (20, 30)]
    with pytest.raises(ValueError, match="needs the bucket affinity"):
        resolve_clusters(cfg)
    timestep = load_config(None, ["ant.k=4"])
    assert resolve_clusters(timestep) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    snr = resolve_clusters(load_config(None, ["ant.k=4", "ant.clustering=snr"]))
    sizes = [b - a for a, b in snr]
    assert snr[0][0] == 0 and snr[-1][1] == 1000 and all(125 <= s <= 500 for s in sizes)  # the App. G bounds
    assert sizes[0] < sizes[-1]  # SNR changes fastest at small t, so the first interval is the shortest


def test_cli_has_train_ant_and_checks_resume_folder(tmp_path, capsys):
    args = build_parser().parse_args(["train-ant", "search_spaces/ant_digits.yaml", "--resume-from", "x"])
    assert args.command == "train-ant" and args.resume_from == "x"
    code = cli_main(["train-ant", "search_spaces/ant_digits.yaml", "--output-dir", str(tmp_path),
                     "--resume-from", str(tmp_path / "missing")])
    assert code == 2 and "not a checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ on Ray


@pytest.fixture(scope="module")
def local_ray():
    shared_ray()
    yield


def assert_same_training(two: Path, one: Path) -> None:
    """Parameters and AdamW moments equal to float tolerance. The moments matter: Adam's step is invariant to a
    global gradient scale, its first moment is not, so a wrong averaging factor cannot hide."""
    a, b = weights(two / "model"), weights(one / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-4)
    a = load_file(two / "checkpoint" / "optimizer.safetensors")
    b = load_file(one / "checkpoint" / "optimizer.safetensors")
    for moment in ("exp_avg", "exp_avg_sq"):  # compared as whole vectors: some biases have ~1e-12 (noise) gradients
        keys = sorted(k for k in b if k.endswith(moment))
        assert keys and sorted(k for k in a if k.endswith(moment)) == keys
        va, vb = torch.cat([a[k].flatten() for k in keys]), torch.cat([b[k].flatten() for k in keys])
        assert float((va - vb).norm()) <= 1e-4 * float(vb.norm()), moment


@pytest.mark.slow
def test_run_ant_two_workers_uw_gradient_clustering_equals_one_worker(local_ray, tmp_path, monkeypatch):
    """The whole stage: affinity -> gradient clustering -> 2 DDP workers -> FID, tracked in MLflow; then the same
    training in one process gives the same model."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = ["ant.method=uw", "ant.steps=3", "ant.checkpoint_every=2", "ant.resources.num_workers=2",
                "ant.clustering=gradient", "ant.affinity.buckets=10", "ant.affinity.samples_per_bucket=4",
                "ant.weighting.name=p2", "fid.num_samples=32", "fid.batch_size=32", "sampler.steps=2",
                "ant.affinity.warmup_steps=1"]
    cfg = ant_config(*settings, tmp=tmp_path)
    result = run_ant(cfg)
    # affinity measured after one step of warm-up training (one Train run per warm-up point: one keeps the suite fast)
    assert {p.name for p in (result.run_dir / "affinity").glob("warmup_model_*")} == {"warmup_model_1"}

    assert len(result.intervals) == K and result.intervals[0][0] == 0 and result.intervals[-1][1] == 1000
    assert np.load(result.affinity_file).shape == (10, 10)
    assert result.fid is not None and math.isfinite(result.fid) and result.metric == "fid32_domain"
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ant_ray.method"] == "uw"
    assert run.data.params["ant.method"] == "uw" and json.loads(run.data.params["ant.intervals"]) == [
        list(iv) for iv in result.intervals]
    assert "fid32_domain" in run.data.metrics and "mtl_uw_weight_0" in run.data.metrics
    assert len(client.get_metric_history(result.run_id, "images_per_s")) == 3  # logged every step by rank 0
    assert any(k.startswith("loss_cluster_") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"affinity", "intervals.json", "loss_curve.png", "summary.txt"} <= artifacts
    assert (result.run_dir / "affinity" / "bucket_affinity.png").is_file()

    single = tmp_path / "single"
    train_local(ant_config(*settings), single, intervals=result.intervals)
    assert_same_training(result.run_dir, single)


@pytest.mark.parametrize("method_name", ["nash_mtl"])
def test_two_workers_equal_one_worker(method_name, local_ray, tmp_path):
    """Nash-MTL covers both DDP paths of the methods: step 0 refreshes its weights from per-cluster gradients
    all-reduced across workers (the path of PCGrad, CAGrad, MGDA, ...), steps 1-2 take the one-backward path
    through DDP (the path of UW, RLW, ...; the UW test above covers it in the whole stage too)."""
    cfg = ant_config(f"ant.method={method_name}", "ant.steps=3", "ant.checkpoint_every=100",
                     "ant.resources.num_workers=2")
    TorchTrainer(train_ant, train_loop_config=loop_config(cfg, tmp_path / "two"),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"two-{method_name}", storage_path=str(tmp_path / "ray"))).fit()
    train_local(cfg, tmp_path / "one")
    assert_same_training(tmp_path / "two", tmp_path / "one")
