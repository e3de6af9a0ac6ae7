"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright): numbers shown equal
the database's, an admin can drill from a session down to its prompts and tool calls, policy decisions and
groups are shown (as text), and so are the MCP gateway's servers and calls."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from aibridge_gw.pricing import PriceTable
from tests.test_admin import agw  # noqa: F401  (the seeded gateway)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
SHOTS = Path(os.environ.get("AIBRIDGE_SCREENSHOTS", "/tmp/aibridge-screenshots"))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"],
        )
        yield b
        b.close()


def signed_in(browser, agw, user="root"):  # noqa: F811
    page = browser.new_page(viewport={"width": 1300, "height": 1100})
    page.goto(agw.url + "/aibridge/")
    page.fill("#tok", agw.tokens[user])
    page.click("#go")
    page.wait_for_selector("body[data-ready='1']")
    return page


def ready(page):
    page.wait_for_selector("body[data-ready='1']")


def test_overview_shows_the_databases_spend_per_user_and_model(browser, agw):  # noqa: F811
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = signed_in(browser, agw)
    rows = agw.sql(
        "SELECT u.name, count(DISTINCT i.id) AS n, sum(t.input_tokens) AS inp, sum(t.output_tokens) AS outp, "
        "any_value(coalesce(i.metadata->>'response_model', i.model)) AS model "
        "FROM aibridge_interceptions i JOIN aibridge_users u ON u.id = i.initiator_id "
        "JOIN aibridge_token_usages t ON t.interception_id = i.id WHERE u.name = 'ann' GROUP BY u.name")
    (ann,) = rows
    price = PriceTable.load().resolve(ann["model"])
    cost = sum(price.cost(21, out, 0, 0) for out in (187, 203))
    cells = page.locator("#leaderboard tr[data-key='ann'] td").all_inner_texts()
    assert cells == ["ann", str(ann["n"]), str(ann["inp"]), str(ann["outp"]), "0", f"${cost:.4f}"]
    unpriced = page.locator("#by-model tr[data-key='gpt-5.4-internal'] td.cost").inner_text()
    assert unpriced == "unpriced"
    warning = page.locator("#unpriced-warning").inner_text()
    assert "gpt-5.4-internal" in warning and "aibridge prices set" in warning
    assert page.locator("svg[aria-label^='Tokens per day'] rect").count() >= 1
    assert page.locator("svg[aria-label^='Adoption'] rect").count() >= 1
    page.screenshot(path=str(SHOTS / "overview.png"), full_page=True)


def test_drill_from_session_to_prompt_and_tool_calls(browser, agw):  # noqa: F811
    page = signed_in(browser, agw)
    page.click("text=Sessions")
    ready(page)
    page.click("tr[data-session='sess-ann-1']")
    ready(page)
    assert page.locator("#interceptions tr.click").count() == 2
    page.locator("#interceptions tr.click").first.click()
    ready(page)
    assert "explain what an AI gateway does" in page.locator("pre.prompt").inner_text()
    page.screenshot(path=str(SHOTS / "session-detail.png"), full_page=True)
    # An interception with a tool call and thoughts, reached through the filters.
    page.goto(agw.url + "/aibridge/#/interceptions")
    ready(page)
    page.select_option("#f-model", "gpt-5.4-internal")
    page.click("#apply")
    ready(page)
    page.locator("#interceptions tr.click").first.click()
    ready(page)
    assert page.locator("#tools td.tool").all_inner_texts() == ["add"]
    assert "add the two numbers with the add tool" in page.content()
    page.screenshot(path=str(SHOTS / "interception-detail.png"), full_page=True)


def test_members_see_only_their_own_data(browser, agw):  # noqa: F811
    page = signed_in(browser, agw, "ben")
    users = page.locator("#leaderboard tr[data-key] td:first-child").all_inner_texts()
    assert users == ["ben"]


def test_malformed_hash_shows_an_error_and_the_token_stays_out_of_local_storage(browser, agw):  # noqa: F811
    page = signed_in(browser, agw)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(agw.url + "/aibridge/#/interceptions")
    ready(page)
    page.evaluate("document.body.dataset.ready = ''; location.hash = '#/interceptions/%E0%A4%A'")  # bad escape
    ready(page)
    assert "malformed" in page.locator("#main .err").inner_text()
    assert page.locator("#main table").count() == 0  # not the previous view
    page.evaluate("document.body.dataset.ready = ''; location.hash = '#/no-such-page'")
    ready(page)
    assert "no page" in page.locator("#main .err").inner_text()
    assert page.evaluate("localStorage.getItem('aibridge_token')") is None
    assert page.evaluate("sessionStorage.getItem('aibridge_token')") == agw.tokens["root"]
    assert not [e for e in errors if "Content Security Policy" in e]  # the CSP blocks nothing the page needs


def test_policy_decisions_and_groups_are_shown_and_escaped(browser, agw):  # noqa: F811
    """The policy view counts decisions per rule and action and lists the recent ones (a message is text, never
    markup); a decision leads to its interception, whose detail lists it; the users view shows groups."""
    import datetime as dt

    from aibridge_gw.flow.recorder import Recorder

    from tests.test_policy_admin import ViaGateway

    assert agw.cli("users", "groups", "set", "ann", "staff,ml").returncode == 0
    ann = agw.sql("SELECT CAST(i.id AS VARCHAR) AS id, CAST(u.id AS VARCHAR) AS uid FROM aibridge_interceptions i "
                  "JOIN aibridge_users u ON u.id = i.initiator_id WHERE u.name = 'ann' ORDER BY i.started_at")[0]
    now = dt.datetime.now(dt.UTC)
    rec = Recorder(ViaGateway(agw))
    rec.policy_decision(ann["id"], rule="no-cloud-keys", policy_version="9c1e", hook="request", action="deny",
                        enforced=True, detectors=["aws-key"], message='<img src=x onerror="window.pwned=1">blocked',
                        user_id=ann["uid"], at=now - dt.timedelta(seconds=2))
    rec.policy_decision(ann["id"], rule="no-shell", policy_version="9c1e", hook="tool", action="deny", enforced=False,
                        detectors=[], message=None, user_id=ann["uid"], tool="bash", tool_call_id="toolu_7", at=now)

    page = signed_in(browser, agw)
    page.click("text=Policy")
    ready(page)
    cells = page.locator("#policy-summary tr[data-rule='no-cloud-keys'][data-action='deny'] td").all_inner_texts()
    assert cells[:6] == ["no-cloud-keys", "deny", "1", "1", "0", "1"]
    assert page.locator("#policy-summary tr[data-rule='no-shell'] td").all_inner_texts()[2:5] == ["1", "0", "1"]
    assert page.locator("#policy-users tr[data-user='ann'] td").all_inner_texts()[:3] == ["ann", "2", "1"]
    recent = page.locator("#recent-decisions tr[data-decision]")
    assert recent.count() == 2
    assert recent.nth(0).locator("td.rule").inner_text() == "no-shell"
    assert recent.nth(0).locator("td.mode").inner_text() == "monitor"
    first = recent.nth(1)
    assert first.locator("td.message").inner_text() == '<img src=x onerror="window.pwned=1">blocked'
    assert first.locator("td.detectors").inner_text() == "aws-key"
    assert page.locator("#recent-decisions img").count() == 0 and page.evaluate("window.pwned") is None
    page.screenshot(path=str(SHOTS / "policy.png"), full_page=True)

    first.locator("a").click()
    ready(page)
    assert page.locator(".decisions td.rule").all_inner_texts() == ["no-cloud-keys", "no-shell"]
    assert page.locator(".decisions td.mode").all_inner_texts() == ["enforced", "monitor"]

    page.click("text=Users")
    ready(page)
    assert page.locator("#users tr[data-user='ann'] td.groups").inner_text() == "ml, staff"
    assert page.locator("#users tr[data-user='ben'] td.groups").inner_text() == ""
    assert page.locator("#groups tr[data-group='ml'] td.members").inner_text() == "ann"
    page.screenshot(path=str(SHOTS / "users.png"), full_page=True)

    member = signed_in(browser, agw, "ben")  # ben sees neither ann's decisions nor her groups
    member.click("text=Policy")
    ready(member)
    assert member.locator("#recent-decisions tr[data-decision]").count() == 0
    member.click("text=Users")
    ready(member)
    assert member.locator("#users tr[data-user] td:first-child").all_inner_texts() == ["ben"]
    assert member.locator("#groups tr[data-group]").count() == 0


def test_the_tools_view_shows_mcp_servers_and_calls(browser, tmp_path, upstream):
    """The MCP gateway's calls per server and tool, per user, the slowest and the recent ones (an error text is text,
    never markup), and each server's state: a down one shown unavailable with why; a member sees their own calls."""
    import asyncio
    import concurrent.futures

    from tests.support.gateway import Gateway
    from tests.support.mcp_server import McpTestServer
    from tests.test_mcp_gateway import session

    coder = McpTestServer().start()
    gw = Gateway(tmp_path / "tools-gw", upstream.url, extra={"mcp_servers": [
        {"name": "coder", "url": coder.url}, {"name": "down", "url": "http://127.0.0.1:9/mcp"}]}).start()
    try:
        gw.tokens = {name: gw.new_user(name) for name in ("root", "ann", "ben")}
        assert gw.cli("users", "set-role", "root", "admin").returncode == 0

        async def calls(token: str, *tools: str):
            async with session(gw.url, token) as s:
                await s.list_tools()
                for name in tools:
                    await s.call_tool(name, {})

        def run(coro):  # Playwright's loop runs in this thread: the MCP client gets one of its own
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                return pool.submit(asyncio.run, coro).result()

        run(calls(gw.tokens["ann"], "coder__coder_list_templates", "coder__<img src=x onerror=window.pwned=1>"))
        run(calls(gw.tokens["ben"], "coder__coder_list_templates"))
        gw.wait_for("SELECT * FROM aibridge_mcp_calls", lambda rows: len(rows) == 3)

        page = signed_in(browser, gw)
        page.click("text=Tools")
        ready(page)
        assert page.locator("#mcp-servers tr[data-server='coder'] td.state").inner_text() == "available"
        assert page.locator("#mcp-servers tr[data-server='down'] td.state").inner_text() == "unavailable"
        assert "ConnectError" in page.locator("#mcp-servers tr[data-server='down'] td.error").inner_text()
        cells = page.locator("#mcp-tools tr[data-tool='coder/coder_list_templates'] td").all_inner_texts()
        assert cells[:5] == ["coder", "coder_list_templates", "2", "0", "2"]
        assert page.locator("#mcp-users tr[data-user='ann'] td").all_inner_texts()[:3] == ["ann", "2", "1"]
        recent = page.locator("#mcp-recent tr[data-call]")
        assert recent.count() == 3
        failed = page.locator("#mcp-recent tr[data-call] td.outcome.failed")
        assert failed.count() == 1 and failed.inner_text() == "error"
        assert "<img src=x" in page.locator("#mcp-recent td.error").all_inner_texts()[0] + \
            "".join(page.locator("#mcp-recent td.tool").all_inner_texts())
        assert page.locator("#main img").count() == 0 and page.evaluate("window.pwned") is None
        page.screenshot(path=str(SHOTS / "tools.png"), full_page=True)

        member = signed_in(browser, gw, "ben")
        member.click("text=Tools")
        ready(member)
        assert member.locator("#mcp-recent tr[data-call]").count() == 1
        assert member.locator("#mcp-users tr[data-user] td:first-child").all_inner_texts() == ["ben"]
    finally:
        gw.stop()
        coder.stop()


def test_the_spend_view_has_a_range_buckets_groups_budgets_and_csv_downloads(browser, agw):  # noqa: F811
    page = signed_in(browser, agw)
    assert page.locator("#by-group tr[data-key='(no group)']").count() == 1
    assert page.locator("#by-client tr").count() >= 2 and page.locator("#by-provider tr").count() >= 2
    assert "No budgets apply" in page.locator("#budgets").inner_text()
    with page.expect_download() as got:
        page.click("button.csv[data-csv='model']")
    text = open(got.value.path()).read()
    assert text.splitlines()[0].startswith("model,") and "claude-sonnet-4-20250514" in text
    page.select_option("#bucket", "week")
    ready(page)
    assert page.locator("svg[aria-label^='Tokens per week']").count() == 1
    page.fill("#from", "2001-01-01")
    page.fill("#to", "2001-01-31")
    page.dispatch_event("#to", "change")
    ready(page)
    assert page.locator("#total-cost").inner_text() == "$0.00"  # nothing in January 2001
    page.evaluate("sessionStorage.clear()")


def test_a_session_shows_the_persons_turns_apart_from_the_clients_own_calls(browser, agw, upstream):  # noqa: F811
    """An opencode session: its title call is kept and marked, the turn is shown as typed (opencode's quotes off)."""
    import httpx

    from tests.support.mock_upstream import Reply
    from tests.support.wire import anthropic_message

    token = agw.new_user("dora")
    headers = {"user-agent": "opencode/1.18.33 ai-sdk/provider-utils/4.0.46 runtime/bun/1.3.14",
               "x-session-id": "ses_dashboard_1", "x-api-key": token, "anthropic-version": "2023-06-01"}
    title = {"model": "claude-haiku-4-5", "max_tokens": 100, "system": [{"type": "text", "text":
             "You are a title generator. You output ONLY a thread title."}], "messages": [{"role": "user", "content": [
             {"type": "text", "text": "Generate a title for this conversation:\n"},
             {"type": "text", "text": '"rename the parser module"'}]}]}
    turn = {"model": "claude-sonnet-4-5", "max_tokens": 1000, "system": "You are OpenCode, the best coding agent.",
            "messages": [{"role": "user", "content": '"rename the parser module"'}]}
    for body in (title, turn):
        upstream.script(Reply.json(anthropic_message("ok")))
        r = httpx.post(agw.url + "/anthropic/v1/messages", json=body, headers=headers, trust_env=False)
        assert r.status_code == 200, r.text
    agw.interceptions("dora", 2)
    page = signed_in(browser, agw)
    page.goto(agw.url + "/aibridge/#/sessions")
    ready(page)
    row = page.locator("tr[data-session='ses_dashboard_1'] td").all_inner_texts()
    assert row[4:7] == ["2", "1", "1"], row  # calls, human turns, the client's own
    page.click("tr[data-session='ses_dashboard_1']")
    ready(page)
    assert page.locator("#turns pre.prompt").all_inner_texts() == ["rename the parser module"]
    assert (page.locator("#human-turns").inner_text(), page.locator("#auxiliary-calls").inner_text()) == ("1", "1")
    assert page.locator("tr.thread[data-kind='auxiliary']").inner_text().startswith("client's own call: title")
    assert page.locator("tr.click[data-kind='auxiliary']").count() == 1
    assert page.locator("tr.click[data-kind='turn']").count() == 1
    page.screenshot(path=str(SHOTS / "session-turns.png"), full_page=True)
    page.locator("tr.click[data-kind='turn']").click()
    ready(page)
    assert page.locator("pre.prompt").inner_text() == "rename the parser module"
    assert page.locator("pre.raw-prompt").text_content() == '"rename the parser module"'  # as sent, kept
