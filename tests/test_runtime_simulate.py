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


def test_demo_runs_an_uneven_plan_and_prints_single_device_tokens():
    from typer.testing import CliRunner

    from hexjax.cli import app
    from hexjax.models import LlamaModel

    args = dict(objective="throughput", batch=2, prompt_len=10, max_new_tokens=5, seed=2)
    result = CliRunner().invoke(app, ["demo", "--model", "tiny", "--objective", "throughput", "--batch", "2",
                                      "--prompt-len", "10", "--max-new-tokens", "5", "--seed", "2"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "tokens identical to single-device generation: yes" in result.output
    assert "r0.s1" in result.output and "tokens/s" in result.output   # a pipeline of two stages at least
    # the printed tokens are those of an independent single-device model on the same prompts
    prompts = plan_and_run("tiny", check=False, **args).prompts
    want = LlamaModel.random(ModelConfig.preset("tiny"), seed=2).generate(prompts[:4], 5)
    for row in want:
        assert " ".join(map(str, row)) in result.output


def test_stages_of_different_dp_get_the_pages_the_plan_was_sized_for():
    # the search picks dp 3 then dp 2 here: rows are padded to 6 per microbatch, and each stage's
    # page pool must still hold what the cost model counted beside the weights
    run = plan_and_run("small", objective="cost", batch=8, prompt_len=24, max_new_tokens=16)
    assert sorted({s.dp for s in run.plan.replicas[0].stages}) == [2, 3]
    assert run.matches is True
