"""The `search:` section: what Ray Tune + Optuna search, per stage, and how.

    search:
      ant:                                   # 1. train from scratch with ANT; a trial is one Ray Train run
        space:
          ant.k: {type: int, low: 2, high: 6}
          ant.method: {type: categorical, choices: [uw, pcgrad, nash_mtl]}
          ant.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        num_trials: 12
        max_concurrent: 2
        eval_every: 250                      # FID at steps 250, 500, ... (the same steps for every trial)
        scheduler: {name: asha, grace_period: 250, reduction_factor: 3}
      deme:                                  # 2. N range specialists of the ant winner (or model.base), merged
        space: {finetune.p: {type: float, low: 0.0, high: 0.6}}
        ranges: ant                          # equal | timestep | snr | ant (the ant winner's own intervals)
        merge: task_arithmetic               # or search: a small inner merge-weight search per trial
      merge:                                 # 3. merge weights by successive halving over the sample count
        fidelities: [1000, 2500, 5000]
        num_candidates: 16
      final: {num_samples: 10000, seeds: [0, 1, 2]}

Space keys are dotted paths of the stage's own section (`ant.*` for ant, `finetune.*` for deme); every value a
distribution can take is checked against that field's own validation when the config loads (see pipeline.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, model_validator

from ant_ray.config.sections import MergeSearchConfig, Section

STAGES = ("ant", "deme", "merge")  # the chain order
STEP_TOLERANCE = 1e-8  # in steps: Optuna's FloatDistribution accepts a value this close to its grid
STAGE_SECTION = {"ant": "ant", "deme": "finetune"}  # the config section a stage's space may change
# Fields a trial may not change: they are fixed per stage (affinity is measured once), or declared, not searched.
UNSEARCHABLE = {"ant": ("ant.affinity", "ant.init_model", "ant.resources", "ant.checkpoint_every", "ant.log_every"),
                "deme": ("finetune.resources", "finetune.ranges", "finetune.range_clustering", "finetune.seed",
                         "finetune.checkpoint_every", "finetune.log_every")}


class IntParam(Section):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> "IntParam":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("log: true needs low >= 1 and step 1")
        if (self.high - self.low) % self.step:
            raise ValueError(f"high - low ({self.high - self.low}) must be a multiple of step ({self.step})")
        return self

    def extremes(self) -> list[Any]:
        return [self.low, self.high]

    def grid(self) -> list[Any] | None:
        return list(range(self.low, self.high + 1, self.step))

    def on_step(self, value: int) -> bool:
        return (value - self.low) % self.step == 0

    def neighbours(self, value: int) -> tuple[int, int]:
        """The two grid values around ``value``."""
        below = self.low + (value - self.low) // self.step * self.step
        return below, below + self.step


class FloatParam(Section):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: Optional[float] = Field(None, gt=0)  # a grid step (grid searcher, or a discretised Optuna space)

    @model_validator(mode="after")
    def _range(self) -> "FloatParam":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        # Optuna would silently move high down to the last whole step (with a warning): say so here instead
        if self.step is not None and not self.on_step(self.high):
            below, above = self.neighbours(self.high)
            raise ValueError(f"high - low ({self.high - self.low:g}) must be a multiple of step ({self.step:g}): "
                             f"set high to {below:g} or {above:g}")
        return self

    def on_step(self, value: float) -> bool:
        """Whether ``value`` is low + a whole number of steps, within Optuna's own tolerance (so that Optuna
        accepts every value this accepts)."""
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return abs(k - round(k)) < STEP_TOLERANCE

    def neighbours(self, value: float) -> tuple[float, float]:
        """The two grid values around ``value`` (step set)."""
        k = math.floor((value - self.low) / self.step)
        return round(self.low + k * self.step, 12), round(self.low + (k + 1) * self.step, 12)

    def extremes(self) -> list[Any]:
        return [self.low, self.high]

    def grid(self) -> list[Any] | None:
        if self.step is None:
            return None
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]


class CategoricalParam(Section):
    type: Literal["categorical"]
    choices: list[Union[bool, int, float, str, None]] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> "CategoricalParam":
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError(f"choices must be distinct, got {self.choices}")
        return self

    def extremes(self) -> list[Any]:
        return list(self.choices)

    def grid(self) -> list[Any] | None:
        return list(self.choices)


Distribution = Annotated[Union[IntParam, FloatParam, CategoricalParam], Field(discriminator="type")]


class SearcherConfig(Section):
    """tpe: Optuna's TPE (multivariate); cmaes: Optuna's CMA-ES (int/float parameters only); random: Optuna's random
    sampler; grid: every point of the space once (int ranges, choices, float ranges with a step)."""
    name: Literal["tpe", "cmaes", "random", "grid"] = "tpe"
    seed: Optional[int] = None  # default: the top-level seed
    startup_trials: int = Field(4, ge=1)  # TPE / CMA-ES: random trials (after the given points) before modelling


class SchedulerConfig(Section):
    """fifo: every trial trains to the end; asha: asynchronous successive halving over training steps, comparing
    trials only at the same step (requires eval_every)."""
    name: Literal["fifo", "asha"] = "fifo"
    grace_period: Optional[int] = Field(None, ge=1)  # steps before a trial may be stopped; default: eval_every
    reduction_factor: float = Field(3.0, gt=1)


class TrialResources(Section):
    """What the trial process itself holds. Training stages: a small driver (its Ray Train workers declare theirs
    in ant.resources / finetune.resources); merge: the trial merges and samples, so give it a GPU on a cluster."""
    cpu: float = Field(gt=0)
    gpu: float = Field(0.0, ge=0)


class TrainingStageSearch(Section):
    space: dict[str, Distribution] = Field(default_factory=dict)
    num_trials: Optional[int] = Field(None, ge=1)  # default 8; the grid searcher runs every point once instead
    max_concurrent: int = Field(2, ge=1)
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    eval_every: Optional[int] = Field(None, ge=1)  # steps between FID reports; None: FID at the last step only
    num_samples: Optional[int] = Field(None, ge=2)  # FID samples per report; None: fid.num_samples
    resources: TrialResources = TrialResources(cpu=0.05)
    # Faults: a trial's Ray Train run restarts from its last checkpoint up to train_max_failures times (a lost
    # worker or node); a trial whose own process is lost is retried up to trial_max_failures times.
    train_max_failures: int = Field(2, ge=0)
    trial_max_failures: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _own_checks(self) -> "TrainingStageSearch":
        if self.scheduler.name == "asha" and self.eval_every is None:
            raise ValueError("scheduler asha compares trials at intermediate steps: set eval_every (steps between "
                             "FID reports)")
        if self.searcher.name == "cmaes":
            categorical = [k for k, v in self.space.items() if isinstance(v, CategoricalParam)]
            if categorical:
                raise ValueError(f"searcher cmaes samples only int/float parameters, but {categorical} are "
                                 "categorical; use searcher tpe (or random / grid)")
        if self.searcher.name == "grid":
            open_ended = [k for k, v in self.space.items() if v.grid() is None]
            if open_ended:
                raise ValueError(f"searcher grid needs finite values: give {open_ended} a step, or use choices")
            if self.num_trials is not None and self.num_trials != self.grid_size():
                raise ValueError(f"searcher grid runs every point once ({self.grid_size()} trials); remove "
                                 f"num_trials ({self.num_trials}) or set it to {self.grid_size()}")
        return self

    def grid_size(self) -> int:
        return math.prod(len(v.grid() or []) for v in self.space.values()) if self.space else 1

    def check_first_value(self, where: str, key: str, value: Any) -> None:
        """An Optuna searcher tries the config's own values first when they lie inside the space; such a value must
        then lie on the space's step too, or the first trial would be a value the space cannot take (Optuna only
        warns). ``value`` is the config's value of ``key``; ``where`` names the stage (search.ant)."""
        dist = self.space[key]
        if (self.searcher.name == "grid" or isinstance(dist, CategoricalParam) or isinstance(value, bool)
                or not isinstance(value, (int, float)) or not dist.low <= value <= dist.high or dist.on_step(value)):
            return
        below, above = dist.neighbours(value)
        raise ValueError(f"{where}.space[{key}]: the config's {key} ({value:g}) is tried first, but it is off the "
                         f"space's step ({dist.step:g} from {dist.low:g}): set {key} to {below:g} or {above:g}, or "
                         f"change {where}.space[{key}].step")

    def trial_count(self) -> int:
        if self.searcher.name == "grid" or not self.space:
            return self.grid_size()
        return self.num_trials if self.num_trials is not None else 8


class ANTStageSearch(TrainingStageSearch):
    """Each trial trains a model from scratch with ANT clustered MTL (the `ant` section + the trial's values)."""


class DeMeStageSearch(TrainingStageSearch):
    """Each trial finetunes N range specialists of the base model concurrently and scores their merged model."""
    ranges: Literal["equal", "timestep", "snr", "ant"] = "equal"  # ant: the ant winner's own intervals (N = its k)
    merge: Literal["task_arithmetic", "search"] = "task_arithmetic"
    merge_candidates: int = Field(4, ge=0)  # merge: search: random weight vectors tried beyond the anchors


class MergeStageSearch(Section):
    """Successive halving over the sample count: every candidate is scored at fidelities[0], the best
    1/reduction_factor go on to the next fidelity, and so on; rankings only ever compare equal sample counts."""
    task_vectors: Optional[list[str]] = None  # default: the deme winner's
    base_model: Optional[str] = None  # the model the task vectors were computed against (with task_vectors)
    fidelities: list[int] = Field(default_factory=lambda: [1000, 2500, 5000], min_length=1)
    num_candidates: int = Field(16, ge=1)  # scored at fidelities[0], the anchors included
    reduction_factor: float = Field(3.0, gt=1)
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    max_concurrent: int = Field(2, ge=1)
    resources: TrialResources = TrialResources(cpu=1.0)
    trial_max_failures: int = Field(1, ge=0)  # retries of a candidate whose trial process was lost

    @model_validator(mode="after")
    def _own_checks(self) -> "MergeStageSearch":
        if any(n < 2 for n in self.fidelities) or any(a >= b for a, b in zip(self.fidelities, self.fidelities[1:])):
            raise ValueError(f"fidelities must be strictly increasing sample counts >= 2, got {self.fidelities}")
        if (self.task_vectors is None) != (self.base_model is None):
            raise ValueError("task_vectors and base_model go together: the task vectors and the base model they "
                             "were computed against")
        if self.task_vectors is not None and len(self.task_vectors) < 1:
            raise ValueError("task_vectors must list at least one .safetensors file")
        return self

    def check_grid_budget(self, task_vectors: int, merge_search: MergeSearchConfig) -> None:
        """num_candidates is the first rung's budget for every searcher. The grid scores its whole grid there (the
        anchors, the coarse grid, then a fine grid around the best): a grid that may exceed the budget fails here,
        with its size, rather than generating far more images than the config says. ``task_vectors``: the most
        task vectors this config can merge."""
        if self.searcher.name != "grid":
            return
        groups = len(merge_search.layer_groups) if merge_search.layer_groups else 1
        size = merge_grid_size(task_vectors, groups, merge_search)
        if size.total <= self.num_candidates:
            return
        weights = f"{task_vectors} task vectors" + (f" x {groups} layer groups" if groups > 1 else "")
        raise ValueError(
            f"search.merge.num_candidates ({self.num_candidates}) is the first rung's budget, but searcher grid scores "
            f"up to {size.total:,} candidates there for {weights}: {size.anchors} anchors, {size.coarse:,} coarse "
            f"points (merge_search.grid_step {merge_search.grid_step:g} over [{merge_search.weight_low:g}, "
            f"{merge_search.weight_high:g}]) and up to {size.fine:,} fine ones (merge_search.grid_fine_step "
            f"{merge_search.grid_fine_step:g}), {size.total * self.fidelities[0]:,} images at {self.fidelities[0]} "
            f"samples each. Set search.merge.num_candidates={size.total} to score the whole grid, make the grid "
            "coarser (merge_search.grid_step, grid_fine_step), or use searcher tpe")


class FinalScoreConfig(Section):
    """The winner is re-scored at this fidelity once per sampling seed: mean and 95% interval."""
    num_samples: int = Field(10000, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)


class SearchConfig(Section):
    ant: Optional[ANTStageSearch] = None
    deme: Optional[DeMeStageSearch] = None
    merge: Optional[MergeStageSearch] = None
    final: FinalScoreConfig = Field(default_factory=FinalScoreConfig)

    def stages(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s) is not None]

    def max_task_vectors(self, ant_k: int, num_specialists: int) -> int:
        """The most task vectors the merge stage can receive: its own list, else one per deme specialist (N = the
        ant winner's k with ranges 'ant'), taking the largest value a searched N or k can take. ``ant_k`` and
        ``num_specialists`` are the config's own ant.k and finetune.num_specialists."""
        if self.merge is not None and self.merge.task_vectors is not None:
            return len(self.merge.task_vectors)
        stage, key, value = ("ant", "ant.k", ant_k) if self.deme is not None and self.deme.ranges == "ant" else \
            ("deme", "finetune.num_specialists", num_specialists)
        settings = getattr(self, stage)
        dist = settings.space.get(key) if settings is not None else None
        if dist is None:
            return value
        return max(v for v in dist.extremes() if isinstance(v, int) and not isinstance(v, bool))


def grid_axis(low: float, high: float, step: float) -> list[float]:
    """low, low + step, ... up to high (a point within 1e-9 of a step past high is dropped)."""
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    return [round(low + i * step, 10) for i in range(count)]


@dataclass(frozen=True)
class MergeGridSize:
    anchors: int  # at most N + 2: task arithmetic, each specialist alone, the uniform mean
    coarse: int  # the coarse grid: (points per axis) ^ weights
    fine: int  # at most: the fine grid within one coarse step of the best point, on every axis
    total: int


def merge_grid_size(task_vectors: int, groups: int, merge_search: MergeSearchConfig) -> MergeGridSize:
    """How many candidates the merge grid scores at most (DeMe Sec. 8's coarse-then-fine grid, anchors first),
    for ``task_vectors`` weights per layer group. The fine grid's true size depends on where the coarse optimum
    lies (its axes are cut at the box), so this is an upper bound; duplicates are not subtracted."""
    ms = merge_search
    weights = task_vectors * groups
    coarse = len(grid_axis(ms.weight_low, ms.weight_high, ms.grid_step)) ** weights
    # the fine axis: up to one coarse step either side of the best point, in whole fine steps, inside the box
    fine_axis = min(2 * int(ms.grid_step / ms.grid_fine_step + 1e-9) + 1,
                    len(grid_axis(ms.weight_low, ms.weight_high, ms.grid_fine_step)))
    anchors = 1 if task_vectors == 1 else task_vectors + 2
    return MergeGridSize(anchors, coarse, fine_axis ** weights, anchors + coarse + fine_axis ** weights)
