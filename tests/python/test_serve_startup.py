"""kiln serve's start: the port is claimed before the model loads, so a second server on a port in use fails before
loading anything; a client that connects while the model loads is answered once it is ready; a signal while loading
ends the process at once.

To hold a server at a known point of its start without timing, its stderr is a pipe that is already full: the server
stops at its first message ("claimed HOST:PORT; loading PATH"), written after the port is claimed and before anything
loads, until the test reads the pipe.
"""
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

import test_serve as serve_test
from conftest import kiln_binary, run_kiln
from test_serve_robustness import post_head, read_answer, status_and_error

MODEL = "qwen3-fp32"  # served straight from the HF checkpoint (converted in memory): no workspace to write
CTX = 64
SMALL_CACHE = ("--kv-cache-blocks", "16")  # the default 1 GiB KV cache would only cost time here


@pytest.fixture(scope="module")
def model(fixture_models):
    return fixture_models / MODEL


def full_pipe():
    """(read end, write end) of a pipe whose buffer is full: a blocking write to it waits until the read end is read."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    for size in (4096, 1):
        try:
            while True:
                os.write(w, b"x" * size)
        except BlockingIOError:
            pass
    os.set_blocking(w, True)
    return r, w


class HeldServer:
    """kiln serve started with a full stderr pipe: it claims its port, then stops at its first message until
    release() reads the pipe (from then on a thread keeps reading it)."""

    def __init__(self, model, *args):
        self.port = serve_test.free_port()
        r, w = full_pipe()
        self.proc = subprocess.Popen([str(kiln_binary()), "serve", str(model), "--port", str(self.port), "--ctx",
                                      str(CTX), *SMALL_CACHE, *map(str, args)], stdout=subprocess.DEVNULL, stderr=w)
        os.close(w)
        self.pipe = os.fdopen(r, "rb")
        self.err = b""
        self.reader = None

    def connect(self):
        """A connection to the claimed port, made while the server is held before loading."""
        deadline = time.monotonic() + 60  # a guard against a hang, not a bound on anything measured
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "kiln serve exited before claiming its port"
            try:
                return socket.create_connection(("127.0.0.1", self.port), timeout=60)
            except ConnectionRefusedError:
                time.sleep(0.02)
        raise AssertionError("kiln serve did not claim its port (a message before the claim would hold it there)")

    def release(self):
        def read():
            self.err = self.pipe.read()
        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def stderr_lines(self):
        """Its messages, once it has exited."""
        self.reader.join(timeout=60)
        return self.err.lstrip(b"x").decode().splitlines()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.reader is None:
            self.release()
        self.reader.join(timeout=60)
        self.pipe.close()


def test_second_server_on_the_same_port_is_refused_before_loading(model, tmp_path):
    """The second server is given a path that does not exist: had it loaded before binding, its error would name the
    path. It fails with exactly one line, the port's, and the first server goes on serving."""
    first = serve_test.Server(model, *SMALL_CACHE, ctx=CTX)
    try:
        missing = tmp_path / "no-such-workspace"
        proc = run_kiln("serve", missing, "--port", first.port, check=False, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert "address already in use" in lines[0] and f"127.0.0.1:{first.port}" in lines[0], proc.stderr
        assert first.get("/health")[0] == 200
    finally:
        first.stop()


def test_request_sent_while_loading_is_answered_once_ready(model):
    prompt, n = "The old kiln", 8
    server = HeldServer(model, "--model-name", "tiny")
    try:
        sock = server.connect()
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0}).encode()
        sock.sendall(post_head(len(body)) + body)  # the server is still held before loading: this waits in the queue
        server.release()
        status, answer = status_and_error(read_answer(sock))
        sock.close()
        assert status == 200, answer
        want = serve_test.generate(model, prompt, n)
        assert answer["choices"][0]["text"] == want["text"]
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        lines = server.stderr_lines()
        # The claim comes first; "listening" (what scripts wait for) only once the server answers.
        assert lines[0] == f"kiln serve: claimed 127.0.0.1:{server.port}; loading {model}", lines
        assert any(line.startswith(f"kiln serve: listening on http://127.0.0.1:{server.port}") for line in lines)
    finally:
        server.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_loading_exits_at_once(model, sig):
    """Held before loading, the server gets a signal: it exits 0 without loading or answering (the waiting connection
    is closed unanswered), and the port is free again."""
    server = HeldServer(model)
    try:
        sock = server.connect()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        server.proc.send_signal(sig)
        server.release()
        assert server.proc.wait(timeout=60) == 0
        # The claim's message (one write of less than PIPE_BUF: all or nothing) is lost to the signal, or written
        # whole when the pipe is read before the signal lands; either way nothing is loaded.
        lines = server.stderr_lines()
        claim = f"kiln serve: claimed 127.0.0.1:{server.port}; loading {model}"
        assert lines in (["kiln serve: stopped while loading the model"],
                         [claim, "kiln serve: stopped while loading the model"]), lines
        try:
            assert sock.recv(65536) == b""  # closed with nothing sent
        except ConnectionResetError:
            pass
        sock.close()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", server.port))
    finally:
        server.close()
