"""Merge methods, one file each, registered by name in MERGE_METHODS ("linear": DeMe Eq. 8, "ties": TIES)."""

from .base import MERGE_METHODS, MergeMethod, build_merge_method
from . import linear, ties  # noqa: F401  (importing registers the methods)
from .linear import LinearMerge
from .ties import TiesMerge

__all__ = ["MERGE_METHODS", "MergeMethod", "build_merge_method", "LinearMerge", "TiesMerge"]
