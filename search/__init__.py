"""Plan search: cost model, exact pipeline DP, packing, exhaustive oracle.

``plan(model, cluster, workload, objective=...)`` finds a plan;
``evaluate(plan, model, cluster, workload)`` predicts how any plan behaves.
"""

from hexjax.search.cost import Prediction, ReplicaPrediction, StagePrediction
from hexjax.search.planner import OBJECTIVES, evaluate, plan
from hexjax.search.space import DEFAULT_MAX_STAGES

__all__ = ["plan", "evaluate", "Prediction", "ReplicaPrediction", "StagePrediction", "OBJECTIVES",
           "DEFAULT_MAX_STAGES"]
