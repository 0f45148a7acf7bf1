"""The deployment files: Compose services and the Celery settings that keep jobs safe.

No Docker engine runs on the build machines, so the Compose file is checked
by reading it as Compose would.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gpt4people.cli import build_parser
from kernel.channels import CHANNELS, delivered_channels
from kernel.contract import delivery_queue
from kernel.redis_urls import parse_sentinel_url
from kernel.settings import Settings
from tests.conftest import ROOT


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_redis_a_worker_the_web_app_and_flower() -> None:
    services = compose()["services"]
    assert {"redis", "worker-gpu0", "worker-cpu", "deliver", "web", "flower"} <= set(services)
    assert services["deliver"]["command"][:2] == ["gpt4people", "deliver"]
    assert services["email"]["command"] == ["gpt4people", "email"]
    assert services["email"]["profiles"] == ["email"]
    for helper in ("calc", "image", "time"):
        assert services[f"helper-{helper}"]["command"][:3] == ["gpt4people", "helper", helper]
    assert "--appendonly yes" in services["redis"]["command"]
    assert "--requirepass" in services["redis"]["command"]
    assert services["worker-cpu"]["command"][:2] == ["gpt4people", "worker"]
    assert "channels.web:create_app" in services["web"]["command"]
    assert services["flower"]["command"] == ["gpt4people", "flower"]


def test_every_app_service_reaches_the_same_password_protected_redis() -> None:
    services = compose()["services"]
    for name in ("worker-gpu0", "worker-cpu", "deliver", "email", "web", "flower"):
        url = services[name]["environment"]["GPT4P_REDIS_URL"]
        assert re.fullmatch(r"\$\{REDIS_SCHEME:-redis\}://:\$\{REDIS_PASSWORD:\?[^}]+\}"
                            r"@\$\{REDIS_HOSTS:-redis:6379\}/0", url), name  # fmt: skip
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["build"]["context"] == "."


def test_every_variable_compose_needs_is_in_the_env_example() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(\w+)=", example, flags=re.MULTILINE))
    assert required <= documented


def test_the_image_builds_llama_cpp_with_the_portable_script() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "scripts/install-llama" in dockerfile
    assert "ARG LLAMA_CUDA" in dockerfile


def test_celery_is_configured_for_long_jobs_and_json_only() -> None:
    import celeryconfig

    assert celeryconfig.accept_content == ["json"]
    assert celeryconfig.task_serializer == celeryconfig.result_serializer == "json"
    assert celeryconfig.task_acks_late and celeryconfig.task_reject_on_worker_lost
    assert celeryconfig.worker_prefetch_multiplier == 1
    visibility = celeryconfig.broker_transport_options["visibility_timeout"]
    assert visibility > celeryconfig.task_time_limit > celeryconfig.task_soft_time_limit


def test_gpu_workers_reserve_their_own_gpu_and_consume_its_queue() -> None:
    services = compose()["services"]
    gpu_workers = {n: s for n, s in services.items() if n.startswith("worker-gpu")}
    assert gpu_workers
    for name, service in gpu_workers.items():
        index = name.removeprefix("worker-gpu")
        command = service["command"]
        assert command[command.index("--gpu") + 1] == index
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["device_ids"] == [index]
        assert "gpu" in device["capabilities"]


API_KEY = "an-api-key-of-24-chars-x"


def compose_config(**variables: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config`: Compose's own parser and validator (no engine needed)."""
    ours = ("GPT4P_", "REDIS_", "FLOWER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    command = ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"]
    return subprocess.run(command, env={**env, **variables}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_docker_compose_itself_accepts_the_file() -> None:
    done = compose_config(REDIS_PASSWORD="pw", GPT4P_HTTP_API_KEY=API_KEY, FLOWER_PASSWORD="pw2")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert (
        resolved["services"]["web"]["environment"]["GPT4P_REDIS_URL"] == "redis://:pw@redis:6379/0"
    )
    devices = resolved["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["device_ids"] == ["0"]


def test_docker_compose_refuses_to_start_without_passwords() -> None:
    done = compose_config()
    assert done.returncode != 0
    assert "REDIS_PASSWORD" in done.stderr


def test_the_ha_profile_adds_a_replica_and_three_sentinels_that_every_service_can_use() -> None:
    services = compose()["services"]
    ha = {name for name, service in services.items() if "ha" in service.get("profiles", [])}
    assert ha == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    assert "'replicaof redis 6379'" in services["redis-replica"]["command"][-1]
    assert "--masterauth" in services["redis"]["command"]  # it rejoins as a replica
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][-1]
        assert "'sentinel monitor mymaster redis 6379 2'" in script  # a quorum of two of three
        # What a Sentinel learnt survives its restart: its configuration is on a volume of
        # its own and written only when missing.
        assert "[ -f /data/sentinel.conf ] ||" in script
        assert services[name]["volumes"] == [f"{name}-data:/data"]
    sentinel_hosts = "sentinel-1:26379;sentinel://sentinel-2:26379;sentinel://sentinel-3:26379"
    done = compose_config(REDIS_PASSWORD="pw", GPT4P_HTTP_API_KEY=API_KEY, FLOWER_PASSWORD="pw2",
                          REDIS_SCHEME="sentinel", REDIS_HOSTS=sentinel_hosts)  # fmt: skip
    assert done.returncode == 0, done.stderr
    environment = yaml.safe_load(done.stdout)["services"]["web"]["environment"]
    password = environment["GPT4P_REDIS_SENTINEL_PASSWORD"]
    settings = Settings(redis_url=environment["GPT4P_REDIS_URL"], redis_sentinel_password=password)
    target = parse_sentinel_url(settings.redis_url or "")
    assert target.sentinels == [(f"sentinel-{i}", 26379) for i in (1, 2, 3)]
    assert (target.password, settings.redis_master_name) == ("pw", "mymaster")


def _published(port: str | dict[str, Any]) -> tuple[str, str]:
    """(host address, container port) of a `ports:` entry, short or long form."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port["target"])
    # 127.0.0.1:5555:5555/tcp, or 127.0.0.1:${GPT4P_FLOWER_PORT:-5555}:5555 unresolved
    return port.split(":", 1)[0], port.rsplit(":", 1)[1].split("/")[0]


def test_flower_is_published_on_the_hosts_loopback_only_and_always_with_a_login() -> None:
    flower = compose()["services"]["flower"]
    assert [_published(port) for port in flower["ports"]] == [("127.0.0.1", "5555")]
    login = flower["environment"]["GPT4P_FLOWER_BASIC_AUTH"]
    assert re.fullmatch(r"\$\{FLOWER_USER:-admin\}:\$\{FLOWER_PASSWORD:\?[^}]+\}", login)
    # The login travels in the environment: a --basic-auth argument shows in `ps`.
    assert not any("auth" in str(arg) for arg in flower["command"])
    done = compose_config(
        REDIS_PASSWORD="pw", GPT4P_HTTP_API_KEY=API_KEY, FLOWER_PASSWORD="a-long-flower-password"
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]["flower"]
    assert [_published(port) for port in resolved["ports"]] == [("127.0.0.1", "5555")]
    assert resolved["environment"]["GPT4P_FLOWER_BASIC_AUTH"] == "admin:a-long-flower-password"


def test_compose_does_not_start_without_an_api_key_for_its_public_web_port() -> None:
    web = compose()["services"]["web"]
    assert {host for host, _ in map(_published, web["ports"])} != {"127.0.0.1"}  # public
    done = compose_config(REDIS_PASSWORD="pw", FLOWER_PASSWORD="a-long-flower-password")
    assert done.returncode != 0
    assert "GPT4P_HTTP_API_KEY" in done.stderr


def test_compose_does_not_start_with_the_example_flower_password() -> None:
    example = (ROOT / ".env.example").read_text()
    values = dict(re.findall(r"^(\w+)=(.*)$", example, flags=re.MULTILINE))
    assert values["GPT4P_HTTP_API_KEY"] == ""  # the example's key is empty too, on purpose
    done = compose_config(**{**values, "GPT4P_HTTP_API_KEY": API_KEY})
    assert done.returncode != 0
    assert "FLOWER_PASSWORD" in done.stderr
    # An .env kept from before (its example password) or a short one: Flower refuses it.
    for password in ("change-me-too", "change-me", "short-pw123"):
        with pytest.raises(ValidationError, match=r"flower_basic_auth"):
            Settings(flower_basic_auth=f"admin:{password}")
    assert Settings(flower_basic_auth="admin:a-long-flower-password").flower_basic_auth


def test_the_compose_deliver_service_consumes_every_delivered_channels_queue() -> None:
    # No --channels: `gpt4people deliver` takes every delivered channel of the registry.
    command = compose()["services"]["deliver"]["command"]
    assert command[:2] == ["gpt4people", "deliver"]
    consumed = {delivery_queue(name) for name in build_parser().parse_args(command[1:]).channels}
    for facts in delivered_channels():
        assert facts.delivery_queue in consumed, f"Compose's deliver service skips {facts.name}"


def test_compose_runs_the_process_of_every_channel_that_has_one() -> None:
    services = compose()["services"]
    for facts in CHANNELS.values():
        if facts.command is not None:
            wanted = ["gpt4people", facts.command]
            running = [name for name, service in services.items()
                       if service.get("command", [])[:2] == wanted]  # fmt: skip
            assert running, f"no Compose service runs `gpt4people {facts.command}`"
            # Off until its settings are there, as `up` does: the operator names the profile.
            assert all(services[name].get("profiles") for name in running), running


def test_compose_passes_every_channels_settings_to_its_services() -> None:
    environment = compose()["x-gpt4people"]["environment"]
    for facts in CHANNELS.values():
        for name in facts.settings:
            variable = f"GPT4P_{name.upper()}"
            assert environment.get(variable) == f"${{{variable}:-}}", (facts.name, variable)
