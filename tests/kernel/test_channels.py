"""The channel registry (kernel.channels) and the tools that follow it: the web app's
webhooks, `up`'s processes, the delivery worker's tasks, `status` and `/metrics`.

Cheap on purpose: apps are built, not served; `up` is planned, not started; a fake
registry entry (a "pigeon" channel) shows that each tool follows the list, not a name.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections.abc import Iterable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute, Match

from channels.web import channel_routers, create_app
from gpt4people.cli import build_parser
from gpt4people.redis_server import RedisServer
from gpt4people.status import channel_report, format_status
from gpt4people.supervisor import Stack
from kernel.channels import (
    CHANNELS,
    ChannelFacts,
    channel_facts,
    delivered_channels,
    started_channels,
    webhook_channels,
)
from kernel.metrics import RedisCollector
from kernel.settings import Settings
from tests.conftest import ROOT, emptied_database, redis_url

DB_CHANNELS = 29  # this module's database on the session's Redis
SID = "AC" + "0" * 32
PIGEON = ChannelFacts("pigeon", delivers_later=True, route="/pigeon", max_chars=140,
                      configured=lambda s: s.imap_folder == "coop", command="pigeon")  # fmt: skip


@pytest.fixture
def pigeon(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChannelFacts]:
    """A channel registered for one test (no such sub-package exists)."""
    monkeypatch.setitem(CHANNELS, PIGEON.name, PIGEON)
    yield PIGEON


def test_the_registry_holds_the_built_in_channels_and_their_facts() -> None:
    assert list(CHANNELS)[:4] == ["http", "cli", "sms", "email"]
    sms, email = CHANNELS["sms"], CHANNELS["email"]
    assert (sms.route, sms.max_chars, sms.carries_images, sms.command) == ("/sms", 1600, True, None)
    assert (sms.delivery_queue, sms.delivery_task) == ("deliver.sms", "gpt4people.deliver.sms")
    assert (email.route, email.command, email.carries_images) == (None, "email", True)
    assert not CHANNELS["http"].delivers_later and not CHANNELS["cli"].delivers_later
    assert CHANNELS["http"].configured(Settings()) and CHANNELS["cli"].configured(Settings())
    # An unlisted channel (a test's, an integration's) waits for its result.
    assert channel_facts("nowhere").delivers_later is False
    routes = [c.route for c in webhook_channels()]
    assert len(routes) == len(set(routes)), "two channels claim one route"
    assert [c.name for c in delivered_channels()] == [
        c.name for c in CHANNELS.values() if c.delivers_later
    ]


def test_the_settings_decide_whether_a_channel_is_configured() -> None:
    sms, email = CHANNELS["sms"], CHANNELS["email"]
    assert not sms.configured(Settings()) and not email.configured(Settings())
    assert not sms.configured(Settings(twilio_account_sid=SID))  # no token: nothing verifies
    assert sms.configured(Settings(twilio_account_sid=SID, twilio_auth_token="t" * 32))
    assert email.configured(Settings(imap_host="imap.example.org"))


@pytest.mark.parametrize("facts", list(CHANNELS.values()), ids=list(CHANNELS))
def test_every_entry_keeps_the_conventions(facts: ChannelFacts) -> None:
    """What a newcomer's entry must satisfy: its parts exist where the conventions say."""
    assert facts.name.isidentifier() and facts.name.islower()
    assert facts.max_chars is None or facts.max_chars > 0
    assert set(facts.settings) <= set(Settings.model_fields), "settings are Settings fields"
    if facts.route is not None:
        assert facts.route.startswith("/") and facts.route != "/"
        assert importlib.import_module(f"channels.{facts.name}.webhook").router
    if facts.delivers_later:
        from workers.app import app

        importlib.import_module(f"channels.{facts.name}.delivery")
        assert facts.delivery_task in app.tasks
        assert f"channels.{facts.name}.delivery" in app.conf.imports  # every worker knows it
        assert app.conf.task_routes[facts.delivery_task] == {"queue": facts.delivery_queue}
    if facts.command is not None:
        assert build_parser().parse_args([facts.command]).command == facts.command


def api_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    """Every endpoint route, also inside included routers (FastAPI keeps them whole)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (router := getattr(route, "original_router", None)) is not None:
            yield from api_routes(router.routes)


def posts_to(app: FastAPI, path: str) -> bool:
    """Whether the app routes a POST to `path` (Starlette's own matching)."""
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


def test_the_web_app_mounts_exactly_the_registered_webhooks() -> None:
    registered = {c.route for c in webhook_channels()}
    assert "/sms" in registered
    app = create_app(Settings())
    served = {route.path for route in api_routes(app.routes)
              if re.fullmatch(r"channels\.\w+\.webhook", route.endpoint.__module__)}  # fmt: skip
    assert served == registered
    assert all(posts_to(app, route) for route in registered)
    assert not posts_to(app, "/pigeon")
    # A webhook module nobody registered would not be served: each one is in the registry.
    modules = {path.parent.name for path in (ROOT / "channels").glob("*/webhook.py")}
    assert modules <= {c.name for c in webhook_channels()}


def test_a_registered_route_must_exist_where_the_convention_says(
    pigeon: ChannelFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No channels/pigeon/webhook.py: the app refuses to start rather than lose a channel.
    with pytest.raises(ModuleNotFoundError, match=r"channels\.pigeon"):
        channel_routers()
    monkeypatch.delitem(CHANNELS, "pigeon")
    moved = dataclasses.replace(CHANNELS["sms"], route="/not-sms")
    monkeypatch.setitem(CHANNELS, "sms", moved)
    with pytest.raises(RuntimeError, match="does not serve /not-sms"):
        channel_routers()


def planned(settings: Settings) -> dict[str, list[str]]:
    return {child.name: child.command for child in Stack(settings, workers=1).plan()}


def test_up_starts_the_process_of_configured_channels_only(pigeon: ChannelFacts) -> None:
    bare = planned(Settings())
    assert {"worker1", "deliver", "web", "flower"} <= set(bare)
    assert not {c.command for c in CHANNELS.values() if c.command} & set(bare)
    with_mail = planned(Settings(imap_host="imap.example.org"))
    assert with_mail["email"] == [sys.executable, "-m", "gpt4people.cli", "email"]
    assert "pigeon" not in with_mail
    # A channel that only the registry names is started by its command once configured.
    coop = planned(Settings(imap_folder="coop"))
    assert coop["pigeon"] == [sys.executable, "-m", "gpt4people.cli", "pigeon"]
    assert [c.name for c in started_channels(Settings(imap_folder="coop"))] == ["pigeon"]
    # The delivery worker consumes every delivered channel (its default), the pigeon's too.
    assert "--channels" not in bare["deliver"]


def test_deliver_consumes_every_delivered_channel_by_default(pigeon: ChannelFacts) -> None:
    args = build_parser().parse_args(["deliver"])
    assert args.channels == [c.name for c in delivered_channels()]
    assert "pigeon" in args.channels and "sms" in args.channels


def test_status_shows_each_channel_its_route_and_its_queue(pigeon: ChannelFacts) -> None:
    settings = Settings(twilio_account_sid=SID, twilio_auth_token="t" * 32)
    report = channel_report(settings, {"deliver.sms": 3, "inference": 1})
    assert list(report) == list(CHANNELS)
    assert report["sms"] == {
        "configured": True, "route": "/sms", "command": None, "queue": "deliver.sms",
        "waiting": 3, "settings": ["GPT4P_TWILIO_ACCOUNT_SID", "GPT4P_TWILIO_AUTH_TOKEN",
                                   "GPT4P_TWILIO_FROM", "GPT4P_TWILIO_MESSAGING_SERVICE_SID",
                                   "GPT4P_PUBLIC_URL"],
    }  # fmt: skip
    assert report["pigeon"]["waiting"] == 0 and report["pigeon"]["configured"] is False
    assert report["http"]["queue"] is None and report["http"]["waiting"] is None
    assert channel_report(settings, None)["sms"]["waiting"] is None  # Redis not asked
    text = format_status({
        "redis": {"url": "redis://127.0.0.1:6379/0", "up": True, "version": "7"},
        "model": "echo", "engine": "echo", "workers": {}, "queues": {}, "channels": report,
    })  # fmt: skip
    lines = text.split("channels\n", 1)[1].splitlines()
    assert any(line.split()[:5] == ["sms", "configured", "POST", "/sms", "deliver.sms"]
               and line.endswith("3 waiting") for line in lines)  # fmt: skip
    email = next(i for i, line in enumerate(lines) if line.split()[0] == "email")
    assert "not configured" in lines[email] and "gpt4people email" in lines[email]
    assert "GPT4P_IMAP_HOST" in lines[email + 1]  # what to set to turn it on


def test_metrics_report_every_delivered_channels_queue(
    redis_server: RedisServer, pigeon: ChannelFacts
) -> None:
    with emptied_database(redis_url(redis_server, DB_CHANNELS)) as client:
        client.rpush("deliver.pigeon", "a", "b")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RedisCollector(client))
        for facts in delivered_channels():
            depth = registry.get_sample_value("gpt4p_queue_depth", {"queue": facts.delivery_queue})
            assert depth == (2.0 if facts is pigeon else 0.0), facts.name


def test_pictures_go_by_link_only_where_a_public_url_is_set() -> None:
    # Without GPT4P_PUBLIC_URL Twilio cannot fetch a picture: the helper says so instead
    # of making one that never arrives.
    bare, public = Settings(), Settings(public_url="https://gpt4people.example.com")
    for name in ("sms", "whatsapp"):
        assert not CHANNELS[name].sends_pictures(bare)
        assert CHANNELS[name].sends_pictures(public)
    assert CHANNELS["email"].sends_pictures(bare) and CHANNELS["telegram"].sends_pictures(bare)
    assert not CHANNELS["http"].sends_pictures(public)
