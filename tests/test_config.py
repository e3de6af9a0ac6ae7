"""The typed configuration: mistakes refused with their key path and the closest valid key; `aibridge config check`
and `aibridge config schema` without a database or a loadable default config."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from aibridge_gw import config_model
from aibridge_gw.config import ConfigError, load_config, parse_config
from tests.support.gateway import BIN, ROOT

PROVIDER = {"name": "openai", "type": "openai", "base_url": "https://api.openai.com/v1", "key": "sk-test"}


@pytest.mark.parametrize(("raw", "message"), [
    ({"retention_day": 3}, "retention_day: unknown key; did you mean `retention_days`?"),
    ({"mcp": {"max_round": 3}}, "mcp.max_round: unknown key; did you mean `mcp.max_rounds`?"),
    ({"providers": [{**PROVIDER, "passthru_paths": ["/x"]}]},
     "providers[0].passthru_paths: unknown key; did you mean `providers[0].passthrough_paths`?"),
    ({"circuit_breaker": {"failure": 3}},
     "circuit_breaker.failure: unknown key; did you mean `circuit_breaker.failures`?"),
    ({"limits": {"max_body_mb": 3}}, "limits.max_body_mb: unknown key; did you mean `limits.max_request_body_mb`?"),
    ({"capture": {"dir": "x"}}, "capture.dir: unknown key; known keys here: directory, max_age_minutes, max_mb"),
    ({"metrics": {"prefx": "x_"}}, "metrics.prefx: unknown key; did you mean `metrics.prefix`?"),
    ({"mcp": {"max_tools": -1}}, "mcp.max_tools: Input should be greater than or equal to 1 (got -1)"),
    ({"circuit_breaker": {"failures": 0}},
     "circuit_breaker.failures: Input should be greater than or equal to 1 (got 0)"),
    ({"timeouts": {"connect_seconds": "soon"}}, "timeouts.connect_seconds: Input should be a valid number"),
    ({"budgets": {"users": {"bob": {"tokens_per_dya": 5}}}},
     "budgets.users.bob.tokens_per_dya: unknown key; did you mean `budgets.users.bob.tokens_per_day`?"),
    ({"providers": [{**PROVIDER, "type": "openia"}]}, "providers[0].type: 'openia' is not a provider type"),
    ({"providers": [{**PROVIDER, "region": "us-east-1"}]}, "providers[0].region: unknown key"),
    ({"storage": {"on_failure": "panic"}}, "storage.on_failure: Input should be 'serve' or 'refuse'"),
])
def test_a_mistyped_config_is_refused_naming_the_key_and_the_closest_valid_one(raw, message):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert message in str(e.value)


def test_a_provider_types_own_keys_are_accepted_only_for_that_type():
    bedrock = {"name": "bedrock", "type": "bedrock", "region": "us-east-1", "access_key": "AKIDEXAMPLE",
               "access_key_secret": "secret", "model": "anthropic.claude-sonnet-4-5"}
    config = parse_config({"providers": [bedrock]})
    assert config.providers[0].transport.region == "us-east-1"
    with pytest.raises(ConfigError, match=r"providers\[0\]\.regoin: unknown key; did you mean `providers\[0\]\.region`"):
        parse_config({"providers": [{**bedrock, "regoin": "us-east-1"}]})


def test_secrets_are_never_repeated_in_a_config_error():
    with pytest.raises(ConfigError) as e:
        parse_config({"providers": [{**PROVIDER, "key": 12345678901234}], "metrics": {"token": 98765432109}})
    assert "12345678901234" not in str(e.value) and "98765432109" not in str(e.value)
    assert "providers[0].key" in str(e.value) and "metrics.token" in str(e.value)


def test_every_problem_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        parse_config({"retention_day": 1, "mcp": {"max_round": 2}, "timeouts": {"connect_seconds": -1}})
    text = str(e.value)
    assert text.startswith("3 problems:") and "retention_days" in text and "mcp.max_rounds" in text
    assert "timeouts.connect_seconds" in text


def test_the_shipped_config_and_empty_sections_load():
    config = load_config(ROOT / "config" / "aibridge.yaml")
    assert [p.name for p in config.providers] == ["anthropic", "openai"]
    config = parse_config({"storage": None, "mcp": None, "providers": [PROVIDER]})
    assert config.mcp.max_rounds == 10 and config.storage.backlog_max_mb == 512


def test_the_schema_covers_every_key_and_refuses_unknown_ones():
    schema = config_model.schema()
    top = schema["properties"]
    assert {"providers", "storage", "timeouts", "budgets", "mcp_servers", "retention_days"} <= set(top)
    assert schema["additionalProperties"] is False
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values() if d.get("type") == "object"
               and "properties" in d)
    # Every provider type has its own variant; Bedrock's carries its region.
    variants = {d["properties"]["type"]["const"]: d for d in schema["$defs"].values()
                if "type" in d.get("properties", {}) and "const" in d["properties"]["type"]}
    assert "region" in variants["bedrock"]["properties"] and "region" not in variants["openai"]["properties"]


def _cli(tmp_path, *args, config: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("AIBRIDGE_CONFIG", "AIBRIDGE_HOME")}
    env["AIBRIDGE_HOME"] = str(tmp_path / "nowhere")
    if config:
        env["AIBRIDGE_CONFIG"] = config
    return subprocess.run([str(BIN / "aibridge"), *args], capture_output=True, text=True, env=env, timeout=60,
                          cwd=tmp_path)


@pytest.mark.integration  # runs the CLI as a process
def test_config_check_and_schema_need_no_database_and_no_default_config(tmp_path):
    schema = _cli(tmp_path, "config", "schema")
    assert schema.returncode == 0, schema.stderr
    assert json.loads(schema.stdout)["title"] == "aibridge configuration"
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"providers": [PROVIDER], "storage": {"duckdb": str(tmp_path / "no" / "db")}}))
    ok = _cli(tmp_path, "config", "check", str(good))
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr
    assert not (tmp_path / "no").exists()  # nothing opened or created
    bad = tmp_path / "bad.yaml"
    bad.write_text("retention_day: 3\nproviders: []\n")
    r = _cli(tmp_path, "config", "check", str(bad), config=str(good))  # FILE overrides --config/$AIBRIDGE_CONFIG
    assert r.returncode == 1 and "did you mean `retention_days`?" in r.stderr
    r = _cli(tmp_path, "--config", str(bad), "config", "check")
    assert r.returncode == 1 and "retention_day: unknown key" in r.stderr
    missing = _cli(tmp_path, "config", "check")
    assert missing.returncode == 1 and "config file not found" in missing.stderr


def test_the_reference_in_the_docs_lists_every_key_as_the_models_define_it():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    block = doc.split("<!-- reference:start -->\n", 1)[1].split("<!-- reference:end -->", 1)[0]
    assert block == config_model.reference(), "docs/configuration.md is stale: regenerate its reference block"
