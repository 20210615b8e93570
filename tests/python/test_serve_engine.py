"""kiln serve's engine features over HTTP: prefix caching (equal outputs, hit counters, per-key salts), logprobs
against transformers' log_softmax, n > 1, queue position frames, client disconnects and a
bounded soak with random cancellations that must leave no KV block in use.

The fixture model is random but deterministic; qwen3-fp32 has no EOS id, so every answer runs to max_tokens.
"""
import concurrent.futures as cf
import http.client
import json
import random
import socket
import time

import pytest

from conftest import run_kiln
from test_serve import MODEL, Server, generate, wait_idle

openai = pytest.importorskip("openai")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

SHARED = ("You are a helpful assistant who answers questions about the weather, the sea, the mountains and the long "
          "history of the old harbour town. ") * 2


def start(ws, *args, **kw):
    """A server with a small KV pool (256 blocks start faster than the default 1 GiB)."""
    return Server(ws, *(args if "--kv-cache-blocks" in args else ("--kv-cache-blocks", 256, *args)), **kw)


@pytest.fixture(scope="module")
def ws(fixture_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_engine_ws") / MODEL
    run_kiln("convert", fixture_models / MODEL, "-o", out)
    return out


@pytest.fixture(scope="module")
def server(ws):
    s = start(ws)
    yield s
    s.stop()


def labeled(server, name, **labels):
    status, text, _ = server.get("/metrics")
    for fam in prometheus_parser.text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def hits(server, headers=None):
    return server.metrics(headers)["kiln_prefix_cache_hit_tokens_total"]


def test_prefix_cache_reuses_shared_prompts_and_keeps_greedy_outputs(ws, server):
    c = server.client()
    before = hits(server)
    for q in ("What about the sea?", "And the mountains?"):
        ref = generate(ws, SHARED + q, 12)
        r = c.completions.create(model="tiny", prompt=SHARED + q, max_tokens=12, temperature=0)
        assert r.choices[0].text == ref["text"]
    assert hits(server) - before >= 16  # the second request reused the shared prompt's full blocks
    # Multi-turn chat: the second turn starts with the first turn's prompt and answer.
    msgs = [{"role": "system", "content": SHARED}, {"role": "user", "content": "Hello"}]
    first = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "Tell me more"}]
    before = hits(server)
    second = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert hits(server) > before
    m = server.metrics()
    assert m["kiln_prefix_cache_queried_tokens_total"] >= m["kiln_prefix_cache_hit_tokens_total"] > 0
    # The same conversation on a server without prefix caching answers identically and never hits.
    s = start(ws, "--no-prefix-cache")
    try:
        again = s.client().chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
        assert again.choices[0].message.content == second.choices[0].message.content
        assert hits(s) == 0
    finally:
        s.stop()


@pytest.mark.parametrize("salt", ["per-key", "none"])
def test_prefix_cache_salt_per_api_key(ws, salt):
    s = start(ws, "--api-key", "key-a", "--api-key", "key-b", "--prefix-cache-salt", salt)
    try:
        auth = {"Authorization": "Bearer key-a"}
        ask = lambda key: s.client(key).completions.create(model="tiny", prompt=SHARED, max_tokens=2)  # noqa: E731
        ask("key-a")
        h0 = hits(s, auth)
        ask("key-b")
        h1 = hits(s, auth)
        ask("key-a")
        h2 = hits(s, auth)
        assert h2 > h1  # a key always reuses its own prefixes
        assert (h1 == h0) if salt == "per-key" else (h1 > h0)  # another key's only without a per-key salt
    finally:
        s.stop()


def test_without_api_keys_any_bearer_token_shares_the_cache(server):
    prompt = SHARED + "unkeyed"
    server.client("whatever-1").completions.create(model="tiny", prompt=prompt, max_tokens=1)
    before = hits(server)
    server.client("whatever-2").completions.create(model="tiny", prompt=prompt, max_tokens=1)
    assert hits(server) > before


def test_logprobs_match_transformers(ws, fixture_models, server):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(fixture_models / MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(fixture_models / MODEL, dtype=torch.float32).eval()
    prompt = tok("The lighthouse keeper said")["input_ids"]
    n, k = 8, 5
    ids, ref_lp, ref_top = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):  # greedy, log_softmax of the raw logits (what kiln reports)
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            nxt = int(torch.argmax(lp))
            ref_lp.append(float(lp[nxt]))
            ref_top.append([float(v) for v in torch.topk(lp, k).values])
            ids.append(nxt)
    gen = ids[len(prompt):]
    tol = 1e-4  # fp32 forward on both sides; values are O(10)
    c = server.client()
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, logprobs=k)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in gen]
    assert lp.token_logprobs == pytest.approx(ref_lp, abs=tol)
    for got, want in zip(lp.top_logprobs, ref_top):
        assert sorted(got.values(), reverse=True) == pytest.approx(want, abs=tol)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    # Streaming carries the same values, chunk by chunk.
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, logprobs=k,
                                       stream=True))
    streamed = [v for ch in chunks if ch.choices and ch.choices[0].logprobs
                for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(ref_lp, abs=tol)
    # Chat: logprobs + top_logprobs in the chat shape, streaming equal to non-streaming.
    msgs = [{"role": "user", "content": "Say something"}]
    full = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                     top_logprobs=3)
    content = full.choices[0].logprobs.content
    assert len(content) == 6 and all(len(e.top_logprobs) == 3 for e in content)
    for e in content:
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the chosen token is the top one
        assert bytes(e.bytes).decode() == e.token
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, stream=True)
    sc = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in sc] == [(e.token, e.logprob) for e in content]
    assert full.choices[0].message.content == "".join(e.token for e in content)


def test_n_choices(ws, server):
    c = server.client()
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0.9, seed=7, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for i, ch in enumerate(r.choices):  # choice i samples with seed + i
        ref = generate(ws, "Once upon a time", 10, "--temperature", 0.9, "--seed", 7 + i)
        assert ch.text == ref["text"]
    assert r.usage.prompt_tokens == ref["prompt_tokens"] and r.usage.completion_tokens == 30
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       temperature=0.9, seed=3, n=2, stream=True,
                                       stream_options={"include_usage": True})
    texts, roles, ends = {0: "", 1: ""}, set(), {}
    chunks = list(stream)
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.add(choice.index)
            if choice.finish_reason:
                ends[choice.index] = choice.finish_reason
    assert roles == {0, 1} and ends == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 16
    full = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                     temperature=0.9, seed=3, n=2)
    assert [ch.message.content for ch in full.choices] == [texts[0], texts[1]]
    assert texts[0] != texts[1]


def test_malformed_logprobs_and_n_name_the_parameter(server):
    for path, body, param in [
            ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
            ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
            ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
            ("/v1/chat/completions", {"n": 65}, "n"),
            ("/v1/completions", {"logprobs": -1}, "logprobs"),
            ("/v1/completions", {"n": 1.5}, "n")]:
        body = dict(body, **({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}))
        status, text, _ = server.request("POST", path, body, {"Content-Type": "application/json"})
        err = json.loads(text)["error"]
        assert status == 400 and err["param"] == param, (body, err)


def sse_lines(port, body):
    """Opens a raw stream; yields its lines (without the newline) as they arrive."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    while True:
        line = resp.fp.readline()
        if not line:
            return
        yield line.decode().rstrip("\n")


def test_queue_position_frames_and_openai_client_while_queued(ws):
    # A long context, so that the request ahead runs until the test cancels it.
    s = start(ws, "--max-running", 1, "--kv-cache-blocks", 1024, ctx=16384)
    try:
        ref = generate(ws, "queued", 6)
        frames = {0: [], 1: []}  # (arrival time, frame), filled live

        def waiting(n):
            while s.metrics()["kiln_requests_waiting"] < n:
                time.sleep(0.02)

        # One long request ahead, running until the frames were seen, then cancelled.
        hog = s.client().completions.create(model="tiny", prompt="hog", max_tokens=16000, temperature=0, stream=True)
        next(iter(hog))

        def watch(i):
            for line in sse_lines(s.port, {"prompt": "queued", "max_tokens": 6, "temperature": 0, "stream": True}):
                if line.startswith(": queue "):
                    frames[i].append((time.monotonic(), json.loads(line[len(": queue "):])))
                elif line.startswith("data: "):
                    return time.monotonic()

        with cf.ThreadPoolExecutor(4) as pool:
            first = pool.submit(watch, 0)
            waiting(1)
            second = pool.submit(watch, 1)
            waiting(2)
            # The official client ignores the comment frames.
            client_run = pool.submit(lambda: "".join(
                ch.choices[0].text for ch in s.client().completions.create(
                    model="tiny", prompt="queued", max_tokens=6, temperature=0, stream=True) if ch.choices))
            waiting(3)
            while len(frames[1]) < 2 and not second.done():  # a repeated frame at an unchanged position
                time.sleep(0.05)
            hog.close()  # cancels it: the queue moves
            first.result()
            second_data = second.result()
            assert client_run.result() == ref["text"]
        assert frames[0][0][1]["position"] == 1
        assert frames[1][0][1]["position"] == 2
        positions = [f["position"] for _, f in frames[1]]
        assert positions[:2] == [2, 2] and positions == sorted(positions, reverse=True)  # repeats, only moves forward
        assert all(f["eta_seconds"] is None or f["eta_seconds"] >= 0 for _, f in frames[0] + frames[1])
        assert all(set(f) == {"position", "eta_seconds"} for _, f in frames[0] + frames[1])
        assert second_data >= frames[1][-1][0]
        wait_idle(s)
    finally:
        s.stop()


def run_one(server, i, n):
    stream = server.client().completions.create(model="tiny", prompt=f"Request {i}: the story of {i * 7}",
                                                max_tokens=n, temperature=0, stream=True)
    return "".join(c.choices[0].text for c in stream if c.choices)


def test_non_streaming_disconnect_cancels_and_frees_blocks(server):
    before = labeled(server, "kiln_requests_finished_total", finish_reason="cancelled")
    body = json.dumps({"prompt": "abandon me", "max_tokens": 200, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    while server.metrics()["kiln_requests_running"] < 1:
        time.sleep(0.01)
    sock.close()
    wait_idle(server)
    assert labeled(server, "kiln_requests_finished_total", finish_reason="cancelled") == before + 1


def test_soak_random_cancellations_leave_no_block_in_use(ws):
    s = start(ws, "--kv-cache-blocks", 120, "--max-batch-tokens", 128)
    rng = random.Random(1234)
    plan = [(i, rng.choice(["full", "stream", "abort", "drop"]), rng.randint(1, 8), rng.randint(5, 200))
            for i in range(1000)]
    c = s.client()

    def one(job):
        i, kind, n, cut = job
        prompt = SHARED[:cut] + str(i)
        if kind == "full":
            return c.completions.create(model="tiny", prompt=prompt, max_tokens=n).usage.completion_tokens == n
        if kind == "drop":  # a non-streaming client that gives up at once
            sock = socket.create_connection(("127.0.0.1", s.port))
            body = json.dumps({"prompt": prompt, "max_tokens": 200}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            sock.close()
            return True
        if kind == "stream":  # every token arrives: the usage chunk counts n (no EOS in this model)
            chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=n, stream=True,
                                               stream_options={"include_usage": True}))
            reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            return chunks[-1].usage.completion_tokens == n and reasons == ["length"]
        stream = c.completions.create(model="tiny", prompt=prompt, max_tokens=200, stream=True)
        got = 0
        for ch in stream:
            assert ch.choices[0].finish_reason is None  # 200 tokens cannot be over after two chunks
            got += 1
            if got == 2:
                stream.close()
                break
        return got == 2

    try:
        with cf.ThreadPoolExecutor(32) as pool:
            assert all(pool.map(one, plan))
        m = wait_idle(s)
        assert m["kiln_kv_blocks_used"] == 0
        def finished_by_reason():
            return {r: labeled(s, "kiln_requests_finished_total", finish_reason=r)
                    for r in ("stop", "length", "cancelled", "error")}
        deadline = time.monotonic() + 30  # the last dropped connections may still be being read
        while sum(finished_by_reason().values()) < len(plan) and time.monotonic() < deadline:
            time.sleep(0.1)
        finished = finished_by_reason()
        m = wait_idle(s)
        kinds = [job[1] for job in plan]
        # Every request reached the engine and ended once: the full and streamed ones by length, the aborted and
        # dropped ones cancelled (or by length, if one finished before its disconnect was seen).
        assert sum(finished.values()) == len(plan) and m["kiln_requests_rejected_total"] == 0, finished
        assert finished["stop"] == 0 and finished["error"] == 0, finished
        assert finished["length"] >= kinds.count("full") + kinds.count("stream"), finished
        assert 0 < finished["cancelled"] <= kinds.count("abort") + kinds.count("drop"), finished
    finally:
        s.stop()
