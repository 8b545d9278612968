"""Task vectors and model merging (DeMe Sec. 3.3): pure functions on in-memory state dicts."""

from .candidates import anchor_weights, random_weights
from .methods import MERGE_METHODS, MergeMethod, build_merge_method
from .task_vectors import (
    TASK_VECTOR_FORMAT,
    TaskVectorMerger,
    check_same_structure,
    compute_task_vector,
    load_task_vector,
    merge_from_task_vectors,
    merge_task_vectors,
    save_task_vector,
    state_dict_fingerprint,
    task_vector_range,
)

__all__ = [
    "MERGE_METHODS", "MergeMethod", "build_merge_method", "TASK_VECTOR_FORMAT", "TaskVectorMerger",
    "check_same_structure", "compute_task_vector", "load_task_vector", "merge_from_task_vectors",
    "merge_task_vectors", "save_task_vector", "state_dict_fingerprint", "task_vector_range", "anchor_weights",
    "random_weights",
]
