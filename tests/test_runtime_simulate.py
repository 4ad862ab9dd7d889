"""Plans searched for a shrunk copy of the example cluster run on virtual devices like one device."""

from hexjax.models import ModelConfig
from hexjax.runtime.simulate import example_cluster, miniature, plan_and_run, shrink_memory


def test_shrinking_keeps_the_cluster_shape():
    base = example_cluster()
    small = shrink_memory(base, 1e-3)
    assert small.num_devices == base.num_devices == 8
    for i in range(8):
        assert abs(small.device(i).memory_bytes - base.device(i).memory_bytes * 1e-3) < 2
        assert small.device(i).peak_flops == base.device(i).peak_flops
    cfg = ModelConfig.preset("tiny")
    mini = miniature(base, cfg)
    largest = max(mini.device(i).memory_bytes for i in range(8))
    assert abs(cfg.num_params * 2 / largest - 1.5) < 0.01


def test_uneven_plan_runs_and_matches_one_device():
    run = plan_and_run("tiny", objective="latency", batch=2, prompt_len=8, max_new_tokens=3)
    stages = run.plan.replicas[0].stages
    assert len(stages) >= 2                       # the model no longer fits one device
    assert run.matches is True and run.tokens_per_s > 0
    assert len(run.tokens) == len(run.prompts) == 2 * len(run.plan.replicas)
