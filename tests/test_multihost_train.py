"""Training across processes: a plan whose replicas (of different layouts) and stages live on two
``jax.distributed`` processes gives the losses and parameters of the same plan trained in one process;
its checkpoints and Hugging Face export are those one process writes, and restore in either direction."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

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


# ---- checkpoints and --save-hf across processes ----

def _train_flags(plan_file, data, ckpt, steps):
    # the optimizer settings of the test above, so the one-process runs reuse its compiled stage programs
    return ["train", "--model", "tiny", "--plan", str(plan_file), "--data", str(data), "--seq-len", str(SEQ),
            "--global-batch", str(BATCH), "--microbatches", str(MICRO), "--lr", "1e-2", "--warmup-steps", "0",
            "--decay-steps", "0", "--clip-norm", "0.5", "--steps", str(steps), "--checkpoint-dir", str(ckpt),
            "--json"]


def _raw_state(ckpt, step):
    """A checkpoint step's arrays as orbax stored them (keyed paths -> numpy), read without hexjax."""
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(ckpt, options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    import jax
    return {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_cli_checkpoints_and_save_hf_across_processes(tmp_path, hexjax):
    """A one-process checkpoint resumed by ``hexjax train`` over two processes, which saves every step and
    exports --save-hf: its losses, every checkpoint step and the HF files equal the same resume in one
    process; its last checkpoint restores in one process under another plan with bit-identical arrays,
    and its HF export is those arrays (transformers loads it)."""
    import shutil

    import jax
    from safetensors.numpy import load_file

    from hexjax.train import TrainConfig, Trainer
    from hexjax.train.checkpoint import latest_step
    plan_file, data = tmp_path / "plan.json", tmp_path / "tokens.npy"
    PLAN.save(plan_file)
    np.save(data, np.random.default_rng(0).integers(0, 256, 2000).astype(np.uint16))
    one, two = tmp_path / "one", tmp_path / "two"
    code, out, err = hexjax(*_train_flags(plan_file, data, one, 1))          # step 1 in one process
    assert code == 0, err[-2000:]
    shutil.copytree(one, two)
    resume = ["--save-every", "1", "--resume", "--save-hf"]
    res = subprocess.run(HEXJAX + ["launch", "-n", "2", "-k", "4", "--timeout", "200", "--"] + ["hexjax"]
                         + _train_flags(plan_file, data, two, 3) + resume + [str(tmp_path / "hf-two")],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    multi = json.loads(res.stdout.strip().splitlines()[-1])                    # process 0's report
    code, out, err = hexjax(*_train_flags(plan_file, data, one, 3), *resume, tmp_path / "hf-one")
    assert code == 0, err[-2000:]
    single = json.loads(out.strip().splitlines()[-1])
    # the two-process run restored the one-process step 1 and trained on from it as one process does
    assert multi["resumed_from"] == single["resumed_from"] == 1
    np.testing.assert_allclose([m["loss"] for m in multi["steps"]], [m["loss"] for m in single["steps"]], rtol=1e-5)
    # every step it saved holds what one process saves (parameters and optimizer state)
    assert sorted(p.name for p in two.iterdir() if p.name.isdigit()) == ["1", "2", "3"] and latest_step(two) == 3
    for step in (2, 3):
        a, b = _raw_state(two, step), _raw_state(one, step)
        assert a.keys() == b.keys() and len(a) > 100
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"step {step} {k}")
    # restored in one process under another plan (one device): exactly the stored arrays
    other = Plan("tiny", "", (Replica((Stage((0, 4), (0,)),)),))
    tr = Trainer("tiny", other, config=TrainConfig(lr=1e-2, warmup_steps=0, clip_norm=0.5), microbatches=MICRO)
    assert tr.restore(two)["step"] == 3 and tr.step_count == 3
    stored = _raw_state(two, 3)
    params, opt = tr.params(), tr.opt_state()
    flat = {f"['params']{jax.tree_util.keystr(p)}": np.asarray(a)
            for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    flat.update({f"['opt_state']['{k}']['{i}']": np.asarray(a) for k, v in opt.items()
                 for i, a in enumerate(jax.tree.leaves(v))})
    assert flat.keys() == stored.keys()
    assert [k for k in stored if not np.array_equal(flat[k], stored[k])] == []
    # --save-hf: the files one process writes; the tensors are the last checkpoint's parameters
    hf_two, hf_one = tmp_path / "hf-two", tmp_path / "hf-one"
    assert sorted(p.name for p in hf_two.iterdir()) == sorted(p.name for p in hf_one.iterdir())
    assert (hf_two / "config.json").read_text() == (hf_one / "config.json").read_text()
    t_two, t_one = load_file(hf_two / "model.safetensors"), load_file(hf_one / "model.safetensors")
    assert t_two.keys() == t_one.keys()
    for k in t_two:
        np.testing.assert_allclose(t_two[k], t_one[k], rtol=1e-5, atol=1e-7, err_msg=k)
    from hexjax.models.hf import load_hf
    exported = load_hf(hf_two, dtype="float32").params
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(params)))
    import torch
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(hf_two, torch_dtype=torch.float32)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert all(np.array_equal(sd[k], t_two[k]) for k in t_two)


KILLED_SAVE_CHILD = textwrap.dedent("""
    import asyncio, hashlib, json, os, sys, time
    import numpy as np
    from hexjax.runtime import distributed
    assert distributed.initialize_from_env()
    import jax
    from orbax.checkpoint._src.path import atomicity
    from hexjax.errors import HexjaxError
    from hexjax.plan import Plan
    from hexjax.train import Trainer, TrainConfig, checkpoint
    checkpoint.SYNC_TIMEOUT_S = 60

    def say(line):                        # one write per line: both processes share the launcher's stdout
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()
    plan, ckpt, me = Plan.load(sys.argv[1]), sys.argv[2], jax.process_index()
    trainer = Trainer("tiny", plan, config=TrainConfig(lr=1e-2, warmup_steps=0, clip_norm=0.5), microbatches=2,
                      seed=0, move=distributed.move, read=distributed.read)
    batch = np.random.default_rng(0).integers(0, 256, size=(8, 9))
    if me == 0:                           # a process that never comes to the save: a bounded wait, an error
        checkpoint.SYNC_TIMEOUT_S, t0 = 5, time.monotonic()
        try:
            trainer.save(ckpt, step=9, wait=True)
            say("MISSING none")
        except HexjaxError as e:
            say(f"MISSING {time.monotonic() - t0:.1f} {e}")
        checkpoint.SYNC_TIMEOUT_S = 60
    else:
        time.sleep(8)
        checkpoint.agree("late", "9 0")   # arrives after process 0 gave up: keeps the rounds aligned
    try:                                  # the processes ask for different steps: none saves, all say so
        trainer.save(ckpt, step=5 + me, wait=True)
        say("DISAGREE none")
    except HexjaxError as e:
        say("DISAGREE " + str(e))
    trainer.step(batch)
    trainer.save(ckpt, wait=True)         # step 1: committed
    digest = hashlib.sha256()
    for tree in (trainer.params(), trainer.opt_state()):
        for k in sorted(tree):
            for a in jax.tree.leaves(tree[k]):
                digest.update(np.ascontiguousarray(a).tobytes())
    say("STEP1 " + digest.hexdigest())
    try:                                  # a directory only process 0 sees: every process refuses to resume
        trainer.restore(ckpt if me == 0 else ckpt + "-elsewhere")
        say("UNSHARED none")
    except HexjaxError as e:
        say("UNSHARED " + str(e))
    if me == 0:
        commit = atomicity.AtomicRenameTemporaryPath.finalize

        async def slow_commit(self):      # step 2's files wait in orbax's temporary directory
            await asyncio.sleep(600)
            await commit(self)
        atomicity.AtomicRenameTemporaryPath.finalize = slow_commit
    trainer.step(batch)
    trainer.save(ckpt)                    # step 2: asynchronous, written by process 0
    say(f"SAVING {me} {os.getpid()}")
    for _ in range(1000):
        trainer.step(batch)
""")


@pytest.mark.slow
def test_killed_writer_keeps_previous_checkpoint(tmp_path):
    """Two processes: a save process 1 never comes to fails on process 0 after the sync timeout; a save
    whose steps differ between processes is refused on both; step 1 is committed;
    a restore from a directory only process 0 sees is refused on both; process 0 (the writer) is killed
    while step 2 sits in orbax's temporary directory. Process 1 stops
    within the heartbeat, step 1 stays the latest, and one process restores it with the exact arrays the
    two-process trainer held."""
    import hashlib
    import os
    import select
    import signal
    import time

    import jax

    from hexjax.train import TrainConfig, Trainer
    from hexjax.train.checkpoint import latest_step, read_meta
    plan_file, script, ckpt = tmp_path / "plan.json", tmp_path / "killed.py", tmp_path / "ckpt"
    PLAN.save(plan_file)
    script.write_text(KILLED_SAVE_CHILD)
    launch = subprocess.Popen(HEXJAX + ["launch", "-n", "2", "-k", "4", "--timeout", "300", "--heartbeat", "10",
                                        "--all-output", "--", sys.executable, str(script), str(plan_file), str(ckpt)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, writer = [], None
    try:
        deadline = time.time() + 240
        while writer is None and time.time() < deadline:
            ready, _, _ = select.select([launch.stdout], [], [], 5)
            if ready:
                line = launch.stdout.readline()
                if not line:
                    break
                lines.append(line.strip())
                if line.startswith("SAVING 0 "):
                    writer = int(line.split()[2])
        assert writer is not None, "\n".join(lines[-30:])
        deadline = time.time() + 60
        while not any("tmp" in p.name for p in ckpt.iterdir()) and time.time() < deadline:
            time.sleep(0.05)
        assert any("tmp" in p.name for p in ckpt.iterdir()), "step 2's temporary directory never appeared"
        assert latest_step(ckpt) == 1
        os.kill(writer, signal.SIGKILL)
        t0 = time.time()
        out, err = launch.communicate(timeout=120)     # the survivor must stop, not hang
        stopped_s = time.time() - t0
    finally:
        if launch.poll() is None:
            launch.kill()
    lines += out.splitlines()
    assert launch.returncode != 0 and stopped_s < 120
    missing = [ln.split(" ", 2) for ln in lines if ln.startswith("MISSING")]
    assert len(missing) == 1 and float(missing[0][1]) < 30, missing
    assert "process 1 did not arrive within 5 s" in missing[0][2], missing
    disagree = [ln for ln in lines if ln.startswith("DISAGREE")]
    assert len(disagree) == 2 and all("disagree on the checkpoint to save" in ln for ln in disagree), lines
    unshared = [ln for ln in lines if ln.startswith("UNSHARED")]
    assert len(unshared) == 2 and all("step 1, is not there for this process" in ln and "shares" in ln
                                      for ln in unshared), unshared
    digests = {ln.split()[1] for ln in lines if ln.startswith("STEP1 ")}
    assert len(digests) == 1, lines
    # the killed save left step 1 as the latest; one process restores it exactly (under another plan)
    assert latest_step(ckpt) == 1 and read_meta(ckpt)["steps_taken"] == 1
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["1"]
    other = Plan("tiny", "", (Replica((Stage((0, 4), (0,)),)),))
    tr = Trainer("tiny", other, config=TrainConfig(lr=1e-2, warmup_steps=0, clip_norm=0.5), microbatches=2)
    assert tr.restore(ckpt)["step"] == 1
    digest = hashlib.sha256()
    for tree in (tr.params(), tr.opt_state()):
        for k in sorted(tree):
            for a in jax.tree.leaves(tree[k]):
                digest.update(np.ascontiguousarray(a).tobytes())
    assert digest.hexdigest() in digests
    tr.save(ckpt, step=2, wait=True)                  # a new save commits over the leftover
    assert latest_step(ckpt) == 2
