"""The documentation site: built strictly from mkdocs.yml, served on 127.0.0.1 and opened in
headless Chromium; the API page must show the signature of every public function and class of
dcal.ops, dcal.nn, dcal.models and dcal.train, and the search index must hold each of them.

Needs mkdocs-material + mkdocstrings[python] (the ``docs`` extra) and Chromium (the Debian package
``chromium``). Locally they may be absent (the test is then skipped, saying which); under CI
(``CI=true``) their absence is a failure.
"""

from __future__ import annotations

import functools
import html
import http.server
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PUBLIC_MODULES = ("dcal.ops", "dcal.nn", "dcal.models", "dcal.train")


def _need(what: str, present: bool) -> None:
    if present:
        return
    if IN_CI:
        pytest.fail(f"{what} is missing under CI=true: .ci/run installs it (the docs extra and apt chromium)")
    pytest.skip(f"{what} is not installed (pip install -e '.[docs]'; apt-get install chromium); required in CI")


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def public_objects():
    """(qualified name, object) of every public function and class of the public modules: the
    module's ``__all__`` when it has one, else every public name bound in it to a function or
    class defined in dcal (what ``from dcal.nn import *`` gives a user)."""
    out = []
    for mod_name in PUBLIC_MODULES:
        mod = importlib.import_module(mod_name)
        names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
        for n in names:
            obj = getattr(mod, n)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__.startswith("dcal"):
                out.append((f"{mod_name}.{n}", obj))
    return out


def _params(obj):
    """Parameter names as a signature shows them (``*args``, ``**kwargs``; no ``self``)."""
    sig = inspect.signature(obj)
    names = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            names.append("*" + p.name)
        elif p.kind is p.VAR_KEYWORD:
            names.append("**" + p.name)
        else:
            names.append(p.name)
    return names


def _signature_text(text: str, name: str):
    """The shown signatures ``name(...)`` in the page's text (balanced parentheses)."""
    found = []
    for m in re.finditer(r"(?<![\w.])" + re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        found.append(text[m.end() : i - 1])
    return found


def _shows_signature(text: str, name: str, params) -> bool:
    for body in _signature_text(text, name):
        pos = 0
        for p in params:
            m = re.search(r"(?<![\w*])" + re.escape(p) + r"(?!\w)", body[pos:])
            if m is None:
                break
            pos += m.end()
        else:
            return True
    return False


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    _need("mkdocs", importlib.util.find_spec("mkdocs") is not None)
    _need("mkdocs-material", importlib.util.find_spec("material") is not None)
    _need("mkdocstrings[python]", importlib.util.find_spec("mkdocstrings_handlers") is not None)
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(ROOT, "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _dump_dom(url: str, profile) -> str:
    chromium = _chromium()
    _need("chromium", chromium is not None)
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--dump-dom",
        url,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip(), f"chromium failed on {url}: {r.stderr[-2000:]}"
    return r.stdout


def _text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", dom))


def test_public_objects_found():
    objs = dict(public_objects())
    # the list the site is checked against is not empty and holds the main entry points
    for name in (
        "dcal.ops.pwca_attention",
        "dcal.ops.neighborhood_attention2d",
        "dcal.ops.attention_rollout",
        "dcal.nn.PWCAAttention",
        "dcal.nn.LocalGraphAttention",
        "dcal.models.DCALViT",
        "dcal.train.Trainer",
    ):
        assert name in objs, name


def test_signature_check_refuses_a_wrong_page():
    # the check itself can fail: a missing parameter, a wrong order or an absent name
    text = "pwca_attention(\n q,\n k1,\n v1,\n k2,\n v2,\n *,\n scale=None\n)"
    assert _shows_signature(text, "pwca_attention", ["q", "k1", "v1", "k2", "v2", "scale"])
    assert not _shows_signature(text, "pwca_attention", ["q", "k1", "v1", "k2", "v2", "backend"])
    assert not _shows_signature(text, "pwca_attention", ["k1", "q"])
    assert not _shows_signature(text, "multi_kv_attention", ["q"])


def test_api_page_in_chromium_shows_every_signature(server, tmp_path):
    dom = _dump_dom(server + "/api/", tmp_path / "profile")
    assert "<title>" in dom and "API reference" in dom, "the API page did not load"
    text = _text(dom)
    missing = []
    for qual, obj in public_objects():
        name, params = qual.rsplit(".", 1)[1], _params(obj)
        if f'id="{qual}"' not in dom:
            missing.append(f"{qual} (no anchor #{qual})")
        elif not params and inspect.isclass(obj):
            continue  # a class constructed without arguments: its heading is its whole signature
        elif not _shows_signature(text, name, params):
            missing.append(f"{qual}{inspect.signature(obj)}")
    assert not missing, "the API page lacks these public signatures:\n" + "\n".join(missing)


def test_search_index_holds_every_public_object(site):
    with open(os.path.join(site, "search", "search_index.json")) as f:
        docs = json.load(f)["docs"]
    locations = {d["location"] for d in docs}
    missing = [qual for qual, _ in public_objects() if f"api/#{qual}" not in locations]
    assert not missing, f"search/search_index.json has no entry for {missing}"
