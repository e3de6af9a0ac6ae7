"""Sessions as people read them, end to end: a real Gemini CLI session of two human turns through a gateway shows
exactly two prompts (its router classifier's calls are kept in the audit, marked `router`, and left out), as typed
(without its `<session_context>` part), grouped in one session though Gemini CLI sends no session id; the admin
API's session view puts the person's turns apart from the client's own calls; captured traffic of the other
clients, replayed through a gateway, records each call's purpose and the typed words."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.clients import ANSWER, answer, clean_env, gemini_response, npm_bin
from tests.support.gateway import Gateway
from tests.support.mock_upstream import MockUpstream, Reply

pytestmark = pytest.mark.timeout(300)
TURNS = ("Say hello to the session test", "Now say goodbye, briefly")
ROUTED = {"complexity_reasoning": "a greeting", "complexity_score": 5}


def routed(seen):
    """The stand-in: Gemini CLI's router gets the JSON it asks for (else it retries five times per turn); a model
    named claude-test-tools gets the reply scripted for it."""
    if b'"claude-test-tools"' in (seen.body or b"") and b"tool_result" not in (seen.body or b""):
        return None
    if b"Task Routing AI" in (seen.body or b"") and "generateContent" in seen.path:
        r = gemini_response()
        r["candidates"][0]["content"]["parts"] = [{"text": json.dumps(ROUTED)}]
        return Reply.json(r)
    return answer(seen)


@pytest.fixture(scope="module")
def sgw(tmp_path_factory):
    mock = MockUpstream().start()
    mock.check = routed
    mock.default = Reply.json({"object": "list", "data": []})
    work = tmp_path_factory.mktemp("sessions-gw")
    gw = Gateway(work, mock.url, providers=[
        {"name": "anthropic", "type": "anthropic", "base_url": mock.url + "/", "key": "sk-upstream-sessions-0123"},
        {"name": "openai", "type": "openai", "base_url": mock.url + "/v1/", "key": "sk-upstream-sessions-0123"},
        {"name": "gemini", "type": "gemini", "base_url": mock.url + "/", "key": "sk-upstream-sessions-0123"},
    ], extra={"logging": {"interceptions_json": str(work / "interceptions.jsonl")}}).start()
    gw.mock = mock
    gw.tokens = {"root": gw.new_user("root")}
    assert gw.cli("users", "set-role", "root", "admin").returncode == 0
    try:
        yield gw
    finally:
        gw.stop()
        mock.stop()


def api(gw, path, **params):
    r = httpx.get(f"{gw.url}/aibridge/api/v1/{path}", params=params, trust_env=False,
                  headers={"authorization": f"Bearer {gw.tokens['root']}"})
    assert r.status_code == 200, r.text
    return r.json()


def cli_json(gw, *args) -> list[dict]:
    r = gw.cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_gemini_cli_session_shows_one_prompt_per_human_turn(sgw, tmp_path):
    exe = npm_bin("@google/gemini-cli", "gemini")
    user = "gemini-person"
    token = sgw.new_user(user)
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    settings = home / ".gemini" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"security": {"auth": {"selectedType": "gemini-api-key"}},
                                    "privacy": {"usageStatisticsEnabled": False}}))
    env = clean_env(home, GEMINI_API_KEY=token, GEMINI_CLI_TRUST_WORKSPACE="true", PWD=str(work),
                    GOOGLE_GEMINI_BASE_URL=sgw.url + "/gemini")
    import subprocess

    for n, prompt in enumerate(TURNS):  # model auto: its router runs before each turn
        argv = [str(exe), "-p", prompt, *(["--resume", "latest"] if n else [])]
        r = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True, timeout=180,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0 and ANSWER in r.stdout, r.stdout + r.stderr[-2000:]
    rows = sgw.interceptions(user, 4)
    assert sorted(r["purpose"] for r in rows) == ["chat", "chat", "router", "router"], rows
    assert {r["client"] for r in rows} == {"Gemini CLI"}

    prompts = [p for p in cli_json(sgw, "prompts") if p["user"] == user]
    assert [p["prompt"] for p in prompts] == list(reversed(TURNS))  # newest first, as typed
    first = prompts[-1]
    assert first["raw_prompt"].startswith("<session_context>") and first["raw_prompt"].endswith(TURNS[0])
    everything = [p for p in cli_json(sgw, "prompts", "--all") if p["user"] == user]
    assert sorted(p["purpose"] for p in everything) == ["chat", "chat", "router", "router"]
    raw = sgw.sql("SELECT p.prompt, p.typed FROM aibridge_user_prompts p JOIN aibridge_interceptions i "
                  f"ON i.id = p.interception_id JOIN aibridge_users u ON u.id = i.initiator_id WHERE u.name = '{user}'")
    assert len(raw) == 4 and any("<session_context>" in r["prompt"] for r in raw)  # the audit keeps the raw text
    assert sorted(r["typed"] or r["prompt"] for r in raw) == sorted(TURNS * 2)

    (session,) = [s for s in cli_json(sgw, "sessions") if s["user"] == user]
    assert (session["interceptions"], session["human_turns"], session["prompts"], session["auxiliary"]) == (4, 2, 2, 2)
    (with_aux,) = [s for s in cli_json(sgw, "sessions", "--all") if s["user"] == user]
    assert with_aux["prompts"] == 4

    view = api(sgw, "sessions/" + session["session"])
    assert [t["prompt"] for t in view["turns"]] == list(TURNS)
    assert (view["human_turns"], view["auxiliary"]) == (2, 2)
    kinds = [(t["kind"], t["purpose"], [c["kind"] for c in t["calls"]]) for t in view["threads"]]
    assert kinds == [("auxiliary", "router", ["auxiliary"]), ("chat", "chat", ["turn"])] * 2, kinds
    listed = [s for s in api(sgw, "sessions")["data"] if s["user"] == user]
    assert listed[0]["human_turns"] == 2 and listed[0]["prompts"] == 2
    assert api(sgw, "sessions", include_auxiliary="true")["data"][0]["prompts"] >= 4

    logged = [json.loads(line) for line in (sgw.workdir / "interceptions.jsonl").read_text().splitlines()]
    assert sorted(e["purpose"] for e in logged if e.get("user") == user) == ["chat", "chat", "router", "router"]


FIXTURES = Path(__file__).parent / "fixtures" / "clients"


def test_captured_client_traffic_through_a_gateway_records_purpose_and_typed_words(sgw):
    """Each fixture's calls sent again through the gateway, with the client's own headers: the rows say what each
    call was for, and the prompts report lists the typed words of the human turns only."""
    user = "replayed-clients"
    token = sgw.new_user(user)
    sent = 0
    for path in sorted(FIXTURES.glob("*/*.json")):
        for c in json.loads(path.read_text()):
            prefix = "/gemini" if "generateContent" in c["path"] or "GenerateContent" in c["path"] else \
                "/anthropic" if c["path"].endswith("/messages") else "/openai"
            url = sgw.url + prefix + (c["path"][len("/v1"):] if prefix == "/openai" else c["path"])
            headers = {**c["headers"], "authorization": f"Bearer {token}", "x-api-key": token,
                       "x-goog-api-key": token}
            r = httpx.post(url, json=c["body"], headers=headers, trust_env=False, timeout=30)
            assert r.status_code == 200, (path, c["path"], r.text[:300])
            sent += 1
    rows = sgw.interceptions(user, sent)
    prompts = [p["prompt"] for p in cli_json(sgw, "prompts", "--limit", "500") if p["user"] == user]
    clients = len(list(FIXTURES.glob("*/*.json")))
    assert sorted(prompts) == sorted(["Say hello to the capture user", "Now say goodbye, briefly"] * clients), prompts
    assert {r["purpose"] for r in rows} >= {"chat", "router", "title", "memory"}
    # The prompt count in the metrics is the person's turns too (a counter per user id: this user's alone).
    uid = rows[0]["initiator_id"]
    metrics = httpx.get(sgw.url + "/aibridge/metrics", trust_env=False).text
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("aibridge_prompts_total{") and f'initiator_id="{uid}"' in line)
    assert counted == 2 * clients


def test_a_turn_and_its_tool_rounds_are_one_thread_of_the_session_view(sgw):
    """Claude Code's turn, the model's tool call, the call carrying its result (linked by the tool call id), and a
    title call of its own: one session, two threads; the turn's thread holds both of its calls."""
    user = "threads-person"
    token = sgw.new_user(user)
    headers = {"user-agent": "claude-cli/2.1.197 (external, sdk-cli)", "x-claude-code-session-id": "sess-threads-1",
               "x-api-key": token, "anthropic-version": "2023-06-01"}
    tool_use = {"id": "msg_tool_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                "content": [{"type": "tool_use", "id": "toolu_thread_1", "name": "Bash", "input": {"command": "ls"}}],
                "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 3}}
    sys = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197;"},
           {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."}]
    typed = "list the files here"
    first = {"model": "claude-test-tools", "max_tokens": 100, "system": sys, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>\nToday's date is 2026-12-05.\n</system-reminder>"},
        {"type": "text", "text": typed}]}]}
    second = {**first, "messages": first["messages"] + [
        {"role": "assistant", "content": tool_use["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_thread_1", "content": "a.txt"}]}]}
    title = {"model": "claude-haiku-4-5", "max_tokens": 50, "system": sys[:1] + [{"type": "text", "text":
             "Generate a concise, sentence-case title (3-7 words) that captures the main topic or goal of this coding "
             "session."}],
             "messages": [{"role": "user", "content": typed}]}
    sgw.mock.script(Reply.json(tool_use))
    for body in (first, second, title):
        r = httpx.post(sgw.url + "/anthropic/v1/messages", json=body, headers=headers, trust_env=False, timeout=30)
        assert r.status_code == 200, r.text
    sgw.interceptions(user, 3)
    view = api(sgw, "sessions/sess-threads-1")
    assert [t["prompt"] for t in view["turns"]] == [typed]
    assert [(t["kind"], [c["kind"] for c in t["calls"]]) for t in view["threads"]] == [
        ("chat", ["turn", "continuation"]), ("auxiliary", ["auxiliary"])]
    turn_thread = view["threads"][0]
    assert turn_thread["calls"][1]["thread_parent_id"] == turn_thread["calls"][0]["id"]
    assert view["threads"][1]["purpose"] == "title"
    (s,) = [s for s in cli_json(sgw, "sessions") if s["session"] == "sess-threads-1"]
    assert (s["interceptions"], s["human_turns"], s["auxiliary"], s["prompts"]) == (3, 1, 1, 1)
