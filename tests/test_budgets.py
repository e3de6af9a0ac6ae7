"""Budgets and rate limits stop a user at their limit with a clean 429, and survive a restart."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, anthropic_client, chat_call, openai_client

BUDGETS = {"budgets": {
    "default": {"requests_per_minute": 3},
    "users": {"heavy": {"tokens_per_day": 300}, "spender": {"usd_per_month": 0.005}},
}}


@pytest.fixture
def bgw(tmp_path, upstream):
    upstream.reset()
    gw = Gateway(tmp_path / "budgets", upstream.url, extra=BUDGETS).start()
    yield gw
    gw.stop()
    upstream.reset()


def test_requests_per_minute_limit_gives_429_with_retry_after(bgw, upstream):
    token = bgw.new_user("rpm")
    cap = capture("openai/chatcompletions/simple.txtar")
    client = openai_client(bgw, token)
    for _ in range(3):
        upstream.script(Reply.from_capture(cap, False))
        chat_call(client, cap.request, False)
    with pytest.raises(openai.RateLimitError) as e:
        chat_call(client, cap.request, False)
    assert e.value.response.headers["retry-after"].isdigit()
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert "3 requests per minute" in e.value.message
    assert len(upstream.seen) == 3  # the refused request never reached the provider
    rows = bgw.wait_for("SELECT status, http_status, error FROM aibridge_interceptions WHERE status = 'rejected'")
    assert rows[0]["http_status"] == 429 and "rate limit" in rows[0]["error"]


def test_daily_token_budget_in_anthropic_format_and_it_survives_a_restart(bgw, upstream):
    token = bgw.new_user("heavy")
    cap = capture("anthropic/simple.txtar")
    upstream.script(Reply.from_capture(cap, False))
    anthropic_call(anthropic_client(bgw, token), cap.request, False)  # 21 + 203 tokens: under 300
    upstream.script(Reply.from_capture(cap, False))
    anthropic_call(anthropic_client(bgw, token), cap.request, False)  # now over
    bgw.interceptions("heavy", 2)
    with pytest.raises(anthropic.RateLimitError) as e:
        anthropic_call(anthropic_client(bgw, token), cap.request, False)
    assert e.value.body["error"]["type"] == "rate_limit_error" and "daily token budget" in e.value.message
    bgw.stop()
    bgw.start()  # counters are rebuilt from the database
    with pytest.raises(anthropic.RateLimitError):
        anthropic_call(anthropic_client(bgw, token), cap.request, False)
    assert len(upstream.seen) == 2
    r = bgw.cli("usage", "--by", "user", "--json")
    heavy = next(d for d in json.loads(r.stdout) if d["user"] == "heavy")
    assert heavy["tokens_remaining_today"] == 0


def test_monthly_usd_budget_uses_the_price_table(bgw, upstream):
    token = bgw.new_user("spender")
    cap = capture("anthropic/simple.txtar")  # claude-sonnet-4: 21*3 + 203*15 per 1M = $0.003108
    for _ in range(2):
        upstream.script(Reply.from_capture(cap, False))
        anthropic_call(anthropic_client(bgw, token), cap.request, False)
    bgw.interceptions("spender", 2)
    with pytest.raises(anthropic.RateLimitError) as e:
        anthropic_call(anthropic_client(bgw, token), cap.request, False)
    assert "monthly budget" in e.value.message
    other = bgw.new_user("unlimited-today")  # default limits: only requests per minute
    upstream.script(Reply.from_capture(cap, False))
    anthropic_call(anthropic_client(bgw, other), cap.request, False)
