"""A stage's `space:` (validated config distributions) as what Optuna and Tune take."""

from __future__ import annotations

import itertools
from typing import Any

import optuna
from ray import tune

from ant_ray.config import CategoricalParam, FloatParam, IntParam


def optuna_distribution(param: IntParam | FloatParam | CategoricalParam) -> optuna.distributions.BaseDistribution:
    if isinstance(param, IntParam):
        return optuna.distributions.IntDistribution(param.low, param.high, step=param.step, log=param.log)
    if isinstance(param, FloatParam):
        return optuna.distributions.FloatDistribution(param.low, param.high, step=param.step, log=param.log)
    return optuna.distributions.CategoricalDistribution(param.choices)


def optuna_space(space: dict[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    return {name: optuna_distribution(param) for name, param in space.items()}


def grid_points(space: dict[str, Any]) -> list[dict[str, Any]]:
    """Every point of a finite space (the grid searcher), in a fixed order."""
    names = list(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[n].grid() for n in names))]


def grid_param_space(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Tune's param_space that runs each point once, in order."""
    return {"point": tune.grid_search(points)}


def trial_values(config: dict[str, Any]) -> dict[str, Any]:
    """The sampled field values of a trial's Tune config (a grid point arrives under "point")."""
    return dict(config["point"]) if "point" in config else dict(config)
