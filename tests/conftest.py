from __future__ import annotations

import itertools
import os
import signal
import subprocess

import pytest

from tests.support.fixtures import TRAFFIC
from tests.support.gateway import RUNNING, Gateway
from tests.support.mock_upstream import MockUpstream

_users = itertools.count(1)
# The conformance run replays ../shared's captured provider traffic; without it there is nothing to replay, so it is
# not collected at all (the suite itself runs on tests/fixtures).
collect_ignore = [] if TRAFFIC.exists() else ["test_conformance.py"]

# The in-process tier (`scripts/test --fast`, `pytest -m fast`): units, codecs, routing, properties and the addon
# chain through mitmproxy's taddons — no gateway process, provider stand-in, database server or real client.
# Everything else is the `integration` tier. A test of a fast module that starts processes marks itself
# `integration`.
FAST_MODULES = frozenset({"test_units", "test_codecs", "test_routing", "test_properties", "test_sse", "test_patches",
                          "test_structure", "test_config", "test_policy_rules", "test_policy_detectors",
                          "test_policy_audit", "test_toolgate", "test_loopback",
                          "test_mcp_gateway_units", "test_purpose"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in FAST_MODULES and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.fast)
        elif item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)

# Tests talk to loopback servers only; a proxy from the environment must not capture SDK traffic.
for _var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = "127.0.0.1,localhost"


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes():
    """Every gateway a test or fixture started is stopped by the end, even when its setup failed or skipped;
    the suite fails if any had to be stopped here, or if any other child process outlives it."""
    yield
    leaked = [gw.workdir.name for gw in list(RUNNING)]
    for gw in list(RUNNING):
        gw.stop(signal.SIGKILL)
    children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True,
                              text=True).stdout.splitlines()
    children = [c for c in children if " ps -o " not in c]
    assert not leaked and not children, f"left running: gateways {leaked}, processes {children}"


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
def own_gateway(tmp_path, upstream):
    """start(name, **Gateway options): a gateway with a config of the test's own, on the shared stand-in; every one
    started is stopped, and the stand-in reset, when the test ends."""
    started: list[Gateway] = []

    def start(name: str, **kw) -> Gateway:
        upstream.reset()
        gw = Gateway(tmp_path / name, upstream.url, **kw)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()
    upstream.reset()


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory):
    """A provider stand-in over TLS on 127.0.0.1 (proxy mode decrypts and re-encrypts), one per test module."""
    from tests.support.tls import tls_stand_in

    stand_in = tls_stand_in(tmp_path_factory.mktemp("upstream-tls"), ["127.0.0.1"])
    yield stand_in
    stand_in.stop()


@pytest.fixture
def up(tls_upstream):
    """The module's TLS stand-in, reset before and after the test."""
    tls_upstream.reset()
    yield tls_upstream
    tls_upstream.reset()


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
