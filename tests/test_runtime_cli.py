"""``hexjax generate`` and ``hexjax dump-hlo`` end to end (in-process, 8 virtual devices)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hexjax.cli import app
from hexjax.errors import PlanError
from hexjax.models import LlamaModel, ModelConfig
from hexjax.plan import Plan, Replica, Stage

ROOT = Path(__file__).resolve().parents[1]
UNEVEN = Plan("tiny", "", (Replica((Stage((0, 1), (5,)), Stage((1, 4), (0, 1, 2, 3), dp=2, tp=2))),))


def test_generate_matches_single_device(tmp_path):
    plan_file = tmp_path / "plan.json"
    UNEVEN.save(plan_file)
    res = CliRunner().invoke(app, ["generate", "--model", "tiny", "--plan", str(plan_file), "--virtual-devices", "8",
                                   "--prompt-ids", "1,2,3", "--prompt-ids", "9, 8, 7, 6, 5, 4, 3, 2, 1",
                                   "--max-new-tokens", "6", "--json", "--check"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    want = LlamaModel.random(ModelConfig.preset("tiny"), seed=0).generate([[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1]], 6)
    assert out["tokens"] == want and out["matches_single_device"] is True
    assert out["random_weights"] is True and out["tokens_per_s"] > 0


def test_generate_refuses_a_plan_bigger_than_the_machine(tmp_path):
    plan_file = tmp_path / "plan.json"
    Plan("tiny", "", (Replica((Stage((0, 4), (11,)),)),)).save(plan_file)
    res = CliRunner().invoke(app, ["generate", "--model", "tiny", "--plan", str(plan_file), "--prompt-ids", "1"])
    assert isinstance(res.exception, PlanError) and "--virtual-devices 12" in str(res.exception)


def test_dump_hlo_cli(tmp_path):
    plan_file = tmp_path / "plan.json"
    UNEVEN.save(plan_file)
    out = tmp_path / "hlo"
    res = CliRunner().invoke(app, ["dump-hlo", "--model", "tiny", "--plan", str(plan_file), "--out", str(out),
                                   "--batch", "4", "--prompt-len", "16", "--output-len", "8"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 * 2 * 4 + 1 and "summary.md" in names
    assert "r0.s1" in res.output and "dp2 x tp2" in res.output and "summary.md" in res.output


def test_generate_with_text_prompt_and_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.preset("tiny")
    lm = LlamaModel.random(cfg, seed=0)
    lm.save_hf(tmp_path)
    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()   # joins words with spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path)
    plan_file = tmp_path / "plan.json"
    UNEVEN.save(plan_file)
    res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path), "--plan", str(plan_file),
                                   "--prompt", "w5 w17 w200", "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["prompts"] == [[5, 17, 200]] and out["random_weights"] is False
    assert out["tokens"] == lm.generate([[5, 17, 200]], 4)
    assert out["text"][0].split() == [f"w{t}" for t in out["tokens"][0]]


def test_example_plans_are_well_formed():
    from hexjax.models import ModelConfig
    from hexjax.plan import Plan
    from hexjax.runtime.generation import check_plan
    files = sorted((ROOT / "examples" / "plans").glob("*.json"))
    assert files
    for f in files:
        plan = Plan.load(f)
        check_plan(plan, ModelConfig.preset(plan.model))
