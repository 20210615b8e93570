"""kiln chat driven over pipes (stdin/stdout are not terminals, so it prints only answers, one per line).

KV reuse is checked by equality: turn k of a chat (which keeps the earlier turns' K/V and prefills only the new
suffix) must give exactly the tokens that `kiln generate --messages` gives on the same conversation computed from
scratch. Greedy decoding on a batch-invariant forward makes that an exact comparison.

Ctrl-C is simulated by sending SIGINT to the process while it streams into a pipe (no pty): the answer stops, the REPL
reads the next line.
"""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import kiln_binary, run_kiln

MODEL = "qwen3-fp32"
N = 12
COMMON = ("--ctx", 1024, "-n", N, "--temperature", 0)


@pytest.fixture(scope="module")
def ws(fixture_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_ws") / MODEL
    run_kiln("convert", fixture_models / MODEL, "-o", out)
    return out


def chat(ws, lines, *args):
    # Bytes, not text mode: universal newlines would turn the model's "\r\n" into "\n".
    proc = subprocess.run([str(kiln_binary()), "chat", str(ws), *map(str, COMMON), *map(str, args)],
                          input="".join(l + "\n" for l in lines).encode(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode(), proc.stderr.decode()


def reference(ws, messages, tmp_path):
    f = tmp_path / "msgs.json"
    f.write_text(json.dumps(messages))
    return json.loads(run_kiln("generate", ws, "--messages", f, *COMMON, "--json").stdout)["text"]


def stats(stderr):
    return [l for l in stderr.splitlines() if l.startswith("[") and "tokens/s" in l]


def expected_output(ws, tmp_path, system, turns):
    """What chat should print for `turns` (user lines, or None for /reset): each answer computed from scratch by
    generate on the whole conversation so far, followed by a newline. Answers may contain newlines themselves, so the
    chat output is compared as a whole."""
    base = [{"role": "system", "content": system}] if system else []
    messages, answers = list(base), []
    for user in turns:
        if user is None:
            messages = list(base)
            continue
        messages.append({"role": "user", "content": user})
        answers.append(reference(ws, messages, tmp_path))
        messages.append({"role": "assistant", "content": answers[-1]})
    return "".join(a + "\n" for a in answers)


def test_three_turns_equal_generate_on_full_conversation(ws, tmp_path):
    users = ["Hello! Who are you?", "Tell me about the sea.", "And the mountains?"]
    out, err = chat(ws, users, "--system", "You are terse.")
    assert out == expected_output(ws, tmp_path, "You are terse.", users)
    lines = stats(err)
    assert len(lines) == 3
    # Turns 2 and 3 reused the cached conversation (a prefix of at least the first turn's prompt).
    reused = [int(l.split(" reused")[0].rsplit(" ", 1)[1]) for l in lines]
    assert reused[0] == 0 and reused[1] > 10 and reused[2] > reused[1], lines


def test_reset_and_system_commands(ws, tmp_path):
    out, err = chat(ws, ["Hello! Who are you?", "Tell me more.", "/reset", "Hello! Who are you?",
                         "/system Be brief.", "Why?", "/exit", "never read"])
    assert "[conversation reset]" in err and "[system prompt set]" in err
    lines = stats(err)
    assert len(lines) == 4  # "/exit" ended it before "never read"
    assert int(lines[2].split(" reused")[0].rsplit(" ", 1)[1]) == 0  # nothing reused after /reset
    # After /reset the conversation starts over; /system re-renders the history under the new system prompt.
    first = expected_output(ws, tmp_path, "", ["Hello! Who are you?", "Tell me more."])
    again = expected_output(ws, tmp_path, "", ["Hello! Who are you?"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! Who are you?"},
                {"role": "assistant", "content": again[:-1]}, {"role": "user", "content": "Why?"}]
    assert out == first + again + reference(ws, messages, tmp_path) + "\n"


def test_sigint_stops_the_answer_not_the_repl(ws):
    # Long answers (up to 20000 tokens): each is stopped with SIGINT once it is streaming.
    proc = subprocess.Popen([str(kiln_binary()), "chat", str(ws), "--ctx", "40000", "-n", "20000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = bytearray(), bytearray()

    def pump(stream, buf):
        while chunk := os.read(stream.fileno(), 4096):
            buf.extend(chunk)
    threads = [threading.Thread(target=pump, args=(proc.stdout, out)),
               threading.Thread(target=pump, args=(proc.stderr, err))]
    for t in threads:
        t.start()

    def wait_for(cond, what, timeout=60):
        end = time.time() + timeout
        while not cond():
            assert proc.poll() is None, f"kiln exited early: {err.decode(errors='replace')}"
            assert time.time() < end, f"timed out waiting for {what}: {err.decode(errors='replace')}"
            time.sleep(0.05)

    try:
        for turn in range(2):
            start = len(out)
            proc.stdin.write(f"Tell me a very long story, part {turn}.\n".encode())
            proc.stdin.flush()
            wait_for(lambda: len(out) > start + 20, f"answer {turn} to stream")
            proc.send_signal(signal.SIGINT)
            wait_for(lambda: err.count(b"interrupted, ") == turn + 1, f"answer {turn} to stop")
        proc.stdin.write(b"/exit\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0, err.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        for t in threads:
            t.join()
    lines = stats(err.decode())
    assert len(lines) == 2 and all(l.startswith("[interrupted, ") for l in lines), lines
    n = [int(l.split("interrupted, ")[1].split(" ")[0]) for l in lines]
    assert all(0 < k < 20000 for k in n), n
