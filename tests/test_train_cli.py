"""``hexjax train``: token windows, checkpoints every K steps, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

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
    with pytest.raises(ConfigError, match="not a training dtype"):
        train_cmd(**{**args, "dtype": "float16"})


TEXT = ["The quick brown fox jumps over the lazy dog. " * 20, "Pack my box with five dozen liquor jugs!\n" * 25]


def _text_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, t in enumerate(TEXT):
        (d / f"doc{i}.txt").write_text(t)
    (d / "notes.md").write_text("ignored: not .txt")
    return d


def test_train_cli_text_hf_metrics(tmp_path):
    """A folder of text (BPE trained on it), metrics with MFU, HF dir + tokenizer out (the same model, plan
    and shapes as the resume test above, so its programs are shared)."""
    from hexjax.cli.train import train_cmd
    from hexjax.models import LlamaModel
    from hexjax.models.config import ModelConfig
    from tokenizers import Tokenizer

    import hexjax
    corpus, out = _text_dir(tmp_path), tmp_path / "tuned"
    res = train_cmd(model="tiny", plan_file=_plan(tmp_path), virtual_devices=None, data=corpus,
                    data_dtype="uint16", seq_len=16, global_batch=4, microbatches=2, steps=2, lr=1e-2,
                    warmup_steps=1, decay_steps=4, weight_decay=0.1, clip_norm=1.0, remat=False, seed=0,
                    checkpoint_dir=None, save_every=0, keep=3, resume=False, as_json=True,
                    save_hf=out, metrics=tmp_path / "m" / "metrics.jsonl",
                    cluster_file=Path(__file__).parents[1] / "examples" / "clusters" / "hexgen-8gpu.toml")
    # the trained tokenizer sits beside the checkpoint and encodes the cached tokens back into the text
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() <= 256 and res["tokenizer"] == str(out / "tokenizer.json")
    ids = np.load(res["data_tokens"])
    assert tok.decode(ids.tolist()) == "".join(TEXT)
    from hexjax.cluster import Cluster
    cluster = Cluster.load(Path(__file__).parents[1] / "examples" / "clusters" / "hexgen-8gpu.toml")
    peak = 3 * cluster.device(0).peak_flops          # the plan's devices 0, 1, 2 are A6000s
    assert all(cluster.device(i).peak_flops == cluster.device(0).peak_flops for i in range(3))
    lines = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for x, s in zip(lines, res["steps"]):
        assert set(x) == {"step", "loss", "grad_norm", "lr", "tokens", "seconds", "tokens_per_s", "mfu"}
        assert x["tokens"] == 64 and x["loss"] == s["loss"] and 0 < x["mfu"] < 1e-3
        assert x["mfu"] == pytest.approx(6 * res["params"] * x["tokens_per_s"] / peak, rel=1e-9)
    assert res["params"] == LlamaModel.random(ModelConfig.load("tiny")).num_params
    assert res["tokens"] == 128 and res["mfu"] > 0
    back = hexjax.load_hf(out)
    assert back.cfg.num_layers == 4 and back.cfg.vocab_size == 256


def test_text_data_cache_and_errors(tmp_path):
    from hexjax.cli.train import train_cmd
    from hexjax.train.data import prepare_text

    corpus = _text_dir(tmp_path)
    first, trained = prepare_text(corpus, vocab_size=300, save_tokenizer_to=[tmp_path / "ck"])
    assert trained == tmp_path / "ck" / "tokenizer.json" and first.parent == corpus / ".hexjax-tokens"
    mtime = first.stat().st_mtime_ns
    again, _ = prepare_text(corpus, tokenizer_path=trained, vocab_size=300)
    assert again == first and again.stat().st_mtime_ns == mtime                 # tokenized once
    single, _ = prepare_text(corpus / "doc0.txt", tokenizer_path=trained, vocab_size=300)
    assert single != first and len(np.load(single)) < len(np.load(first))
    with pytest.raises(ConfigError, match="more than the model's vocabulary of 100"):
        prepare_text(corpus, tokenizer_path=trained, vocab_size=100)
    with pytest.raises(ConfigError, match="smaller than the 256 bytes"):
        prepare_text(corpus, vocab_size=100)

    args = dict(model="tiny", plan_file=_plan(tmp_path), virtual_devices=None, data=corpus, data_dtype="uint16",
                seq_len=16, global_batch=4, microbatches=2, steps=1, lr=1e-3, warmup_steps=0, decay_steps=None,
                weight_decay=0.1, clip_norm=1.0, remat=False, seed=0, checkpoint_dir=None, save_every=0, keep=3,
                resume=False, as_json=True)
    n = len(np.load(prepare_text(corpus, vocab_size=256)[0]))         # what tiny's own BPE makes of it
    with pytest.raises(ConfigError, match="fewer than one batch of 8"):
        train_cmd(**{**args, "global_batch": 8, "seq_len": n // 8 + 1})
    (tmp_path / "short.txt").write_text("tiny text")
    with pytest.raises(ConfigError, match="fewer than one window"):
        train_cmd(**{**args, "data": tmp_path / "short.txt"})
    with pytest.raises(ConfigError, match="no such data file"):
        train_cmd(**{**args, "data": tmp_path / "missing.txt"})
    with pytest.raises(ConfigError, match="unknown data file extension '.csv'"):
        (tmp_path / "x.csv").write_text("a,b")
        train_cmd(**{**args, "data": tmp_path / "x.csv"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .txt files"):
        train_cmd(**{**args, "data": tmp_path / "empty"})
    with pytest.raises(ConfigError, match="no such tokenizer file"):
        train_cmd(**{**args, "tokenizer": tmp_path / "nope.json"})
    with pytest.raises(ConfigError, match="--tokenizer applies to text data"):
        train_cmd(**{**args, "data": _tokens(tmp_path), "tokenizer": trained})
