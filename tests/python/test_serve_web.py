"""kiln serve's browser-facing HTTP: the chat page at `/` and CORS (--allow-origin), checked with plain http.client
requests (the page's behaviour in a real browser is tests/python/test_web_page.py)."""
import http.client
import json

import pytest

from conftest import run_kiln
from test_serve import KEY, Server, ws  # noqa: F401  (ws is a fixture)


def call(server, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def keyed(ws):  # noqa: F811
    s = Server(ws, "--api-key", KEY, "--allow-origin", "https://chat.example.org",
               "--allow-origin", "http://localhost:3000/")
    yield s
    s.stop()


def test_page_loads_without_key_and_is_self_contained(keyed):
    status, headers, body = call(keyed, "GET", "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert body.startswith("<!doctype html>") and body.rstrip().endswith("</html>")
    # No external assets: nothing is loaded from anywhere, and the policy forbids it anyway.
    for marker in ("http://", "https://", "//cdn", "<link", " src="):
        assert marker not in body, marker
    assert "connect-src 'self'" in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    # The data behind it still needs the key.
    assert call(keyed, "GET", "/v1/models")[0] == 401
    assert call(keyed, "GET", "/v1/models", {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert call(keyed, "POST", "/", {"Content-Type": "application/json"}, "{}")[0] == 401


def test_cors_preflight_for_allowed_origins_only(keyed):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    status, h, _ = call(keyed, "OPTIONS", "/v1/chat/completions", {"Origin": "https://chat.example.org", **pre})
    assert status == 204  # answered before authentication: browsers send preflights without the key
    assert h["access-control-allow-origin"] == "https://chat.example.org"
    assert "POST" in h["access-control-allow-methods"]
    assert h["access-control-allow-headers"] == "authorization, content-type"
    assert h["vary"] == "Origin"
    # The trailing "/" of the flag does not matter, and neither does the case of the host.
    status, h, _ = call(keyed, "OPTIONS", "/v1/models", {"Origin": "http://LOCALHOST:3000", **pre})
    assert status == 204 and h["access-control-allow-origin"] == "http://LOCALHOST:3000"
    for origin in ("https://evil.example.org", "http://chat.example.org", "https://chat.example.org:8443", "null"):
        status, h, body = call(keyed, "OPTIONS", "/v1/chat/completions", {"Origin": origin, **pre})
        assert status == 403, origin
        assert "access-control-allow-origin" not in h
        assert json.loads(body)["error"]["message"]


def test_cors_headers_on_answers_including_errors(keyed):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2})
    status, h, _ = call(keyed, "POST", "/v1/completions", {"Origin": "https://chat.example.org", **auth}, body)
    assert status == 200 and h["access-control-allow-origin"] == "https://chat.example.org"
    # A page must be able to read a 401 to tell its user that the key is wrong.
    status, h, _ = call(keyed, "GET", "/v1/models", {"Origin": "https://chat.example.org"})
    assert status == 401 and h["access-control-allow-origin"] == "https://chat.example.org"
    status, h, _ = call(keyed, "POST", "/v1/completions", {"Origin": "https://evil.example.org", **auth}, body)
    assert status == 200 and "access-control-allow-origin" not in h
    status, h, _ = call(keyed, "POST", "/v1/completions", auth, body)  # same-origin / non-browser: no Origin
    assert status == 200 and "access-control-allow-origin" not in h


def test_cors_is_off_by_default_and_star_allows_any(ws):  # noqa: F811
    s = Server(ws)
    try:
        pre = {"Origin": "https://chat.example.org", "Access-Control-Request-Method": "POST"}
        status, h, _ = call(s, "OPTIONS", "/v1/chat/completions", pre)
        assert status != 204 and "access-control-allow-origin" not in h
        status, h, _ = call(s, "GET", "/v1/models", {"Origin": "https://chat.example.org"})
        assert status == 200 and "access-control-allow-origin" not in h
    finally:
        s.stop()
    s = Server(ws, "--allow-origin", "*")
    try:
        pre = {"Origin": "https://anything.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "x-a; x-b"}
        status, h, _ = call(s, "OPTIONS", "/v1/chat/completions", pre)
        assert status == 204 and h["access-control-allow-origin"] == "*"
        assert h["access-control-allow-headers"] == "Authorization, Content-Type"  # not echoed when malformed
        status, h, _ = call(s, "GET", "/v1/models", {"Origin": "https://anything.example"})
        assert status == 200 and h["access-control-allow-origin"] == "*" and "vary" not in h
    finally:
        s.stop()


@pytest.mark.parametrize("origin", ["chat.example.org", "https://x.org/path", "https://", "https://a b.org"])
def test_bad_allow_origin_is_one_line_error(ws, origin):  # noqa: F811
    r = run_kiln("serve", ws, "--allow-origin", origin, check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-origin" in lines[0], r.stderr
