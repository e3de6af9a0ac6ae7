"""`scripts/run --workers N`: N real mitmdump workers on one port (SO_REUSEPORT), recording through one shared
DuckDB writer (or each into PostgreSQL): every call recorded once whichever worker served it, one budget and one
token directory for all, and a killed worker costs nothing the others served."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import time

import httpx
import psycopg
import pytest

from tests.support.gateway import ROOT, Gateway
from tests.support.mock_upstream import Reply
from tests.support.wire import anthropic_message

BODY = {"model": "claude-sonnet-4-0", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def _call(gw: Gateway, token: str, prompt: str = "hi") -> int:
    body = {**BODY, "messages": [{"role": "user", "content": prompt}]}
    # A new connection each time: the kernel picks a worker per connection.
    return httpx.post(gw.url + "/anthropic/v1/messages", json=body, headers={"x-api-key": token},
                      trust_env=False, timeout=30).status_code


def _served_before(gw: Gateway, user: str) -> tuple[str, list[str]]:
    """A new user's token known to every worker, and six calls made with it (their prompts)."""
    token = gw.new_user(user)
    _known_everywhere(gw, token)
    before = [f"before {n}" for n in range(6)]
    assert [_call(gw, token, p) for p in before] == [200] * 6
    return token, before


def _known_everywhere(gw: Gateway, token: str) -> None:
    """A token made with the CLI reaches the worker that answered at once, the others within a second."""
    deadline = time.monotonic() + 10
    while [_call(gw, token, "probe") for _ in range(8)] != [200] * 8:
        assert time.monotonic() < deadline, "a worker never learned the new token"
        time.sleep(0.2)


@pytest.fixture
def workers(tmp_path, mock):
    started: list[Gateway] = []

    def start(**kw) -> Gateway:
        gw = Gateway(tmp_path / f"w{len(started)}", mock.url, workers=2, **kw)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


def test_two_workers_share_one_port_and_one_duckdb_audit(workers, mock):
    gw = workers()
    assert len(set(gw.workers_answering().values())) == 2  # two processes answer on the one port
    token = gw.new_user("many")  # through the runtime file the supervisor wrote: any worker may answer
    mock.default = Reply.json(anthropic_message("from a worker", (11, 5)))
    _known_everywhere(gw, token)
    prompts = [f"call {n}" for n in range(24)]
    assert [_call(gw, token, p) for p in prompts] == [200] * 24
    rows = gw.wait_for(
        "SELECT CAST(i.id AS VARCHAR) AS id, p.prompt, u.input_tokens, u.output_tokens FROM aibridge_interceptions i "
        "JOIN aibridge_user_prompts p ON p.interception_id = i.id JOIN aibridge_token_usages u "
        "ON u.interception_id = i.id WHERE i.status = 'completed' AND p.prompt <> 'probe'", lambda rows: len(rows) >= 24)
    assert sorted(r["prompt"] for r in rows) == sorted(prompts)  # each call once
    assert len({r["id"] for r in rows}) == 24
    assert {(r["input_tokens"], r["output_tokens"]) for r in rows} == {(11, 5)}


def test_a_token_revoked_with_the_cli_is_refused_by_every_worker(workers, mock):
    gw = workers()
    token = gw.new_user("revoked")
    mock.default = Reply.json(anthropic_message("ok", (3, 2)))
    _known_everywhere(gw, token)
    tid = gw.op("tokens.list", user="revoked")["rows"][0][0]
    gw.op("tokens.revoke", id=tid)
    deadline = time.monotonic() + 10
    while [_call(gw, token) for _ in range(8)] != [401] * 8:
        assert time.monotonic() < deadline, "a worker still takes the revoked token"
        time.sleep(0.2)


def test_requests_per_minute_hold_across_workers(workers, mock):
    gw = workers(extra={"budgets": {"users": {"capped": {"requests_per_minute": 5}}}})
    probe, capped = gw.new_user("probe"), gw.new_user("capped")
    mock.default = Reply.json(anthropic_message("ok", (3, 2)))
    _known_everywhere(gw, probe)
    time.sleep(1.5)  # every worker's next reload has `capped` too (probing with it would spend its budget)
    assert len(gw.workers_answering()) == 2
    while dt.datetime.now(dt.UTC).second > 45:  # every call within one minute window
        time.sleep(1)
    assert [_call(gw, capped) for _ in range(8)] == [200] * 5 + [429] * 3


def test_a_killed_worker_is_restarted_and_loses_nothing_the_other_served(workers, mock):
    """Not even what the killed worker itself answered a moment before: its journal goes to the writer again
    when the supervisor restarts it."""
    gw = workers()
    mock.default = Reply.json(anthropic_message("ok", (11, 5)))
    token, before = _served_before(gw, "survivor")
    victim_number, victim = sorted(gw.workers_answering().items())[0]
    import os

    last = [f"last {n}" for n in range(6)]
    assert [_call(gw, token, p) for p in last] == [200] * 6  # some answered by the victim, just now
    os.kill(victim, signal.SIGKILL)
    before += last
    # Until the supervisor restarts it, connections the kernel gives the dead worker's socket are refused or
    # reset; the other worker serves every connection it accepts.
    after, served = [], 0
    deadline = time.monotonic() + 20
    while served < 6:
        assert time.monotonic() < deadline, "the surviving worker stopped serving"
        prompt = f"after {len(after)}"
        try:
            if _call(gw, token, prompt) == 200:
                after.append(prompt)
                served += 1
        except httpx.TransportError:
            pass
    deadline = time.monotonic() + 20
    while True:  # the supervisor started the worker again, with a new pid
        answering = gw.workers_answering()
        if answering.get(victim_number) not in (None, victim) and len(answering) == 2:
            break
        assert time.monotonic() < deadline, f"worker {victim_number} was not restarted: {answering}"
        time.sleep(0.2)
    rows = gw.wait_for("SELECT p.prompt FROM aibridge_user_prompts p JOIN aibridge_interceptions i "
                       "ON i.id = p.interception_id WHERE i.status = 'completed' AND p.prompt <> 'probe'",
                       lambda rows: len(rows) >= len(before) + len(after))
    assert sorted(r["prompt"] for r in rows) == sorted(before + after)
    assert "worker 1" in gw.log() or "worker 2" in gw.log()


def test_stopping_the_supervisor_commits_every_workers_records(workers, mock):
    gw = workers()
    token = gw.new_user("graceful")
    mock.default = Reply.json(anthropic_message("ok", (11, 5)))
    _known_everywhere(gw, token)
    assert [_call(gw, token, f"c{n}") for n in range(10)] == [200] * 10
    db = gw.db
    assert gw.stop() == 0
    assert not db.with_name(db.name + ".gateway.json").exists()
    # The file is free (the writer exited) and holds every call: the CLI opens it directly now.
    rows = gw.sql("SELECT p.prompt FROM aibridge_interceptions i JOIN aibridge_user_prompts p "
                  "ON p.interception_id = i.id WHERE i.status = 'completed' AND p.prompt LIKE 'c%'")
    assert sorted(r["prompt"] for r in rows) == sorted(f"c{n}" for n in range(10))


def test_workers_on_postgresql_keep_one_audit(workers, mock, tmp_path):
    from tests.support.postgres import Cluster

    cluster = Cluster().start()
    try:
        dsn = cluster.create_database("workers")
        gw = workers(extra={"storage": {"duckdb": str(tmp_path / "spools" / "a.duckdb"), "postgres": dsn}})
        token = gw.new_user("pgworkers")
        mock.default = Reply.json(anthropic_message("ok", (7, 4)))
        _known_everywhere(gw, token)
        assert [_call(gw, token, f"pg {n}") for n in range(12)] == [200] * 12
        deadline = time.monotonic() + 10
        with psycopg.connect(dsn) as conn:
            while True:
                prompts = sorted(r[0] for r in conn.execute(
                    "SELECT p.prompt FROM aibridge_user_prompts p JOIN aibridge_interceptions i "
                    "ON i.id = p.interception_id WHERE i.status = 'completed' AND p.prompt LIKE 'pg %'").fetchall())
                if len(prompts) >= 12 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        assert prompts == sorted(f"pg {n}" for n in range(12))
        spools = sorted(p.name for p in (tmp_path / "spools").iterdir() if p.name.startswith("postgres-"))
        assert any(s.endswith("-w1.spool") for s in spools) and any(s.endswith("-w2.spool") for s in spools), spools
    finally:
        cluster.stop()


def test_workers_refuse_a_port_already_in_use(tmp_path, mock):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        gw = Gateway(tmp_path, mock.url)
        r = subprocess.run([sys.executable, "-m", "aibridge_gw.workers", "2", "--listen-host",
                            "127.0.0.1", "--listen-port", str(port), "--set", f"aibridge_config={gw.config_path}"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and f"port {port} is in use" in r.stderr


def test_scripts_run_refuses_a_bad_worker_count():
    r = subprocess.run([str(ROOT / "scripts" / "run"), "--workers", "two"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--workers takes a number" in r.stderr


def test_metrics_add_up_every_workers_counts_whichever_worker_is_scraped(workers, mock):
    gw = workers()
    token = gw.new_user("counted")
    mock.default = Reply.json(anthropic_message("ok", (11, 5)))
    _known_everywhere(gw, token)  # 8 calls with the prompt "probe"
    assert [_call(gw, token, f"m{n}") for n in range(12)] == [200] * 12
    gw.wait_for("SELECT * FROM aibridge_interceptions WHERE status = 'completed'", lambda rows: len(rows) >= 20)
    time.sleep(0.5)
    completed = len(gw.sql("SELECT id FROM aibridge_interceptions WHERE status = 'completed'"))
    import re

    totals = set()
    for _ in range(8):  # fresh connections: several workers answer
        text = httpx.get(gw.url + "/aibridge/metrics", trust_env=False, timeout=10).text
        found = re.findall(r'^aibridge_interceptions_total\{[^}]*status="completed"[^}]*\} ([\d.]+)$', text, re.M)
        totals.add(sum(float(x) for x in found))
        tokens = re.findall(r'^aibridge_tokens_total\{[^}]*type="input"[^}]*\} ([\d.]+)$', text, re.M)
        assert sum(float(x) for x in tokens) == completed * 11
    assert totals == {float(completed)}  # every call counted once, the same answer from every worker


def test_a_killed_shared_writer_is_restarted_and_the_workers_record_through_the_new_one(workers, mock):
    """The one DuckDB writer dies (`kill -9`): the supervisor starts another, which replays the spool the dead one
    left; workers reconnect and keep recording. What it had committed or spooled is kept."""
    import os

    gw = workers()
    mock.default = Reply.json(anthropic_message("ok", (11, 5)))
    token, before = _served_before(gw, "rewritten")
    gw.wait_for("SELECT * FROM aibridge_user_prompts WHERE prompt LIKE 'before%'", lambda rows: len(rows) == 6)
    writer = int(subprocess.run(["pgrep", "-f", f"aibridge_gw.store.server {gw.db}"], capture_output=True,
                                text=True).stdout.split()[0])
    os.kill(writer, signal.SIGKILL)
    after = [f"after {n}" for n in range(6)]
    assert [_call(gw, token, p) for p in after] == [200] * 6  # serving never depended on the writer being up
    from aibridge_gw.store.ops import OpError

    deadline = time.monotonic() + 30
    while True:  # queries answer again once the worker that takes them has reconnected
        try:
            gw.sql("SELECT 1")
            break
        except OpError:
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.2)
    rows = gw.wait_for("SELECT p.prompt FROM aibridge_user_prompts p JOIN aibridge_interceptions i "
                       "ON i.id = p.interception_id WHERE i.status = 'completed' AND p.prompt <> 'probe'",
                       lambda rows: len(rows) >= 12, timeout=30)
    assert sorted(r["prompt"] for r in rows) == sorted(before + after)
    assert "the store process exited" in gw.log()


def test_proxy_mode_through_workers_every_tunnel_is_intercepted_with_the_one_ca(tmp_path):
    """HTTPS_PROXY through `--workers 2`: each CONNECT lands on some worker, which decrypts it with the CA the
    supervisor created once before starting them, and records the call."""
    import anthropic

    from tests.support.gateway import UPSTREAM_ANTHROPIC_KEY
    from tests.support.tls import client_context, tls_stand_in

    upstream = tls_stand_in(tmp_path / "upstream", ["127.0.0.1"])
    providers = [{"name": "anthropic", "type": "anthropic", "base_url": upstream.url + "/",
                  "key": UPSTREAM_ANTHROPIC_KEY, "hosts": ["api.anthropic.com"]}]
    gw = Gateway(tmp_path / "gw", upstream.url, providers=providers, workers=2,
                 extra={"proxy": {"allow_addresses": ["localhost"]}},
                 args=["--set", f"ssl_verify_upstream_trusted_ca={upstream.ca}"])
    try:
        gw.start()
        token = gw.new_user("tunnelled")
        time.sleep(1.5)  # every worker has the new token
        upstream.default = Reply.json(anthropic_message("decrypted", (9, 4)))
        answers = []
        for n in range(8):  # a new client, so a new tunnel, each time
            client = anthropic.Anthropic(base_url="https://api.anthropic.com", api_key=token, max_retries=0,
                                         http_client=anthropic.DefaultHttpxClient(proxy=gw.url,
                                                                                  verify=client_context(gw.ca)))
            msg = client.messages.create(model="claude-sonnet-4-0", max_tokens=5,
                                         messages=[{"role": "user", "content": f"tunnel {n}"}])
            answers.append(msg.content[0].text)
        assert answers == ["decrypted"] * 8
        rows = gw.wait_for("SELECT p.prompt FROM aibridge_user_prompts p JOIN aibridge_interceptions i "
                           "ON i.id = p.interception_id WHERE i.status = 'completed'", lambda rows: len(rows) >= 8)
        assert sorted(r["prompt"] for r in rows) == [f"tunnel {n}" for n in range(8)]
    finally:
        gw.stop()
        upstream.stop()


def test_aibridge_keys_lists_and_resets_every_workers_key_pool(workers, mock):
    """Key pools are per worker; `aibridge keys` reaches whichever worker answers and still shows and resets
    every worker's keys."""
    import json

    bad, good = "sk-ant-pool-key-one-AAAA", "sk-ant-pool-key-two-BBBB"
    gw = workers(providers=[{"name": "anthropic", "type": "anthropic", "base_url": mock.url + "/",
                             "keys": [bad, good]}])
    token = gw.new_user("pooled")
    refused = {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}

    def check(seen):
        if seen.headers.get("x-api-key") == bad:
            return Reply(401, {"content-type": "application/json"}, json.dumps(refused).encode())
        return None

    mock.check = check
    mock.default = Reply.json(anthropic_message("ok", (3, 2)))
    _known_everywhere(gw, token)  # eight calls, over both workers: each fails over from the bad key itself

    def states() -> dict:
        r = gw.cli("keys", "list", "--json")
        assert r.returncode == 0, r.stderr
        return {(row["worker"], row["key"]): row["state"] for row in json.loads(r.stdout)}

    deadline = time.monotonic() + 10
    while states() != {(1, "sk-a…AAAA"): "disabled", (1, "sk-a…BBBB"): "ready",
                       (2, "sk-a…AAAA"): "disabled", (2, "sk-a…BBBB"): "ready"}:
        assert time.monotonic() < deadline, states()
        time.sleep(0.3)
    mock.check = None
    r = gw.cli("keys", "reset")
    assert r.returncode == 0 and "every other worker" in r.stdout, r.stdout + r.stderr
    deadline = time.monotonic() + 10
    while set(states().values()) != {"ready"}:
        assert time.monotonic() < deadline, states()
        time.sleep(0.3)


def test_a_group_budget_stops_a_member_across_workers_and_notifies_once(workers, mock):
    """budgets.groups.team: 100 tokens a day per member (5 tokens a call); thresholds 85 % and 100 %. The member's
    calls, spread over both workers, are refused once the fleet's total reaches the limit (within a refresh of the
    shared counters), and each threshold's webhook POST is sent exactly once, whichever worker saw it."""
    from tests.test_budgets import _Webhook

    hook = _Webhook()
    try:
        gw = workers(extra={"budgets": {"groups": {"team": {"tokens_per_day": 100}}},
                            "notifications": {"webhook": hook.url}})
        probe, member = gw.new_user("probe"), gw.new_user("member")
        gw.op("users.groups_set", name="member", groups="team")
        mock.default = Reply.json(anthropic_message("ok", (3, 2)))
        _known_everywhere(gw, probe)
        time.sleep(1.5)  # every worker's directory has `member` and its group
        answers = []
        deadline = time.monotonic() + 40
        while 429 not in answers[-1:]:
            assert time.monotonic() < deadline, "the group budget never stopped the member"
            answers.append(_call(gw, member))
            time.sleep(0.25)
        served = answers.count(200)
        assert 20 <= served <= 20 + 12  # 100 tokens at 5 a call; at most a couple of refreshes' worth over
        time.sleep(2.5)  # both workers have the fleet's totals now
        assert [_call(gw, member) for _ in range(8)] == [429] * 8
        time.sleep(3)
        notices = sorted((b["threshold"], b["group"], b["user"]) for b in hook.bodies)
        assert notices == [(0.85, "team", "member"), (1.0, "team", "member")]
        assert all("group team" in b["text"] for b in hook.bodies)
    finally:
        hook.server.shutdown()
