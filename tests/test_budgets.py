"""Budgets and rate limits stop a user at their limit with a clean 429, and survive a restart."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.support.fixtures import capture
from tests.support.gateway import Gateway
from tests.support.mock_upstream import Reply
from tests.support.sdk import anthropic_call, anthropic_client, chat_call, openai_client

BUDGETS = {"budgets": {
    "default": {"requests_per_minute": 3},
    "users": {"heavy": {"tokens_per_day": 300}, "spender": {"usd_per_month": 0.005}},
}}


@pytest.fixture
def bgw(tmp_path, upstream):
    upstream.reset()
    gw = Gateway(tmp_path / "budgets", upstream.url, extra=BUDGETS).start()
    yield gw
    gw.stop()
    upstream.reset()


def test_requests_per_minute_limit_gives_429_with_retry_after(bgw, upstream):
    token = bgw.new_user("rpm")
    cap = capture("openai/chatcompletions/simple.txtar")
    client = openai_client(bgw, token)
    for _ in range(3):
        upstream.script(Reply.from_capture(cap, False))
        chat_call(client, cap.request, False)
    with pytest.raises(openai.RateLimitError) as e:
        chat_call(client, cap.request, False)
    assert e.value.response.headers["retry-after"].isdigit()
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert "3 requests per minute" in e.value.message
    assert len(upstream.seen) == 3  # the refused request never reached the provider
    rows = bgw.wait_for("SELECT status, http_status, error FROM aibridge_interceptions WHERE status = 'rejected'")
    assert rows[0]["http_status"] == 429 and "rate limit" in rows[0]["error"]


def test_daily_token_budget_in_anthropic_format_and_it_survives_a_restart(bgw, upstream):
    token = bgw.new_user("heavy")
    cap = capture("anthropic/simple.txtar")
    upstream.script(Reply.from_capture(cap, False))
    anthropic_call(anthropic_client(bgw, token), cap.request, False)  # 21 + 203 tokens: under 300
    upstream.script(Reply.from_capture(cap, False))
    anthropic_call(anthropic_client(bgw, token), cap.request, False)  # now over
    bgw.interceptions("heavy", 2)
    with pytest.raises(anthropic.RateLimitError) as e:
        anthropic_call(anthropic_client(bgw, token), cap.request, False)
    assert e.value.body["error"]["type"] == "rate_limit_error" and "daily token budget" in e.value.message
    bgw.stop()
    bgw.start()  # counters are rebuilt from the database
    with pytest.raises(anthropic.RateLimitError):
        anthropic_call(anthropic_client(bgw, token), cap.request, False)
    assert len(upstream.seen) == 2
    r = bgw.cli("usage", "--by", "user", "--json")
    heavy = next(d for d in json.loads(r.stdout) if d["user"] == "heavy")
    assert heavy["tokens_remaining_today"] == 0


def test_monthly_usd_budget_uses_the_price_table(bgw, upstream):
    token = bgw.new_user("spender")
    cap = capture("anthropic/simple.txtar")  # claude-sonnet-4: 21*3 + 203*15 per 1M = $0.003108
    for _ in range(2):
        upstream.script(Reply.from_capture(cap, False))
        anthropic_call(anthropic_client(bgw, token), cap.request, False)
    bgw.interceptions("spender", 2)
    with pytest.raises(anthropic.RateLimitError) as e:
        anthropic_call(anthropic_client(bgw, token), cap.request, False)
    assert "monthly budget" in e.value.message
    other = bgw.new_user("unlimited-today")  # default limits: only requests per minute
    upstream.script(Reply.from_capture(cap, False))
    anthropic_call(anthropic_client(bgw, other), cap.request, False)


GROUP_BUDGETS = {"budgets": {
    "default": {"requests_per_minute": 60, "usd_per_month": 200},
    "groups": {"staff": {"tokens_per_day": 1000}, "interns": {"tokens_per_day": 300},
               "ml": {"usd_per_day": 0.005}},
    "users": {"boss": {"tokens_per_day": 250}},
}}


def test_group_budgets_apply_per_member_the_highest_of_several_and_an_own_entry_replaces_them(tmp_path, upstream):
    """interns: 300 tokens a day each (two calls of 224 tokens: the third is refused); a member of staff and interns
    gets staff's 1000 (the highest); `boss`, an intern with an own entry, gets 250 and nothing of the groups; ml's
    usd_per_day stops its member; `aibridge budgets explain` and `status` say which entry applies and why."""
    upstream.reset()
    gw = Gateway(tmp_path / "group-budgets", upstream.url, extra=GROUP_BUDGETS).start()
    try:
        cap = capture("anthropic/simple.txtar")  # 21 + 203 tokens, $0.003108 a call (claude-sonnet-4)
        people = {}
        for name, groups in (("ivy", "interns"), ("sam", "interns,staff"), ("boss", "interns"), ("mia", "ml")):
            people[name] = gw.new_user(name)
            gw.op("users.groups_set", name=name, groups=groups)

        def calls_until_refused(name: str, most: int = 6) -> tuple[int, str]:
            client = anthropic_client(gw, people[name])
            for n in range(most):
                upstream.script(Reply.from_capture(cap, False))
                try:
                    anthropic_call(client, cap.request, False)
                except anthropic.RateLimitError as e:
                    upstream.reset()
                    return n, e.message
                gw.interceptions(name, n + 1)
            return most, ""

        assert calls_until_refused("ivy")[0] == 2  # 224, 448 >= 300
        n, message = calls_until_refused("boss")
        assert n == 2 and "daily token budget of 250" in message  # its own entry, not the interns' 300
        assert calls_until_refused("sam", 4) == (4, "")  # staff's 1000 is the highest of its groups
        n, message = calls_until_refused("mia")
        assert n == 2 and "daily budget of $0.01" in message  # $0.006216 >= $0.005 after two

        explain = json.loads(gw.cli("budgets", "explain", "sam", "--json").stdout)
        by = {lim["limit"]: lim for lim in explain["limits"]}
        assert explain["groups"] == ["interns", "staff"]
        assert by["tokens_per_day"]["value"] == 1000 and by["tokens_per_day"]["from"].startswith("groups.staff")
        assert "the highest of interns, staff" in by["tokens_per_day"]["from"]
        assert by["usd_per_month"] == {"limit": "usd_per_month", "value": 200, "from": "default", "used": 0.012432}
        assert by["requests_per_minute"]["from"] == "default"
        boss = {lim["limit"]: lim for lim in json.loads(gw.cli("budgets", "explain", "boss", "--json").stdout)["limits"]}
        assert boss["tokens_per_day"]["from"] == "users.boss" and boss["usd_per_month"]["value"] is None
        text = gw.cli("budgets", "explain", "ivy").stdout
        assert "groups.interns" in text and "tokens_per_day" in text
        status = {d["user"]: d for d in json.loads(gw.cli("budgets", "status", "--json").stdout)}
        assert status["ivy"]["tokens_today"] == 448 and status["ivy"]["tokens_per_day"] == 300
        assert status["mia"]["usd_per_day"] == 0.005 and status["mia"]["usd_today"] == pytest.approx(0.006216)
        assert status["sam"]["groups"] == ["interns", "staff"]
    finally:
        gw.stop()
        upstream.reset()


class _Webhook:
    """A webhook receiver on 127.0.0.1: the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        import http.server
        import threading

        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/aibridge-secret-path"

    def wait(self, n: int, timeout: float = 10) -> list[dict]:
        import time

        deadline = time.monotonic() + timeout
        while len(self.bodies) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.bodies)


def test_budget_thresholds_are_notified_once_per_period_by_webhook_and_log_even_across_a_restart(tmp_path,
                                                                                                 upstream):
    """interns: 300 tokens a day, thresholds 50 % and 100 %: the first call (224 tokens) crosses 50 %, the second
    100 %: one webhook POST each, with a `text` naming the user, the group and the threshold, and a log line; the
    refused third call says nothing more. After a restart with the limit raised to 1000, a call that crosses 50 %
    again in the same day says nothing: the store remembers what was said (once per period across the fleet)."""
    import yaml

    hook = _Webhook()
    upstream.reset()
    config = {"budgets": {"groups": {"interns": {"tokens_per_day": 300}}},
              "notifications": {"webhook": hook.url, "thresholds": [0.5, 1.0]}}
    gw = Gateway(tmp_path / "notices", upstream.url, extra=config).start()
    try:
        cap = capture("anthropic/simple.txtar")
        token = gw.new_user("nia")
        gw.op("users.groups_set", name="nia", groups="interns")
        client = anthropic_client(gw, token)
        upstream.script(Reply.from_capture(cap, False))
        anthropic_call(client, cap.request, False)
        first = hook.wait(1)
        assert [b["threshold"] for b in first] == [0.5]
        assert first[0]["text"].startswith("aibridge: nia has used 50 % of their daily token budget (224 tokens "
                                           "of 300 tokens") and "group interns" in first[0]["text"]
        assert (first[0]["user"], first[0]["group"], first[0]["limit"], first[0]["used"]) == (
            "nia", "interns", "tokens_per_day", 224)
        upstream.script(Reply.from_capture(cap, False))
        anthropic_call(client, cap.request, False)
        both = hook.wait(2)
        assert [b["threshold"] for b in both] == [0.5, 1.0] and "100 %" in both[1]["text"]
        with pytest.raises(anthropic.RateLimitError):
            anthropic_call(client, cap.request, False)
        assert "nia has used 100 % of their daily token budget" in gw.log()
        assert "aibridge-secret-path" not in gw.log()  # a webhook's URL is a secret of its own

        gw.stop()
        raw = yaml.safe_load(gw.config_path.read_text())
        raw["budgets"]["groups"]["interns"]["tokens_per_day"] = 1000
        gw.config_path.write_text(yaml.safe_dump(raw))
        gw.start()
        upstream.script(Reply.from_capture(cap, False))
        anthropic_call(anthropic_client(gw, token), cap.request, False)  # 672 of 1000: past 50 % again, same day
        gw.interceptions("nia", 3)
        assert len(hook.wait(3, timeout=3)) == 2
        rows = gw.wait_for("SELECT limit_name, threshold FROM aibridge_budget_notices ORDER BY threshold",
                           lambda r: len(r) == 2)
        assert [(r["limit_name"], r["threshold"]) for r in rows] == [("tokens_per_day", 0.5), ("tokens_per_day", 1.0)]
    finally:
        gw.stop()
        hook.server.shutdown()
        upstream.reset()
