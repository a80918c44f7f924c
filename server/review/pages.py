"""The review page's HTML: Jinja2 templates with autoescaping on for every template, so every text a model wrote (and
every id, name and reason) is escaped wherever it lands; nothing is marked safe. The page's own script and style are
files served by the server itself (no CDN: it works offline), and the Content-Security-Policy admits no other script,
not even an inline one, so a text that got past the escaping still could not run.

The login page is the one exception to "no inline script": the guard sends it (with 401) to a browser that opens a
review page with no key, before any file can be fetched, so its script is inline and admitted by its sha256 alone.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache, lru_cache
from importlib.resources import files
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined

HERE = files("server.review")
ASSETS = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


def href(*segments: str, **params: Any) -> str:
    """``/review/<segment>/...?params``: every segment quoted whole (an id's ``/`` or ``..`` stays inside it)."""
    path = "/review" + "".join("/" + quote(str(s), safe="") for s in segments)
    query = {k: v for k, v in params.items() if v is not None and v != ""}
    return path + ("?" + urlencode(query) if query else "")


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.globals["href"] = href
    env.filters["pct"] = lambda x: f"{x:.0%}"
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


@cache
def asset(name: str) -> bytes:
    """A static file of the page, by its name in :data:`ASSETS` only (never a path from a request)."""
    if name not in ASSETS:
        raise KeyError(name)
    return (HERE / "static" / name).read_bytes()


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_LOGIN_STYLE = ("body{font:16px system-ui,sans-serif;max-width:28em;margin:4em auto;padding:0 1em}"
                "input{font:inherit;width:100%;padding:.4em;margin:.5em 0}button{font:inherit;padding:.4em 1em}"
                "#err{color:#b00}")
_LOGIN_SCRIPT = """
document.getElementById('f').addEventListener('submit', async function (ev) {
  ev.preventDefault();
  var key = document.getElementById('key').value.trim();
  var r = await fetch('/review/session', {method: 'POST', headers: {'Authorization': 'Bearer ' + key}});
  if (r.ok) { sessionStorage.setItem('cai-review-key', key); location.reload(); }
  else { document.getElementById('err').textContent = 'That key was refused.'; }
});
"""
LOGIN_HTML = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cai review: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_LOGIN_STYLE}</style></head>
<body><h1>cai review</h1>
<p>This server needs an API key (one of its <code>--api-key-file</code>). The page keeps it in this tab only.</p>
<form id="f"><label for="key">API key</label><input id="key" type="password" autocomplete="off" autofocus>
<button type="submit">Sign in</button><p id="err" role="alert"></p></form>
<script>{_LOGIN_SCRIPT}</script></body></html>
"""
LOGIN_HEADERS = {**HEADERS, "Content-Security-Policy": (
    f"default-src 'none'; script-src {_sha(_LOGIN_SCRIPT)}; style-src {_sha(_LOGIN_STYLE)}; connect-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'")}


def login_page() -> tuple[bytes, dict[str, str]]:
    """The body and headers of the page the guard sends a browser with no key (status 401)."""
    return LOGIN_HTML.encode("utf-8"), LOGIN_HEADERS
