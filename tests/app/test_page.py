"""The web page as files and headers (the browser drives it in tests/integration/test_page_browser.py)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from fastapi.testclient import TestClient

from app.page import STATIC

ASSETS = ["/static/page/app.js", "/static/page/style.css", "/static/page/favicon.svg"]


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data


def test_the_page_is_served_at_the_root_with_a_strict_csp(client: TestClient) -> None:
    resp = client.get("/", headers={"Authorization": ""})  # the page itself needs no key
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    csp = dict(d.strip().split(" ", 1) for d in resp.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["img-src"] == "'self' blob:" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in resp.headers["content-security-policy"]
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_the_page_has_no_inline_code_and_names_only_its_own_assets(client: TestClient) -> None:
    parser = Tags()
    parser.feed(client.get("/").text)
    assert parser.script_text.strip() == ""
    urls = []
    for tag, attrs in parser.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)  # no inline handlers
        assert "style" not in attrs, tag
        urls += [v for k, v in attrs.items() if k in ("src", "href") and v]
    assert set(urls) == {*ASSETS[:2], "/static/page/favicon.svg", "/docs"}
    for path in ASSETS:
        resp = client.get(path)
        assert resp.status_code == 200, path
        assert "script-src 'self'" in resp.headers["content-security-policy"]


def test_the_assets_load_nothing_from_other_origins() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace, not a request
        assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", text, re.I), path.name
        assert "@import" not in text and "eval(" not in text, path.name


def test_assets_have_their_content_types(client: TestClient) -> None:
    types = {"app.js": "javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
    for name, kind in types.items():
        assert kind in client.get(f"/static/page/{name}").headers["content-type"], name
    assert client.get("/static/page/nope.js").status_code == 404
    assert client.get("/static/page/../main.py").status_code == 404
