"""The price book (issue #27): genai-prices' bundled data by default, a `pricing:` file over it, `aibridge prices
set` over both; each usage row keeps the cost and rates it was charged at, so a price change never rewrites an old
call's cost; a model no source knows is counted unpriced (metric, reports) and never shown as free."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, anthropic_client

SONNET = "claude-sonnet-4-20250514"  # the capture's model: $3 in, $15 out per 1M in the package's data


@pytest.fixture
def pgw(tmp_path, upstream):
    upstream.reset()
    pricing = tmp_path / "prices.yaml"
    pricing.write_text("taken: '2026-11-01'\nmodels:\n  acme-coder: {input: 2.0, output: 4.0, cache_read: 0.2, "
                       "cache_write: 2.5}\n")
    gw = Gateway(tmp_path / "prices", upstream.url, extra={"pricing": str(pricing)}).start()
    gw.token = gw.new_user("payer")
    yield gw
    gw.stop()
    upstream.reset()


def call(gw, upstream, model_answered: str | None = None) -> None:
    cap = capture("anthropic/simple.txtar")  # 21 input, 203 output tokens
    reply = Reply.from_capture(cap, False)
    if model_answered:
        reply = dataclasses.replace(reply, body=reply.body.replace(SONNET.encode(), model_answered.encode()))
    upstream.script(reply)
    anthropic_call(anthropic_client(gw, gw.token), cap.request, False)


def costs(gw, n: int) -> list[dict]:
    rows = gw.wait_for("SELECT t.cost_usd, t.price, coalesce(i.metadata->>'response_model', i.model) AS model "
                       "FROM aibridge_token_usages t JOIN aibridge_interceptions i ON i.id = t.interception_id "
                       "ORDER BY t.created_at", lambda r: len(r) >= n)
    return [{**r, "price": json.loads(r["price"]) if r["price"] else None} for r in rows]


def test_a_price_change_never_rewrites_what_a_recorded_call_cost(pgw, upstream):
    call(pgw, upstream)
    (first,) = costs(pgw, 1)
    assert first["cost_usd"] == pytest.approx((21 * 3 + 203 * 15) / 1e6)
    assert first["price"]["source"].startswith("genai-prices ") and first["price"]["model"] == SONNET

    r = pgw.cli("prices", "set", SONNET, "--input", "1", "--output", "2", "--note", "negotiated")
    assert r.returncode == 0, r.stderr
    call(pgw, upstream)
    first_again, second = costs(pgw, 2)
    assert first_again["cost_usd"] == first["cost_usd"]  # kept as charged
    assert second["cost_usd"] == pytest.approx((21 * 1 + 203 * 2) / 1e6) and second["price"]["source"] == "database"
    usage = json.loads(pgw.cli("usage", "--by", "model", "--json").stdout)
    (sonnet,) = [d for d in usage if d["model"] == SONNET]
    assert sonnet["cost_usd"] == pytest.approx(first["cost_usd"] + second["cost_usd"], abs=1e-6)
    listed = json.loads(pgw.cli("prices", "list", "--json").stdout)
    assert [(p["model"], p["input"], p["output"], p["cache_read"], p["note"]) for p in listed] == [
        (SONNET, 1.0, 2.0, 1.0, "negotiated")]
    shown = json.loads(pgw.cli("prices", "show", SONNET, "--json").stdout)
    assert (shown["source"], shown["input"]) == ("database", 1.0)
    assert pgw.cli("prices", "delete", SONNET).returncode == 0
    shown = json.loads(pgw.cli("prices", "show", SONNET, "--provider", "anthropic", "--json").stdout)
    assert shown["source"].startswith("genai-prices ") and shown["input"] == 3.0


def test_the_pricing_file_prices_its_models_and_an_unknown_model_is_counted_unpriced(pgw, upstream):
    call(pgw, upstream, model_answered="acme-coder")  # in the file only
    call(pgw, upstream, model_answered="acme-private-7b")  # in no price book
    acme, private = costs(pgw, 2)
    assert acme["cost_usd"] == pytest.approx((21 * 2 + 203 * 4) / 1e6) and acme["price"]["source"] == "file"
    assert private["cost_usd"] is None and private["price"] is None
    metrics = httpx.get(pgw.url + "/aibridge/metrics", trust_env=False).text
    assert 'aibridge_unpriced_usage_total{model="acme-private-7b"} 1.0' in metrics
    by_model = {d["model"]: d for d in json.loads(pgw.cli("usage", "--by", "model", "--json").stdout)}
    assert by_model["acme-private-7b"]["cost"] == "unpriced" and by_model["acme-private-7b"]["cost_usd"] == 0
    # A price set later prices what was recorded unpriced (there was no cost to keep).
    assert pgw.cli("prices", "set", "acme-private-7b", "--input", "10", "--output", "10").returncode == 0
    by_model = {d["model"]: d for d in json.loads(pgw.cli("usage", "--by", "model", "--json").stdout)}
    assert by_model["acme-private-7b"]["cost_usd"] == pytest.approx(224 * 10 / 1e6)
    bad = pgw.cli("prices", "set", "x", "--input", "-1", "--output", "1")
    assert bad.returncode != 0 and "input must be a price" in bad.stderr
