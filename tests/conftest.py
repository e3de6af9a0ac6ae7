from __future__ import annotations

import itertools
import os

import pytest

from tests.support.gateway import Gateway
from tests.support.mock_upstream import MockUpstream

_users = itertools.count(1)

# Tests talk to loopback servers only; a proxy from the environment must not capture SDK traffic.
for _var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = "127.0.0.1,localhost"


@pytest.fixture(scope="session")
def upstream():
    mock = MockUpstream().start()
    yield mock
    mock.stop()


@pytest.fixture(scope="session")
def gateway(upstream, tmp_path_factory):
    gw = Gateway(tmp_path_factory.mktemp("gw"), upstream.url).start()
    yield gw
    gw.stop()


@pytest.fixture
def mock(upstream):
    upstream.reset()
    yield upstream
    upstream.reset()


@pytest.fixture
def user(gateway):
    """A fresh user and token per test, so each test's rows are its own."""
    name = f"user{next(_users)}"
    return name, gateway.new_user(name)
