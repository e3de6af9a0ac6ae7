"""The MCP gateway's parts in-process (fast tier): the access rules and their config, the session id that carries
the client across stateless requests, `<server>__<name>` resolution, URI templates, the call rows (masked, cut,
pruned, exported, on a store of the previous version) and the rate limit."""

from __future__ import annotations

import re
import datetime as dt
import json
import uuid

import pytest
from aibridge_gw.admin import gateway_client
from aibridge_gw.config import ConfigError, parse_config
from aibridge_gw.flow.recorder import MCP_ARGUMENTS_MAX, Recorder
from aibridge_gw.mcp.access import Caller, McpAccess, access_rows
from aibridge_gw.mcp.gateway import McpGateway, SessionId, _template_matches
from aibridge_gw.mcp.registry import Listing, McpRegistry
from aibridge_gw.metrics import Metrics
from aibridge_gw.policy.budgets import McpCallLimit
from aibridge_gw.store import schema
from aibridge_gw.store.writer import Store
from mcp import types

NOW = dt.datetime.now(dt.UTC)
SERVERS = [{"name": "github", "url": "http://gh.test/mcp", "tool_deny_regex": "^secret_"},
           {"name": "jira", "url": "http://jira.test/mcp"}, {"name": "my__srv", "url": "http://x.test/mcp"}]
ISSUE_RULES = [{"servers": ["github"], "tools": ["*"], "groups": ["staff"]},
               {"servers": ["github"], "tools": ["delete_*", "merge_*"], "deny": True},
               {"servers": ["jira"], "users": ["alice"]}]


def config(rules=ISSUE_RULES, **more):
    return parse_config({"mcp_servers": SERVERS, "mcp_access": rules, **more})


def test_the_issues_example_allows_and_denies_per_user_and_group_deny_wins():
    c = config()
    access, (github, jira, _) = McpAccess(c.mcp_access), c.mcp_servers
    alice, bob = Caller("alice"), Caller("bob", ("staff",))
    assert access.decide(jira, "create_issue", alice).allowed
    assert not access.decide(github, "list_repos", alice).allowed
    assert access.decide(github, "list_repos", bob).why == \
        "allowed by mcp_access[0] (allow; servers github; tools *; groups staff)"
    assert access.decide(github, "delete_repo", bob).why == \
        "denied by mcp_access[1] (deny; servers github; tools delete_*, merge_*)"
    assert access.decide(github, "secret_sauce", bob).why == "excluded by tool_deny_regex of server github"
    assert not access.decide(jira, "create_issue", bob).allowed
    assert access.server_visible(github, bob) and not access.server_visible(github, alice)
    # A deny listed before an allow still wins; a deny of a whole server hides it.
    first = McpAccess(config([ISSUE_RULES[1], ISSUE_RULES[0], {"servers": ["jira"], "deny": True}]).mcp_access)
    assert not first.decide(github, "merge_pr", bob).allowed and first.decide(github, "list_repos", bob).allowed
    assert not first.server_visible(jira, alice)


def test_without_rules_everything_is_everyones_but_server_regexes_still_apply():
    c = config([])
    access, github = McpAccess(c.mcp_access), c.mcp_servers[0]
    assert access.open and access.decide(github, "delete_repo", Caller("anyone")).allowed
    assert not access.decide(github, "secret_x", Caller("anyone")).allowed


def test_access_rules_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"mcp_access\[0\].servers: `gihub` is not an MCP server here "
                                          r"\(did you mean `github`\?\)"):
        config([{"servers": ["gihub"]}])
    with pytest.raises(ConfigError, match=r"mcp_access\[0\].deny"):
        config([{"servers": ["github"], "deny": "sometimes"}])
    with pytest.raises(ConfigError, match="unknown key"):
        config([{"server": ["github"]}])
    assert config([{"servers": ["git*"], "groups": ["Staff"]}]).mcp_access[0].groups == ("staff",)
    with pytest.raises(ConfigError, match="duplicate MCP server name"):
        parse_config({"mcp_servers": [SERVERS[0], SERVERS[0]]})
    limits = config(budgets={"default": {"mcp_calls_per_minute": 30}}).budgets.default
    assert limits.mcp_calls_per_minute == 30 and not limits.any  # not a model-call limit


def test_the_access_report_names_each_tool_and_why():
    c = config()
    github, jira, other = c.mcp_servers
    tools = [types.Tool(name=n, inputSchema={"type": "object"}) for n in ("list_repos", "delete_repo", "secret_x")]
    rows = access_rows(c.mcp_servers, {"github": Listing(tools=tools), "jira": None, "my__srv": "unreachable"},
                       McpAccess(c.mcp_access), Caller("bob", ("staff",)))
    assert [r[:4] for r in rows] == [
        ["github", "list_repos", "github__list_repos", True], ["github", "delete_repo", "github__delete_repo", False],
        ["github", "secret_x", "github__secret_x", False], ["jira", "*", "", False], ["my__srv", "*", "", None]]


def test_names_resolve_to_the_longest_server_name_that_prefixes_them():
    c = config()
    gw = McpGateway(None, Metrics())
    gw.registry = McpRegistry(c.mcp_servers, c.mcp, lambda u, s: None)
    assert [(s.name, t) for s, t in [gw.resolve("github__list__all"), gw.resolve("my__srv__do_it")]] == [
        ("github", "list__all"), ("my__srv", "do_it")]
    assert gw.resolve("my__do_it") is None and gw.resolve("github__") is None and gw.resolve(5) is None


def test_the_session_id_carries_the_client_and_refuses_anything_else():
    sid = SessionId.mint("claude-code", "2.1.197")
    assert all(0x21 <= ord(ch) <= 0x7E for ch in sid) and len(sid) < SessionId.MAX
    client, version, session = SessionId.read(sid)
    assert (client, version) == ("claude-code", "2.1.197") and len(session) == 16
    assert SessionId.read(SessionId.mint(None, None))[:2] == (None, None)
    assert SessionId.read(SessionId.mint("x" * 5000, "y"))[0] == "x" * 100
    for bad in (None, "", "abc", "aib1.", "aib1.!!!", "aib1." + "A" * 2000, "aib1.e30", "aib1.W10"):
        assert SessionId.read(bad) is None


def test_uri_templates():
    assert _template_matches("docs://pages/{page}", "docs://pages/intro")
    assert not _template_matches("docs://pages/{page}", "docs://pages/a/b")
    assert _template_matches("file:///{+path}", "file:///etc/hosts")
    assert not _template_matches("docs://pages/{page}", "other://pages/x")


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "audit.duckdb")
    s.open()
    yield s
    s.close()


def rows(store) -> list[dict]:
    store.flush().result(timeout=30)
    r = store.run("sql", False, query_text="SELECT * FROM aibridge_mcp_calls ORDER BY created_at").result(timeout=30)
    return [dict(zip(r["columns"], row)) for row in r["rows"]]


def test_a_call_row_holds_no_credential_and_huge_arguments_are_cut(store):
    rec = Recorder(store)
    uid = str(uuid.uuid4())
    common = dict(user_id=uid, user_name="u", method="tools/call", server="github", is_error=False, outcome="ok")
    rec.mcp_call(str(uuid.uuid4()), created_at=NOW, tool="t", error="Authorization: Bearer aib_secretsecret",
                 arguments={"token": "ghp_0123456789abcdefghij0123456789abcdef", "n": 1}, **common)
    rec.mcp_call(str(uuid.uuid4()), created_at=NOW + dt.timedelta(seconds=1), tool="t" * 9000,
                 arguments={"q": "x" * (MCP_ARGUMENTS_MAX + 10)}, **common)
    first, second = rows(store)
    assert "ghp_0123456789" not in first["arguments"] and json.loads(first["arguments"])["n"] == 1
    assert "aib_secretsecret" not in first["error"]
    assert json.loads(second["arguments"])["aibridge_truncated"] is True and len(second["tool"]) == 512


def test_calls_are_pruned_by_age_and_exported(store, tmp_path):
    rec = Recorder(store)
    for days, tool in ((90, "old"), (0, "new")):
        rec.mcp_call(str(uuid.uuid4()), created_at=NOW - dt.timedelta(days=days), user_id=None, user_name="u",
                     method="tools/call", server="s", tool=tool, arguments={}, is_error=False, outcome="ok")
    assert [r["tool"] for r in rows(store)] == ["old", "new"]
    store.run("prune", True, days=60).result(timeout=30)
    assert [r["tool"] for r in rows(store)] == ["new"]
    files = store.run("export", False, fmt="csv", out=str(tmp_path / "out")).result(timeout=30)["files"]
    assert str(tmp_path / "out" / "aibridge_mcp_calls.csv") in files


def test_a_store_of_the_previous_version_reads_empty_then_migrates(tmp_path, monkeypatch):
    import duckdb

    db = tmp_path / "v8.duckdb"
    conn = duckdb.connect(str(db))
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS", [x for x in schema.MIGRATIONS if x[0] <= 8])
        schema.migrate(conn)
    conn.close()
    assert gateway_client._local(db, "report", {"kind": "mcp_calls", "filters": {}})["data"] == []
    assert gateway_client._local(db, "report", {"kind": "mcp_summary", "filters": {}})["data"] == []
    out = tmp_path / "out"
    assert not any("mcp_calls" in f for f in gateway_client._local(db, "export", {"fmt": "csv", "out": str(out)})[
        "files"])
    gateway_client._local(db, "users.add", {"name": "now"})  # the first write migrates
    assert schema.migrate(duckdb.connect(str(db))) == []


def test_the_rate_limit_counts_per_person_apart_from_model_calls():
    c = config(budgets={"default": {"mcp_calls_per_minute": 2}, "users": {"free": {"requests_per_minute": 5}}})
    limit = McpCallLimit(c.budgets.default, c.budgets.users)
    assert limit.limit_for("anyone") == 2 and limit.limit_for("free") is None
    uid = str(uuid.uuid4())
    assert [limit.local(uid, 2) is None for _ in range(3)] == [True, True, False]
    assert limit.local(str(uuid.uuid4()), 2) is None
    assert McpCallLimit.counter_id(uid) != uid and McpCallLimit.counter_id(uid) == McpCallLimit.counter_id(uid)
    assert McpCallLimit.fleet(2, 2) is None and McpCallLimit.fleet(3, 2).retry_after >= 1


def test_tool_names_model_apis_refuse_are_shortened_stably_and_apart():
    from aibridge_gw.mcp.tools import model_tool_name

    assert model_tool_name("docs__search_issues", 49) == "docs__search_issues"  # fits: unchanged
    dotted = model_tool_name("docs__pages.read", 49)
    assert dotted.startswith("docs__pages_read_") and re.fullmatch(r"[A-Za-z0-9_-]+", dotted)
    a = model_tool_name("github__" + "a" * 60 + "_one", 49)
    b = model_tool_name("github__" + "a" * 60 + "_two", 49)
    assert len(a) == len(b) == 49 and a != b and a[:40] == b[:40] == ("github__" + "a" * 32)
    assert model_tool_name("github__" + "a" * 60 + "_one", 49) == a  # the same name always becomes the same
    assert len(model_tool_name("x" * 100)) == 64  # model APIs' own limit by default
    assert model_tool_name("ünïcode__tøøl", 49).isascii()
