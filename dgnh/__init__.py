"""dgnh — distributed Gauss–Newton Hessian of multilayer perceptrons.

The names backed by Dask (``DaskBackend``) and Zarr (``Dataset``,
``open_dataset``, ``save_dataset``, ``open``, ``save``) are loaded on first
use, so ``import dgnh`` and pure-numpy work stay light.
"""

from importlib import import_module

from .activations import ACTIVATIONS
from .analyses import (glm_predictive, influence, log_marginal_likelihood, obs_prune,
                       obs_saliencies, optimize_prior_precision, per_sample_gradients,
                       per_sample_losses, self_influence)
from .compress import compress
from .exact_solve import DualFactorization, dual_factorize, dual_solve, solve
from .factorization import Factorization, IndefiniteError, LowRankUpdate, ScaledIdentity
from .gauss_newton import GaussNewton, HessianOperator
from .hmatrix import HMatrix, HSSFactorization
from .hybrid import Hybrid
from .losses import LOSSES
from .lowrank import LowRank, pivoted_cholesky
from .nystrom import nystrom
from .model import MLP
from .operator import Operator
from .sampling import SamplePlan, plan as sampling_plan
from .solve import CGResult, cg
from .spectral import SpectralDensity, eigsh, spectral_density
from .version import __version__


_LAZY = {"Dataset": "dataset", "open_dataset": "dataset", "save_dataset": "dataset",
         "DaskBackend": "cluster", "open": "store", "save": "store"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dgnh' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ACTIVATIONS", "CGResult", "DaskBackend", "Dataset", "DualFactorization",
    "Factorization", "GaussNewton", "HMatrix", "HSSFactorization", "HessianOperator", "Hybrid",
    "IndefiniteError", "LOSSES", "LowRank", "LowRankUpdate", "MLP", "Operator", "SamplePlan",
    "ScaledIdentity", "SpectralDensity", "__version__", "cg", "compress", "dual_factorize",
    "dual_solve", "eigsh", "nystrom", "open", "open_dataset", "pivoted_cholesky", "save",
    "save_dataset", "sampling_plan", "solve", "spectral_density",
    "glm_predictive", "influence", "log_marginal_likelihood", "obs_prune", "obs_saliencies",
    "optimize_prior_precision", "per_sample_gradients", "per_sample_losses", "self_influence",
]
