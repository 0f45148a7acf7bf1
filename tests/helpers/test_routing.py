"""Helpers end to end: registration, routing by name, by media and by the model, failures.

Real Redis, a real inference worker (scripted engine) and real helper worker
processes, each on its own ``helper.<name>`` queue.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess

import openai
from PIL import Image

from kernel.helper_registry import HelperRegistry
from tests.conftest import run_cli, wait_for


def ask(env: dict[str, str], prompt: str) -> str:
    done = run_cli(["ask", "--timeout", "60", prompt], env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_helpers_register_and_are_listed_with_their_instances(
    helper_stack: object, helper_env: dict[str, str]
) -> None:
    listed = {h["name"]: h for h in json.loads(run_cli(["helpers", "--json"], helper_env).stdout)}
    assert {"calc", "image", "time"} <= set(listed)
    assert listed["calc"]["instances"] == ["calc@test"]
    assert listed["calc"]["capabilities"] == ["math.eval"]
    assert listed["image"]["accepts"] == ["image/*"]
    text = run_cli(["helpers"], helper_env).stdout
    assert "calc" in text and "live on calc@test" in text


def test_calc_through_ask(helper_stack: object, helper_env: dict[str, str]) -> None:
    assert ask(helper_env, "/calc (2+3)*4 - 2**3") == "12"


def test_calc_through_the_http_api(helper_web: str) -> None:
    client = openai.OpenAI(base_url=f"{helper_web}/v1", api_key="x", timeout=60, max_retries=0)
    completion = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "/calc 1/3 + 1/3"}]
    )
    assert completion.choices[0].message.content == "2/3 (≈ 0.666666666667)"


def test_time_helper_names_the_zone(helper_stack: object, helper_env: dict[str, str]) -> None:
    assert "in Asia/Tokyo (UTC+09:00)" in ask(helper_env, "/time Tokyo")


def test_a_third_party_helper_from_the_readme_is_routed_by_name(
    helper_stack: object, helper_env: dict[str, str]
) -> None:
    assert ask(helper_env, "/shout hello there") == "HELLO THERE"


def test_an_unknown_helper_is_answered_with_what_exists(
    helper_stack: object, helper_env: dict[str, str]
) -> None:
    text = ask(helper_env, "/nope 1+1")
    assert text.startswith("The helper 'nope' does not exist.")
    assert "calc" in text and "image" in text and "time" in text


def test_a_helper_that_raises_gets_an_apology_not_a_traceback(
    helper_stack: object, helper_env: dict[str, str]
) -> None:
    text = ask(helper_env, "/boom please")
    assert text == "Sorry, the boom helper could not do that."


def test_a_helper_that_runs_out_of_time_gets_an_apology(
    helper_stack: object, helper_env: dict[str, str]
) -> None:
    assert ask(helper_env, "/slow please") == "Sorry, the slow helper took too long."


def test_a_helper_error_meant_for_users_is_passed_on(
    helper_stack: object, helper_env: dict[str, str]
) -> None:
    assert ask(helper_env, "/calc 1/0") == "calc: division by zero"


def test_the_model_can_call_a_helper_and_use_its_answer(
    helper_stack: object, helper_env: dict[str, str]
) -> None:
    # The scripted engine emits {"helper": "calc", "input": "6*7"} when helpers are offered.
    assert ask(helper_env, "use calc for 6*7") == "The answer is 42."


def test_an_image_on_a_job_is_routed_to_the_image_helper(helper_web: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), "red").save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    client = openai.OpenAI(base_url=f"{helper_web}/v1", api_key="x", timeout=60, max_retries=0)
    completion = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": data_url}},
        ]}],
    )  # fmt: skip
    assert completion.choices[0].message.content == ("PNG image, 64×32 pixels, RGB; no EXIF data.")


def test_a_killed_helper_drops_out_after_its_ttl_and_is_reported_not_running(
    helper_stack: dict[str, subprocess.Popen[bytes]], helper_env: dict[str, str],
    registry: HelperRegistry,
) -> None:  # fmt: skip
    ghost = helper_stack["ghost"]
    assert registry.get("ghost") is not None and registry.get("ghost").live  # type: ignore[union-attr]
    os.killpg(ghost.pid, signal.SIGKILL)
    ghost.wait(10)
    wait_for(lambda: not registry.get("ghost").live, 30, "ghost to drop out")  # type: ignore[union-attr]
    listed = {h["name"]: h for h in json.loads(run_cli(["helpers", "--json"], helper_env).stdout)}
    assert listed["ghost"]["live"] is False
    text = ask(helper_env, "/ghost hi")
    assert text.startswith("The helper 'ghost' is not running right now.")


def test_helper_calls_and_failures_are_in_the_metrics(
    helper_web: str, helper_env: dict[str, str]
) -> None:
    from tests.channels.test_http import metric_values

    ask(helper_env, "/calc 1+1")
    ask(helper_env, "/boom now")
    values = metric_values(helper_web)
    assert values[("gpt4p_helper_calls_total", (("helper", "calc"),))] >= 1
    assert values[("gpt4p_helper_failures_total", (("helper", "boom"), ("reason", "error")))] >= 1
