"""Training across processes: a plan whose replicas (of different layouts) and stages live on two
``jax.distributed`` processes gives the losses and parameters of the same plan trained in one process."""

import json
import subprocess
import sys
import textwrap

import numpy as np

from hexjax.plan import Plan, Replica, Stage

# process 0 owns devices 0-3, process 1 devices 4-7 (hexjax launch -n 2 -k 4)
PLAN = Plan("tiny", "", (
    # replica 0: tp2 on process 0 -> dp2 on process 1 (activations and cotangents cross processes)
    Replica((Stage((0, 2), (0, 1), tp=2), Stage((2, 4), (4, 5), dp=2))),
    # replica 1: one dp2 stage of every layer on process 1 (its gradients are summed into replica 0's)
    Replica((Stage((0, 4), (6, 7), dp=2),)),
))
STEPS, BATCH, SEQ, MICRO = 2, 8, 8, 2   # step 2's loss follows step 1's summed, clipped update
HEXJAX = [sys.executable, "-c", "from hexjax.cli import main; main()"]

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from hexjax.runtime import distributed
    assert distributed.initialize_from_env()
    import jax
    from hexjax.plan import Plan
    from hexjax.train import Trainer, TrainConfig
    plan = Plan.load(sys.argv[1])
    distributed.check_run(plan, None, what="train")
    steps, batch, seq, micro = map(int, sys.argv[2:6])
    trainer = Trainer("tiny", plan, config=TrainConfig(lr=1e-2, warmup_steps=0, clip_norm=0.5), microbatches=micro,
                      seed=0, move=distributed.move, read=distributed.read)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        out = trainer.step(rng.integers(0, 256, size=(batch, seq + 1)))
        losses.append([out["loss"], out["grad_norm"]])
    params = trainer.params()
    sums = {k: float(sum(np.abs(a).sum(dtype=np.float64) for a in jax.tree.leaves(v))) for k, v in params.items()}
    out = {"process": jax.process_index(), "losses": losses, "param_abs_sums": sums,
           "in_sync": trainer.replicas_in_sync(), "moves": distributed.paths, "undeleted": distributed.finish()}
    print("RESULT " + json.dumps(out), flush=True)
""")


def _one_process(plan):
    from hexjax.train import Trainer, TrainConfig
    import jax
    trainer = Trainer("tiny", plan, config=TrainConfig(lr=1e-2, warmup_steps=0, clip_norm=0.5), microbatches=MICRO,
                      seed=0)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(STEPS):
        out = trainer.step(rng.integers(0, 256, size=(BATCH, SEQ + 1)))
        losses.append([out["loss"], out["grad_norm"]])
    sums = {k: float(sum(np.abs(a).sum(dtype=np.float64) for a in jax.tree.leaves(v)))
            for k, v in trainer.params().items()}
    return losses, sums


def test_training_across_two_processes_equals_one_process(tmp_path):
    plan_file, script = tmp_path / "plan.json", tmp_path / "train.py"
    PLAN.save(plan_file)
    script.write_text(CHILD)
    res = subprocess.run(HEXJAX + ["launch", "-n", "2", "-k", "4", "--timeout", "200", "--all-output", "--",
                                   sys.executable, str(script), str(plan_file), str(STEPS), str(BATCH), str(SEQ),
                                   str(MICRO)], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    results = [json.loads(ln.split("RESULT ", 1)[1]) for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert sorted(r["process"] for r in results) == [0, 1], res.stdout[-2000:]
    want_losses, want_sums = _one_process(PLAN)
    for r in results:
        # every process reads the same losses, equal to the one-process run's
        np.testing.assert_allclose(r["losses"], want_losses, rtol=1e-5)
        assert r["param_abs_sums"].keys() == want_sums.keys()
        np.testing.assert_allclose([r["param_abs_sums"][k] for k in want_sums], list(want_sums.values()), rtol=1e-5)
        assert r["in_sync"] is True
        # the run really crossed processes: direct transfers or handoffs, and the host path
        assert set(r["moves"]) & {"direct", "handoff"} and "host" in r["moves"], r["moves"]
        assert r["undeleted"] == 0
