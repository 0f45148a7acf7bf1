"""GPT4P_REDIS_URL: one server, or Celery's Sentinel form, parsed as Celery reads it."""

from __future__ import annotations

import pytest

from kernel.redis_client import celery_transport_options
from kernel.redis_urls import (
    InvalidRedisUrlError,
    parse_sentinel_url,
    redact_url,
    scrub,
    url_secrets,
)
from kernel.settings import Settings


def test_a_sentinel_url_names_every_sentinel_and_the_primarys_login_and_database() -> None:
    target = parse_sentinel_url("sentinel://:pw@s1:26379/2;sentinel://s2:26380;sentinel://s3/2")
    assert target.sentinels == [("s1", 26379), ("s2", 26380), ("s3", 26379)]
    assert (target.password, target.db) == ("pw", 2)


def test_the_login_and_database_of_the_first_part_reach_every_part() -> None:
    # kombu reads each part on its own when it moves to the next Sentinel: a part without
    # the password would fail with NOAUTH in the middle of a failover.
    settings = Settings(redis_url="sentinel://:p%40w@s1:26379/2;sentinel://s2:26380")
    assert settings.redis_url == "sentinel://:p%40w@s1:26379/2;sentinel://:p%40w@s2:26380/2"
    assert parse_sentinel_url(settings.redis_url).password == "p@w"


def test_parts_that_disagree_are_refused_rather_than_half_followed() -> None:
    # Celery and kombu read the first part; a database named only later would split the
    # deployment between two databases.
    with pytest.raises(InvalidRedisUrlError, match="different databases"):
        parse_sentinel_url("sentinel://s1:26379/0;sentinel://s2:26379/3")


def test_a_plain_password_with_a_semicolon_is_redacted_whole() -> None:
    assert redact_url("redis://:p;ss@host:6379/0") == "redis://:***@host:6379/0"


def test_passwords_never_reach_a_log_line() -> None:
    url = "sentinel://:pw1@s1:26379;sentinel://user:pw1@s2:26379/0"
    assert "pw1" not in redact_url(url)
    assert redact_url(url) == "sentinel://:***@s1:26379;sentinel://user:***@s2:26379/0"


def test_celery_gets_the_master_name_and_the_sentinels_password_only_for_sentinels() -> None:
    settings = Settings(redis_master_name="primary-a", redis_sentinel_password="spw")
    options = celery_transport_options("sentinel://s1:26379", settings)
    assert options["master_name"] == "primary-a"
    assert options["sentinel_kwargs"]["password"] == "spw"
    # A Sentinel whose host is gone is skipped in seconds, not after TCP's own timeout.
    assert 0 < options["sentinel_kwargs"]["socket_connect_timeout"] <= 5
    assert 0 < options["sentinel_kwargs"]["socket_timeout"] <= 5
    assert celery_transport_options("redis://r:6379/0", settings) == {}


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("sentinel://:p;w@s1:26379;sentinel://s2:26379/0", "p;w"),  # ";" in a password
        ("redis://r:6379/0?password=hunter2&socket_timeout=5", "hunter2"),
        ("REDIS://R:6379/0?db=1&Password=hunter2", "hunter2"),
        ("redis://r:6379/0?pass%77ord=hunter2", "hunter2"),  # redis-py decodes the name
        ("redis://r:6379/0?sentinel_password=hunter2&x=1", "hunter2"),
        ("rediss://user:hun%40ter2@r:6380/0", "hun%40ter2"),
        ("redis://hunter2@r:6379/0", "hunter2"),  # a lone secret before the "@"
    ],
)
def test_no_way_of_writing_a_password_gets_it_into_a_log_line(url: str, secret: str) -> None:
    redacted = redact_url(url)
    assert secret not in redacted
    assert "***" in redacted


def test_an_ipv6_sentinel_keeps_its_brackets() -> None:
    settings = Settings(redis_url="sentinel://:pw@[::1]:26379/0;sentinel://[fd00::2]")
    assert settings.redis_url == "sentinel://:pw@[::1]:26379/0;sentinel://:pw@[fd00::2]:26379/0"
    assert parse_sentinel_url(settings.redis_url).sentinels == [("::1", 26379),
                                                                ("fd00::2", 26379)]  # fmt: skip


def test_a_password_given_as_an_option_moves_into_the_login_that_kombu_reads() -> None:
    settings = Settings(redis_url="redis://r:6379/2?socket_timeout=5&pass%77ord=p%40w")
    assert settings.redis_url == "redis://:p%40w@r:6379/2?socket_timeout=5"
    with pytest.raises(ValueError, match="give the login once"):
        Settings(redis_url="redis://:a@r:6379/0?password=b")


def test_free_text_is_scrubbed_of_urls_and_of_every_known_secret() -> None:
    text = "cannot reach redis://:p%40ssw0rd@r:6379/0 (p@ssw0rd rejected)"
    assert scrub(text, url_secrets("redis://:p%40ssw0rd@r:6379/0")) == (
        "cannot reach redis://:***@r:6379/0 (*** rejected)"
    )
