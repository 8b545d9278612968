"""The sections of a configuration: plain, validated data. Every section forbids unknown keys, so a typo fails at
load time with the field's dotted name, before Ray starts."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ant_ray.plugin_options import check_mtl_options, check_weighting_options


class ConfigError(ValueError):
    """Bad configuration: the message names the field and how to fix it."""


class Section(BaseModel):
    # inf / nan are never a sensible setting, and JSON (MLflow params, the saved config) cannot hold them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _plain_json(value: Any, where: str) -> Any:
    """Only what JSON holds exactly (the config is logged and saved as JSON): numbers, strings, booleans, null,
    lists and string-keyed mappings of those."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{where} holds {value}; use a finite number")
        return value
    if isinstance(value, list):
        return [_plain_json(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain_json(v, where) for k, v in value.items()}
    raise ValueError(f"{where} holds a {type(value).__name__} ({value!r}); use numbers, strings, booleans or lists")


class TrackingConfig(Section):
    uri: Optional[str] = None  # default: sqlite file in output_dir; MLFLOW_TRACKING_URI overrides
    experiment: str = "ant_ray"


class RayConfig(Section):
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else a private local instance
    num_cpus: Optional[int] = Field(None, ge=1)  # logical CPUs of the private local instance


class DataConfig(Section):
    dataset: Literal["digits", "cifar10", "image-folder"] = "digits"
    path: Optional[str] = None
    resolution: int = Field(8, ge=4)
    channels: Literal[1, 3] = 1
    limit: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.dataset != "digits" and not self.path:
            raise ValueError(f"data.path is required for dataset {self.dataset!r} (digits ships with scikit-learn)")
        return self


class DiffusionConfig(Section):
    schedule: Literal["linear", "cosine"] = "linear"
    T: int = Field(1000, ge=2)
    prediction: Literal["epsilon", "v", "x0"] = "epsilon"


class ModelConfig(Section):
    base: str = "tiny"  # a preset (tiny, small, ddpm-cifar10) or a local diffusers UNet2DModel folder


class WeightingConfig(Section):
    name: str = "uniform"
    options: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "WeightingConfig":
        check_weighting_options(self.name, self.options)  # raises naming the weighting and its options
        return self


class SamplerConfig(Section):
    name: Literal["ddim", "ddpm"] = "ddim"
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0.0, le=1.0)
    # The network's precision while sampling (FID, sample grids): bf16/fp16 autocast is faster where the hardware
    # supports it but moves FID a little; benchmarks/bench_sampling_precision.py measures whether it keeps rankings.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class FIDConfig(Section):
    extractor: Literal["domain", "inception"] = "domain"
    num_samples: int = Field(5000, ge=2)
    batch_size: int = Field(500, ge=1)
    seed: int = 1234


class ResourcesConfig(Section):
    """Resources per Ray Train worker (or per trial): declared, never assumed."""
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    num_workers: int = Field(1, ge=0)  # 0: Ray Train's in-process local mode (tests)

    @field_validator("gpu")
    @classmethod
    def _whole_gpus(cls, v: float) -> float:
        if v not in (0, 1) and v != int(v):
            raise ValueError("fractional GPUs per worker break NCCL ('Duplicate GPU detected'); use 0 or 1")
        return v


class TrainConfig(Section):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)  # global batch, split across workers
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_accumulation: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    weighting: WeightingConfig = Field(default_factory=WeightingConfig)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML reads a bare `no` as false

    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)


class FinetuneConfig(TrainConfig):
    num_specialists: int = Field(2, ge=1)
    ranges: Optional[list[tuple[int, int]]] = None  # default: N equal ranges of [0, T)
    p: float = Field(0.1, ge=0, le=1)  # probability a batch's timesteps come from all of [0, T) (DeMe Eq. 6)
    consistency_weight: float = Field(1.0, ge=0)  # lambda (DeMe Eq. 5)
    lr: float = Field(1e-4, gt=0)
    # Ranges from ANT's interval clustering (DP over N intervals) instead of N equal ranges; `ranges` wins if set.
    range_clustering: Optional[Literal["timestep", "snr"]] = None
    seed: Optional[int] = None  # finetuning seed (specialist i uses seed + i); None: the top-level seed + 1
    channel_projection: bool = False  # DeMe's identity-initialised CxC 1x1 projections
    projection_places: Union[Literal["default"], list[str]] = "default"
    # How many specialists one Ray Train worker trains in turn (each with `resources`). Above 1 it saves a worker
    # process start-up per specialist where workers are scarce (CPU); results are the same. Needs num_workers <= 1.
    specialists_per_worker: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> "FinetuneConfig":
        if self.specialists_per_worker > 1 and self.resources.num_workers > 1:
            raise ValueError(f"finetune.specialists_per_worker={self.specialists_per_worker} needs "
                             f"finetune.resources.num_workers 1 (a worker that trains specialists in turn is not "
                             f"data parallel); set one of them to 1")
        if self.ranges is not None:
            if len(self.ranges) != self.num_specialists:
                raise ValueError(f"finetune.ranges has {len(self.ranges)} ranges but finetune.num_specialists is "
                                 f"{self.num_specialists}")
            for (a, b), (c, _) in zip(self.ranges, self.ranges[1:] + [(None, None)]):
                if not a < b or (c is not None and b != c):
                    raise ValueError(f"finetune.ranges must be contiguous half-open [start, end) pairs, got "
                                     f"{self.ranges}")
        return self


class AffinityConfig(Section):
    """Task affinity for gradient-based clustering (ANT Sec. 3.2): gradient cosine between timestep buckets."""
    buckets: int = Field(50, ge=2)
    samples_per_bucket: int = Field(32, ge=1)
    sketch_dim: Optional[int] = Field(None, ge=16)  # None: exact (buckets x P memory); else random projection
    warmup_steps: int = Field(0, ge=0)  # plain training steps before measuring affinity (0: use model.base as is)
    checkpoints: int = Field(1, ge=1)  # average the affinity at warmup_steps x 1..checkpoints (ANT Sec. 3.2)

    @model_validator(mode="after")
    def _checkpoints_need_warmup(self) -> "AffinityConfig":
        if self.checkpoints > 1 and self.warmup_steps == 0:
            raise ValueError("ant.affinity.checkpoints > 1 averages over training: set ant.affinity.warmup_steps > 0")
        return self


class ANTConfig(TrainConfig):
    """Clustered-MTL training (ANT): k timestep clusters by interval DP, an MTL method over the clusters."""
    k: int = Field(5, ge=1)
    clustering: Literal["timestep", "snr", "gradient"] = "timestep"
    min_size: Optional[int] = Field(None, ge=1)  # default T/(2k) (ANT App. G)
    max_size: Optional[int] = Field(None, ge=1)  # default 2T/k
    method: str = "uw"
    method_options: dict[str, Any] = Field(default_factory=dict)
    timestep_sampling: Literal["uniform", "stratified"] = "uniform"
    affinity: AffinityConfig = Field(default_factory=AffinityConfig)
    init_model: Optional[str] = None  # start from a diffusers folder instead of model.base

    # Field validators, so that an error names ant.method or ant.method_options (method is checked first)
    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        check_mtl_options(method)  # raises naming the methods there are
        return method

    @field_validator("method_options")
    @classmethod
    def _known_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        _plain_json(options, "ant.method_options")
        if "method" in info.data:  # else the method itself failed, and says so
            check_mtl_options(info.data["method"], options)  # raises naming the option and the rule
        return options

    @model_validator(mode="after")
    def _sizes(self) -> "ANTConfig":
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ValueError("ant.min_size must be <= ant.max_size")
        return self


class MergeSearchConfig(Section):
    method: Literal["linear", "ties"] = "linear"
    ties_density: float = Field(0.2, gt=0, le=1)  # TIES: fraction of each task vector kept by magnitude
    # Per-layer-group weights: {group: key prefix}, first match wins, "" catches the rest. None: one weight per model.
    layer_groups: Optional[dict[str, str]] = None
    searcher: Literal["optuna", "grid"] = "optuna"
    num_trials: int = Field(16, ge=1)  # optuna only; the grid's size follows from its steps
    max_concurrent: int = Field(2, ge=1)
    weight_low: float = 0.0
    weight_high: float = 1.5
    grid_step: float = Field(0.25, gt=0)  # DeMe Sec. 8: a coarse grid ...
    grid_fine_step: float = Field(0.05, gt=0)  # ... then a finer grid within one coarse step of the best
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _bounds(self) -> "MergeSearchConfig":
        if not self.weight_low < self.weight_high:
            raise ValueError("merge_search.weight_low must be < merge_search.weight_high")
        if self.grid_fine_step >= self.grid_step:
            raise ValueError("merge_search.grid_fine_step must be smaller than merge_search.grid_step")
        if self.layer_groups is not None and (not self.layer_groups or not all(
                isinstance(v, str) for v in self.layer_groups.values())):
            raise ValueError("merge_search.layer_groups must map group names to key prefixes, e.g. "
                             "{down: 'down_blocks.', mid: 'mid_block.', up: 'up_blocks.', other: ''}")
        return self

    def merge_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"method": self.method, "layer_groups": self.layer_groups}
        if self.method == "ties":
            options["density"] = self.ties_density
        return options


class ComparisonConfig(Section):
    """`ant-ray compare-deme` / `compare-ant`: the seeds each arm runs with; for ANT, the methods x clusterings."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    ant_methods: list[str] = Field(default_factory=lambda: ["uw", "pcgrad", "nash_mtl", "uw_pcgrad"])
    ant_clusterings: list[Literal["timestep", "snr", "gradient"]] = Field(
        default_factory=lambda: ["timestep", "snr", "gradient"])
    # compare-ant: how many (arm, seed) runs go at once (each holds ant.resources; size ray.num_cpus to match).
    max_concurrent: int = Field(default=1, ge=1)

    @field_validator("ant_methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        for name in methods:
            check_mtl_options(name)  # raises listing the choices
        return methods
