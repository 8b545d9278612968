"""The validated configuration: plain data, one YAML file per job under `search_spaces/`, `--set` overrides.

sections.py holds the sections (data, model, pretrain, finetune, ant, ...), search.py the `search:` section,
pipeline.py the whole config and its cross-section checks, loading.py YAML + overrides -> PipelineConfig.
"""

from ant_ray.config.loading import apply_overrides, config_from_dict, load_config
from ant_ray.config.pipeline import PipelineConfig, with_values
from ant_ray.config.search import (CategoricalParam, DeMeStageSearch, FloatParam, IntParam, MergeStageSearch,
                                   SearchConfig, SearcherConfig, TrainingStageSearch)
from ant_ray.config.sections import (AffinityConfig, ANTConfig, ConfigError, FinetuneConfig, MergeSearchConfig,
                                     ResourcesConfig, TrainConfig)

__all__ = ["ANTConfig", "AffinityConfig", "CategoricalParam", "ConfigError", "DeMeStageSearch", "FinetuneConfig",
           "FloatParam", "IntParam", "MergeSearchConfig", "MergeStageSearch", "PipelineConfig", "ResourcesConfig",
           "SearchConfig", "SearcherConfig", "TrainConfig", "TrainingStageSearch", "apply_overrides", "config_from_dict",
           "load_config",
           "with_values"]
