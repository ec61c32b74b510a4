"""dgnh — distributed Gauss–Newton Hessian of multilayer perceptrons."""

from .gauss_newton import GaussNewton, HessianOperator
from .losses import LOSSES
from .activations import ACTIVATIONS
from .model import MLP
from .operator import Operator
from .sampling import SamplePlan, plan as sampling_plan
from .dataset import Dataset, open_dataset, save_dataset
from .cluster import DaskBackend
from .store import open, save
from .factorization import Factorization, IndefiniteError, LowRankUpdate, ScaledIdentity
from .lowrank import LowRank, nystrom, pivoted_cholesky
from .solve import CGResult, DualFactorization, cg, dual_factorize, dual_solve, solve
from .spectral import SpectralDensity, eigsh, spectral_density
from .hmatrix import HMatrix, HSSFactorization
from .compress import Hybrid, compress

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "GaussNewton",
    "HessianOperator",
    "LOSSES",
    "MLP",
    "Operator",
    "SamplePlan",
    "sampling_plan",
    "Dataset",
    "open_dataset",
    "save_dataset",
    "DaskBackend",
    "open",
    "save",
    "Factorization",
    "IndefiniteError",
    "LowRankUpdate",
    "ScaledIdentity",
    "LowRank",
    "nystrom",
    "pivoted_cholesky",
    "CGResult",
    "DualFactorization",
    "cg",
    "dual_factorize",
    "dual_solve",
    "solve",
    "SpectralDensity",
    "eigsh",
    "spectral_density",
    "HMatrix",
    "HSSFactorization",
    "Hybrid",
    "compress",
    "__version__",
]
