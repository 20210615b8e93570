"""kiln serve: the documented API surface that test_serve.py does not cover (docs/serving.md), driven by the official
`openai` client.

Oracles: `kiln generate` for the same sampling parameters (the server runs the same sequence decoder, so text and
tokens must be equal, not close), transformers' tokenizer/chat template and log_softmax for chat logprobs,
prometheus_client's parser for the metrics, and the error envelope the docs promise for refused fields.
"""
import json
import signal
import time

import pytest

from conftest import run_kiln
from test_serve import MODEL, Server, generate, wait_idle, ws  # noqa: F401  (ws is a fixture)

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(ws):  # noqa: F811
    s = Server(ws, "--kv-cache-blocks", 256)
    yield s
    s.stop()


def error_of(status, body, headers=None):
    """(status, the OpenAI envelope's "error" object) of a Server.request answer."""
    doc = json.loads(body)
    assert set(doc) == {"error"}, doc
    return status, doc["error"]


@pytest.mark.parametrize("field,value", [("best_of", 2), ("echo", True), ("suffix", " and then")])
def test_unsupported_completion_fields_are_400_naming_the_field(server, field, value):
    status, err = error_of(*server.request("POST", "/v1/completions",
                                           {"model": "tiny", "prompt": "Hello", "max_tokens": 2, field: value},
                                           {"Content-Type": "application/json"}))
    assert status == 400 and err["param"] == field and err["type"] == "invalid_request_error", err
    assert field in err["message"]
    # The same through the official client, and the neutral values are accepted.
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="tiny", prompt="Hello", max_tokens=2, **{field: value})
    assert e.value.body["param"] == field
    neutral = {"best_of": 1, "echo": False, "suffix": None}[field]
    r = server.client().completions.create(model="tiny", prompt="Hello", max_tokens=2, **{field: neutral})
    assert r.usage.completion_tokens == 2


def test_max_completion_tokens(ws, server):  # noqa: F811
    ref = generate(ws, "Hello there", 5, "--chat")
    msgs = [{"role": "user", "content": "Hello there"}]
    r = server.client().chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == ref["text"]
    # max_completion_tokens (OpenAI's current name) wins over the deprecated max_tokens when both are given.
    r = server.client().chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=5, max_tokens=9,
                                                temperature=0)
    assert r.usage.completion_tokens == 5


def test_chat_content_as_text_parts(ws, server):  # noqa: F811
    ref = generate(ws, "Hello there, friend", 8, "--chat")
    parts = [{"type": "text", "text": "Hello there, "}, {"type": "text", "text": "friend"}]
    r = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                                max_tokens=8, temperature=0)
    assert r.choices[0].message.content == ref["text"] and r.usage.prompt_tokens == ref["prompt_tokens"]
    # A part kiln cannot use is refused, naming the field.
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": image}],
                                                max_tokens=2)
    assert "content" in e.value.body["message"]


SAMPLING = [
    # (HTTP parameters, the same for kiln generate)
    (dict(temperature=0.9, top_k=20, seed=11), ("--temperature", 0.9, "--top-p", 1, "--top-k", 20, "--seed", 11)),
    (dict(temperature=1.0, min_p=0.05, seed=12), ("--temperature", 1.0, "--top-p", 1, "--top-k", 0, "--min-p", 0.05,
                                                   "--seed", 12)),
    (dict(temperature=0.8, top_p=0.9, presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.3, seed=13),
     ("--temperature", 0.8, "--top-p", 0.9, "--top-k", 0, "--presence-penalty", 0.6, "--frequency-penalty", 0.4,
      "--repetition-penalty", 1.3, "--seed", 13)),
    (dict(temperature=0, repetition_penalty=1.5, frequency_penalty=1.0),  # greedy: the penalties alone steer it
     ("--temperature", 0, "--repetition-penalty", 1.5, "--frequency-penalty", 1.0)),
]


@pytest.mark.parametrize("params,flags", SAMPLING)
def test_sampling_parameters_equal_generate(ws, server, params, flags):  # noqa: F811
    ref = generate(ws, "Once upon a time", 24, *flags)
    http = dict(params)
    extra = {k: http.pop(k) for k in ("top_k", "min_p", "repetition_penalty") if k in http}  # not in the client's API
    r = server.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, extra_body=extra,
                                           **http)
    assert r.choices[0].text == ref["text"]
    # The parameters change the outcome: without them (same seed and temperature) the text differs.
    plain = {k: v for k, v in params.items() if k in ("temperature", "seed")}
    other = server.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, **plain)
    assert other.choices[0].text != ref["text"]


def test_chat_logprobs_match_transformers(fixture_models, server):
    """Chat logprobs are log_softmax of the raw logits at each step (docs/serving.md), on the prompt that
    apply_chat_template(tokenize=True) builds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(fixture_models / MODEL)
    model = AutoModelForCausalLM.from_pretrained(fixture_models / MODEL, dtype=torch.float32).float().eval()
    msgs = [{"role": "user", "content": "What does the lighthouse keeper say?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    n, k = 6, 4
    want_lp, want_top, gen = [], [], []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids + gen])).logits[0, -1].double(), -1)
            nxt = int(torch.argmax(lp))
            want_lp.append(float(lp[nxt]))
            want_top.append([(int(i), float(v)) for v, i in zip(*torch.topk(lp, k))])
            gen.append(nxt)
    r = server.client().chat.completions.create(model="tiny", messages=msgs, max_tokens=n, temperature=0,
                                                logprobs=True, top_logprobs=k)
    assert r.usage.prompt_tokens == len(ids)
    content = r.choices[0].logprobs.content
    tol = 1e-4  # fp32 forwards on both sides; the values are O(10)
    assert [e.token for e in content] == [tok.decode([t]) for t in gen]
    assert [e.logprob for e in content] == pytest.approx(want_lp, abs=tol)
    for e, top in zip(content, want_top):
        assert [t.token for t in e.top_logprobs] == [tok.decode([i]) for i, _ in top]
        assert [t.logprob for t in e.top_logprobs] == pytest.approx([v for _, v in top], abs=tol)


def test_kv_blocks_cached_metric(ws):  # noqa: F811
    """Unreferenced full blocks stay cached for reuse: after a request, every full block of the tokens it computed
    (the prompt and every generated token but the last, which is never fed back) is counted in kiln_kv_blocks_cached
    and none in kiln_kv_blocks_used; a repeat request revives and releases the same blocks; without prefix caching
    nothing is kept."""
    for flags, cached in (((), True), (("--no-prefix-cache",), False)):
        s = Server(ws, "--kv-cache-blocks", 64, *flags)
        try:
            assert s.metrics()["kiln_kv_blocks_cached"] == 0
            prompt = "The old harbour town had a lighthouse, a bakery and a long history of storms. " * 2
            r = s.client().completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
            computed = r.usage.prompt_tokens + r.usage.completion_tokens - 1
            m = wait_idle(s)
            assert m["kiln_kv_blocks_cached"] == (computed // 16 if cached else 0), (computed, m)
            s.client().completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
            m = wait_idle(s)
            assert m["kiln_kv_blocks_cached"] == (computed // 16 if cached else 0), (computed, m)
            assert m["kiln_kv_blocks_used"] == 0
        finally:
            s.stop()


def test_ready_is_503_while_draining(ws):  # noqa: F811
    s = Server(ws, "--drain-timeout", 30)
    try:
        assert s.get("/ready")[0] == 200
        stream = s.client().completions.create(model="tiny", prompt="drain me", max_tokens=450, temperature=0,
                                               stream=True)
        it = iter(stream)
        next(it)
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the handler sets the draining flag asynchronously
            status, body, _ = s.get("/ready")
            if status != 200:
                break
            time.sleep(0.01)
        status, err = error_of(status, body)
        assert status == 503 and "shutting down" in err["message"], err
        assert s.get("/health")[0] == 200  # alive, just not taking work
        status, err = error_of(*s.request("POST", "/v1/completions", {"model": "tiny", "prompt": "late"},
                                          {"Content-Type": "application/json"}))
        assert status == 503, err
        rest = list(it)  # the running request still finishes
        assert [ch.choices[0].finish_reason for ch in rest if ch.choices][-1] == "length"
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()
