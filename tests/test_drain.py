"""Exact spend when clients misbehave (#22): a client that goes away mid-stream still gets its call recorded and
charged with the provider's final usage (the gateway reads the answer to its end, within
`timeouts.drain_after_disconnect_seconds`); a stream whose final usage never comes is marked `usage_estimated`;
whatever usage values a provider sends, the row is recorded and no budget counter is poisoned.

Clients hang up with raw sockets, at exact events (an SDK cannot stop at one)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.wire import (
    PATHS,
    _sse,
    anthropic_message,
    anthropic_stream,
    api_request,
    chat_stream,
    request_body,
    status_of,
)

DRAIN = 1.5  # seconds a stream is read on after its client left (short, for the stall test)
DAILY = 500  # tokens per day of the budgeted users


@pytest.fixture(scope="module")
def dgw(tmp_path_factory, upstream):
    upstream.reset()
    gw = Gateway(tmp_path_factory.mktemp("drain"), upstream.url, extra={
        "timeouts": {"drain_after_disconnect_seconds": DRAIN},
        "budgets": {"users": {f"budgeted{n}": {"tokens_per_day": DAILY} for n in range(4)}},
    }).start()
    yield gw
    gw.stop()
    upstream.reset()


def ended(gw: Gateway, name: str, n: int = 1) -> list[dict]:
    return gw.wait_for(
        "SELECT CAST(i.id AS VARCHAR) AS id, i.status, i.error, i.http_status, CAST(i.metadata AS VARCHAR) AS metadata "
        "FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
        f"WHERE u.name = '{name}' AND i.status NOT IN ('in_progress', 'rejected') ORDER BY i.started_at",
        lambda rows: len(rows) >= n, timeout=15)


def usage(gw: Gateway, iid: str) -> list[tuple]:
    rows = gw.sql("SELECT input_tokens, output_tokens, usage_estimated, CAST(metadata AS VARCHAR) AS metadata "
                  f"FROM aibridge_token_usages WHERE interception_id = '{iid}' ORDER BY id")
    return [(r["input_tokens"], r["output_tokens"], r["usage_estimated"]) for r in rows]


def health(gw: Gateway) -> dict:
    return httpx.get(gw.url + "/aibridge/healthz", trust_env=False).json()


def settled(gw: Gateway, mock) -> None:
    deadline = time.time() + 10
    while time.time() < deadline and (mock.active or health(gw)["inflight"]):
        time.sleep(0.05)
    assert mock.active == 0 and health(gw)["inflight"] == 0


# --- a client that leaves mid-stream --------------------------------------------------------------------


def test_anthropic_client_closing_after_the_last_content_block_stop_is_charged_the_providers_final_usage(dgw, mock):
    """The issue's case: the client has the whole answer at the last content_block_stop and closes; the provider
    reports 254 output tokens in the message_delta after it. The row has them and the daily budget is charged
    them: two such calls (2 x 272 tokens) use up a 500-token daily budget (2 x 19 would not), and
    a call the budget refuses never reaches the provider."""
    token = dgw.new_user("budgeted0")
    for _ in range(2):
        mock.script(Reply.sse(anthropic_stream(usage=(18, 254)), delay=0.3))
        got = api_request(dgw.port, PATHS["anthropic"], token, request_body("anthropic"),
                          read_until=b"content_block_stop")
        assert b"content_block_stop" in got and b"message_delta" not in got  # it left before the usage came
    rows = ended(dgw, "budgeted0", 2)
    for row in rows:
        assert row["status"] == "completed" and row["error"] is None
        assert json.loads(row["metadata"])["client_disconnected"] is True
        assert usage(dgw, row["id"]) == [(18, 254, False)]
    assert mock.aborted == 0  # the provider's answer was read to its end
    settled(dgw, mock)
    got = api_request(dgw.port, PATHS["anthropic"], token, request_body("anthropic"))
    assert status_of(got) == 429 and b"daily token budget" in got
    assert len(mock.seen) == 2


def test_openai_chat_stream_closed_right_after_finish_reason_stop_records_the_usage_chunk(dgw, mock):
    token = dgw.new_user("chatter")
    mock.script(Reply.sse(chat_stream(usage=(31, 9)), delay=0.3))
    got = api_request(dgw.port, PATHS["chat"], token, request_body("chat"), read_until=b'"finish_reason": "stop"')
    assert b'"finish_reason": "stop"' in got and b"prompt_tokens" not in got
    (row,) = ended(dgw, "chatter")
    assert row["status"] == "completed" and row["error"] is None
    assert json.loads(row["metadata"])["client_disconnected"] is True
    assert usage(dgw, row["id"]) == [(31, 9, False)]
    settled(dgw, mock)


def test_upstream_stalling_after_the_client_left_ends_at_the_drain_deadline_with_usage_estimated(dgw, mock):
    """The provider goes silent after the last content_block_stop: the gateway reads on for the configured drain
    only, then closes the provider's connection; the row ends failed with message_start's figures, marked as an
    estimate. Nothing is left running."""
    token = dgw.new_user("stalled")
    mock.script(Reply(**{**Reply.sse(anthropic_stream(usage=(18, 254)), delay=0.05).__dict__, "stall_after": 4}))
    left = time.time()
    api_request(dgw.port, PATHS["anthropic"], token, request_body("anthropic"), read_until=b"content_block_stop")
    (row,) = ended(dgw, "stalled")
    took = time.time() - left
    assert DRAIN - 0.2 <= took <= DRAIN + 4, took
    assert row["status"] == "failed" and "went away" in row["error"] and "estimated" in row["error"]
    assert usage(dgw, row["id"]) == [(18, 1, True)]
    deadline = time.time() + 5
    while time.time() < deadline and mock.aborted == 0:
        time.sleep(0.05)
    assert mock.aborted == 1  # the provider's connection was closed at the deadline
    settled(dgw, mock)


# --- usage values ---------------------------------------------------------------------------------------


def _anthropic_usage(**usage) -> Reply:
    msg = anthropic_message()
    msg["usage"] = {**msg["usage"], **usage}
    return Reply.json(msg)


def test_usage_beyond_bigint_is_recorded_clamped_and_flagged_and_charged_to_no_budget(dgw, mock):
    """2^63+5 input tokens: before, the usage row went to the dead-letter file and the user's budget counter was
    poisoned (every later call refused). Now the row is recorded, clamped to the column's maximum and flagged, and
    charged to no budget, also after a restart rebuilds the counters from the database."""
    token = dgw.new_user("budgeted1")
    mock.script(_anthropic_usage(input_tokens=2**63 + 5, output_tokens=7))
    assert status_of(api_request(dgw.port, PATHS["anthropic"], token, request_body("anthropic", stream=False))) == 200
    (row,) = ended(dgw, "budgeted1")
    assert row["status"] == "completed"
    rows = dgw.wait_for(f"SELECT input_tokens, output_tokens, CAST(metadata AS VARCHAR) AS metadata "
                        f"FROM aibridge_token_usages WHERE interception_id = '{row['id']}'")
    assert rows[0]["input_tokens"] == 2**63 - 1 and rows[0]["output_tokens"] == 7
    assert json.loads(rows[0]["metadata"])["usage_clamped"] == ["input_tokens"]
    mock.script(Reply.json(anthropic_message(usage=(10, 5))))
    assert status_of(api_request(dgw.port, PATHS["anthropic"], token, request_body("anthropic", stream=False))) == 200
    ended(dgw, "budgeted1", 2)
    dgw.stop()
    dgw.start()
    mock.script(Reply.json(anthropic_message(usage=(10, 5))))
    assert status_of(api_request(dgw.port, PATHS["anthropic"], token, request_body("anthropic", stream=False))) == 200
    ended(dgw, "budgeted1", 3)


@pytest.mark.parametrize("n, value, recorded", [(0, 1000.0, 1000), (1, -5, 0), (2, 12.6, 13)])
def test_usage_values_as_providers_send_them(dgw, mock, n, value, recorded):
    """A float with an integral value is that count (1000.0 was recorded as 0), a fraction rounds, and a negative
    count is 0 (it must never credit a budget)."""
    name = f"values{n}"
    token = dgw.new_user(name)
    mock.script(_anthropic_usage(output_tokens=value))
    assert status_of(api_request(dgw.port, PATHS["anthropic"], token, request_body("anthropic", stream=False))) == 200
    (row,) = ended(dgw, name)
    assert row["status"] == "completed"
    assert usage(dgw, row["id"]) == [(12, recorded, False)]


def test_an_sse_line_over_16_mib_is_skipped_and_the_final_usage_after_it_is_recorded(dgw, mock):
    token = dgw.new_user("hugeline")
    events = anthropic_stream(usage=(12, 7))
    huge = _sse({"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": "x" * (17 * 1024 * 1024)}}, "content_block_delta")
    mock.script(Reply.sse(events[:2] + [huge] + events[2:]))
    with httpx.stream("POST", dgw.url + PATHS["anthropic"], json=request_body("anthropic"), trust_env=False,
                      headers={"x-api-key": token}, timeout=30) as r:
        got = sum(len(c) for c in r.iter_raw())
    assert got > 17 * 1024 * 1024  # the client got every byte
    (row,) = ended(dgw, "hugeline")
    assert row["status"] == "completed" and row["error"] is None
    assert usage(dgw, row["id"]) == [(12, 7, False)]


# --- bounds: drain off, graceful stop, configuration ------------------------------------------------------


def test_with_the_drain_off_the_provider_connection_is_cut_at_once_and_the_usage_is_estimated(own_gateway, upstream):
    gw = own_gateway("nodrain", extra={"timeouts": {"drain_after_disconnect_seconds": 0}})
    token = gw.new_user("cut")
    upstream.script(Reply.sse(anthropic_stream(usage=(18, 254)), delay=0.3))
    api_request(gw.port, PATHS["anthropic"], token, request_body("anthropic"), read_until=b"content_block_stop")
    (row,) = ended(gw, "cut")
    assert row["status"] == "failed" and "client disconnected" in row["error"].lower()
    assert usage(gw, row["id"]) == [(18, 1, True)]
    deadline = time.time() + 5
    while time.time() < deadline and upstream.aborted == 0:
        time.sleep(0.05)
    assert upstream.aborted == 1


def test_a_graceful_stop_ends_a_stream_read_on_after_its_client_left(own_gateway, upstream):
    """SIGTERM while the gateway reads on a stream whose client left (the provider stalls): the stream is a call in
    flight like any other, ended when shutdown_grace_seconds runs out, recorded with its estimated usage, and the
    gateway exits."""
    gw = own_gateway("stop", extra={"timeouts": {"drain_after_disconnect_seconds": 60, "shutdown_grace_seconds": 1}})
    token = gw.new_user("stopped")
    upstream.script(Reply(**{**Reply.sse(anthropic_stream(usage=(18, 254)), delay=0.05).__dict__, "stall_after": 4}))
    api_request(gw.port, PATHS["anthropic"], token, request_body("anthropic"), read_until=b"content_block_stop")
    deadline = time.time() + 5
    while time.time() < deadline and health(gw)["inflight"] != 1:
        time.sleep(0.05)
    assert health(gw)["inflight"] == 1  # still reading the provider's answer
    began = time.time()
    assert gw.stop() == 0
    assert time.time() - began < 10
    (row,) = ended(gw, "stopped")
    assert row["status"] == "failed" and row["error"] == "gateway shut down"
    assert usage(gw, row["id"]) == [(18, 1, True)]


def test_drain_after_disconnect_is_zero_or_more_seconds_and_defaults_to_120(tmp_path):
    from aibridge_gw.config import ConfigError, load_config

    def config(name: str, timeouts: dict | None) -> str:
        return str(Gateway(tmp_path / name, "http://127.0.0.1:9", extra={"timeouts": timeouts} if timeouts else None
                           ).config_path)

    assert load_config(config("default", None)).timeouts.drain_after_disconnect == 120
    assert load_config(config("off", {"drain_after_disconnect_seconds": 0})).timeouts.drain_after_disconnect == 0
    assert load_config(config("short", {"drain_after_disconnect_seconds": 2.5})).timeouts.drain_after_disconnect == 2.5
    for n, bad in enumerate((-1, "soon", float("nan"), float("inf"))):
        with pytest.raises(ConfigError, match="drain_after_disconnect_seconds"):
            load_config(config(f"bad{n}", {"drain_after_disconnect_seconds": bad}))


def test_reading_on_stops_past_the_byte_bound_with_usage_estimated(own_gateway, upstream):
    """What is read after the client left is bounded by limits.max_request_body_mb too (10 KiB here)."""
    gw = own_gateway("bytes", extra={"limits": {"max_request_body_mb": 10 / 1024}})
    token = gw.new_user("bytes")
    events = anthropic_stream(usage=(18, 254))
    big = _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "y" * 20_000}},
               "content_block_delta")
    upstream.script(Reply.sse(events[:3] + [big] * 8 + events[3:], delay=0.3))
    api_request(gw.port, PATHS["anthropic"], token, request_body("anthropic"), read_until=b"text_delta")
    (row,) = ended(gw, "bytes")
    assert row["status"] == "failed" and "bytes" in row["error"] and "estimated" in row["error"]
    assert usage(gw, row["id"]) == [(18, 1, True)]
