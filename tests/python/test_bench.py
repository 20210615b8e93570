"""kiln bench: offline (engine in process) and serve (HTTP load against kiln serve) on a fixture model.

Counts are checked against what was asked and, for the served runs, against the server's own Prometheus counters;
the timing numbers cannot be predicted, so only their internal order is checked. Errors are one line.
"""
import csv
import http.server
import json
import threading

import pytest
import tokenizers

from conftest import run_kiln
from test_serve import Server, free_port, ws  # noqa: F401  (ws is a fixture)

N, IN, OUT = 6, 12, 9


def check_run(run, concurrency, n=N, prompt_tokens=N * IN):
    assert run["concurrency"] == concurrency
    assert (run["requests"], run["failed"]) == (n, 0)
    assert run["output_tokens"] == n * OUT and run["prompt_tokens"] == prompt_tokens
    assert run["duration_s"] > 0 and run["process_cpu_s"] > 0
    assert run["requests_per_s"] == pytest.approx(n / run["duration_s"], rel=1e-9)
    assert run["output_tokens_per_s"] == pytest.approx(n * OUT / run["duration_s"], rel=1e-9)
    for m in ("ttft", "tpot", "itl", "e2e"):
        assert 0 <= run[f"{m}_p50_s"] <= run[f"{m}_p99_s"], m
    assert 0 < run["ttft_p50_s"] <= run["e2e_p50_s"] and run["ttft_p99_s"] <= run["e2e_p99_s"]
    assert run["e2e_p99_s"] <= run["duration_s"]


def check_csv(path, runs):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs)
    for row, run in zip(rows, runs):
        for k in ("concurrency", "requests", "output_tokens", "prompt_tokens"):
            assert int(row[k]) == run[k]
        for k in ("ttft_p99_s", "requests_per_s"):
            assert float(row[k]) == pytest.approx(run[k])


def test_offline_counts_json_and_csv(ws, tmp_path):  # noqa: F811
    out = run_kiln("bench", "offline", ws, "-n", N, "--input-len", IN, "--output-len", OUT, "-c", "1,3",
                   "--ctx", 256, "--json", "--csv", tmp_path / "off.csv")
    doc = json.loads(out.stdout)
    assert doc["mode"] == "offline" and doc["output_len"] == OUT
    assert [r["concurrency"] for r in doc["runs"]] == [1, 3]
    for run in doc["runs"]:
        check_run(run, run["concurrency"])
    check_csv(tmp_path / "off.csv", doc["runs"])
    assert not (tmp_path / "off.csv.tmp").exists()
    # The table for people has a header and one row per run.
    table = run_kiln("bench", "offline", ws, "-n", 2, "--input-len", 4, "--output-len", 3, "-c", 2).stdout
    assert len(table.strip().splitlines()) == 2 and "out tok/s" in table


def counter(server, name):
    return server.metrics()[name]


def test_serve_counts_match_the_server(ws, tmp_path):  # noqa: F811
    s = Server(ws)
    try:
        before = counter(s, "kiln_generation_tokens_total")
        out = run_kiln("bench", "serve", "--url", s.url, "-n", N, "--input-len", IN, "--output-len", OUT,
                       "-c", "1,4", "--json", "--csv", tmp_path / "serve.csv")
        doc = json.loads(out.stdout)
        assert doc["mode"] == "serve" and doc["target"] == s.url
        for run, c in zip(doc["runs"], (1, 4)):
            check_run(run, c)
        check_csv(tmp_path / "serve.csv", doc["runs"])
        # The server generated exactly what bench counted, plus bench's one warm-up request of min(OUT, 8) tokens.
        assert counter(s, "kiln_generation_tokens_total") - before == 2 * N * OUT + min(OUT, 8)
        # Poisson arrivals (open loop): every request still runs, and the rate is reported.
        doc = json.loads(run_kiln("bench", "serve", "--url", s.url, "-n", 4, "--input-len", IN, "--output-len",
                                  OUT, "--rate", "50", "--json").stdout)
        (run,) = doc["runs"]
        assert run["rate"] == 50 and run["concurrency"] == 0
        check_run(run, 0, n=4, prompt_tokens=4 * IN)
        # Text prompts from a file go out as text; the server's usage gives their token counts.
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("Hello there\n\nA second\\nprompt over two lines\n")
        doc = json.loads(run_kiln("bench", "serve", "--url", s.url, "-n", 3, "--prompts", prompts,
                                  "--output-len", OUT, "--json").stdout)
        tok = tokenizers.Tokenizer.from_file(str(ws / "tokenizer.json"))
        sent = ("Hello there", "A second\nprompt over two lines", "Hello there")  # 3 prompts: the file is cycled
        expected = sum(len(tok.encode(t).ids) for t in sent)
        assert doc["runs"][0]["prompt_tokens"] == expected
    finally:
        s.stop()


class QueueingServer(http.server.ThreadingHTTPServer):
    """Answers like a busy kiln with the queue extension: SSE comment frames `: queue {...}` before the tokens, and a
    comment line inside a data frame, which SSE readers must skip."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "queued-model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert req["model"] == "queued-model" and req["stream"] and req["ignore_eos"]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = lambda c: "data: " + json.dumps(c) + "\n\n"  # noqa: E731
            out = ': queue {"position": 2, "eta_seconds": 1.5}\n\n: queue {"position": 1, "eta_seconds": 0.5}\n\n'
            for i in range(req["max_tokens"]):
                piece = chunk({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]})
                out += piece if i % 2 else ": keep-alive\n" + piece
            out += chunk({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
            out += ": keep-alive\n" + chunk({"choices": [], "usage": {"prompt_tokens": len(req["prompt"]),
                                                                   "completion_tokens": req["max_tokens"]}})
            self.wfile.write((out + "data: [DONE]\n\n").encode())

    def __init__(self):
        super().__init__(("127.0.0.1", 0), self.Handler)


def test_serve_reads_streams_with_queue_reports():
    fake = QueueingServer()
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        doc = json.loads(run_kiln("bench", "serve", "--url", f"http://127.0.0.1:{fake.server_address[1]}/",
                                  "-n", N, "--input-len", IN, "--output-len", OUT, "-c", 2, "--json").stdout)
        (run,) = doc["runs"]
        check_run(run, 2)
        assert run["itl_p99_s"] >= 0
    finally:
        fake.shutdown()


@pytest.mark.parametrize("args, message", [
    (["serve", "--url", "URL"], "cannot reach"),
    (["serve", "--url", "ftp://127.0.0.1:1"], "--url"),
    (["serve", "-c", "0"], "--concurrency"),
    (["serve", "-c", "4,x"], "--concurrency"),
    (["serve", "--rate", "-1"], "--rate"),
    (["serve", "--output-len", "0"], "--output-len"),
    (["offline", "WS", "--id-range", "100000000"], "--id-range"),
    (["offline", "WS", "--prompts", "/nonexistent/prompts.txt"], "prompt file"),
])
def test_errors_are_one_line(ws, args, message):  # noqa: F811
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = [url if a == "URL" else ws if a == "WS" else a for a in args]
    if args[0] == "serve" and "--url" not in args:
        args += ["--url", url]
    r = run_kiln("bench", *args, check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
