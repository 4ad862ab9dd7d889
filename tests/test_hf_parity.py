"""Parity with Hugging Face transformers (torch, fp32, CPU) on tiny random Llamas."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

import hexjax  # noqa: E402
from hexjax.errors import ConfigError  # noqa: E402
from hexjax.models import LlamaModel, ModelConfig  # noqa: E402

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, initializer_range=0.06, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(),
    "mqa-3layers": dict(num_key_value_heads=1, num_hidden_layers=3),
    "tied": dict(tie_word_embeddings=True),
    "llama3-rope": dict(rope_parameters=LLAMA3_ROPE),
    "linear-rope": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "attention-bias": dict(attention_bias=True),
    "mlp-bias": dict(mlp_bias=True),
    "head-dim-24": dict(head_dim=24),
}


def make_hf(path, seed=0, **overrides):
    """A random LlamaForCausalLM (norm scales and biases perturbed too) saved to ``path``."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


TOKENS = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 48))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    ref = make_hf(tmp_path, seed=len(case), **CASES[case])
    model = hexjax.load_hf(tmp_path)
    assert model.num_params == sum(p.numel() for p in ref.parameters()) == model.cfg.num_params
    assert rel_err(model(TOKENS), hf_logits(ref, TOKENS)) < 1e-4


def test_old_config_layout_top_level_rope(tmp_path):
    """rope_theta / rope_scaling at top level (transformers < 5) read as rope_parameters."""
    ref = make_hf(tmp_path, seed=3, rope_parameters=LLAMA3_ROPE, attention_bias=True)
    new_cfg = hexjax.load_hf(tmp_path).cfg
    d = json.loads((tmp_path / "config.json").read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    (tmp_path / "config.json").write_text(json.dumps(d))
    model = hexjax.load_hf(tmp_path)
    assert model.cfg == new_cfg and model.cfg.rope_scaling.kind == "llama3"
    assert model.cfg.rope_theta == 500000.0
    assert rel_err(model(TOKENS), hf_logits(ref, TOKENS)) < 1e-4


@pytest.mark.parametrize("case", ["gqa", "llama3-bias"])
def test_greedy_generation_token_for_token(tmp_path, case):
    overrides = {"gqa": dict(), "llama3-bias": dict(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True)}
    ref = make_hf(tmp_path, seed=5, **overrides[case])
    model = hexjax.load_hf(tmp_path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, BASE["vocab_size"], n).tolist() for n in (5, 17, 11)]
    got = model.generate(prompts, 32)
    # the oracle: Hugging Face, batched with left padding and an attention mask
    width = max(map(len, prompts))
    ids = torch.zeros((3, width), dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    want = out[:, width:].tolist()
    assert [len(g) for g in got] == [32] * 3
    assert got == want
    # one prompt at a time gives the same tokens as the ragged batch
    assert model.generate([prompts[1]], 32) == [want[1]]


def test_bf16_checkpoint_loads(tmp_path):
    ref = make_hf(tmp_path / "fp32", seed=7)
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    # the oracle: the bf16-rounded weights computed in fp32 (reloading recomputes rotary
    # frequencies in fp32, which .float() on the converted module would not)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    assert any(v.dtype == np.dtype(jnp.bfloat16) for v in
               hexjax.models.hf.read_safetensors(tmp_path / "bf16" / "model.safetensors").values())
    model = hexjax.load_hf(tmp_path / "bf16")
    assert rel_err(model(TOKENS), hf_logits(ref, TOKENS)) < 1e-4
    low = hexjax.load_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert low.params["layer_0"]["attn"]["wq"].dtype == jnp.bfloat16
    assert rel_err(low(TOKENS), hf_logits(ref, TOKENS)) < 5e-2


def test_sharded_checkpoint_loads(tmp_path):
    ref = make_hf(tmp_path / "one", seed=8)
    ref.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert rel_err(hexjax.load_hf(tmp_path / "sharded")(TOKENS), hf_logits(ref, TOKENS)) < 1e-4


def test_save_hf_round_trip_through_transformers(tmp_path):
    cfg = ModelConfig("rt", 160, 64, 112, 2, 4, 2, head_dim=24, attention_bias=True, tie_word_embeddings=True,
                      rope_theta=500000.0, rope_scaling=ModelConfig.preset("llama-3.1-8b").rope_scaling)
    model = LlamaModel.random(cfg, seed=4)
    model.save_hf(tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert rel_err(model(TOKENS), hf_logits(ref, TOKENS)) < 1e-4
    assert hexjax.load_hf(tmp_path).cfg.tie_word_embeddings


# ---------------------------------------------------------------- errors

@pytest.fixture
def saved(tmp_path):
    make_hf(tmp_path, seed=9)
    return tmp_path


def test_missing_weights_file(tmp_path, saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        hexjax.load_hf(saved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        hexjax.load_hf(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not a directory"):
        hexjax.load_hf(tmp_path / "nowhere")


def test_missing_and_unexpected_tensor(saved):
    file = saved / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        hexjax.load_hf(saved)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((112, 64), np.float32)
    tensors["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, file)
    with pytest.raises(ConfigError, match=r"unexpected tensor model\.layers\.1\.mlp\.extra\.weight"):
        hexjax.load_hf(saved)


def test_shape_mismatch_names_the_tensor(saved):
    d = json.loads((saved / "config.json").read_text())
    d["intermediate_size"] = 96
    (saved / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"mlp\.gate_proj\.weight has shape \(112, 64\) but config.json implies \(96, 64\)"):
        hexjax.load_hf(saved)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'yarn'"),
    (lambda d: d.update(model_type="mistral"), "model_type 'mistral'"),
])
def test_unsupported_config(saved, edit, match):
    d = json.loads((saved / "config.json").read_text())
    edit(d)
    (saved / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match):
        hexjax.load_hf(saved)


def test_missing_shard(tmp_path):
    make_hf(tmp_path / "one", seed=10).save_pretrained(tmp_path / "s", safe_serialization=True, max_shard_size="40KB")
    next((tmp_path / "s").glob("model-*.safetensors")).unlink()
    with pytest.raises(ConfigError, match="missing"):
        hexjax.load_hf(tmp_path / "s")
