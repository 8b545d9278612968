"""What the ANT and DeMe training loops share: exact-resume state, EMA, per-step randomness, mixed precision,
how a run's models are spread over its workers, and the session a loop reports to (Ray Train's, or an in-process
one). Plain functions of tensors and config values; Ray only inside `RayTrainSession`, never MLflow."""

from ant_ray.training.divergence import DivergenceGuard, TrainingDiverged, any_rank_diverged, check_finite_weights
from ant_ray.training.ema import update_ema
from ant_ray.training.precision import AUTOCAST_DTYPES
from ant_ray.training.progress import progress_line, show_progress
from ant_ray.training.randomness import step_generator, step_seed
from ant_ray.training.session import LocalSession, current_session, run_in_process
from ant_ray.training.state import load_training_state, save_training_state
from ant_ray.training.worker_groups import group_members, worker_groups

__all__ = ["AUTOCAST_DTYPES", "DivergenceGuard", "TrainingDiverged", "any_rank_diverged", "check_finite_weights",
           "load_training_state", "progress_line", "save_training_state", "show_progress", "step_generator",
           "step_seed", "update_ema", "group_members", "worker_groups", "LocalSession", "current_session",
           "run_in_process"]
