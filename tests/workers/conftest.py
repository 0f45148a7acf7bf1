"""Fixtures of the worker-side tests: each module's own Redis database (its `DB`), a client
of it and a client-side Celery app on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from gpt4people.redis_server import RedisServer
from kernel.settings import Settings
from tests.conftest import emptied_database, redis_url
from workers.app import celery_for


@pytest.fixture
def db_url(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The database named by the test module's `DB` on the session's Redis, emptied."""
    url = redis_url(redis_server, request.module.DB)
    with emptied_database(url):
        yield url


@pytest.fixture
def client(db_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(db_url)
    yield client
    client.close()


@pytest.fixture
def client_app(db_url: str) -> Iterator[Celery]:
    app = celery_for(Settings(redis_url=db_url))
    yield app
    app.close()
