"""The analyses of a trained network from its GNH: Laplace evidence and predictive,
influence of training points, and pruning by optimal brain surgeon.

Plain functions returning typed results that carry their parameters, the route
taken and an error bound:

* :mod:`~dgnh.analyses.samples` — per-sample losses and gradients from the factors;
* :mod:`~dgnh.analyses.laplace` — log marginal likelihood, prior (and noise)
  optimisation, GLM predictive (posterior in :mod:`~dgnh.analyses.posterior`);
* :mod:`~dgnh.analyses.influence` — influence scores and self-influence;
* :mod:`~dgnh.analyses.pruning` — OBS saliencies and pruning with compensation.
"""

from .influence import InfluenceResult, SelfInfluenceResult, influence, self_influence
from .laplace import (
                        LaplaceResult,
                        Predictive,
                        glm_predictive,
                        log_marginal_likelihood,
                        optimize_prior_precision,
)
from .pruning import PruneResult, Saliencies, obs_prune, obs_saliencies
from .samples import SampleGradients, per_sample_gradients, per_sample_losses

__all__ = ["InfluenceResult", "LaplaceResult", "Predictive", "PruneResult", "Saliencies",
           "SampleGradients", "SelfInfluenceResult", "glm_predictive", "influence",
           "log_marginal_likelihood", "obs_prune", "obs_saliencies", "optimize_prior_precision",
           "per_sample_gradients", "per_sample_losses", "self_influence"]
