"""Start-up, graceful shutdown and secrets hygiene of the gateway process."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess

import duckdb
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import ROOT, UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY, Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, anthropic_client, chat_call, openai_client


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_flushes_every_finished_interception(tmp_path, upstream, sig):
    upstream.reset()
    gw = Gateway(tmp_path / "gw", upstream.url).start()
    try:
        token = gw.new_user("flush")
        cap = capture("openai/chatcompletions/simple.txtar")
        n = 40
        upstream.script(*[Reply.from_capture(cap, i % 2 == 0) for i in range(n)])
        client = openai_client(gw, token)
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: chat_call(client, cap.request, i % 2 == 0), range(n)))
    finally:
        assert gw.stop(sig) == 0
    assert not gw.db.with_name(gw.db.name + ".gateway.json").exists()
    conn = duckdb.connect(str(gw.db), read_only=True)
    try:
        rows = conn.execute(
            "SELECT status, count(*) FROM aibridge_interceptions GROUP BY status"
        ).fetchall()
        assert rows == [("completed", n)]
        assert conn.execute("SELECT count(*) FROM aibridge_token_usages").fetchone()[0] == n
        assert conn.execute("SELECT count(*) FROM aibridge_user_prompts").fetchone()[0] == n
    finally:
        conn.close()
    upstream.reset()


def test_no_secret_in_logs_or_database(tmp_path, upstream):
    upstream.reset()
    gw = Gateway(tmp_path / "gw", upstream.url).start()
    try:
        token = gw.new_user("secrets")
        cap = capture("anthropic/simple.txtar")
        upstream.script(Reply.from_capture(cap, True), Reply.from_capture(cap, False))
        anthropic_call(anthropic_client(gw, token), cap.request, True)
        anthropic_call(anthropic_client(gw, token), cap.request, False)
        with pytest.raises(Exception):
            anthropic_call(anthropic_client(gw, token + "x"), cap.request, False)
        gw.interceptions("secrets", 2)
    finally:
        gw.stop()
    log = gw.log()
    assert "interception" in log  # the gateway does log each interception...
    for secret in (token, UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY):
        assert secret not in log  # ...but never a credential
    conn = duckdb.connect(str(gw.db), read_only=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        assert "aibridge_tokens" in tables and "aibridge_interceptions" in tables
        for table in tables:
            dump = repr(conn.execute(f"SELECT * FROM {table}").fetchall())
            for secret in (token, UPSTREAM_ANTHROPIC_KEY, UPSTREAM_OPENAI_KEY):
                assert secret not in dump, table
    finally:
        conn.close()
    upstream.reset()


def test_bad_config_stops_start_up_with_a_clear_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("providers:\n  - name: x\n    type: palm\n    base_url: https://example.invalid/\n")
    mitmdump = os.path.join(os.path.dirname(os.sys.executable), "mitmdump")
    r = subprocess.run(
        [mitmdump, "-s", str(ROOT / "addons" / "aibridge.py"), "--listen-host", "127.0.0.1", "--listen-port", "0",
         "--set", f"aibridge_config={cfg}", "--set", f"confdir={tmp_path / 'certs'}"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    assert "providers[0].type: 'palm' is not a provider type (one of anthropic, openai, gemini, copilot, bedrock, chatgpt)" in (
        r.stdout + r.stderr)


def test_scripts_run_passes_arguments_to_mitmdump():
    r = subprocess.run([str(ROOT / "scripts" / "run"), "--version"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Mitmproxy: 12.2" in r.stdout
