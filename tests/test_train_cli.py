"""``hexjax train``: token windows, checkpoints every K steps, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hexjax.errors import ConfigError, PlanError
from hexjax.plan import Plan, Replica, Stage
from hexjax.train.data import TokenWindows, open_tokens


def _plan(tmp_path, model="tiny", last=4):
    p = Plan(model, "", (Replica((Stage((0, 2), (0,)), Stage((2, last), (1, 2), 1, 2))),))
    path = tmp_path / f"plan{last}.json"
    p.save(path)
    return path


def _tokens(tmp_path, n=2000, vocab=256):
    path = tmp_path / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, vocab, n).astype(np.uint16))
    return path


def test_token_windows(tmp_path):
    raw = np.arange(101, dtype=np.uint16)
    raw.tofile(tmp_path / "t.bin")
    w = TokenWindows(open_tokens(tmp_path / "t.bin"), seq_len=10, seed=3)
    assert w.num_windows == 10
    epoch = w.batch(0, 10)
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 100, 10))
    assert (np.diff(epoch, axis=1) == 1).all() and epoch.shape == (10, 11)
    assert np.array_equal(w.batch(4, 3), epoch[4:7])                      # a position is all the state
    assert sorted(w.batch(10, 10)[:, 0].tolist()) == list(range(0, 100, 10))  # next epoch, new order
    with pytest.raises(ConfigError, match="fewer than one window"):
        TokenWindows(raw[:5], seq_len=10)


def test_train_cli_resume_equals_uninterrupted(tmp_path):
    from typer.testing import CliRunner

    from hexjax.cli import app
    plan, data = _plan(tmp_path), _tokens(tmp_path)
    common = ["train", "--model", "tiny", "--plan", str(plan), "--data", str(data), "--seq-len", "16",
              "--global-batch", "4", "--microbatches", "2", "--lr", "1e-2", "--warmup-steps", "1",
              "--json"]

    def run(*extra):
        res = CliRunner().invoke(app, common + list(extra))
        assert res.exit_code == 0, res.output
        return json.loads(res.output.strip().splitlines()[-1])

    full = run("--steps", "4")                    # cosine over 4 steps
    first = run("--steps", "2", "--decay-steps", "4", "--checkpoint-dir", str(tmp_path / "ck"), "--save-every", "1", "--keep", "2")
    assert first["checkpoint"] and sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["1", "2"]
    # the resumed run keeps the saved schedule and data position
    second = run("--steps", "4", "--checkpoint-dir", str(tmp_path / "ck"), "--resume")
    assert second["resumed_from"] == 2 and [s["step"] for s in second["steps"]] == [3, 4]
    want = [s["loss"] for s in full["steps"]]
    got = [s["loss"] for s in first["steps"] + second["steps"]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert [s["lr"] for s in first["steps"] + second["steps"]] == [s["lr"] for s in full["steps"]]


def test_train_cli_errors(tmp_path):
    from hexjax.cli.train import train_cmd
    plan, data = _plan(tmp_path), _tokens(tmp_path)
    args = dict(model="tiny", plan_file=plan, virtual_devices=None, data=data, data_dtype="uint16", seq_len=16,
                global_batch=4, microbatches=2, steps=1, lr=1e-3, warmup_steps=0, decay_steps=None,
                weight_decay=0.1, clip_norm=1.0, remat=False, seed=0, checkpoint_dir=None, save_every=0, keep=3,
                resume=False, as_json=True)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        train_cmd(**{**args, "seq_len": 1000})
    with pytest.raises(ConfigError, match="microbatches"):
        train_cmd(**{**args, "global_batch": 3})
    with pytest.raises(PlanError, match="stages end at layer 3"):
        train_cmd(**{**args, "plan_file": _plan(tmp_path, last=3)})
    with pytest.raises(ConfigError, match="no such token file"):
        train_cmd(**{**args, "data": tmp_path / "missing.npy"})
    with pytest.raises(ConfigError, match="need --checkpoint-dir"):
        train_cmd(**{**args, "resume": True})
