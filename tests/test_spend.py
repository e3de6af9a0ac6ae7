"""Seeing spend (issue #27): usage by group, week and month over a date range, CSV of every table, budget use with
a forecast (admin API and CLI), and the FOCUS 1.2 export agreeing with `aibridge usage` to the last digit."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import duckdb
import httpx
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, anthropic_client, chat_call, openai_client

CONFIG = {"budgets": {"default": {"usd_per_month": 100},
                      "groups": {"staff": {"tokens_per_day": 10_000, "usd_per_week": 1}}}}


@pytest.fixture(scope="module")
def sgw(tmp_path_factory, upstream):
    upstream.reset()
    gw = Gateway(tmp_path_factory.mktemp("spend"), upstream.url, extra=CONFIG).start()
    gw.tokens = {n: gw.new_user(n) for n in ("root", "ann", "ben", "cid")}
    gw.cli("users", "set-role", "root", "admin")
    gw.op("users.groups_set", name="ann", groups="staff,ml")
    gw.op("users.groups_set", name="ben", groups="staff")
    simple, chat = capture("anthropic/simple.txtar"), capture("openai/chatcompletions/simple.txtar")
    for user in ("ann", "ann", "ben"):
        upstream.script(Reply.from_capture(simple, False))
        anthropic_call(anthropic_client(gw, gw.tokens[user]), simple.request, False)
    odd = Reply.from_capture(chat, False)  # a client-chosen model name shaped like a spreadsheet formula
    model = json.loads(odd.body)["model"]
    upstream.script(dataclasses.replace(odd, body=odd.body.replace(model.encode(), b"=HYPERLINK(1)")))
    chat_call(openai_client(gw, gw.tokens["cid"]), chat.request, False)
    gw.interceptions("ann", 2)
    gw.interceptions("cid", 1)
    yield gw
    gw.stop()
    upstream.reset()


def api(gw, path: str, **params) -> httpx.Response:
    return httpx.get(f"{gw.url}/aibridge/api/v1/{path}", params=params, trust_env=False,
                     headers={"authorization": f"Bearer {gw.tokens['root']}"})


def usage(gw, *args) -> dict:
    return {d[args[1]]: d for d in json.loads(gw.cli("usage", *args, "--json").stdout)}


def test_usage_by_group_week_and_month_over_a_range(sgw):
    by_user = usage(sgw, "--by", "user")
    by_group = usage(sgw, "--by", "group")
    # ann is in staff and ml, ben in staff, cid in none: a person in two groups counts in both.
    assert by_group["staff"]["cost_usd"] == pytest.approx(by_user["ann"]["cost_usd"] + by_user["ben"]["cost_usd"])
    assert by_group["ml"]["cost_usd"] == pytest.approx(by_user["ann"]["cost_usd"])
    assert by_group["(no group)"]["interceptions"] == 1
    (week,) = usage(sgw, "--by", "week").values()
    (month,) = usage(sgw, "--by", "month").values()
    total = sum(d["cost_usd"] for d in by_user.values())
    assert week["cost_usd"] == pytest.approx(total) and month["cost_usd"] == pytest.approx(total)
    assert json.loads(sgw.cli("usage", "--by", "user", "--until", "2000-01-01", "--json").stdout) == []
    ts = api(sgw, "usage/timeseries", stack="group", bucket="week", since="30d").json()
    assert ts["bucket"] == "week" and {d["group"] for d in ts["data"]} == {"staff", "ml", "(no group)"}
    assert api(sgw, "usage/timeseries", bucket="year").json()["error"]["parameter"] == "bucket"


def test_every_table_downloads_as_csv_without_formulas(sgw):
    r = api(sgw, "usage", group_by="model", format="csv")
    assert r.headers["content-type"].startswith("text/csv") and "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {"model", "cost_usd", "input_tokens"} <= set(rows[0])
    assert "'=HYPERLINK(1)" in [row["model"] for row in rows]  # quoted: a spreadsheet shows it, never runs it
    out = sgw.cli("usage", "--by", "user", "--csv").stdout
    assert out.splitlines()[0].startswith("user,") and len(out.splitlines()) == 1 + 3
    assert api(sgw, "usage", format="xml").json()["error"]["parameter"] == "format"


def test_budget_use_per_user_and_group_with_a_forecast(sgw):
    report = api(sgw, "budgets").json()
    ann = {u["limit"]: u for u in report["users"] if u["user"] == "ann"}
    assert ann["tokens_per_day"]["from"] == "groups.staff" and ann["tokens_per_day"]["used"] == 448
    assert ann["tokens_per_day"]["forecast"] >= 448 and ann["usd_per_month"]["from"] == "default"
    staff = {g["limit"]: g for g in report["groups"] if g["group"] == "staff"}
    assert staff["tokens_per_day"]["members"] == 2 and staff["tokens_per_day"]["used"] == 448 + 224
    member = httpx.get(f"{sgw.url}/aibridge/api/v1/budgets", trust_env=False,
                       headers={"authorization": f"Bearer {sgw.tokens['ben']}"}).json()
    assert {u["user"] for u in member["users"]} == {"ben"}  # a member sees their own
    detail = json.loads(sgw.cli("budgets", "status", "--json", "--detail").stdout)
    assert {g["group"] for g in detail["groups"]} == {"staff"}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_focus_export_agrees_with_aibridge_usage(sgw, tmp_path, fmt):
    r = sgw.cli("export", "--focus", "--format", fmt, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    path = tmp_path / f"focus.{fmt}"
    con = duckdb.connect()
    rel = con.sql(f"SELECT * FROM read_csv_auto('{path}')" if fmt == "csv" else f"SELECT * FROM '{path}'")
    cols = rel.columns
    for column in ("BilledCost", "ChargePeriodStart", "ChargePeriodEnd", "ServiceName", "BillingCurrency",
                   "ConsumedQuantity", "ConsumedUnit", "ProviderName", "SubAccountName", "ResourceId", "Tags"):
        assert column in cols
    rows = [dict(zip(cols, row)) for row in rel.fetchall()]
    by_user = usage(sgw, "--by", "user", "--since", "2000-01-01")
    for user, d in by_user.items():
        mine = [row for row in rows if row["SubAccountName"] == user]
        assert sum(float(row["BilledCost"]) for row in mine) == pytest.approx(d["cost_usd"], abs=1e-6)
        assert sum(int(row["ConsumedQuantity"]) for row in mine) == sum(
            d[k] for k in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_write_input_tokens"))
    ann = [row for row in rows if row["SubAccountName"] == "ann"]
    assert len(ann) == 1 and ann[0]["ChargeCategory"] == "Usage" and ann[0]["BillingCurrency"] == "USD"
    assert ann[0]["ServiceName"] == "Claude API" and ann[0]["ProviderName"] == "Anthropic"
    assert json.loads(ann[0]["Tags"]) == {"aibridge_user": "ann", "aibridge_groups": "ml,staff"}
    assert str(ann[0]["ChargePeriodStart"]).startswith(str(ann[0]["ChargePeriodEnd"])[:8])
    assert float(ann[0]["BilledCost"]) == pytest.approx(2 * (21 * 3 + 203 * 15) / 1e6, rel=1e-12)  # unrounded
    cid = [row for row in rows if row["SubAccountName"] == "cid"]
    assert len(cid) == 1
