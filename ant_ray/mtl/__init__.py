"""MTL methods applied to timestep clusters (ANT Sec. 4.2), one file per method (LibMTL ``weighting/``
style). ``MTL_METHODS.get(name)(num_tasks=k, **options)`` or ``build_mtl_method(name, k, options)``
builds one; see ``base.py`` for the calling contract."""

from ant_ray.mtl.base import (
    MTL_METHODS,
    GradientMethod,
    LossWeightingMethod,
    MTLMethod,
    build_mtl_method,
    flat_grad,
    flatten_grads,
    write_flat_grad,
)

# Importing the method modules registers them.
from ant_ray.mtl.cagrad import CAGrad
from ant_ray.mtl.gradnorm import GradNorm
from ant_ray.mtl.imtl_g import IMTLG
from ant_ray.mtl.ls import LinearScalarization
from ant_ray.mtl.nash_mtl import NashMTL
from ant_ray.mtl.pcgrad import PCGrad
from ant_ray.mtl.rlw import RandomLossWeighting
from ant_ray.mtl.uw import UncertaintyWeighting
from ant_ray.mtl.uw_pcgrad import UWPCGrad

__all__ = [
    "MTL_METHODS",
    "MTLMethod",
    "LossWeightingMethod",
    "GradientMethod",
    "build_mtl_method",
    "flat_grad",
    "flatten_grads",
    "write_flat_grad",
    "LinearScalarization",
    "RandomLossWeighting",
    "UncertaintyWeighting",
    "PCGrad",
    "NashMTL",
    "GradNorm",
    "IMTLG",
    "CAGrad",
    "UWPCGrad",
]
