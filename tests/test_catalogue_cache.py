"""The TOML catalogues' parse cache (vramplan._data.parsed_toml): the TOML stays the one source.

The cache holds the source text beside its parse and is used only for that very text, so an edit
takes effect on the next run with no other step; a broken, foreign or stale cache is ignored.
"""

from __future__ import annotations

import marshal
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vramplan import _data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def writes_bytecode(monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    monkeypatch.setattr(sys, "pycache_prefix", None)


def _parse(path: Path):
    return _data.parsed_toml(path, path.read_text(encoding="utf-8"))


def test_every_catalogue_parses_as_tomllib_does_through_the_cache(tmp_path, writes_bytecode):
    for src in sorted(_data.DATA_DIR.glob("*.toml")):
        path = tmp_path / src.name
        shutil.copy(src, path)
        first = _parse(path)  # parsed, then kept
        assert _data.toml_cache_path(path).exists(), src.name
        second = _parse(path)  # from the cache
        want = tomllib.loads(src.read_text(encoding="utf-8"))
        assert first == want and second == want, src.name
        assert repr(second) == repr(want)  # same types and key order (int vs float, list vs tuple)


def test_an_edit_takes_effect_at_once_even_at_the_same_length(tmp_path, writes_bytecode):
    path = tmp_path / "cat.toml"
    path.write_text('[a]\nx = 1\nname = "old"\n')
    assert _parse(path) == {"a": {"x": 1, "name": "old"}}
    path.write_text('[a]\nx = 2\nname = "new"\n')  # same size; mtime may not move within its resolution
    assert _parse(path) == {"a": {"x": 2, "name": "new"}}
    assert _parse(path) == {"a": {"x": 2, "name": "new"}}  # the cache was rewritten for the new text
    cached_text, _ = marshal.loads(_data.toml_cache_path(path).read_bytes())
    assert cached_text == path.read_text()


@pytest.mark.parametrize("blob", [b"", b"garbage \x00\xff", marshal.dumps([1, 2, 3]),
                                  marshal.dumps(("[a]\nx = 1\n", {"a": {"x": 99}}))],
                         ids=["empty", "garbage", "another-shape", "stale"])
def test_a_broken_foreign_or_stale_cache_is_ignored_and_rewritten(tmp_path, writes_bytecode, blob):
    path = tmp_path / "cat.toml"
    path.write_text("[a]\nx = 2\n")
    cache = _data.toml_cache_path(path)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(blob)
    assert _parse(path) == {"a": {"x": 2}}
    assert marshal.loads(cache.read_bytes()) == ("[a]\nx = 2\n", {"a": {"x": 2}})


def test_nothing_is_written_without_bytecode_or_where_it_cannot_be(tmp_path, monkeypatch, writes_bytecode):
    path = tmp_path / "cat.toml"
    path.write_text("when = 1979-05-27\n[a]\nx = 1\n")  # a date: marshal cannot hold it, so it is not kept
    assert _parse(path) == tomllib.loads(path.read_text())
    assert not _data.toml_cache_path(path).exists()
    path.write_text("[a]\nx = 1\n")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert _parse(path) == {"a": {"x": 1}}
    assert not _data.toml_cache_path(path).parent.exists()
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    (tmp_path / "__pycache__").write_text("a file where the cache folder would go")
    assert _parse(path) == {"a": {"x": 1}}  # cannot be written: parsed, no error
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_the_cache_follows_pycache_prefix(tmp_path, monkeypatch, writes_bytecode):
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "prefix"))
    path = tmp_path / "cat.toml"
    path.write_text("[a]\nx = 1\n")
    assert _parse(path) == {"a": {"x": 1}}
    cache = _data.toml_cache_path(path)
    assert cache.exists() and str(cache).startswith(str(tmp_path / "prefix"))


def test_a_catalogue_edit_shows_on_the_next_command_with_no_other_step(tmp_path):
    """End to end, as a user edits an installed catalogue: a copy of the package, run, edit, run again."""
    shutil.copytree(ROOT / "vramplan", tmp_path / "vramplan", ignore=shutil.ignore_patterns("__pycache__"))
    toml = tmp_path / "vramplan" / "data" / "methods.toml"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPYCACHEPREFIX", None)

    def methods() -> str:
        res = subprocess.run([sys.executable, "-m", "vramplan", "methods"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    before = methods()
    assert (tmp_path / "vramplan" / "data" / "__pycache__").is_dir()  # the parse was kept
    assert methods() == before  # read from the cache
    text = toml.read_text()
    old = "Full-parameter supervised fine-tuning"
    assert old in text and old in before
    toml.write_text(text.replace(old, "Full-parameter supervised fine-tuning EDITED"))
    after = methods()
    assert "Full-parameter supervised fine-tuning EDITED" in after and after != before
