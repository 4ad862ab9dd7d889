"""Plan search: cost model, exact pipeline DP, packing, exhaustive oracle.

``plan(model, cluster, workload, objective=...)`` finds a plan;
``evaluate(plan, model, cluster, workload)`` predicts how any plan behaves.
"""

if __name__ != "hexjax.search":   # reached as top-level `search`: see hexjax/_toplevel.py
    from hexjax._toplevel import step_aside
    step_aside(__name__, __path__[0])
else:
    from hexjax.search.cost import Prediction, ReplicaPrediction, StagePrediction
    from hexjax.search.planner import OBJECTIVES, evaluate, plan
    from hexjax.search.space import DEFAULT_MAX_STAGES

    __all__ = ["plan", "evaluate", "Prediction", "ReplicaPrediction", "StagePrediction", "OBJECTIVES",
               "DEFAULT_MAX_STAGES"]
