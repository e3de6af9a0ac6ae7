"""Secret and PII detectors on realistic fixtures, without false positives on ordinary prose and code, within a
bounded time on large texts; redaction of request bodies and stored texts."""

from __future__ import annotations

import base64
import copy
import json
import os
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from aibridge_gw import config_model
from aibridge_gw.policy.detectors import DETECTORS, Finding, Scan, pii, secrets
from aibridge_gw.policy.redact import mask, redact_body, redact_text

# Secret-shaped values are assembled here so the file itself holds no literal credential.
AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
GITHUB_PAT = "ghp_" + "x7Kq2LmN9pR4sT6vW8yZ1aB3cD5eF7gH9jK2"
STRIPE_KEY = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
SLACK_TOKEN = "xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


JWT = (_b64({"alg": "HS256", "typ": "JWT"}) + "." + _b64({"sub": "1234567890", "name": "Jo", "iat": 1516239022})
       + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")

PROSE_AND_CODE = '''\
Thanks for the review! I rewrote the retry loop so that the API key rotation job no longer blocks the
worker; passwords still need 12 characters and the secret store is read once per process. See RFC 7231,
section 6.5.1, and version 2.4.1 of the client (released 2024-01-15 at 10:30). The order 1700000000000 shipped.

def get_secret(key: str) -> str:
    """Read a secret from the vault by key."""
    token = vault.read(key)
    password = os.environ["DB_PASSWORD"]
    api_key = settings.get("api_key")
    secret = "${SECRET_FROM_ENV}"
    max_tokens: int = 4096
    checksum = "d41d8cd98f00b204e9800998ecf8427e"
    user_id = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    return f"{key}:{token}"
'''


def _found(text: str, findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.type, text[f.start:f.end]) for f in findings]


def test_an_aws_key_pair_is_found_in_an_env_file_and_in_a_credentials_file():
    env = f'export AWS_ACCESS_KEY_ID={AWS_KEY_ID}\nexport AWS_SECRET_ACCESS_KEY="{AWS_SECRET}"\n'
    found = _found(env, secrets(env))
    assert ("aws-key", AWS_KEY_ID) in found and ("aws-key", AWS_SECRET) in found
    credentials = f"[default]\naws_access_key_id = {AWS_KEY_ID}\naws_secret_access_key = {AWS_SECRET}\n"
    found = _found(credentials, secrets(credentials))
    assert ("aws-key", AWS_KEY_ID) in found
    assert any(value == AWS_SECRET for _, value in found)  # unquoted: found as a value assigned to a secret name


@pytest.mark.parametrize(("kind", "value"), [
    ("github-token", GITHUB_PAT), ("stripe-key", STRIPE_KEY), ("slack-token", SLACK_TOKEN), ("jwt", JWT),
])
def test_a_token_is_found_with_its_exact_span(kind, value):
    text = f"here it is: {value} — please keep it safe"
    assert _found(text, secrets(text)) == [(kind, value)]


def test_a_pem_private_key_is_masked_from_its_begin_line_to_its_end_line():
    for key in (rsa.generate_private_key(public_exponent=65537, key_size=2048),
                ec.generate_private_key(ec.SECP256R1())):
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode().strip()
        text = f"my deploy key:\n{pem}\nthanks"
        assert _found(text, secrets(text)) == [("private-key", pem)]


def test_basic_auth_in_a_url_is_the_password_only_and_not_an_email():
    text = "curl https://admin:S3cretP4ss@db.example.com/x"
    assert _found(text, secrets(text)) == [("basic-auth", "S3cretP4ss")]
    assert pii(text) == []


def test_a_value_assigned_to_a_secret_name_counts_only_when_it_looks_random():
    text = 'db_password = "Xk9#mQ2$vL7pR4nW"\npassword = "changeme"\ntoken = "${TOKEN}"\nsecret = get_secret()\n'
    assert _found(text, secrets(text)) == [("high-entropy", "Xk9#mQ2$vL7pR4nW")]


def test_ordinary_prose_and_code_raise_nothing():
    assert secrets(PROSE_AND_CODE) == []
    assert pii(PROSE_AND_CODE) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("card 4111 1111 1111 1111 on file", [("card", "4111 1111 1111 1111")]),
    ("card 4111-1111-1111-1112 on file", []),  # Luhn fails
    ("amex 378282246310005.", [("card", "378282246310005")]),
    ("ids 1700000000000 and 12345678901234", []),  # numbers, not cards
    ("iban DE89 3704 0044 0532 0130 00 ok", [("iban", "DE89 3704 0044 0532 0130 00")]),
    ("iban GB82WEST12345698765432 ok", [("iban", "GB82WEST12345698765432")]),
    ("iban DE89 3704 0044 0532 0130 01 ok", []),  # mod-97 fails
    ("write to jane.doe+billing@example.co.uk today", [("email", "jane.doe+billing@example.co.uk")]),
    ("<a href='mailto:ops@example.com'>", [("email", "ops@example.com")]),
    ("call +44 20 7946 0958 or (555) 123-4567", [("phone", "+44 20 7946 0958"), ("phone", "(555) 123-4567")]),
    ("released 2024-01-15, build 1.22.333.4444", []),
])
def test_personal_data_is_found_only_when_its_checksum_or_shape_holds(text, expected):
    assert _found(text, pii(text)) == expected


def test_large_texts_are_scanned_in_bounded_time_and_a_key_at_the_end_is_still_found():
    prose = (PROSE_AND_CODE * 1000)[:1_000_000] + f"\nkey {AWS_KEY_ID}"
    blob = base64.b64encode(os.urandom(750_000)).decode()
    started = time.perf_counter()
    found = secrets(prose)
    secrets(blob), pii(prose), pii(blob)
    assert time.perf_counter() - started < 10  # loose: the real numbers are in the commit report
    assert ("aws-key", AWS_KEY_ID) in _found(prose, found)


def test_a_scan_answers_each_text_once():
    scan = Scan()
    first = scan.findings("secrets", f"token {GITHUB_PAT}")
    assert scan.findings("secrets", f"token {GITHUB_PAT}") is first


def test_overlapping_findings_merge_into_one_mask_named_after_the_specific_detector():
    text = "x" * 30
    merged = mask(text, [Finding("high-entropy", 2, 20), Finding("aws-key", 2, 12), Finding("email", 18, 25)])
    assert merged == "xx[REDACTED:aws-key]" + "x" * 5


def test_redact_text_masks_a_stored_prompt_and_names_the_types():
    text, types = redact_text(f"use {GITHUB_PAT} and mail me at bob@example.com")
    assert text == "use [REDACTED:github-token] and mail me at [REDACTED:email]"
    assert types == ["github-token", "email"]
    assert redact_text("nothing here", ["secrets"]) == ("nothing here", [])


def test_a_nested_anthropic_body_is_masked_in_every_text_and_nothing_else():
    image = base64.b64encode(os.urandom(3000)).decode()
    body = {
        "model": "claude-sonnet-4-5", "max_tokens": 1024,
        "system": [{"type": "text", "text": f"Deploy with {AWS_KEY_ID}."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": f"Why does {GITHUB_PAT} fail? The rest of this sentence stays."},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": f"they pasted {GITHUB_PAT}", "signature": "EqQBCkgIARABGAIiQL"},
                {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": f"echo {STRIPE_KEY}"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": f"printed {STRIPE_KEY}"}]},
        ],
    }
    original = copy.deepcopy(body)
    out, types = redact_body(body)
    assert body == original  # the given body is not changed
    assert out["model"] == "claude-sonnet-4-5" and out["max_tokens"] == 1024
    assert out["system"][0]["text"] == "Deploy with [REDACTED:aws-key]."
    user = out["messages"][0]["content"]
    assert user[0]["text"] == "Why does [REDACTED:github-token] fail? The rest of this sentence stays."
    assert user[1] == body["messages"][0]["content"][1]  # image bytes untouched
    assert out["messages"][1]["content"][0] == body["messages"][1]["content"][0]  # signed thinking untouched
    assert out["messages"][1]["content"][1]["input"] == {"command": "echo [REDACTED:stripe-key]"}
    assert out["messages"][1]["content"][1]["id"] == "toolu_01"
    assert out["messages"][2]["content"][0] == {"type": "tool_result", "tool_use_id": "toolu_01",
                                               "content": "printed [REDACTED:stripe-key]"}
    assert types == ["aws-key", "github-token", "stripe-key"]


def test_an_openai_body_keeps_valid_json_tool_arguments_once_masked():
    arguments = json.dumps({"url": "https://example.com", "auth": JWT})
    body = {"model": "gpt-4.1", "messages": [
        {"role": "user", "content": "my card is 4111 1111 1111 1111, mail me at a.b@example.org"},
        {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "fetch", "arguments": arguments}}]},
    ]}
    out, types = redact_body(body, ["secrets", "pii"])
    assert out["messages"][0]["content"] == "my card is [REDACTED:card], mail me at [REDACTED:email]"
    args = json.loads(out["messages"][1]["tool_calls"][0]["function"]["arguments"])
    assert args == {"url": "https://example.com", "auth": "[REDACTED:jwt]"}
    assert out["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert sorted(types) == ["card", "email", "jwt"]
    only_secrets, types = redact_body(body, ["secrets"])
    assert "4111 1111 1111 1111" in only_secrets["messages"][0]["content"] and types == ["jwt"]


def test_the_detector_functions_conditions_may_call_are_the_detectors_there_are():
    assert tuple(DETECTORS) == config_model.DETECTOR_FUNCTIONS


def test_anthropic_and_google_api_keys_are_found_where_the_library_has_no_plugin():
    from aibridge_gw.policy.detectors import secrets

    key = "sk-ant-api03-" + "Ab3_x-9" * 14
    found = secrets(f"use {key} here")
    assert [(f.type, f.start, f.end) for f in found] == [("anthropic-key", 4, 4 + len(key))]
    google = "AIzaSyDk2-Xq9vL3mN8pQ1rT5uW7yZ0aB4cE6gH"
    assert [f.type for f in secrets(f"key={google}")] == ["google-api-key"]
    assert secrets("sk-ant- is how Anthropic keys start; AIza is Google's prefix") == []
