"""The packages import one way (kernel <- answer <- workers <- channels | helpers <-
gpt4people), and every module imports on its own in a fresh interpreter.

import-linter (``make lint``) checks the direction of imports; it cannot see an
import cycle that only breaks when a particular module is imported first, which
is what a user's own module or unit test does. So each module is imported
first thing, in its own interpreter.
"""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernel", "answer", "workers", "channels", "helpers", "gpt4people")
# What a helper author's module needs: never the Celery worker side, a channel or llama.cpp.
SDK_MUST_NOT_LOAD = ("answer", "workers", "channels", "gpt4people", "llama_cpp", "celery")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        path = [str(ROOT / package)]
        for info in pkgutil.walk_packages(path, prefix=f"{package}."):
            names.append(info.name)
    return sorted(names)


def _fresh_import(module: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_every_module_imports_first_thing_in_a_fresh_interpreter() -> None:
    modules = _modules()
    assert len(modules) > 50, modules  # the walk found the tree
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(modules, pool.map(_fresh_import, modules), strict=True))
    failed = {
        name: (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        for name, result in results.items()
        if result.returncode != 0
    }
    assert failed == {}


def test_the_helper_sdk_loads_the_kernel_only() -> None:
    code = (
        "import sys\n"
        "from helpers.sdk import HelperError, HelperRequest, HelperResult, helper\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)  # fmt: skip
    loaded = result.stdout.split()
    assert [m for m in loaded if m.split(".")[0] in SDK_MUST_NOT_LOAD] == []


def test_the_readme_helper_example_works_as_a_standalone_module_with_its_own_test(
    tmp_path: Path,
) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```python\n# mypackage/shout\.py\n(.*?)```", readme, re.DOTALL)
    assert example is not None, "README lost its 'Writing one' example"
    package = tmp_path / "mypackage"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "shout.py").write_text(example.group(1))
    # The author's own unit test, as README shows it: it imports their module first.
    own_test = re.search(r"```python\n(from mypackage\.shout import shout\n.*?)```", readme,
                         re.DOTALL)  # fmt: skip
    assert own_test is not None, "README lost the helper's own unit test"
    (tmp_path / "test_shout.py").write_text(own_test.group(1))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_shout.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module", ["kernel.contract", "helpers.sdk"])
def test_the_contract_and_the_sdk_stay_light(module: str) -> None:
    # Before the re-layering, importing the contract loaded the whole Celery worker side
    # (about 545 modules). The bound leaves room for library upgrades, not for a layer.
    code = f"import sys, {module}; print(len(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)  # fmt: skip
    assert int(result.stdout) < 300


def test_the_sdk_keeps_the_names_helper_authors_used() -> None:
    # A helper declared without the decorator, and the MMS media fetch at its old place.
    code = (
        "from helpers.sdk import Helper, HelperRequest, HelperResult, fetch_media\n"
        "from channels.sms_media import fetch_media as old_place\n"
        "shout = Helper('shout', 'Shouts.', lambda r: HelperResult(text=r.text.upper()))\n"
        "assert shout.run(HelperRequest(text='hi')).text == 'HI'\n"
        "assert old_place is fetch_media\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
