"""Hostile requests (#22): no credential reaches a log line, `aibridge sql` cannot write or touch the file system,
and idle or slow connections cannot crowd out a legitimate client."""

from __future__ import annotations

import json
import os

import pytest

from aibridge_gw.store.ops import OpError
from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.wire import chat_completion

AUDIT_TABLES = ("aibridge_interceptions", "aibridge_token_usages", "aibridge_user_prompts", "aibridge_tool_usages",
                "aibridge_model_thoughts", "aibridge_users", "aibridge_tokens")


def _sql_attacks(tmp_path):
    copied = tmp_path / "copied.csv"
    return copied, [
        "EXPLAIN ANALYZE DELETE FROM aibridge_token_usages",
        "EXPLAIN ANALYZE UPDATE aibridge_users SET role = 'admin'",
        f"EXPLAIN ANALYZE COPY aibridge_users TO '{copied}'",
        f"COPY aibridge_users TO '{copied}'",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT content FROM read_blob('/etc/hostname')",
        "FROM '/etc/hostname'",
        "SELECT * FROM glob('/etc/*')",
        "WITH gone AS (DELETE FROM aibridge_token_usages RETURNING *) SELECT count(*) FROM gone",
        f"ATTACH '{tmp_path / 'other.duckdb'}' AS other",
        "SET enable_external_access = true",
        "SELECT * FROM aibridge_users; SET lock_configuration = false",
    ]


def _check_sql_is_contained(gw: Gateway, tmp_path, via_gateway: bool):
    cli = gw.cli
    before = {t: gw.sql(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in AUDIT_TABLES}
    copied, attacks = _sql_attacks(tmp_path)
    r = cli("sql", attacks[0])  # as the CLI says it: one line, exit 1
    assert r.returncode == 1 and "read-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for attack in attacks:  # the same operation, without a process per query
        with pytest.raises(OpError) as refused:
            gw.op("sql", query_text=attack)
        assert os.uname().nodename not in str(refused.value), attack
    assert not copied.exists() and not (tmp_path / "other.duckdb").exists()
    assert {t: gw.sql(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in AUDIT_TABLES} == before
    users = json.loads(cli("sql", "SELECT name, role FROM aibridge_users", "--json").stdout)
    assert not any(u["role"] == "admin" and u["name"] == "eve" for u in users)
    # Every audit table stays queryable by name, EXPLAIN ANALYZE of a read still works.
    assert gw.sql("SELECT count(*) AS n FROM " + " CROSS JOIN ".join(
        f"(SELECT count(*) AS n{i} FROM {t})" for i, t in enumerate(AUDIT_TABLES)))
    assert gw.op("sql", query_text="EXPLAIN ANALYZE SELECT count(*) FROM aibridge_interceptions")["rows"]
    # export keeps working.
    out = tmp_path / ("export-gw" if via_gateway else "export-file")
    r = cli("export", "--format", "csv", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "aibridge_users.csv").read_text().startswith("id,")
    assert "eve" in (out / "aibridge_users.csv").read_text()
    r = cli("export", "--format", "parquet", "--out", str(out / "pq"))
    assert r.returncode == 0 and (out / "pq" / "aibridge_interceptions.parquet").exists(), r.stderr


def test_sql_cannot_write_or_touch_files_through_a_running_gateway_or_on_the_file(own_gateway, tmp_path, mock):
    import httpx

    gw = own_gateway("sqlguard")
    token = gw.new_user("eve")
    mock.script(Reply.json(chat_completion()))
    r = httpx.post(gw.url + "/openai/v1/chat/completions", headers={"authorization": f"Bearer {token}"},
                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, trust_env=False)
    assert r.status_code == 200
    gw.interceptions("eve")
    _check_sql_is_contained(gw, tmp_path, via_gateway=True)
    gw.stop()
    _check_sql_is_contained(gw, tmp_path, via_gateway=False)
