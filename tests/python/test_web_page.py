"""The chat page at `/` in a real browser: headless Chromium driven by selenium against `kiln serve` on a fixture.

The oracle is the official openai client: the text the page shows after streaming must equal the client's greedy
answer to the same messages, turn after turn. The stop button must cancel the request on the server (its KV blocks
come back). The queue-position display is driven by a scripted stand-in server, so the page can be held in the
queued state for as long as the test looks at it.
"""
import http.server
import json
import shutil
import threading
import time

import pytest

from test_serve import KEY, Server, ws  # noqa: F401  (ws is a fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(ws):  # noqa: F811
    s = Server(ws, "--api-key", KEY)
    yield s
    s.stop()


def wait_for(driver, predicate, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate())


def status(driver):
    s = driver.find_element(By.ID, "status")
    return s.get_attribute("data-state"), s.text


def answers(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#log .assistant .text')].map(e => e.textContent)")


def set_field(driver, field_id, value):
    f = driver.find_element(By.ID, field_id)
    f.clear()
    f.send_keys(str(value))


def open_page(driver, url, max_tokens):
    driver.get(url + "/")
    driver.find_element(By.TAG_NAME, "summary").click()  # opens Settings
    set_field(driver, "key", KEY)
    set_field(driver, "temperature", 0)
    set_field(driver, "max-tokens", max_tokens)
    driver.find_element(By.ID, "prompt").click()  # the key field's change event loads the model name
    wait_for(driver, lambda: driver.find_element(By.ID, "model").text == "model: tiny")


def send(driver, text):
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


# Records every value the last answer takes while it streams (each textContent write replaces the text node).
RECORD_PARTIALS = """
window.partials = [];
new MutationObserver(records => {
  for (const r of records) for (const n of r.addedNodes)
    if (n.nodeType === Node.TEXT_NODE && r.target.closest && r.target.closest('.assistant'))
      window.partials.push(n.data);
}).observe(document.getElementById('log'), {childList: true, subtree: true});
"""


def test_chat_streams_and_keeps_history(browser, server):
    open_page(browser, server.url, 40)
    client = server.client(KEY)
    messages = []
    for turn in ("Hello there, who are you?", "And what comes next?"):
        browser.execute_script(RECORD_PARTIALS)
        send(browser, turn)
        wait_for(browser, lambda: status(browser)[0] in ("done", "error", "stopped"))
        assert status(browser) == ("done", "done (reached max tokens)")
        shown = answers(browser)[-1]
        messages.append({"role": "user", "content": turn})
        expected = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40)
        assert shown == expected.choices[0].message.content
        messages.append({"role": "assistant", "content": shown})
        # It streamed: the answer grew through several prefixes of the final text.
        partials = [p for p in browser.execute_script("return window.partials") if p]
        assert len(set(partials)) > 1 and all(shown.startswith(p) for p in partials), partials
    assert len(answers(browser)) == 2


def finished_cancelled(server):
    status, text, _ = server.get("/metrics", {"Authorization": f"Bearer {KEY}"})
    assert status == 200
    values = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            values[(s.name, s.labels.get("finish_reason", ""))] = s.value
    return values


def test_stop_button_cancels_on_the_server(browser, server):
    open_page(browser, server.url, 480)
    before = finished_cancelled(server).get(("kiln_requests_finished_total", "cancelled"), 0)
    # Press Stop as soon as the first words show, a moment when the server has hundreds of tokens still to go.
    browser.execute_script("""
      new MutationObserver((records, observer) => {
        const last = [...document.querySelectorAll('#log .assistant .text')].pop();
        if (last && last.textContent) { observer.disconnect(); document.getElementById('stop').click(); }
      }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    """)
    send(browser, "Tell me a very long story.")
    wait_for(browser, lambda: status(browser)[0] in ("done", "error", "stopped"))
    assert status(browser) == ("stopped", "stopped")
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
    shown = answers(browser)[-1]
    full = server.client(KEY).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me a very long story."}], temperature=0,
        max_tokens=480).choices[0].message.content
    assert shown and full.startswith(shown) and len(shown) < len(full)
    # The server noticed the closed stream: the request ended as cancelled and gave back every KV block.
    deadline = time.monotonic() + 30
    while True:
        m = finished_cancelled(server)
        if m[("kiln_requests_running", "")] == 0 and m[("kiln_kv_blocks_used", "")] == 0:
            break
        assert time.monotonic() < deadline, "the stopped request still holds the engine"
        time.sleep(0.05)
    assert m[("kiln_requests_finished_total", "cancelled")] == before + 1


class ScriptedServer(http.server.ThreadingHTTPServer):
    """Serves kiln's page and answers one chat request the way a busy kiln does: queue reports first, then tokens
    once the test releases it."""

    def __init__(self, page):
        self.page, self.release = page, threading.Event()
        super().__init__(("127.0.0.1", 0), ScriptedHandler)


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, content_type, body):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/":
            self.reply("text/html; charset=utf-8", self.server.page)
        else:
            self.reply("application/json", json.dumps({"object": "list", "data": [{"id": "tiny"}]}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

        def frame(text):
            self.wfile.write(text.encode())
            self.wfile.flush()

        # Split across writes and with CRLF line ends, as any server may; the page must reassemble frames.
        frame(': queue {"position": 3, "eta_seconds": 7.6}\r\n\r\n: queue {"posi')
        frame('tion": 2, "eta_seconds": 4.2}\n\n: keep-alive\n\n')
        self.server.release.wait(60)
        for piece in ({"role": "assistant"}, {"content": "Hi"}, {"content": " there"}):
            frame("data: " + json.dumps({"choices": [{"index": 0, "delta": piece, "finish_reason": None}]}) + "\n\n")
        frame("data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\n\n")
        frame("data: [DONE]\n\n")


def test_queue_position_shown_until_first_token(browser, server):
    page = server.get("/")[1].encode()
    fake = ScriptedServer(page)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{fake.server_address[1]}/")
        send(browser, "hi")
        wait_for(browser, lambda: status(browser)[0] == "queued" and "position 2" in status(browser)[1])
        assert status(browser) == ("queued", "queued: position 2, ~4 s")
        fake.release.set()
        wait_for(browser, lambda: status(browser)[0] == "done")
        assert answers(browser)[-1] == "Hi there"
    finally:
        fake.release.set()
        fake.shutdown()
