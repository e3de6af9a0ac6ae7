"""Secrets and personal data in a text, as typed positions (`Finding`): what a policy tests and what redaction masks.

Secrets are found by detect-secrets' own plugins, run in-process on a string: their patterns, their JWT check
and their false-positive heuristics, but not their `analyze_line`, which consults the library's global settings
(and can verify a secret over the network), and which yields the secret's text rather than its position. Personal
data are a few patterns of our own, each confirmed by its checksum (Luhn for cards, mod-97 for IBANs).

Work is bounded: a text is scanned up to `SCAN_LIMIT` characters, and the library's slow case-insensitive
patterns (keyword assignments and the like) only run on lines near one of their necessary words (`Gate`), at most
`GATED_LIMIT` characters of such lines per text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from detect_secrets.filters import heuristic
from detect_secrets.plugins import (
    artifactory,
    aws,
    azure_storage_key,
    basic_auth,
    cloudant,
    discord,
    github_token,
    gitlab_token,
    ibm_cloud_iam,
    ibm_cos_hmac,
    jwt,
    keyword,
    mailchimp,
    npm,
    openai,
    private_key,
    pypi_token,
    sendgrid,
    slack,
    softlayer,
    square_oauth,
    stripe,
    telegram_token,
    twilio,
)
from detect_secrets.plugins.base import BasePlugin, RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString

SCAN_LIMIT = 4_000_000  # characters of one text that are scanned; the rest is not
GATED_LIMIT = 128_000  # characters of gated lines one text may cost the slow patterns
WINDOW = 256  # characters either side of a gate word where its plugin's patterns may start (within its line)
ASSIGNMENT_REACH = 64  # an assignment-only plugin's gate word counts with an assignment sign this close


@dataclass(frozen=True, slots=True)
class Finding:
    """A detected value: its type (short kebab-case) and where it is in the text; never the value itself."""

    type: str
    start: int
    end: int


class _Plugin:
    """One detect-secrets plugin, run for positions: each of its patterns over the text (only near a gate word when
    it has gates). The secret is the whole match, or its capture group when that group holds a value (8
    characters or more) rather than a prefix alternation such as (ghp|gho|…)."""

    def __init__(self, kind: str, plugin: BasePlugin, gate: Gate | None = None,
                 patterns: list[tuple[re.Pattern, int | None]] | None = None) -> None:
        self.kind = kind
        self.plugin = plugin
        self.gate = gate
        self.patterns = patterns if patterns is not None else [(p, None) for p in plugin.denylist]

    def spans(self, text: str, windows: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        for pattern, group in self.patterns:
            for lo, hi in windows:
                for m in pattern.finditer(text, lo, hi):
                    span = self._span(m, group)
                    if span is not None and self.accept(text, *span):
                        yield self.extend(text, *span)

    @staticmethod
    def _span(m: re.Match, group: int | None) -> tuple[int, int] | None:
        if group is None:
            group = next((g for g in range(1, (m.re.groups or 0) + 1)
                          if m.group(g) and len(m.group(g)) >= 8), 0)
        start, end = m.span(group)
        while start < end and _delimiter(m.string[start]):
            start += 1
        while end > start and _delimiter(m.string[end - 1]):
            end -= 1
        return (start, end) if end > start else None

    def accept(self, text: str, start: int, end: int) -> bool:
        return True

    def extend(self, text: str, start: int, end: int) -> tuple[int, int]:
        """A match can stop inside its token (the JWT pattern ends before the signature): mask to the token's end."""
        m = _TOKEN_TAIL.match(text, end)
        end = m.end() if m else end
        while end > start and text[end - 1] == ".":
            end -= 1
        return start, end


def _delimiter(ch: str) -> bool:
    return ch.isspace() or ch in "\"'`=:"


_TOKEN_TAIL = re.compile(r"[\w\-+/=.]+")


class _Jwt(_Plugin):
    """A JWT only when its header and payload decode as JSON (the plugin's own check)."""

    def accept(self, text: str, start: int, end: int) -> bool:
        return jwt.JwtTokenDetector.is_formally_valid(text[start:end])


class _PrivateKey(_Plugin):
    """The plugin matches a key's BEGIN line; the whole block, to its END line, is the secret."""

    _END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY[A-Z ]*-----|---- END SSH2 ENCRYPTED PRIVATE KEY ----")
    _BODY = re.compile(r"[A-Z ]*-*(?:\s*[A-Za-z0-9+/=]{16,})*")  # a block cut before its END line

    def extend(self, text: str, start: int, end: int) -> tuple[int, int]:
        start = start - 5 if text.startswith("-----", start - 5) else start
        m = self._END.search(text, end, end + 64_000)
        if m:
            return start, m.end()
        return start, self._BODY.match(text, end, end + 64_000).end()


class _Keyword(_Plugin):
    """A value assigned to a secret-sounding name (password=, api_key: …), kept only when it looks random: no
    whitespace, 8 characters or more, Shannon entropy over the base64 alphabet at least `MIN_ENTROPY`, and not
    discarded by detect-secrets' heuristics (templates, ${VAR}, indirect references, UUIDs, ids, sequences)."""

    MIN_ENTROPY = 3.0
    _entropy = Base64HighEntropyString()

    def accept(self, text: str, start: int, end: int) -> bool:
        value = text[start:end]
        if len(value) < 8 or any(c.isspace() for c in value):
            return False
        if self._entropy.calculate_shannon_entropy(value) < self.MIN_ENTROPY:
            return False
        line = text[text.rfind("\n", 0, start) + 1:_line_end(text, end)]
        return not (heuristic.is_templated_secret(value) or heuristic.is_prefixed_with_dollar_sign(value)
                    or heuristic.is_sequential_string(value) or heuristic.is_potential_uuid(value)
                    or heuristic.is_not_alphanumeric_string(value) or heuristic.is_indirect_reference(line)
                    or heuristic.is_likely_id_string(value, line, self.plugin))


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end == -1 else end


@dataclass(frozen=True, slots=True)
class Gate:
    """Words one of which every match of a plugin contains (lower-case ones in any case), and whether the plugin
    only matches assignments (an =, :, ( or > within `ASSIGNMENT_REACH` of the word)."""

    words: tuple[str, ...]
    assigned: bool = False


_KEY_WORDS = ("key", "pw", "pass", "secret", "token")  # the keyword families' necessary words (pw covers pwd)
_KEYWORD_PATTERNS = list({**keyword.QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP,
                          **keyword.CONFIG_DENYLIST_REGEX_TO_GROUP}.items())


class AnthropicKeyDetector(RegexBasedDetector):
    """Anthropic API and admin keys, which detect-secrets has no plugin for (an AI gateway's users paste them more
    than any other), written as the library's own extension point: a regex-based plugin."""

    secret_type = "Anthropic API Key"
    denylist = [re.compile(r"sk-ant-(?:api|admin|oat)\d{2}-[A-Za-z0-9_\-]{32,}")]


class GoogleApiKeyDetector(RegexBasedDetector):
    """Google API keys (Gemini, Maps, …): `AIza` and 35 characters; likewise missing from detect-secrets."""

    secret_type = "Google API Key"
    denylist = [re.compile(r"\bAIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])")]


SECRET_PLUGINS: tuple[_Plugin, ...] = (
    _Plugin("aws-key", aws.AWSKeyDetector()),
    _Plugin("anthropic-key", AnthropicKeyDetector(), Gate(("sk-ant-",))),
    _Plugin("google-api-key", GoogleApiKeyDetector(), Gate(("aiza",))),
    _Plugin("github-token", github_token.GitHubTokenDetector()),
    _Plugin("gitlab-token", gitlab_token.GitLabTokenDetector()),
    _Plugin("slack-token", slack.SlackDetector(), Gate(("xox", "hooks.slack.com"))),
    _Plugin("stripe-key", stripe.StripeDetector(), Gate(("k_live_",))),
    _PrivateKey("private-key", private_key.PrivateKeyDetector()),
    _Jwt("jwt", jwt.JwtTokenDetector()),
    _Plugin("basic-auth", basic_auth.BasicAuthDetector()),
    _Plugin("openai-key", openai.OpenAIDetector()),
    _Plugin("azure-storage-key", azure_storage_key.AzureStorageKeyDetector()),
    _Plugin("artifactory-token", artifactory.ArtifactoryDetector(), Gate(("AKC", "AP"))),
    _Plugin("discord-token", discord.DiscordBotTokenDetector()),
    _Plugin("mailchimp-key", mailchimp.MailchimpDetector(), Gate(("-us",))),
    _Plugin("npm-token", npm.NpmDetector(), Gate(("_authtoken",), assigned=True)),
    _Plugin("pypi-token", pypi_token.PypiTokenDetector()),
    _Plugin("sendgrid-key", sendgrid.SendGridDetector()),
    _Plugin("square-oauth", square_oauth.SquareOAuthDetector()),
    _Plugin("telegram-token", telegram_token.TelegramBotTokenDetector()),
    _Plugin("twilio-key", twilio.TwilioKeyDetector()),
    _Plugin("cloudant-key", cloudant.CloudantDetector(), Gate((*_KEY_WORDS, "cloudant"), assigned=True)),
    _Plugin("ibm-cloud-key", ibm_cloud_iam.IbmCloudIamDetector(), Gate(_KEY_WORDS, assigned=True)),
    _Plugin("ibm-cos-key", ibm_cos_hmac.IbmCosHmacDetector(), Gate(("secret",), assigned=True)),
    _Plugin("softlayer-key", softlayer.SoftlayerDetector(), Gate((*_KEY_WORDS, "softlayer"), assigned=True)),
    _Keyword("high-entropy", keyword.KeywordDetector(), Gate((*_KEY_WORDS, "contrase"), assigned=True),
             patterns=_KEYWORD_PATTERNS),
)
"""Every detect-secrets plugin but two: the public-IP one (an address is not a secret) and the bare high-entropy
string ones (hashes, ids and base64 data in code and prompts would all match; their entropy measure is used for
values assigned to secret-sounding names instead)."""


class _Windows:
    """Where the gated patterns may look in one text: the lines around each gate word, clipped to `WINDOW` either
    side, merged, at most `GATED_LIMIT` characters in all."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lowered = text.lower()
        self._cache: dict[Gate, list[tuple[int, int]]] = {}

    def of(self, gate: Gate | None) -> list[tuple[int, int]]:
        if gate is None:
            return [(0, len(self.text))]
        if gate not in self._cache:
            self._cache[gate] = self._windows(gate)
        return self._cache[gate]

    def _windows(self, gate: Gate) -> list[tuple[int, int]]:
        text, low = self.text, self.lowered
        hits = sorted(i for word in gate.words for i in _occurrences(low if word.islower() else text, word))
        if gate.assigned:
            hits = [i for i in hits if _ASSIGNMENT.search(text, max(0, i - ASSIGNMENT_REACH), i + ASSIGNMENT_REACH)]
        out: list[tuple[int, int]] = []
        budget = GATED_LIMIT
        for i in hits:
            lo = max(text.rfind("\n", 0, i) + 1, i - WINDOW)
            hi = min(_line_end(text, i), i + WINDOW)
            if out and lo <= out[-1][1]:
                lo, prev_hi = out.pop()
                budget += prev_hi - lo
                hi = max(hi, prev_hi)
            if hi - lo > budget:
                break
            budget -= hi - lo
            out.append((lo, hi))
        return out


_ASSIGNMENT = re.compile(r"[=:(>]")


def _occurrences(text: str, word: str) -> Iterator[int]:
    i = text.find(word)
    while i != -1:
        yield i
        i = text.find(word, i + 1)


def secrets(text: str) -> list[Finding]:
    """Credentials in `text` (AWS keys, GitHub/GitLab/Slack/Stripe tokens, private keys, JWTs, basic auth, values
    assigned to secret-sounding names, …), in text order."""
    text = text[:SCAN_LIMIT]
    windows = _Windows(text)
    found = {Finding(p.kind, s, e) for p in SECRET_PLUGINS for s, e in p.spans(text, windows.of(p.gate))}
    return sorted(found, key=lambda f: (f.start, f.end, f.type))


class _Pii:
    """A pattern for one kind of personal data, the characters that may not precede a match (a match starts a
    token), and the check a match must pass. Patterns begin with a character class rather than a lookbehind, so
    the regex engine skips the text that cannot start one."""

    def __init__(self, kind: str, pattern: str, not_after: str, valid: Callable[[str], bool]) -> None:
        self.kind = kind
        self.pattern = re.compile(pattern)
        self.not_after = not_after
        self.valid = valid

    def find(self, text: str) -> Iterator[Finding]:
        for m in self.pattern.finditer(text):
            start = m.start()
            if (start == 0 or text[start - 1] not in self.not_after) and self.valid(m.group()):
                yield Finding(self.kind, start, m.end())


class _Email:
    """An e-mail address, found from its @ (rare in text) outwards; not the user:password@ of a URL."""

    kind = "email"
    _LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+%-")
    _DOMAIN = re.compile(r"(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}(?![\w-])")

    def find(self, text: str) -> Iterator[Finding]:
        for at in _occurrences(text, "@"):
            start = at
            while start > 0 and at - start < 64 and text[start - 1] in self._LOCAL:
                start -= 1
            domain = self._DOMAIN.match(text, at + 1)
            if start == at or domain is None or (start > 0 and text[start - 1] in self._LOCAL):
                continue
            if text[start - 1:start] in (":", "/") and not text.endswith("mailto:", 0, start):
                continue
            yield Finding(self.kind, start, domain.end())


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in _digits(number)]
    odd = digits[-1::-2]
    even = [sum(divmod(2 * d, 10)) for d in digits[-2::-2]]
    return bool(digits) and (sum(odd) + sum(even)) % 10 == 0


_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3[0689]|6")  # Visa, Mastercard, Amex, Diners/JCB, Discover/UnionPay


def _card(s: str) -> bool:
    digits = _digits(s)
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn_valid(digits)


IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_valid(s: str) -> bool:
    iban = s.replace(" ", "")
    if IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _phone(s: str) -> bool:
    return 10 <= len(_digits(s)) <= 15


_WORD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"

PII_PATTERNS: tuple[_Pii | _Email, ...] = (
    _Email(),
    _Pii("phone", r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w)", _WORD + "+", _phone),
    _Pii("phone", r"(?:\(\d{3}\)|\d{3})[ .-]\d{3}[ .-]\d{4}(?!\w)", _WORD + "(+", _phone),
    _Pii("card", r"\d(?:[ -]?\d){12,18}(?![\d-])", "0123456789-", _card),
    _Pii("iban", r"[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)(?![A-Za-z0-9])",
         _WORD, iban_valid),
)


def pii(text: str) -> list[Finding]:
    """Personal data in `text`: e-mail addresses, phone numbers (international +… or North American), card numbers
    (network prefix and Luhn) and IBANs (country length and mod-97), in text order."""
    text = text[:SCAN_LIMIT]
    found = {f for p in PII_PATTERNS for f in p.find(text)}
    return sorted(found, key=lambda f: (f.start, f.end, f.type))


DETECTORS: dict[str, Callable[[str], list[Finding]]] = {"secrets": secrets, "pii": pii}


def types_of(findings: list[Finding] | tuple[Finding, ...]) -> list[str]:
    """The distinct types, in order of first appearance."""
    return list(dict.fromkeys(f.type for f in findings))


class Scan:
    """Detector results within one request: each (detector, text) is scanned once, however many rules, hooks and
    redactions ask."""

    def __init__(self) -> None:
        self._found: dict[tuple[str, str], tuple[Finding, ...]] = {}

    def findings(self, detector: str, text: str) -> tuple[Finding, ...]:
        key = (detector, text)
        if key not in self._found:
            self._found[key] = tuple(DETECTORS[detector](text))
        return self._found[key]
