"""The writer holds records through faults of its store (fast tier: an in-process `Store`, faults injected where
the database answers): nothing is dead-lettered for a fault of the store, held records are committed in order
once it is back, survive a shutdown in the spool, wait on disk past the memory bound, and the journal keeps the
start of every call in flight across rotations."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import duckdb
import pytest
from aibridge_gw.store import codec, deadletters, writer
from aibridge_gw.store.process import WriterProcess
from aibridge_gw.store.rows import INTERCEPTIONS, USERS, interception_end
from aibridge_gw.store.writer import Store


def _start(iid: str, uid: str):
    return INTERCEPTIONS.row(id=iid, initiator_id=uid, provider="openai", provider_name="openai", model="m",
                             client="test", credential_kind="central", status="in_progress", started_at=dt.datetime.now(dt.UTC), api="chat")


def _end(iid: str):
    return interception_end(iid, status="completed", ended_at=dt.datetime.now(dt.UTC), http_status=200, error=None,
                            metadata="{}")


def _count(store: Store, sql: str) -> int:
    return store.read(lambda c: c.execute(sql).fetchone()[0]).result(10)


class DiskFull:
    """`Store._apply` fails as DuckDB does on a full disk while `on` is set."""

    def __init__(self, monkeypatch) -> None:
        self.on = True
        self.calls = 0
        apply = Store._apply

        def failing(store, batch, tolerant=False):
            self.calls += 1
            if self.on:
                raise duckdb.TransactionException('Failed to commit: Could not write file "x.wal": No space left on '
                                                  'device')
            return apply(store, batch, tolerant)

        monkeypatch.setattr(Store, "_apply", failing)


def _failing_store(path, monkeypatch, **kw) -> tuple[Store, "DiskFull", str]:
    """An open store whose disk is full (until the fault is switched off), and a user id submitted to it."""
    store = Store(path, **kw)
    store.open()
    fault = DiskFull(monkeypatch)
    uid = str(uuid.uuid4())
    store.submit(USERS.row(id=uid, name="u", role="member", created_at=dt.datetime.now(dt.UTC)))
    return store, fault, uid


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def fast_retry(monkeypatch):
    monkeypatch.setattr(writer, "RETRY_FIRST", 0.05)
    monkeypatch.setattr(writer, "RETRY_MAX", 0.2)
    monkeypatch.setattr(writer, "IDLE_PROBE", 0.1)


def test_a_full_disk_holds_records_and_they_are_committed_in_order_when_it_clears(tmp_path, monkeypatch, fast_retry):
    store, fault, uid = _failing_store(tmp_path / "a.duckdb", monkeypatch)
    ids = [str(uuid.uuid4()) for _ in range(50)]
    for iid in ids:
        store.submit(_start(iid, uid))
    assert _wait(lambda: not store.up)
    for iid in ids:  # ends arrive while their starts are held: they must be applied after them
        store.submit(_end(iid))
    assert _wait(lambda: store.backlog == 101), store.state
    assert store.state["reason"] == "disk full" and store.state["since"] is not None
    assert store.dead_lettered == 0 and not store.dead_letter_path.exists()
    assert store.spool_path.stat().st_size > 0  # held records are in the spool too
    with pytest.raises(writer.StoreUnavailable):
        store.flush().result(5)  # a flush never claims records are committed while they are held
    fault.on = False
    assert _wait(lambda: store.backlog == 0 and store.up), store.state
    store.flush().result(5)
    assert _count(store, "SELECT count(*) FROM aibridge_interceptions WHERE status = 'completed'") == 50
    assert store.spool_path.stat().st_size == 0  # emptied once everything in it is committed
    store.close()


def test_records_held_at_shutdown_stay_in_the_spool_and_the_next_start_commits_them(tmp_path, monkeypatch,
                                                                                     fast_retry):
    db = tmp_path / "b.duckdb"
    store, fault, uid = _failing_store(db, monkeypatch)
    iid = str(uuid.uuid4())
    store.submit(_start(iid, uid))
    store.submit(_end(iid))
    assert _wait(lambda: store.backlog == 3)
    store.close()
    assert store.backlog == 3 and db.with_name(db.name + ".spool").stat().st_size > 0
    fault.on = False
    again = Store(db)
    again.open()
    assert _count(again, "SELECT count(*) FROM aibridge_interceptions WHERE status = 'completed'") == 1
    again.close()


def test_past_the_memory_bound_spooled_batches_wait_on_disk_and_keep_their_order(tmp_path, monkeypatch, fast_retry):
    store, fault, uid = _failing_store(tmp_path / "c.duckdb", monkeypatch, backlog_max_bytes=2000)
    ids = [str(uuid.uuid4()) for _ in range(40)]
    for iid in ids:
        store.submit(_start(iid, uid))
        time.sleep(0.002)
    assert _wait(lambda: store.backlog == 41)
    for iid in ids:
        store.submit(_end(iid))
    assert _wait(lambda: store.backlog == 81)
    assert any(entry[0] == "disk" for entry in store._held)  # memory full: the rest waits in the spool only
    assert store.backlog_bytes <= 2000 + 256 * 50
    fault.on = False
    assert _wait(lambda: store.backlog == 0), store.state
    assert _count(store, "SELECT count(*) FROM aibridge_interceptions WHERE status = 'completed'") == 40
    assert store.lost == 0
    store.close()


def test_with_the_spool_unwritable_too_records_beyond_memory_are_counted_lost(tmp_path, monkeypatch, fast_retry):
    store = Store(tmp_path / "d.duckdb", backlog_max_bytes=600)
    store.open()
    DiskFull(monkeypatch)
    monkeypatch.setattr(Store, "_spool_append", lambda self, data: (self._spool_trouble(OSError(28, "No space left "
                                                                                                 "on device")), None)[1])
    monkeypatch.setattr(writer, "has_room", lambda directory: False)
    uid = str(uuid.uuid4())
    for n in range(20):
        store.submit(_start(str(uuid.uuid4()), uid))
        time.sleep(0.15)  # one batch per record
    assert _wait(lambda: store.lost > 0)
    assert store.state["spool"] == "disk full" and store.backlog >= 1
    store._held.clear()  # the fault never clears in this test: let close() finish at once
    store.backlog = 0
    store.close()


def test_a_record_refused_as_data_is_dead_lettered_and_replay_applies_only_what_the_store_takes(tmp_path):
    store = Store(tmp_path / "e.duckdb")
    store.open()
    store.submit(USERS.row(id=str(uuid.uuid4()), name=None, role="member", created_at=dt.datetime.now(dt.UTC)))
    store.flush().result(5)
    assert store.dead_lettered == 1 and store.up  # the database's verdict on the data, not a fault of the store
    good = str(uuid.uuid4())  # dead-lettered earlier for a cause since fixed (written as the writer writes them)
    deadletters.append(store.dead_letter_path, json.dumps(
        {"at": "2026-12-01T00:00:00+00:00", "error": "fixed since", "record": writer._encode(
            USERS.row(id=good, name="back", role="member", created_at=dt.datetime.now(dt.UTC)))},
        default=writer._datetime).encode() + b"\n")

    def apply(record):
        from aibridge_gw.store.ops import apply_record

        store.call(lambda conn: apply_record(conn, record)).result(5)

    first = deadletters.replay(store.dead_letter_path, apply)
    assert (first["entries"], first["applied"], first["kept"]) == (2, 1, 1)
    assert "NOT NULL" in first["errors"][0]  # still refused: it stays in the file
    assert _count(store, f"SELECT count(*) FROM aibridge_users WHERE id = '{good}'") == 1
    second = deadletters.replay(store.dead_letter_path, apply)
    assert (second["entries"], second["applied"], second["kept"]) == (1, 0, 1)
    apply(writer._encode(USERS.row(id=good, name="back", role="member", created_at=dt.datetime.now(dt.UTC))))
    assert _count(store, f"SELECT count(*) FROM aibridge_users WHERE id = '{good}'") == 1  # idempotent
    store.close()


def test_the_journal_keeps_the_start_of_every_call_in_flight_across_rotations(tmp_path, monkeypatch):
    from aibridge_gw.store import process

    monkeypatch.setattr(process, "JOURNAL_ROTATE_SECONDS", 0.0)
    db = tmp_path / "j.duckdb"
    wp = WriterProcess(db, journal=tmp_path / "j.journal")
    wp.open()
    uid = str(uuid.uuid4())
    open_call, done_call = str(uuid.uuid4()), str(uuid.uuid4())
    wp.submit(USERS.row(id=uid, name="u", role="member", created_at=dt.datetime.now(dt.UTC)))
    wp.submit(_start(open_call, uid))
    wp.submit(_start(done_call, uid))
    wp.submit(_end(done_call))
    for _ in range(4):  # several rotations, each deleting the old part once its flush confirms the commit
        wp.flush().result(10)
        wp._rotate_journal()
        assert _wait(lambda: not wp._journal_flushing)
        wp.submit(USERS.row(id=str(uuid.uuid4()), name=f"x{_}", role="member", created_at=dt.datetime.now(dt.UTC)))
    kinds = [json.loads(line) for line in wp._journal_lines()]
    starts = {k[2][0] for k in kinds if k[0] == "i" and k[1] == "aibridge_interceptions"}
    assert open_call in starts and done_call not in starts
    wp.close()


def test_health_readiness_and_metrics_report_the_store(gateway):
    import httpx

    health = httpx.get(gateway.url + "/aibridge/healthz", trust_env=False)
    body = health.json()
    assert health.status_code == 200 and body["status"] == "ok" and body["reasons"] == []
    assert body["store"] == {"up": True, "reason": None, "since": None, "backlog": 0, "refusing": False}
    assert {"inflight", "pid", "worker"} <= body.keys()
    ready = httpx.get(gateway.url + "/aibridge/readyz", trust_env=False)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = httpx.get(gateway.url + "/aibridge/metrics", trust_env=False).text
    assert "\naibridge_store_up 1.0" in metrics and "\naibridge_records_backlog 0.0" in metrics
    assert "\naibridge_records_dead_lettered_total 0.0" in metrics


def test_storage_failure_settings_are_checked(tmp_path):
    from aibridge_gw.config import ConfigError, parse_config

    ok = parse_config({"storage": {"on_failure": "refuse", "refuse_after_seconds": 2, "backlog_max_mb": 64}})
    assert (ok.storage.on_failure, ok.storage.refuse_after_seconds, ok.storage.backlog_max_mb) == ("refuse", 2.0, 64)
    assert parse_config({}).storage.on_failure == "serve"
    for bad in ({"on_failure": "drop"}, {"backlog_max_mb": 0}, {"refuse_after_seconds": -1},
                {"backlog_max_mb": "lots"}):
        with pytest.raises(ConfigError):
            parse_config({"storage": bad})


def test_a_journal_nobody_will_reopen_is_adopted_by_the_next_process_beside_it(tmp_path):
    """A worker that is gone for good (the group restarted with fewer workers) left a journal: the next gateway
    process of the same database sends its records and ends its unfinished calls; a live process's journal (its
    lock held) and another database's are left alone."""
    db = tmp_path / "adopt.duckdb"
    uid, done, cut = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    lines = [json.dumps(writer._encode(r), separators=(",", ":"), default=writer._datetime) for r in (
        USERS.row(id=uid, name="gone", role="member", created_at=dt.datetime.now(dt.UTC)),
        _start(done, uid), _end(done), _start(cut, uid))]
    orphan = tmp_path / "adopt.duckdb.w3.journal"
    orphan.write_text("\n".join(lines) + "\n")
    other_db = tmp_path / "other.duckdb.w2.journal"
    other_db.write_text(lines[0] + "\n")
    live = tmp_path / "adopt.duckdb.w2.journal"
    live.write_text(lines[0] + "\n")
    from aibridge_gw.store import claim

    held = claim.hold(live)
    wp = WriterProcess(db, journal=tmp_path / "adopt.duckdb.journal")
    wp.open()
    try:
        wp.flush().result(10)
        rows = wp.run("sql", query_text="SELECT id, status, error FROM aibridge_interceptions").result(10)["rows"]
        assert {(str(r[0]), r[1], r[2]) for r in rows} == {(done, "completed", None), (cut, "failed", "gateway stopped")}
        assert not orphan.exists() and other_db.exists() and live.exists()
    finally:
        wp.close()
        import os

        os.close(held)


def test_the_flush_operation_fails_while_records_are_held_so_no_journal_goes_early(tmp_path, monkeypatch,
                                                                                  fast_retry):
    store, fault, uid = _failing_store(tmp_path / "f.duckdb", monkeypatch)
    assert _wait(lambda: store.backlog == 1)
    with pytest.raises(writer.StoreUnavailable):
        store.run("flush", writes=True).result(5)  # the named operation the gateway's journal rotation sends
    fault.on = False
    assert _wait(lambda: store.backlog == 0)
    store.run("flush", writes=True).result(5)
    store.close()


def test_an_end_whose_start_never_arrived_is_dead_lettered_not_dropped_and_replays_after_its_start(tmp_path):
    store = Store(tmp_path / "g.duckdb")
    store.open()
    uid, iid = str(uuid.uuid4()), str(uuid.uuid4())
    store.submit(USERS.row(id=uid, name="u", role="member", created_at=dt.datetime.now(dt.UTC)))
    store.submit(_end(iid))
    store.flush().result(5)
    assert store.dead_lettered == 1 and store.written == 1
    entry = json.loads(store.dead_letter_path.read_text())
    assert "no interception row" in entry["error"]

    def apply(record):
        from aibridge_gw.store.ops import apply_record

        store.call(lambda conn: apply_record(conn, record)).result(5)

    assert deadletters.replay(store.dead_letter_path, apply)["kept"] == 1  # its start is still missing
    store.submit(_start(iid, uid))
    store.flush().result(5)
    assert deadletters.replay(store.dead_letter_path, apply)["applied"] == 1
    assert _count(store, f"SELECT count(*) FROM aibridge_interceptions WHERE id = '{iid}' AND status = 'completed'") == 1
    store.close()


def test_text_postgresql_cannot_hold_is_stored_escaped():
    assert codec.clean_text("gpt-4o\x00") == "gpt-4o\\x00"
    assert codec.clean_text("a\udcffb") == "a\\xffb" and codec.clean_text("plain") == "plain"


def test_a_spool_deleted_under_the_writer_is_written_again_from_what_is_held(tmp_path, monkeypatch, fast_retry):
    db = tmp_path / "spooldir" / "h.duckdb"
    store, fault, uid = _failing_store(db, monkeypatch, backlog_max_bytes=400)
    for n in range(6):
        store.submit(_start(str(uuid.uuid4()), uid))
        time.sleep(0.15)  # separate batches: some wait on disk only (past the memory bound)
    assert _wait(lambda: store.backlog == 7) and any(e[0] == "disk" for e in store._held)
    store.spool_path.unlink()
    assert _wait(lambda: store.spool_path.exists() and store.spool_path.stat().st_size > 0)
    store.close()  # still failing: what is held stays in the new spool
    fault.on = False
    again = Store(db)
    again.open()
    assert _count(again, "SELECT count(*) FROM aibridge_interceptions") == 6
    again.close()


def test_a_database_file_deleted_under_the_writer_holds_records_and_says_so(tmp_path, fast_retry):
    db = tmp_path / "i.duckdb"
    store = Store(db)
    store.open()
    db.unlink()
    store.submit(USERS.row(id=str(uuid.uuid4()), name="u", role="member", created_at=dt.datetime.now(dt.UTC)))
    assert _wait(lambda: not store.up and store.backlog == 1)
    assert store.state["reason"] == "database file deleted or replaced"
    with pytest.raises(writer.StoreUnavailable):
        store.flush().result(5)  # so the gateway keeps its journal for the next start
    store._held.clear()
    store.backlog = 0
    store.close()
