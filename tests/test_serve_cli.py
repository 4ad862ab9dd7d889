"""``hexjax serve``'s app from a Hugging Face directory with a tokenizer: text prompts and chat."""

import json

import pytest

openai = pytest.importorskip("openai")

import hexjax  # noqa: E402
from hexjax.models.hf import LlamaModel  # noqa: E402
from hexjax.serve.api import ServerThread  # noqa: E402

from test_serve_engine import TINY_UNEVEN  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("tiny-hf")
    model = LlamaModel.random(hexjax.ModelConfig.preset("tiny"), seed=0)
    model.save_hf(d)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(200)] + ["user", "assistant", ":", "hello", "world"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(d)
    (d / "plan.json").write_text(json.dumps(TINY_UNEVEN))
    return d, model


@pytest.fixture(scope="module")
def served(hf_dir):
    from hexjax.cli.serve import build_app
    d, model = hf_dir
    app, engine = build_app(str(d), d / "plan.json", max_batch=4, max_model_len=64, warmup=False,
                            served_name="tiny-hf")
    with ServerThread(app) as srv:
        srv.dir = d
        yield srv, engine, model, openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0,
                                                timeout=120)


def _want(model, ids, n, eos):
    out = model.generate([ids], n, eos_id=eos)[0]
    return out


def test_text_prompt(served):
    from transformers import AutoTokenizer
    srv, engine, model, client = served
    tok = AutoTokenizer.from_pretrained(str(engine_dir(served)))
    ids = tok("hello world w5", add_special_tokens=True)["input_ids"]
    want = _want(model, ids, 10, tok.eos_token_id)
    r = client.completions.create(model="tiny-hf", prompt="hello world w5", max_tokens=10, temperature=0)
    assert r.choices[0].model_extra["token_ids"] == want
    assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids)


def engine_dir(served):
    return served[0].dir


def test_chat(served):
    from transformers import AutoTokenizer
    srv, engine, model, client = served
    tok = AutoTokenizer.from_pretrained(str(engine_dir(served)))
    msgs = [{"role": "user", "content": "hello w7"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    want = _want(model, ids, 6, tok.eos_token_id)
    r = client.chat.completions.create(model="tiny-hf", messages=msgs, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    chunks = list(client.chat.completions.create(model="tiny-hf", messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tok.decode(want, skip_special_tokens=True)   # streamed pieces join to the whole text
    assert chunks[-1].usage.completion_tokens == len(want)


def test_serve_help():
    from typer.testing import CliRunner
    from hexjax.cli import app
    r = CliRunner().invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "--max-batch" in r.output


def test_chat_logprobs(served):
    srv, engine, model, client = served
    r = client.chat.completions.create(model="tiny-hf", messages=[{"role": "user", "content": "w1 w2"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def _greedy_text(served, prompt: str, n: int):
    from transformers import AutoTokenizer
    srv, engine, model, client = served
    tok = AutoTokenizer.from_pretrained(str(engine_dir(served)))
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    return tok.decode(_want(model, ids, n, tok.eos_token_id), skip_special_tokens=True)


def test_stop_strings(served):
    """Stop strings against a reference cut from the full greedy text: the text ends right before the
    first stop string, streamed or not, and no streamed chunk ever carries any part of it."""
    srv, engine, model, client = served
    prompt = "hello world w5"
    full = _greedy_text(served, prompt, 24)
    words = full.split(" ")
    assert len(words) >= 8, full
    # a stop string across a token boundary, one inside a word, and one that never occurs
    cases = [[words[3][-1] + " " + words[4][:2]], [words[6][1:]], ["never there", words[5] + " "]]
    for stop in cases:
        at = min(i for i in (full.find(s) for s in stop) if i >= 0)
        want = full[:at]
        r = client.completions.create(model="tiny-hf", prompt=prompt, max_tokens=24, temperature=0, stop=stop)
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop", (stop, r.choices[0].text)
        chunks = [c for c in client.completions.create(model="tiny-hf", prompt=prompt, max_tokens=24,
                                                       temperature=0, stop=stop, stream=True) if c.choices]
        texts = [c.choices[0].text for c in chunks]
        assert "".join(texts) == want, (stop, texts)
        assert chunks[-1].choices[0].finish_reason == "stop"
        sent = ""
        for t in texts:   # what was sent at any time is a prefix of the answer: nothing to take back
            sent += t
            assert want.startswith(sent)
    # no stop string in the text: everything, finish "length"
    r = client.completions.create(model="tiny-hf", prompt=prompt, max_tokens=24, temperature=0, stop=["zzz"])
    assert r.choices[0].text == full and r.choices[0].finish_reason == "length"
