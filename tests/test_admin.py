"""The admin surface: HTTP API scoped by role, cost from the price table, CLI reports, metrics, JSON logs,
retention."""

from __future__ import annotations

import dataclasses

import json
import subprocess

import duckdb
import httpx
import pytest

from aibridge_gw.pricing import PriceTable
from tests.support.fixtures import capture
from tests.support.gateway import BIN, Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, anthropic_client, chat_call, openai_client, responses_call

CLAUDE = {"User-Agent": "claude-cli/2.1.328 (external, sdk-cli)", "X-Claude-Code-Session-Id": "sess-ann-1"}


@pytest.fixture(scope="module")
def agw(tmp_path_factory, upstream):
    work = tmp_path_factory.mktemp("admin-gw")
    gw = Gateway(work, upstream.url, extra={"logging": {"interceptions_json": str(work / "interceptions.jsonl")}}).start()
    try:
        yield from _seed(gw, upstream)
    finally:  # also when seeding fails or skips (no captures): never leave the gateway running
        gw.stop()


def _seed(gw, upstream):
    gw.tokens = {}
    for name in ("root", "ann", "ben"):
        gw.tokens[name] = gw.new_user(name)
    assert gw.cli("users", "set-role", "root", "admin").returncode == 0
    upstream.reset()
    simple = capture("anthropic/simple.txtar")
    chat = capture("openai/chatcompletions/simple.txtar")
    gpt54 = capture("openai/responses/blocking/summary_and_commentary_builtin_tool.txtar")
    # The Responses call answers as a model no price book knows (a private deployment): shown "unpriced".
    private = Reply.from_capture(gpt54, False)
    private = dataclasses.replace(private, body=private.body.replace(b'"gpt-5.4-2026-03-05"', b'"gpt-5.4-internal"'))
    upstream.script(Reply.from_capture(simple, True), Reply.from_capture(simple, False),
                    Reply.from_capture(chat, False), private)
    ann = anthropic_client(gw, gw.tokens["ann"], default_headers=CLAUDE)
    anthropic_call(ann, simple.request, True)
    anthropic_call(ann, simple.request, False)
    chat_call(openai_client(gw, gw.tokens["ben"]), chat.request, False)
    responses_call(openai_client(gw, gw.tokens["ben"]), gpt54.request, False)
    gw.interceptions("ann", 2)
    gw.interceptions("ben", 2)
    upstream.reset()
    yield gw


def api(gw, path, token, **params):
    return httpx.get(f"{gw.url}/aibridge/api/v1/{path}", params=params, trust_env=False,
                     headers={"authorization": f"Bearer {token}"} if token else {})


def test_api_requires_a_token(agw):
    r = api(agw, "interceptions", None)
    assert r.status_code == 401 and r.json()["error"]["message"]


def test_admin_sees_everyone_members_only_themselves(agw):
    every = api(agw, "interceptions", agw.tokens["root"]).json()["data"]
    assert {i["user"] for i in every} == {"ann", "ben"}
    own = api(agw, "interceptions", agw.tokens["ann"]).json()["data"]
    assert {i["user"] for i in own} == {"ann"} and len(own) == 2
    assert api(agw, "interceptions", agw.tokens["ann"], initiator="ben").json()["data"] == []
    ben_id = next(i["id"] for i in every if i["user"] == "ben")
    assert api(agw, f"interceptions/{ben_id}", agw.tokens["ann"]).status_code == 404


def test_filters_and_bad_parameters(agw):
    root = agw.tokens["root"]
    assert {i["client"] for i in api(agw, "interceptions", root, client="Claude Code").json()["data"]} == {"Claude Code"}
    assert [i["model"] for i in api(agw, "interceptions", root, model="gpt-4.1").json()["data"]] == ["gpt-4.1"]
    assert len(api(agw, "interceptions", root, provider="anthropic").json()["data"]) == 2
    assert api(agw, "interceptions", root, started_after="2999-01-01T00:00:00Z").json()["data"] == []
    assert len(api(agw, "interceptions", root, session="sess-ann-1").json()["data"]) == 2
    bad = api(agw, "interceptions", root, started_before="yesterday-ish")
    assert bad.status_code == 400 and bad.json()["error"]["parameter"] == "started_before"
    assert api(agw, "interceptions", root, colour="red").json()["error"]["parameter"] == "colour"
    assert api(agw, "usage", root, group_by="planet").json()["error"]["parameter"] == "group_by"


def test_cursor_pagination_is_newest_first_and_stable_under_inserts(agw, upstream):
    root = agw.tokens["root"]
    first = api(agw, "interceptions", root, limit=2).json()
    assert len(first["data"]) == 2 and first["next_cursor"]
    starts = [i["started_at"] for i in first["data"]]
    assert starts == sorted(starts, reverse=True)
    # A new interception arrives between pages: it must not shift or repeat the older ones.
    upstream.reset()
    upstream.script(Reply.from_capture(capture("openai/chatcompletions/simple.txtar"), False))
    chat_call(openai_client(agw, agw.tokens["ben"]), capture("openai/chatcompletions/simple.txtar").request, False)
    agw.interceptions("ben", 3)
    seen = [i["id"] for i in first["data"]]
    cursor = first["next_cursor"]
    while cursor:
        page = api(agw, "interceptions", root, limit=2, cursor=cursor).json()
        seen += [i["id"] for i in page["data"]]
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen)) == 4  # the four that existed when paging began
    assert api(agw, "interceptions", root, cursor="garbage").json()["error"]["parameter"] == "cursor"
    upstream.reset()


def test_detail_has_usage_prompt_tools_and_thoughts(agw):
    root = agw.tokens["root"]
    (ic,) = [i for i in api(agw, "interceptions", root, model="gpt-5.4").json()["data"]]
    d = api(agw, f"interceptions/{ic['id']}", root).json()
    assert [(u["input_tokens"], u["output_tokens"]) for u in d["token_usages"]] == [(61, 42)]
    assert d["prompts"][0]["prompt"].startswith("Is 4 + 9 a prime number?")
    assert [t["tool"] for t in d["tool_usages"]] == ["add"]
    assert {t["source"] for t in d["thoughts"]} == {"reasoning_summary", "commentary"}
    assert d["cost_usd"] is None and d["priced"] is False  # gpt-5.4-internal is in no price book


def test_usage_and_cost_per_user_and_model(agw):
    root = agw.tokens["root"]
    prices = PriceTable.load()
    sonnet = prices.resolve("claude-sonnet-4-20250514")
    expected_ann = sonnet.cost(21, 187, 0, 0) + sonnet.cost(21, 203, 0, 0)
    by_user = {d["user"]: d for d in api(agw, "usage", root, group_by="user").json()["data"]}
    assert by_user["ann"]["cost_usd"] == pytest.approx(expected_ann)
    assert (by_user["ann"]["input_tokens"], by_user["ann"]["output_tokens"]) == (42, 390)
    assert by_user["ben"]["unpriced_models"] == ["gpt-5.4-internal"]
    by_model = {d["model"]: d for d in api(agw, "usage", root, group_by="model").json()["data"]}
    assert by_model["gpt-5.4-internal"]["cost"] == "unpriced"
    assert by_model["claude-sonnet-4-20250514"]["cost_usd"] == pytest.approx(expected_ann)
    days = api(agw, "usage", root, group_by="day", since="1d").json()["data"]
    assert days[-1]["active_users"] == 2
    # A member's usage covers only their own calls.
    assert {d["user"] for d in api(agw, "usage", agw.tokens["ann"]).json()["data"]} == {"ann"}


def test_sessions_group_by_client_session(agw):
    data = api(agw, "sessions", agw.tokens["root"]).json()["data"]
    (ann,) = [s for s in data if s["session"] == "sess-ann-1"]
    assert (ann["user"], ann["client"], ann["interceptions"], ann["prompts"]) == ("ann", "Claude Code", 2, 2)
    assert ann["output_tokens"] == 390


def test_clients_and_models_for_filters(agw):
    root = agw.tokens["root"]
    assert {c["value"] for c in api(agw, "clients", root).json()["data"]} >= {"Claude Code", "Unknown"}
    models = [m["value"] for m in api(agw, "models", root, prefix="gpt-").json()["data"]]
    assert models and all(m.startswith("gpt-") for m in models)


def test_prometheus_metrics(agw):
    r = httpx.get(agw.url + "/aibridge/metrics", trust_env=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("aibridge_interceptions_total", "aibridge_interceptions_inflight", "aibridge_tokens_total",
                 "aibridge_interceptions_duration_seconds_bucket", "aibridge_prompts_total",
                 "aibridge_non_injected_tool_selections_total", "aibridge_passthrough_total"):
        assert name in text, name
    assert 'type="output"' in text and 'status="completed"' in text and 'client="Claude Code"' in text


def test_structured_interception_log(agw):
    lines = [json.loads(l) for l in (agw.workdir / "interceptions.jsonl").read_text().splitlines()]
    ann = [l for l in lines if l["user"] == "ann"]
    assert len(ann) == 2 and all(l["msg"] == "interception log" for l in lines)
    assert sorted(l["output_tokens"] for l in ann) == [187, 203]
    assert {l["client"] for l in ann} == {"Claude Code"} and ann[0]["duration_ms"] >= 0


def test_cli_reports_export_and_healthz(agw, tmp_path):
    r = agw.cli("usage", "--by", "user", "--json")
    assert r.returncode == 0, r.stderr
    assert {d["user"] for d in json.loads(r.stdout)} == {"ann", "ben"}
    r = agw.cli("prompts", "--search", "PRIME")
    assert r.returncode == 0 and "prime" in r.stdout
    r = agw.cli("sessions", "--user", "ann", "--json")
    assert [s["session"] for s in json.loads(r.stdout)] == ["sess-ann-1"]
    out = tmp_path / "export"
    r = agw.cli("export", "--format", "parquet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    n = duckdb.sql(f"SELECT count(*) FROM '{out / 'aibridge_interceptions.parquet'}'").fetchall()[0][0]
    assert n >= 4
    assert not (out / "aibridge_tokens.parquet").exists()  # token hashes are never exported
    assert (out / "aibridge_provider_objects.parquet").exists()  # whom batches and background work belong to
    h = httpx.get(agw.url + "/aibridge/healthz", trust_env=False).json()
    assert h["status"] == "ok" and h["records_failed"] == 0


def test_prune_deletes_old_records_and_their_rows(tmp_path, upstream):
    gw = Gateway(tmp_path / "prune", upstream.url)
    env = {"AIBRIDGE_CONFIG": str(gw.config_path)}
    import os

    # creates the database and its schema
    subprocess.run([str(BIN / "aibridge"), "users", "add", "pruner"], env={**os.environ, **env}, check=True,
                   capture_output=True)
    con = duckdb.connect(str(gw.db))
    for age, iid in ((90, "00000000-0000-0000-0000-0000000000a1"), (1, "00000000-0000-0000-0000-0000000000b2")):
        con.execute("INSERT INTO aibridge_interceptions (id, provider, provider_name, credential_kind, status, started_at) "
                    f"VALUES (?, 'openai', 'openai', 'centralized', 'completed', now() - INTERVAL {age} DAY)", [iid])
        con.execute("INSERT INTO aibridge_user_prompts (id, interception_id, provider_response_id, prompt, created_at) "
                    "VALUES (uuid(), ?, NULL, 'p', now())", [iid])
    con.close()
    r = subprocess.run([str(BIN / "aibridge"), "prune", "--days", "60"], env={**os.environ, **env},
                       capture_output=True, text=True)
    assert r.returncode == 0 and "deleted 1 interception" in r.stdout
    con = duckdb.connect(str(gw.db), read_only=True)
    assert con.execute("SELECT CAST(id AS VARCHAR) FROM aibridge_interceptions").fetchall() == [("00000000-0000-0000-0000-0000000000b2",)]
    assert con.execute("SELECT count(*) FROM aibridge_user_prompts").fetchone()[0] == 1
    con.close()


@pytest.mark.parametrize("model,family", [
    ("claude-sonnet-4-20250514", "claude-sonnet-4"), ("claude-sonnet-4-0", "claude-sonnet-4"),
    ("gpt-4.1-2025-04-14", "gpt-4.1"), ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("anthropic/claude-haiku-4-5", "claude-haiku-4-5"),
])
def test_price_resolution(model, family):
    """Dated, aliased and provider-qualified names get their family's price from the package's data."""
    prices = PriceTable.load()
    assert prices.resolve(model) == prices.resolve(family) is not None
    assert prices.resolve(model).source.startswith("genai-prices ")


def test_unknown_model_is_unpriced_not_free():
    assert PriceTable.load().cost("gpt-9-ultra", 1000, 1000, 0, 0) is None
