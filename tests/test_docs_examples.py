"""The Python examples of README.md and docs/ run as written, against a real Valkey.

Each example is found by a line it contains (not by its position), run with the fewest stubs
for the names it leaves undefined (``fetch_pear``, ``run_report``, ``db``, ...), its map and
lock names moved into the test's namespace. An expression statement followed by a comment
that starts with a Python literal (``prices["apple"]  # 1.25, from the local copy``) must
evaluate to that literal. Every fenced ``python`` block of those files must at least compile.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import io
import os
import re
import subprocess
import sys
import tokenize
import unicodedata
from pathlib import Path
from typing import Any

import pytest

import syncmap
from servers import wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text(encoding="utf-8"))


def block(path: Path, marker: str) -> str:
    """The one python block of ``path`` that contains ``marker``."""
    found = [b for b in blocks(path) if marker in b]
    assert len(found) == 1, f"{path.name}: {len(found)} python blocks contain {marker!r}"
    return found[0]


def compile_block(source: str, name: str) -> Any:
    return compile(source, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def stated_results(source: str) -> dict[int, Any]:
    """Line -> the literal a trailing comment says that line's expression returns."""
    stated = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string[1:].strip()
        for candidate in (text, text.split(",")[0]):
            try:
                stated[tok.start[0]] = ast.literal_eval(candidate)
                break
            except (ValueError, SyntaxError):
                continue
    return stated


async def run_example(source: str, env: dict[str, Any], name: str) -> dict[str, Any]:
    """Run ``source`` statement by statement in ``env`` (top-level ``await`` allowed); an
    expression whose line's comment states a literal must evaluate to it."""
    stated = stated_results(source)
    for stmt in ast.parse(source).body:
        wanted = stated.get(stmt.lineno, ...) if isinstance(stmt, ast.Expr) else ...
        if wanted is not ...:
            code = compile(ast.Expression(stmt.value), name, "eval", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        else:
            code = compile(ast.Module([stmt], []), name, "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, env)  # the docs' own examples
        if asyncio.iscoroutine(result):
            result = await result
        if wanted is not ...:
            line = source.splitlines()[stmt.lineno - 1].strip()
            assert result == wanted, f"{name}: `{line}` gave {result!r}"
    return env


def renamed(source: str, ns: str) -> str:
    """The example with its map named ``ns`` (and its guard lock in that map's hash tag)."""
    return source.replace('"prices"', f'"{ns}"').replace("{prices}", f"{{{ns}}}")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_python_block_compiles(path):
    for i, source in enumerate(blocks(path)):
        compile_block(source, f"{path.name} block {i}")


def test_readme_tour(server, ns, monkeypatch):
    monkeypatch.setenv("SYNCMAP_URL", server.url)
    source = renamed(block(ROOT / "README.md", 'get_or_load("pear"'), ns)
    env = {
        "fetch_pear": lambda: 0.8,
        "catalog": {"kiwi": 0.5, "plum": 0.3},
        "skus": ["kiwi", "plum", "absent"],
    }
    try:
        asyncio.run(run_example(source, env, "README tour"))
        prices = env["prices"]
        assert prices.get("apple", fresh=True) == 1.30  # the guarded write
        assert prices.get_many(["orders", "pear", "kiwi"]) == {
            "orders": 1,
            "pear": 0.8,
            "kiwi": 0.5,
        }
    finally:
        if "node" in env:
            env["node"].close()


def test_readme_two_processes(server, ns):
    """The README's prices.py in two processes: the reader prints each price the writer sets
    and serves its reads from the local copy. Sleeps are scaled down (reader x0.8, writer
    x0.1), and the writer starts once the reader has subscribed."""
    source = renamed(block(ROOT / "README.md", 'sys.argv[1] == "writer"'), ns)

    def script(scale: float) -> str:
        return (
            f"import time\n_sleep = time.sleep\ntime.sleep = lambda s: _sleep(s * {scale})\n"
            + source
        )

    env = {**os.environ, "SYNCMAP_URL": server.url}
    run = [sys.executable, "-c"]
    reader = subprocess.Popen(
        [*run, script(0.8), "reader"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        client = server.client()
        channel = f"syncmap:{{{ns}}}:ch"
        wait_until(
            lambda: client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1],
            what="the reader to subscribe",
        )
        client.close()
        subprocess.run([*run, script(0.1), "writer"], env=env, check=True, timeout=60)
        out, _ = reader.communicate(timeout=60)
    finally:
        reader.kill()
        reader.wait()
    assert reader.returncode == 0
    lines = out.splitlines()
    prices = [float(line.split()[-1]) for line in lines if line.startswith("apple is now")]
    assert prices and prices == sorted(prices) and prices[-1] == 1.09, out
    stats = re.search(r"hits=(\d+), misses=(\d+)", lines[-1])
    assert stats, out
    hits, misses = map(int, stats.groups())
    assert hits + misses == 60 and hits >= 50, out  # all but a few reads are local hits


def test_readme_lock_and_safehashmap(server, ns, monkeypatch):
    monkeypatch.setenv("SYNCMAP_URL", server.url)
    readme = ROOT / "README.md"
    fences = []
    with syncmap.connect() as node:
        env = {
            "node": node,
            "run_report": lambda fence: fences.append(fence),
            "alert": lambda lock: None,
        }
        lock_source = re.sub(
            r'"(reports:nightly|job:42|leader)"',
            rf'"{ns}-\1"',
            block(readme, 'node.obtain("job:42"'),
        )
        asyncio.run(run_example(lock_source, env, "README Lock"))
    assert len(fences) == 1 and fences[0] >= 1
    env = {"token": "t0k3n", "expected": None, "new": 2}
    asyncio.run(run_example(block(readme, "SafeHashMap(maxsize="), env, "README SafeHashMap"))
    assert env["m"]["user:1"] == {"name": "Ada"} and env["m"].get("session:9") == "t0k3n"


def test_lock_md_usage(server, ns):
    source = block(ROOT / "docs" / "lock.md", "obtain_multi")
    source = re.sub(r'"(reports:nightly|job:42|leader)"', rf'"{ns}-\1"', source)
    source = source.replace("{order:42}", f"{{{ns}}}")
    fences = []

    async def main() -> None:
        with syncmap.connect(server.url) as node:
            anode = await syncmap.connect_async(server.url)
            env = {
                "syncmap": syncmap,
                "node": node,
                "anode": anode,
                "run_report": lambda fence: fences.append(fence),
                "alert": lambda lock: None,
            }
            try:
                await run_example(source, env, "docs/lock.md")
                env["both"].release()
            finally:
                await anode.close()

    asyncio.run(main())
    assert fences and fences[0] >= 1


def test_frameworks_md_cached(server, ns):
    source = renamed(block(ROOT / "docs" / "frameworks.md", "price.refresh("), ns)
    calls = []

    class Db:
        def fetch_price(self, sku: str, currency: str) -> dict:
            calls.append(sku)
            return {"sku": sku, "currency": currency}

    with syncmap.connect(server.url) as node:
        env = {"__name__": "app.prices", "node": node, "db": Db()}
        asyncio.run(run_example(source, env, "docs/frameworks.md cached"))
    assert calls == ["A-1", "A-1"]  # the first call, then refresh() (invalidate drops it)


def test_readme_cached_and_frameworks_md_keys(server, ns):
    """The README's decorator example, and frameworks.md's key= and early_refresh ones (their
    functions' bodies are ``...``: what they return here is None)."""
    calls = []

    class Db:
        def fetch_price(self, sku: str) -> dict:
            calls.append(sku)
            return {"sku": sku}

    class User:
        id = 7

    frameworks = ROOT / "docs" / "frameworks.md"
    with syncmap.connect(server.url) as node:
        env = {"__name__": "app.prices", "node": node, "db": Db()}
        source = renamed(block(ROOT / "README.md", "def price(sku: str) -> dict | None"), ns)
        asyncio.run(run_example(source, env, "README cached"))
        assert env["price"]("A-1") == {"sku": "A-1"} and calls == ["A-1"]
        env.update(Session=object, User=User)
        for marker in ('key="price:{sku}"', "early_refresh=1.0"):
            asyncio.run(run_example(block(frameworks, marker), env, f"docs/frameworks.md {marker}"))
        assert env["price_of"].key("B-2", object()) == "price:B-2"
        assert env["report"].key(User(), "mon") == "report:7:mon"
        assert env["exchange_rates"]() is None


def test_prefork_md_spawn_example(server, ns, tmp_path):
    """prefork.md's multiprocessing example (spawn: the URL and the map's name go to the
    children), its body filled in: each of the 4 children writes and reads the map."""
    source = block(ROOT / "docs" / "prefork.md", 'get_context("spawn")')
    source = source.replace('"redis://127.0.0.1:6379/0"', repr(server.url))
    source = source.replace('"prices"', repr(ns))
    assert source.count("        ...\n") == 1, source
    source = source.replace("        ...\n", "        prices.incr('workers')\n")
    script = tmp_path / "example.py"
    script.write_text(source)
    subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    with syncmap.connect(server.url) as node, node.map(ns) as prices:
        assert prices.get("workers", fresh=True) == 4


def test_operations_md_map_options_are_the_maps():
    """docs/operations.md's table of map options names every option a map takes, with its
    default."""
    from syncmap._map import _MapBase

    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("## Map options", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.M))
    params = inspect.signature(_MapBase.__init__).parameters
    taken = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(rows) == set(taken)
    written = {"`None`": None, '`"json"`': None, '`"server"`': "server", "1 MiB": 1 << 20}
    for name, default in rows.items():
        default = default.strip()
        value = (
            written[default] if default in written else ast.literal_eval(default.replace(",", ""))
        )
        assert value == taken[name], f"{name}: the table says {default}, the map {taken[name]!r}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub makes of a heading: markup dropped, lowercase, punctuation and
    symbols dropped (``§``, ``:``, backticks), spaces to ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    kept = (ch for ch in text.lower() if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        in_code ^= line.startswith("```")
        heading = re.match(r"#{1,6}\s+(.*?)\s*$", line)
        if heading and not in_code:
            anchor = github_anchor(heading.group(1))
            n = seen[anchor] = seen.get(anchor, -1) + 1
            found.add(f"{anchor}-{n}" if n else anchor)
    return found


def test_relative_links_and_anchors_resolve():
    """Every relative link of README.md, CONTRIBUTING.md, CHANGELOG.md and docs/ names a file
    that exists, and its ``#anchor`` a heading of that file."""
    broken = []
    for path in [*DOCS, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]:
        text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and anchor not in anchors(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
