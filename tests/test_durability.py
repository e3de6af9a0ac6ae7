"""Records survive a crash: kill -9 under load, restart, and every interception whose client got its answer is in
the database exactly once, finished, with its usage — even one answered a moment before the kill (the gateway
journals each record before the client's request goes on, and sends the journal again at the next start)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time

import duckdb
import httpx
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import chat_call, openai_client


def test_kill_9_under_load_loses_no_finished_interception(tmp_path, upstream):
    upstream.reset()
    cap = capture("openai/chatcompletions/simple.txtar")
    upstream.default = Reply.from_capture(cap, False)
    gw = Gateway(tmp_path / "durable", upstream.url).start()
    token = gw.new_user("durable")
    counter = itertools.count()
    finished: list[tuple[str, float]] = []
    stop = threading.Event()

    def worker():
        client = openai_client(gw, token)
        while not stop.is_set():
            model = f"dur-{next(counter)}"
            try:
                chat_call(client, {**cap.request, "model": model}, False)
                finished.append((model, time.monotonic()))
            except Exception:
                return  # the gateway is gone

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    gw.proc.send_signal(signal.SIGKILL)
    gw.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(10)
    assert len(finished) > 50

    gw.start()  # replays the spool
    try:
        rows = gw.sql("SELECT model, count(*) AS n FROM aibridge_interceptions WHERE model LIKE 'dur-%' GROUP BY model")
        counts = {r["model"]: r["n"] for r in rows}
        safe = [m for m, _ in finished]  # every call whose answer reached its client, up to the last
        assert safe and all(counts.get(m) == 1 for m in safe), [m for m in safe if counts.get(m) != 1][:5]
        assert all(n == 1 for n in counts.values())
        completed = gw.sql("SELECT count(*) AS n FROM aibridge_interceptions i JOIN aibridge_token_usages t "
                           "ON t.interception_id = i.id WHERE i.status = 'completed' AND i.model IN ("
                           + ",".join(f"'{m}'" for m in safe) + ")")
        assert completed[0]["n"] == len(safe), gw.sql(
            "SELECT i.model, i.status, i.error, (SELECT count(*) FROM aibridge_token_usages t WHERE t.interception_id = i.id) AS u "
            "FROM aibridge_interceptions i WHERE i.status <> 'completed' OR NOT EXISTS (SELECT 1 FROM aibridge_token_usages t "
            "WHERE t.interception_id = i.id)")  # finished, with usage rows, once each
        # Calls the kill cut off were started (journaled) and are ended failed, none left in progress.
        assert not gw.sql("SELECT id FROM aibridge_interceptions WHERE status = 'in_progress'")
    finally:
        gw.stop()
        upstream.reset()


def test_spooled_batch_not_yet_in_duckdb_is_replayed_once_at_start_up(tmp_path):
    """A crash after the spool fsync but before the DuckDB commit: the next start applies the batch once.
    The spool is data only (JSON lines, never pickle), private to the gateway's user, and a line torn by the
    crash is skipped. The batch has the row shapes of before migration 3 (an upgrade replays an older spool)."""
    import datetime as dt
    import stat

    from aibridge_gw.store.writer import EndInterception, Insert, Store, encode_batch

    db = tmp_path / "spool.duckdb"
    first = Store(db)
    first.open()  # create the schema, then simulate the crash below
    first.close()
    now = dt.datetime.now(dt.UTC)
    iid = "11111111-2222-4333-8444-555555555555"
    batch = [
        Insert("aibridge_interceptions", (iid, None, "openai", "openai", "gpt-4.1", "Unknown", None, None, None,
                                          None, "centralized", None, "in_progress", now, None, None, "openai.chat",
                                          False, None, None)),
        EndInterception(iid, ("completed", now, 200, None, "{}")),
    ]
    frame = encode_batch(batch)
    assert frame.startswith(b"[") and b"pickle" not in frame
    torn = encode_batch([batch[0]])
    spool = db.with_name(db.name + ".spool")
    spool.write_bytes(frame + b"\n" + torn[:10])
    for _ in range(2):  # a second start finds an empty spool and changes nothing
        store = Store(db)
        store.open()
        rows = store.read(lambda c: c.execute("SELECT CAST(id AS VARCHAR), status, http_status FROM aibridge_interceptions").fetchall()).result()
        store.close()
        assert rows == [(iid, "completed", 200)]
        assert spool.read_bytes() == b""
        assert stat.S_IMODE(spool.stat().st_mode) == 0o600 and stat.S_IMODE(db.stat().st_mode) == 0o600


def _store_processes(parent: int | None = None) -> list[tuple[int, int]]:
    """(pid, ppid) of running store writer processes (optionally only the children of `parent`)."""
    out = []
    for line in subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines():
        pid, ppid, args = line.split(None, 2)
        if "aibridge_gw.store.server" in args and (parent is None or int(ppid) == parent):
            out.append((int(pid), int(ppid)))
    return out


def test_the_store_is_its_own_process_and_outlives_a_killed_gateway_only_to_commit(tmp_path, upstream):
    """Recording's CPU is off the proxy's interpreter: a child process owns DuckDB. When the gateway is killed
    with -9, the child commits what it received, then exits by itself (no orphan) and frees the file."""
    upstream.reset()
    cap = capture("openai/chatcompletions/simple.txtar")
    upstream.default = Reply.from_capture(cap, False)
    gw = Gateway(tmp_path / "proc", upstream.url).start()
    token = gw.new_user("proc")
    children = _store_processes(gw.proc.pid)
    assert len(children) == 1, children
    child = children[0][0]
    client = openai_client(gw, token)
    for n in range(20):
        chat_call(client, {**cap.request, "model": f"proc-{n}"}, False)
    time.sleep(0.3)  # past the gateway's send window (records still in it die with the process, as before)
    gw.stop(signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(pid == child for pid, _ in _store_processes()):
        time.sleep(0.05)
    assert not any(pid == child for pid, _ in _store_processes()), "the store process outlived its gateway"
    con = duckdb.connect(str(gw.db), read_only=True)  # the file is free: nobody holds it any more
    try:
        rows = con.execute("SELECT count(*) FROM aibridge_interceptions WHERE model LIKE 'proc-%' "
                           "AND status = 'completed'").fetchone()
    finally:
        con.close()
    assert rows[0] == 20
    upstream.reset()


def test_the_store_process_answers_named_operations_and_keeps_their_errors(tmp_path):
    from aibridge_gw.store.ops import OpError
    from aibridge_gw.store.process import WriterProcess
    from aibridge_gw.store.reports import BadParameter

    store = WriterProcess(tmp_path / "named.duckdb")
    store.open()
    try:
        assert store.run("users.add", True, name="ann").result(10)["name"] == "ann"
        with pytest.raises(OpError, match="already exists"):
            store.run("users.add", True, name="ann").result(10)
        with pytest.raises(TypeError):
            store.run("users.add", True, nonsense=1).result(10)
        with pytest.raises(BadParameter) as e:
            store.run("admin_query", route="usage", viewer=None, filters={}, group_by="nope").result(10)
        assert e.value.name == "group_by"
        assert store.run("directory").result(10) == []
        store.flush().result(10)
    finally:
        store.close()
    assert store._proc.returncode == 0
    with pytest.raises(RuntimeError, match="store process is gone"):
        store.run("users.list").result(10)


def test_a_store_process_that_dies_is_restarted_and_recording_goes_on(tmp_path, upstream):
    """A crashed or OOM-killed writer is replaced (it replays the spool the dead one left), and healthz is back
    to ok once the replacement has the file open."""
    upstream.reset()
    cap = capture("openai/chatcompletions/simple.txtar")
    upstream.default = Reply.from_capture(cap, False)
    gw = Gateway(tmp_path / "gone", upstream.url).start()

    def health() -> tuple[int, str]:
        r = httpx.get(gw.url + "/aibridge/healthz", trust_env=False)
        return r.status_code, r.json()["status"]

    try:
        token = gw.new_user("phoenix")
        assert health() == (200, "ok")
        (child, _), = _store_processes(gw.proc.pid)
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if health() == (200, "ok") and [p for p, _ in _store_processes(gw.proc.pid)] not in ([], [child]):
                break
            time.sleep(0.02)
        (replacement, _), = _store_processes(gw.proc.pid)
        assert replacement != child
        deadline = time.monotonic() + 10  # ok once the replacement has the file open (a loaded machine may lag)
        while health() != (200, "ok"):
            assert time.monotonic() < deadline, httpx.get(gw.url + "/aibridge/healthz", trust_env=False).text
            time.sleep(0.05)
        chat_call(openai_client(gw, token), {**cap.request, "model": "after-restart"}, False)
        ic, = gw.interceptions("phoenix")
        assert (ic["model"], ic["status"]) == ("after-restart", "completed")
    finally:
        gw.stop()
        upstream.reset()


def test_a_journal_line_cut_short_by_a_kill_spoils_nothing_else(tmp_path, upstream):
    """A kill in the middle of a journal write leaves half a line: it is skipped, the whole lines before it are
    sent again, and the next records start on a line of their own."""
    upstream.reset()
    cap = capture("openai/chatcompletions/simple.txtar")
    upstream.default = Reply.from_capture(cap, False)
    gw = Gateway(tmp_path / "cut", upstream.url).start()
    token = gw.new_user("cut")
    client = openai_client(gw, token)
    chat_call(client, {**cap.request, "model": "cut-before"}, False)
    journal = gw.db.with_name(gw.db.name + ".journal")
    gw.stop(signal.SIGKILL)
    whole = journal.read_bytes()
    assert b"cut-before" in whole
    journal.write_bytes(whole + b'["i","aibridge_interceptions",["half a li')
    gw.start()
    try:
        chat_call(openai_client(gw, token), {**cap.request, "model": "cut-after"}, False)
        rows = gw.wait_for("SELECT model, status FROM aibridge_interceptions WHERE model LIKE 'cut-%' ORDER BY model",
                           lambda rows: len(rows) == 2 and all(r["status"] == "completed" for r in rows))
        assert [r["model"] for r in rows] == ["cut-after", "cut-before"]
        assert "skipped an unreadable line" in gw.log()
    finally:
        gw.stop()
        upstream.reset()


def test_a_writer_killed_under_load_loses_no_answered_call(tmp_path, upstream):
    """kill -9 of the store process while calls flow: the gateway starts another (it replays the dead one's spool)
    and sends its journal again; every call whose client got its answer is recorded once, completed, with usage."""
    upstream.reset()
    cap = capture("openai/chatcompletions/simple.txtar")
    upstream.default = Reply.from_capture(cap, False)
    gw = Gateway(tmp_path / "writer-kill", upstream.url).start()
    try:
        token = gw.new_user("wk")
        counter = itertools.count()
        answered: list[str] = []
        stop = threading.Event()

        def worker():
            client = openai_client(gw, token)
            while not stop.is_set():
                model = f"wk-{next(counter)}"
                chat_call(client, {**cap.request, "model": model}, False)
                answered.append(model)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        (child, _), = _store_processes(gw.proc.pid)
        os.kill(child, signal.SIGKILL)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(10)
        assert len(answered) > 40 and all(not t.is_alive() for t in threads)
        rows = gw.wait_for(
            "SELECT i.model, count(DISTINCT i.id) AS n, count(t.id) AS u FROM aibridge_interceptions i JOIN "
            "aibridge_token_usages t ON t.interception_id = i.id WHERE i.model LIKE 'wk-%' AND i.status = "
            "'completed' GROUP BY i.model", lambda rows: len(rows) >= len(answered), timeout=20)
        assert sorted(r["model"] for r in rows) == sorted(answered)
        assert all(r["n"] == 1 and r["u"] == 1 for r in rows)
    finally:
        gw.stop()
        upstream.reset()
