"""kiln serve under hostile input (issue 13): every case is thrown at one live server, which must answer each in the
OpenAI error envelope and afterwards still serve, with every KV block back and its resident memory within a bound of
where it started. Then the cases that need their own server: flags out of range, drain with trickling clients and a
second signal, a half-closed streaming client, and a model whose logits turn to NaN for one request's tokens. (Two
servers on one port: test_serve_startup.py.)

Raw sockets are used where an HTTP client would hide what is sent (chunking, Content-Encoding, half-close).
"""
import concurrent.futures as cf
import gzip
import json
import signal
import re
import socket
import threading
import time
from pathlib import Path

import pytest

import test_serve as serve_test
from conftest import run_kiln

prometheus_parser = pytest.importorskip("prometheus_client.parser")

MODEL = "qwen3-fp32"
BODY_LIMIT = 65536
CTX = 64
# The server's resident memory may grow by this much over all the cases (allocator caches, thread stacks of the
# connections). A decompressed or unbounded body, the failure this guards against, costs tens of MiB to GiB.
RSS_BOUND_KIB = 64 * 1024


@pytest.fixture(scope="module")
def ws(fixture_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("robust_ws") / MODEL
    run_kiln("convert", fixture_models / MODEL, "-o", out)
    return out


class Server(serve_test.Server):
    """test_serve's server, with this file's small context, JSON posts and the process's resident memory."""

    def __init__(self, ws, *args, port=None, ctx=CTX):
        super().__init__(ws, *args, port=port, ctx=ctx)

    def post(self, body, path="/v1/completions", headers=None):
        status, text, _ = self.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        return status, json.loads(text)

    def rss_kib(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def raw_exchange(port, head: bytes, body_parts=(), shut_wr=False, read_timeout=60):
    """Sends a request head and body parts on a fresh socket and returns everything read until EOF (or the stream's
    end). Sending stops early if the server closes: a refused body is not read to its end."""
    s = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    try:
        s.sendall(head)
        for part in body_parts:
            try:
                s.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        if shut_wr:
            s.shutdown(socket.SHUT_WR)
        return read_answer(s, shut_wr)
    finally:
        s.close()


def read_answer(s, shut_wr=False):
    """Everything read from socket s until EOF, the end of a stream, or (unless shut_wr) a whole answer."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
        if b"data: [DONE]" in out:
            break
        if b"\r\n\r\n" in out and not shut_wr and b"text/event-stream" not in out:
            head_end = out.index(b"\r\n\r\n") + 4
            length = [int(line.split(b":")[1]) for line in out[:head_end].split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if length and len(out) >= head_end + length[0]:
                break
    return out


def status_and_error(response: bytes):
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body)["error"] if status >= 400 else json.loads(body)


def post_head(length=None, chunked=False, encoding=None, path="/v1/completions"):
    h = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if encoding:
        h += f"Content-Encoding: {encoding}\r\n"
    h += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n"
    return (h + "\r\n").encode()


def chunked(data: bytes, size=16384):
    for i in range(0, len(data), size):
        part = data[i:i + size]
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
    yield b"0\r\n\r\n"


def deep(depth):
    return "[" * depth + "1" + "]" * depth


@pytest.fixture(scope="module")
def server(ws):
    s = Server(ws, "--max-body-bytes", BODY_LIMIT)
    yield s
    s.stop()


def test_hostile_requests_get_envelopes_and_leave_nothing_behind(server, fixture_models):
    ok = {"prompt": "The old kiln", "max_tokens": 4, "temperature": 0}
    assert server.post(ok)[0] == 200
    rss_start = server.rss_kib()

    # 1. Deep nesting, in the prompt, in a chat message and in a content part: 400, one short line.
    cases = [("/v1/completions", '{"prompt": ' + deep(20000) + "}"),
             ("/v1/chat/completions", '{"messages": [{"role": "user", "content": ' + deep(20000) + "}]}"),
             ("/v1/chat/completions",
              '{"messages": [{"role": "user", "content": [{"type": "text", "text": ' + deep(20000) + "}]}]}")]
    for path, body in cases:
        status, err = server.post(body.encode(), path)
        assert status == 400 and "deeper than 128 levels" in err["error"]["message"], err
        assert len(err["error"]["message"]) < 300 and "\n" not in err["error"]["message"]

    # 2. A gzip bomb (~50 KB that inflates to 50 MB) is cut off at the limit while it inflates: 413.
    bomb = gzip.compress(b'{"prompt": "' + b"a" * 50_000_000 + b'"}', 9)
    assert len(bomb) < BODY_LIMIT
    status, err = status_and_error(raw_exchange(server.port, post_head(len(bomb), encoding="gzip"), [bomb]))
    assert status == 413 and "exceeds 65536 bytes" in err["message"], err
    # ... and the same bomb chunked.
    status, err = status_and_error(raw_exchange(server.port, post_head(chunked=True, encoding="gzip"), chunked(bomb)))
    assert status == 413, err
    # A compressed request within the limit is served.
    small = gzip.compress(json.dumps(ok).encode())
    status, answer = status_and_error(raw_exchange(server.port, post_head(len(small), encoding="gzip"), [small]))
    assert status == 200 and answer["usage"]["completion_tokens"] == 4

    # 3. A chunked body beyond the limit (an endless one would do the same): 413 before it ends.
    endless = (b'{"prompt": "' + b"b" * 200_000 + b'"}')
    status, err = status_and_error(raw_exchange(server.port, post_head(chunked=True), chunked(endless)))
    assert status == 413, err
    status, answer = status_and_error(raw_exchange(server.port, post_head(chunked=True),
                                                   chunked(json.dumps(ok).encode(), 7)))
    assert status == 200 and answer["usage"]["completion_tokens"] == 4
    # A declared length beyond the limit is refused unread; to an unknown route too.
    status, err = status_and_error(raw_exchange(server.port, post_head(10**12), [b"x" * 1000]))
    assert status == 413, err
    status, err = status_and_error(raw_exchange(server.port, post_head(chunked=True, path="/v1/other"),
                                                chunked(endless)))
    assert status == 413, err

    # 4. A prompt whose bytes alone cannot fit the context is refused before it is tokenized.
    tok = json.loads((fixture_models / MODEL / "tokenizer.json").read_text())
    longest = max(len(t.encode()) for t in list(tok["model"]["vocab"]) + [a["content"] for a in tok["added_tokens"]])
    too_long = (CTX - 1) * longest * 4 + 1
    if too_long + 100 < BODY_LIMIT:
        status, err = server.post({"prompt": "c" * too_long, "max_tokens": 1})
        assert status == 400 and err["error"]["code"] == "context_length_exceeded" and "bytes" in err["error"]["message"]
    status, err = server.post({"prompt": list(range(CTX)), "max_tokens": 1})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"

    # 5. Bad auth headers on an open server are ignored; malformed bodies still get envelopes.
    assert server.post(ok, headers={"Authorization": "bearer whatever"})[0] == 200
    status, err = server.post(b"\x1f\x8b garbage")
    assert status == 400 and err["error"]["message"]

    # Still answering, every block back, memory within the bound.
    assert server.request("GET", "/health")[0] == 200
    assert server.post(ok)[0] == 200
    deadline = time.monotonic() + 30
    while server.metrics()["kiln_kv_blocks_used"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metrics()["kiln_kv_blocks_used"] == 0
    grown = server.rss_kib() - rss_start
    assert grown < RSS_BOUND_KIB, f"RSS grew by {grown} KiB"


def test_metrics_are_exact_text_format_0_0_4(server):
    assert server.post({"prompt": "count", "max_tokens": 2})[0] == 200
    status, text, headers = server.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = list(prometheus_parser.text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "a family is split"
    for f in families:
        assert f.type in ("counter", "gauge", "histogram"), (f.name, f.type)
        assert f.samples, f.name
        if f.type == "counter":
            assert all(s.name == f.name + "_total" for s in f.samples), f.name
    finished = next(f for f in families if f.name == "kiln_requests_finished")
    assert sorted(s.labels["finish_reason"] for s in finished.samples) == ["cancelled", "error", "length", "stop"]
    # In 0.0.4, HELP and TYPE name the samples exactly: each TYPE line's name starts the next sample line.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# TYPE "):
            name = line.split()[2]
            sample = lines[i + 1]
            assert sample.split("{")[0].split(" ")[0].startswith(name), (line, sample)
            assert lines[i - 1].startswith("# HELP " + name + " ")
    assert text.endswith("\n")


def test_auth_scheme_is_case_insensitive(ws):
    s = Server(ws, "--api-key", "sk-k")
    try:
        body = {"prompt": "x", "max_tokens": 1}
        for header in ("Bearer sk-k", "bearer sk-k", "BEARER sk-k", "Bearer  sk-k"):
            assert s.post(body, headers={"Authorization": header})[0] == 200, header
        for header in ("Bearer sk-x", "Basic sk-k", "Bearersk-k", "sk-k"):
            status, err = s.post(body, headers={"Authorization": header})
            assert status == 401 and err["error"]["type"] == "authentication_error", header
        assert s.post(body)[0] == 401
        # An unauthorized request's body is never read; the connection closes after the 401 and the server goes on.
        status, err = status_and_error(raw_exchange(s.port, post_head(chunked=True), chunked(b"{" * 100000)))
        assert status == 401
        assert s.post(body, headers={"Authorization": "bearer sk-k"})[0] == 200
    finally:
        s.stop()


def test_half_closed_stream_is_not_cancelled(server):
    """A client that shuts its sending side after the request (SHUT_WR) still reads the whole stream."""
    body = json.dumps({"prompt": "The old kiln", "max_tokens": 12, "temperature": 0, "stream": True}).encode()
    out = raw_exchange(server.port, post_head(len(body)), [body], shut_wr=True)
    events = [json.loads(line[6:]) for line in out.decode().split("\n") if line.startswith("data: {")]
    assert events and events[-1]["choices"][0]["finish_reason"] == "length", out[-500:]
    reference = server.post({"prompt": "The old kiln", "max_tokens": 12, "temperature": 0})[1]
    assert "".join(e["choices"][0]["text"] for e in events) == reference["choices"][0]["text"]


@pytest.mark.parametrize("args", [("--port", "70000"), ("--port", "-1"), ("--max-queue", "-1"), ("--max-queue", "0"),
                                  ("--max-batch-tokens", "0"), ("--max-running", "-3"), ("--ctx", "-5"),
                                  ("--kv-cache-blocks", "-1"), ("--kv-cache-mib", "0"), ("--max-body-bytes", "0"),
                                  ("--max-body-bytes", "-1"), ("--drain-timeout", "-1"), ("--drain-timeout", "nan"),
                                  ("--threads", "-2"), ("--kv-cache-fraction", "1")])
def test_serve_flags_out_of_range_are_usage_errors(ws, args):
    proc = run_kiln("serve", ws, *args, check=False, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and args[0] in lines[0], proc.stderr


@pytest.mark.parametrize("args", [("offline", "WS", "--num-prompts", "0"), ("offline", "WS", "--input-len", "-1"),
                                  ("offline", "WS", "--output-len", "0"), ("offline", "WS", "--concurrency", "0"),
                                  ("offline", "WS", "--concurrency", "1,x"), ("offline", "WS", "--max-running", "0"),
                                  ("offline", "WS", "--max-batch-tokens", "-1"), ("offline", "WS", "--id-range", "0"),
                                  ("offline", "WS", "--kv-cache-mib", "0"), ("offline", "WS", "--ctx", "-1"),
                                  ("serve", "--rate", "-1"), ("serve", "--timeout", "0"), ("serve", "-c", "2.5")])
def test_bench_flags_out_of_range_are_usage_errors(ws, args):
    proc = run_kiln("bench", *[str(ws) if a == "WS" else a for a in args], check=False, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and args[-2] in lines[0], proc.stderr


class Trickler:
    """A client that sends a request head promising a long body, then one byte every 0.2 s until stopped: it never
    lets httplib's read timeout fire and never finishes."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(post_head(10000))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.wait(0.2):
            try:
                self.sock.sendall(b" ")
            except OSError:
                return

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def test_drain_deadline_is_hard_with_trickling_clients(ws):
    s = Server(ws, "--drain-timeout", 1)
    tricklers = [Trickler(s.port) for _ in range(3)]
    try:
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        # Without a hard deadline the process waits for the tricklers, which never finish.
        assert s.proc.wait(timeout=30) == 0
    finally:
        for t in tricklers:
            t.close()
        s.stop()


def test_second_signal_exits_at_once(ws):
    s = Server(ws, "--drain-timeout", 600)
    trickler = Trickler(s.port)
    try:
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert s.proc.poll() is None  # draining: it would wait up to 600 s for the trickler
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=30) == 1
        assert "second signal" in s.proc.stderr.read().decode()
    finally:
        trickler.close()
        s.stop()


def test_expect_100_continue_oversized_is_413_and_closes(server):
    """A client that asks before sending an oversized body gets 413 instead of "100 Continue", and the connection
    closes: a client that then sends the body anyway (curl does after a second) must not have it parsed as the next
    request on a kept-alive connection."""
    head = post_head(10**9).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
    s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    try:
        s.sendall(head)
        out = b""
        while b"\r\n\r\n" not in out or len(out) < out.index(b"\r\n\r\n") + 4 + int(
                re.search(rb"(?i)content-length: *(\d+)", out).group(1)):
            chunk = s.recv(65536)
            assert chunk, out
            out += chunk
        status, err = status_and_error(out)
        assert status == 413 and err["type"] == "invalid_request_error", err
        assert b"connection: close" in out.lower(), out
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536) == b""  # closed: nothing more is answered on this connection
        except (BrokenPipeError, ConnectionResetError):
            pass
    finally:
        s.close()
    assert server.get("/health")[0] == 200


@pytest.fixture(scope="module")
def nan_ws(fixture_models, tmp_path_factory):
    """The fixture checkpoint with one embedding row set to negative NaN (what x86 produces for invalid operations):
    any request containing that token computes NaN logits (the lm_head is untied); all others are untouched. The
    workspace is converted from the edited checkpoint, so its manifest and hashes are kiln's own."""
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    from tokenizers import Tokenizer

    src = fixture_models / MODEL
    ckpt = tmp_path_factory.mktemp("nan_ckpt")
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (ckpt / f.name).write_bytes(f.read_bytes())
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    token = tok.encode("a zebra").ids[-1]
    assert token not in tok.encode("The old kiln").ids
    for f in src.glob("*.safetensors"):
        tensors = st.load_file(str(f))
        if "model.embed_tokens.weight" in tensors:
            emb = tensors["model.embed_tokens.weight"]
            assert emb.dtype == np.float32
            emb[token, :] = np.array([0xFFC00000], dtype=np.uint32).view(np.float32)[0]
        st.save_file(tensors, str(ckpt / f.name), metadata={"format": "pt"})
    out = tmp_path_factory.mktemp("nan_ws") / "ws"
    run_kiln("convert", ckpt, "-o", out)
    return out


def test_nan_logits_fail_one_request_and_spare_its_neighbours(nan_ws, ws):
    s = Server(nan_ws, "--max-body-bytes", BODY_LIMIT)
    try:
        good = {"prompt": "The old kiln", "max_tokens": 24, "temperature": 0}
        bad = {"prompt": "a zebra", "max_tokens": 24, "temperature": 0}
        with cf.ThreadPoolExecutor(8) as ex:
            futures = [ex.submit(s.post, good if i % 2 else bad) for i in range(8)]
            results = [f.result() for f in futures]
        for i, (status, body) in enumerate(results):
            if i % 2:
                assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
            else:
                assert status == 500 and body["error"]["type"] == "server_error", body
                assert "NaN" in body["error"]["message"] and "\n" not in body["error"]["message"]
        # The neighbours' text is the unedited model's (nothing leaked into them), and the server goes on.
        reference = json.loads(run_kiln("generate", ws, "--prompt", "The old kiln", "--ctx", CTX, "-n", 24,
                                        "--temperature", 0, "--json").stdout)
        assert all(body["choices"][0]["text"] == reference["text"] for i, (_, body) in enumerate(results) if i % 2)
        stream_body = json.dumps({**bad, "stream": True}).encode()
        out = raw_exchange(s.port, post_head(len(stream_body)), [stream_body]).decode()
        assert '"server_error"' in out and "data: [DONE]" in out
        assert s.post(good)[1]["choices"][0]["text"] == reference["text"]
        assert s.metrics()["kiln_kv_blocks_used"] == 0
    finally:
        s.stop()
    # The CLI: exit 1 with one line.
    proc = run_kiln("generate", nan_ws, "--prompt", "a zebra", "-n", 4, "--temperature", 0, check=False)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "NaN" in proc.stderr, proc.stderr


def test_prompt_with_deep_messages_is_one_line_error(real_tokenizers, tmp_path):
    msgs = tmp_path / "deep.json"
    msgs.write_text('[{"role": "user", "content": ' + deep(30000) + "}]")
    proc = run_kiln("prompt", real_tokenizers / "qwen3", "--messages", msgs, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "deeper than 128 levels" in lines[0] and len(lines[0]) < 400
