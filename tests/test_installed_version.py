"""``vramplan.stacks.installed_version`` reads ``.dist-info`` folders itself to keep ``importlib.metadata`` (about
17 ms of CPU to import on the 2-core machine, ~6% of ``fit``'s 0.3 s target) off the planning path; it must give
``importlib.metadata.version``'s answer for every installed distribution, however the name is spelt."""

from __future__ import annotations

from importlib import metadata

import pytest

from vramplan.stacks import installed_version


def _expected(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _spellings(name: str) -> set[str]:
    return {name, name.upper(), name.lower().replace("-", "_"), name.lower().replace("_", "-"),
            name.replace("-", ".")}


def test_installed_version_equals_importlib_metadata_for_every_installed_distribution():
    names = sorted({d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"]})
    assert len(names) > 10  # the environment's distributions (numpy, pytest, ...)
    installed_version.cache_clear()
    try:
        for name in names:
            for spelt in _spellings(name):
                assert installed_version(spelt) == _expected(spelt), spelt
    finally:
        installed_version.cache_clear()


@pytest.mark.parametrize("name", ["no-such-package-vramplan", "numpy-but-not"])
def test_a_package_not_installed_has_no_version(name):
    installed_version.cache_clear()
    assert installed_version(name) is None and _expected(name) is None


def test_a_distribution_installed_after_a_lookup_is_seen(tmp_path, monkeypatch):
    """The folder listings are kept per (device, inode, mtime): installing into a folder already listed shows."""
    import sys

    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    installed_version.cache_clear()
    try:
        assert installed_version("vramplan-toy-dist") is None
        info = tmp_path / "vramplan_toy_dist-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vramplan-toy-dist\nVersion: 1.2.3\n\n")
        installed_version.cache_clear()
        assert installed_version("vramplan-toy-dist") == "1.2.3" == installed_version("Vramplan.Toy_Dist")
    finally:
        installed_version.cache_clear()
