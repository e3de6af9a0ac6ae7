"""The aibridge CLI, with the gateway running (through its control endpoint) and without (on the file)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.support.gateway import BIN, Gateway


def run_cli(config_path, *args):
    env = {**os.environ, "AIBRIDGE_CONFIG": str(config_path)}
    return subprocess.run([str(BIN / "aibridge"), *args], capture_output=True, text=True, env=env, timeout=60)


def test_users_and_tokens_through_the_running_gateway(gateway):
    cli = gateway.cli
    r = cli("users", "add", "carol")
    assert r.returncode == 0 and "carol" in r.stdout
    dup = cli("users", "add", "carol")
    assert dup.returncode == 1 and dup.stderr.strip() == "aibridge: user 'carol' already exists"
    r = cli("tokens", "create", "--user", "carol", "--name", "laptop")
    assert r.returncode == 0
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("aib_") and len(token) > 40
    listing = json.loads(cli("tokens", "list", "--user", "carol", "--json").stdout)
    assert [(t["user"], t["name"], t["state"]) for t in listing] == [("carol", "laptop", "active")]
    assert token not in json.dumps(listing) and listing[0]["hint"] == f"{token[:4]}…{token[-4:]}"
    # Only a hash is stored.
    stored = json.loads(cli("sql", "SELECT token_hash FROM aibridge_tokens", "--json").stdout)
    assert all(token not in row["token_hash"] for row in stored)
    users = json.loads(cli("users", "list", "--json").stdout)
    assert {"name": "carol", "role": "member"}.items() <= next(u for u in users if u["name"] == "carol").items()


def test_unknown_user_is_a_one_line_error(gateway):
    r = gateway.cli("tokens", "create", "--user", "nobody-here")
    assert r.returncode == 1
    assert r.stderr.strip() == "aibridge: unknown user 'nobody-here'"
    assert r.stdout == ""


def test_sql_is_read_only(gateway):
    r = gateway.cli("sql", "DELETE FROM aibridge_users")
    assert r.returncode == 1 and "read-only" in r.stderr
    r = gateway.cli("sql", "SELECT 1 AS one; DROP TABLE aibridge_users")
    assert r.returncode == 1
    assert gateway.sql("SELECT count(*) AS n FROM aibridge_users")[0]["n"] >= 0
    r = gateway.cli("sql", "SELECT 41 + 1 AS answer")
    assert r.returncode == 0 and "answer" in r.stdout and "42" in r.stdout
    bad = gateway.cli("sql", "SELECT * FROM no_such_table")
    assert bad.returncode == 1 and "no_such_table" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cli_works_on_the_file_without_a_gateway_and_gateway_honours_it(tmp_path, upstream):
    gw = Gateway(tmp_path / "offline", upstream.url)
    assert not gw.db.exists()
    assert run_cli(gw.config_path, "users", "add", "dave", "--admin").returncode == 0
    r = run_cli(gw.config_path, "tokens", "create", "--user", "dave")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    out = json.loads(run_cli(gw.config_path, "users", "list", "--json").stdout)
    assert [(u["name"], u["role"], u["active_tokens"]) for u in out] == [("dave", "admin", 1)]
    gw.start()
    try:
        import httpx

        r = httpx.get(gw.url + "/openai/v1/models", headers={"authorization": f"Bearer {token}"}, trust_env=False)
        assert r.status_code == 200
    finally:
        gw.stop()


@pytest.mark.parametrize("args", [["users"], ["tokens", "revoke"], ["bogus"]])
def test_usage_errors_exit_nonzero(gateway, args):
    assert gateway.cli(*args).returncode != 0


def test_ca_path_and_export(tmp_path, gateway):
    confdir = tmp_path / "certs"
    r = gateway.cli("ca", "path", "--confdir", str(confdir))
    assert r.returncode == 0
    cert = confdir / "mitmproxy-ca-cert.pem"
    assert r.stdout.strip() == str(cert) and cert.exists()
    assert oct((confdir / "mitmproxy-ca.pem").stat().st_mode & 0o777) == "0o600"  # the private key
    pem = gateway.cli("ca", "export", "--confdir", str(confdir))
    assert pem.stdout == cert.read_text() and "PRIVATE KEY" not in pem.stdout
    out = tmp_path / "ca.p12"
    assert gateway.cli("ca", "export", "--format", "p12", "--out", str(out), "--confdir", str(confdir)).returncode == 0
    from cryptography.hazmat.primitives.serialization import pkcs12

    p12 = pkcs12.load_pkcs12(out.read_bytes(), None)
    assert p12.key is None and p12.additional_certs  # certificate only, no key
    bundle = gateway.cli("ca", "export", "--format", "bundle", "--confdir", str(confdir)).stdout
    assert bundle.count("BEGIN CERTIFICATE") > 10 and cert.read_text() in bundle


@pytest.mark.parametrize(
    "client,mode,expected",
    [
        ("claude-code", "base-url", ["ANTHROPIC_BASE_URL={gw}/anthropic", "ANTHROPIC_API_KEY=aib_T",
                                     "claude mcp add --transport http --scope user aibridge {gw}/aibridge/mcp "
                                     "--header 'Authorization: Bearer aib_T'"]),
        ("python", "base-url", ["OPENAI_BASE_URL={gw}/openai/v1", "ANTHROPIC_BASE_URL={gw}/anthropic"]),
        ("codex", "base-url", ['base_url = "{gw}/openai/v1"', 'wire_api = "responses"',
                               '[mcp_servers.aibridge]\nurl = "{gw}/aibridge/mcp"\nbearer_token_env_var = '
                               '"AIBRIDGE_TOKEN"']),
        ("claude-code", "proxy", ["HTTPS_PROXY=http://bob:aib_T@{host}", "NODE_EXTRA_CA_CERTS={certs}/mitmproxy-ca-cert.pem"]),
        ("codex", "proxy", ["HTTPS_PROXY=http://bob:aib_T@{host}", "SSL_CERT_FILE={certs}/aibridge-ca-bundle.pem",
                            "AIBRIDGE_TOKEN=aib_T", 'url = "{gw}/aibridge/mcp"']),
        ("opencode", "base-url", ['"baseURL": "{gw}/anthropic/v1"', '"baseURL": "{gw}/openai/v1"']),
        ("kilo", "base-url", ['"baseURL": "{gw}/anthropic/v1"']),
        ("gemini-cli", "base-url", ["GOOGLE_GEMINI_BASE_URL={gw}/gemini", "GEMINI_API_KEY=aib_T"]),
        ("gemini-cli", "proxy", ["NODE_EXTRA_CA_CERTS={certs}/mitmproxy-ca-cert.pem", "GEMINI_API_KEY=aib_T"]),
        ("llm", "base-url", ["api_base: {gw}/openai/v1", "X-Title: llm", "OPENAI_API_KEY=aib_T"]),
        ("aider", "base-url", ["OPENAI_API_BASE={gw}/openai/v1", "ANTHROPIC_API_BASE={gw}/anthropic"]),
        ("aider", "proxy", ["REQUESTS_CA_BUNDLE={certs}/aibridge-ca-bundle.pem", "OPENAI_API_KEY=aib_T"]),
        ("crush", "base-url", ['"base_url": "{gw}/anthropic"', '"base_url": "{gw}/openai/v1"']),
        ("goose", "base-url", ["ANTHROPIC_HOST={gw}/anthropic"]),
        ("continue", "base-url", ["apiBase: {gw}/anthropic/v1/"]),
        ("zed", "base-url", ['"api_url": "{gw}/anthropic"']),
        ("cline", "base-url", ["{gw}/anthropic", "{gw}/openai/v1"]),
        ("claude-code", "proxy", ["ANTHROPIC_API_KEY=aib_T"]),  # the gateway token as the key, also in proxy mode
    ],
)
def test_env_prints_paste_ready_settings_for_the_running_gateway(tmp_path, gateway, client, mode, expected):
    confdir = tmp_path / "certs"
    r = gateway.cli("env", client, "--mode", mode, "--token", "aib_T", "--user", "bob", "--confdir", str(confdir))
    assert r.returncode == 0, r.stderr
    for line in expected:
        assert line.format(gw=gateway.url, host=gateway.url.split("://")[1], certs=confdir) in r.stdout


def test_every_guide_prints_shell_that_parses(tmp_path):
    """Each client's guide, in both modes, is valid shell (config files as heredocs) and carries the token."""
    from aibridge_gw.admin.guides import GUIDES, env_lines

    for client in GUIDES:
        for mode in ("base-url", "proxy"):
            text = "\n".join(env_lines(client, mode, "http://gw.test:8080", "aib_T", tmp_path))
            assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, (client, mode)
            assert "aib_T" in text or client in ("system",), (client, mode)


def test_scripts_run_lets_the_user_set_the_options_it_defaults(tmp_path):
    """`scripts/run --set confdir=… --set connection_strategy=… --set flow_detail=…`: the user's values replace
    the script's own defaults (mitmproxy refuses two values for one option) and the gateway starts with them."""
    import httpx

    from tests.support.gateway import ROOT, free_port

    gw = Gateway(tmp_path / "gw", "http://127.0.0.1:9")
    port, confdir = free_port(), tmp_path / "my-certs"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "run"), "--listen-port", str(port), "--set", f"confdir={confdir}",
         "--set=connection_strategy=eager", "--set", "flow_detail=1", "--set", f"aibridge_config={gw.config_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline, up = time.time() + 60, False
        while time.time() < deadline and proc.poll() is None and not up:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/aibridge/healthz", timeout=1, trust_env=False).is_success
            except httpx.HTTPError:
                time.sleep(0.2)
        assert up, proc.communicate(timeout=10)[0] if proc.poll() is not None else "not answering"
        assert (confdir / "mitmproxy-ca-cert.pem").exists()  # the CA lives where the user said
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def test_guides_keep_the_users_own_settings(tmp_path):
    """Pasted over existing settings, a guide merges what it needs into JSON settings and never overwrites a config
    file (the heredoc stops: merge by hand)."""
    from aibridge_gw.admin.guides import env_lines

    home = tmp_path / "home"
    (home / ".gemini").mkdir(parents=True)
    (home / ".gemini" / "settings.json").write_text(json.dumps(
        {"ui": {"theme": "Dracula"}, "security": {"folderTrust": {"enabled": True}, "auth": {"selectedType": "x"}}}))
    (home / ".continue").mkdir()
    (home / ".continue" / "config.yaml").write_text("name: mine\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}

    def paste(client: str) -> subprocess.CompletedProcess:
        text = "\n".join(env_lines(client, "base-url", "http://gw.test:8080", "aib_T", tmp_path))
        return subprocess.run(["bash", "-ec", text], env=env, cwd=tmp_path, capture_output=True, text=True)

    assert paste("gemini-cli").returncode == 0
    assert json.loads((home / ".gemini" / "settings.json").read_text()) == {
        "ui": {"theme": "Dracula"},
        "security": {"folderTrust": {"enabled": True}, "auth": {"selectedType": "gemini-api-key"}}}
    r = paste("continue")
    assert r.returncode != 0 and "cannot overwrite existing file" in r.stderr
    assert (home / ".continue" / "config.yaml").read_text() == "name: mine\n"
