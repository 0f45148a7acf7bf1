"""Finding the GPUs of this host, for `gpt4people worker --gpus all`."""

from __future__ import annotations

import shutil
import subprocess


class NoGpuError(RuntimeError):
    """No NVIDIA GPU is visible here; the message says what was tried."""


def detect_gpus(timeout: float = 15.0) -> list[int]:
    """Indexes of the NVIDIA GPUs that ``nvidia-smi`` lists."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        raise NoGpuError("no NVIDIA GPU found: nvidia-smi is not installed (use a CPU worker)")
    try:
        listed = subprocess.run(
            [binary, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout, check=True,
        )  # fmt: skip
    except (subprocess.SubprocessError, OSError) as error:
        raise NoGpuError(f"no NVIDIA GPU found: nvidia-smi failed ({error})") from None
    indexes = [int(line) for line in listed.stdout.split() if line.strip().isdigit()]
    if not indexes:
        raise NoGpuError("no NVIDIA GPU found: nvidia-smi lists none")
    return indexes
