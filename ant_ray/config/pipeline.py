"""The whole configuration: every section, the optional `search:`, and the checks that span sections."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, model_validator

from ant_ray.config.search import STAGE_SECTION, UNSEARCHABLE, SearchConfig, TrainingStageSearch
from ant_ray.config.sections import (ANTConfig, ComparisonConfig, DataConfig, DiffusionConfig, FIDConfig,
                                     FinetuneConfig, MergeSearchConfig, ModelConfig, RayConfig, SamplerConfig,
                                     Section, TrackingConfig, TrainConfig)
from ant_ray.diffusion.presets import PRESETS, check_preset_resolution


class PipelineConfig(Section):
    name: str = "ant_ray"
    seed: int = 0
    output_dir: str = "ant_ray_runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    fid: FIDConfig = Field(default_factory=FIDConfig)
    pretrain: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    merge_search: MergeSearchConfig = Field(default_factory=MergeSearchConfig)
    ant: ANTConfig = Field(default_factory=ANTConfig)
    comparison: ComparisonConfig = Field(default_factory=ComparisonConfig)
    search: Optional[SearchConfig] = None  # `ant-ray search`: what to search, per stage (config/search.py)

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        T = self.diffusion.T
        if self.sampler.steps > T:
            raise ValueError(f"sampler.steps ({self.sampler.steps}) cannot exceed diffusion.T ({T})")
        if self.finetune.num_specialists > T:
            raise ValueError(f"finetune.num_specialists ({self.finetune.num_specialists}) cannot exceed diffusion.T "
                             f"({T})")
        if self.ant.k > T:
            raise ValueError(f"ant.k ({self.ant.k}) cannot exceed diffusion.T ({T})")
        k, low, high = self.ant.k, self.ant.min_size, self.ant.max_size
        if (low is not None and k * low > T) or (high is not None and k * high < T):
            raise ValueError(f"ant.min_size / ant.max_size ({low} / {high}) leave no way to split diffusion.T ({T}) "
                             f"into ant.k ({k}) intervals: k x min_size must be <= T <= k x max_size")
        if self.model.base in PRESETS:  # a model folder is checked against its own config when it is loaded
            check_preset_resolution(self.model.base, self.data.resolution)
        if self.finetune.ranges is not None and (self.finetune.ranges[0][0] != 0 or self.finetune.ranges[-1][1] != T):
            raise ValueError(f"finetune.ranges must cover [0, {T}) exactly, got {self.finetune.ranges}")
        if self.search is not None:
            _check_search(self)
        return self

    def check_searchable(self) -> None:
        """`ant-ray search` needs a search: section with at least one stage."""
        if self.search is None or not self.search.stages():
            raise ValueError("this config has no search: section; add one (see search_spaces/quickstart.yaml) or run "
                             "the fixed pipeline with `ant-ray run`")

    def worker_dump(self) -> dict:
        """The config as the training loops and scoring tasks receive it (JSON-able; the search section stays with
        the driver)."""
        return self.model_dump(mode="json", exclude={"search"})

    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    def tracking_uri(self) -> str:
        return (os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.uri
                or f"sqlite:///{self.output_path() / 'mlflow.db'}")




def _field_exists(cfg: PipelineConfig, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Section) or part not in type(node).model_fields:
            return False
        node = getattr(node, part)
    return True


def with_values(cfg: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """A copy of ``cfg`` (without its search section) with dotted fields set, validated like a loaded config."""
    raw = cfg.model_dump(mode="json", exclude={"search"})
    for dotted, value in values.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return PipelineConfig.model_validate(raw)


def _check_search(cfg: PipelineConfig) -> None:
    """Every space key names a searchable field of its stage's section, and every value its distribution can take
    passes that field's own validation; stage combinations make sense. Raises naming `search.<stage>...`."""
    search = cfg.search
    if not search.stages():
        raise ValueError("search has no stage: add at least one of search.ant, search.deme, search.merge")
    for stage in ("ant", "deme"):
        settings: TrainingStageSearch | None = getattr(search, stage)
        if settings is None:
            continue
        section = STAGE_SECTION[stage]
        for key, dist in settings.space.items():
            where = f"search.{stage}.space[{key}]"
            if not key.startswith(section + ".") or not _field_exists(cfg, key):
                raise ValueError(f"{where}: the {stage} stage searches fields of its own section; {key!r} is not "
                                 f"a field of `{section}` (e.g. {section}.lr)")
            if any(key == f or key.startswith(f + ".") for f in UNSEARCHABLE[stage]):
                raise ValueError(f"{where}: {key} is fixed per stage and cannot be searched")
            for value in dist.extremes():
                try:
                    with_values(cfg, {key: value})
                except ValidationError as err:
                    reason = err.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"{where}: the value {value!r} is not valid for {key}: {reason}") from None
            settings.check_first_value(f"search.{stage}", key, functools.reduce(getattr, key.split("."), cfg))
        steps = getattr(cfg, section).steps
        if settings.eval_every is not None:
            if f"{section}.steps" in settings.space:
                raise ValueError(f"search.{stage}.space[{section}.steps]: trials report FID at the same steps "
                                 f"(eval_every), so {section}.steps is fixed while eval_every is set")
            if steps % settings.eval_every:
                raise ValueError(f"search.{stage}.eval_every ({settings.eval_every}) must divide {section}.steps "
                                 f"({steps}) so that every trial reports at its last step")
            grace = settings.scheduler.grace_period
            if settings.scheduler.name == "asha" and grace is not None and (grace % settings.eval_every
                                                                             or grace > steps):
                raise ValueError(f"search.{stage}.scheduler.grace_period ({grace}) must be a multiple of eval_every "
                                 f"({settings.eval_every}) and at most {section}.steps ({steps})")
    deme = search.deme
    if deme is not None and deme.ranges == "ant":
        if search.ant is None:
            raise ValueError("search.deme.ranges: 'ant' takes the ant winner's intervals; add a search.ant stage or "
                             "use equal / timestep / snr")
        if "finetune.num_specialists" in deme.space:
            raise ValueError("search.deme.space[finetune.num_specialists]: with ranges 'ant', N is the ant "
                             "winner's k; search ant.k instead")
    merge = search.merge
    if merge is not None:
        if merge.task_vectors is not None and deme is not None:
            raise ValueError("search.merge.task_vectors: the merge stage takes the deme winner's task vectors when "
                             "search.deme is present; remove one of the two")
        if merge.task_vectors is None and deme is None:
            raise ValueError("search.merge.task_vectors: nothing to merge; list task vector files (with "
                             "search.merge.base_model) or add a search.deme stage")
        merge.check_grid_budget(search.max_task_vectors(cfg.ant.k, cfg.finetune.num_specialists), cfg.merge_search)
        # A candidate's sample stream goes on from one fidelity to the next in whole batches of fid.batch_size, the
        # batches every stage samples in: so one model scored on n samples gets one score in every stage.
        batch = cfg.fid.batch_size
        broken = [n for n in merge.fidelities[:-1] if n % batch]
        if broken:
            raise ValueError(f"search.merge.fidelities: {broken} must be multiples of fid.batch_size ({batch}), so "
                             "that a candidate's samples continue from one fidelity to the next in the batches every "
                             f"stage samples in; use multiples of {batch}, or set fid.batch_size="
                             f"{math.gcd(*merge.fidelities[:-1])}")
