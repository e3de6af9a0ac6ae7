"""The audit tables' row layout in one place: each table's columns beside the builder of its rows.

Records travel to the writer (and its spool) as `Insert(table, row)` with the row in column order; building
them here, by column name, keeps the order the schema's, whatever code records. A column the caller leaves out
is NULL.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Insert:
    table: str
    row: tuple


@dataclass(slots=True)
class EndInterception:
    id: str
    values: tuple  # in END_COLUMNS order


class Table:
    __slots__ = ("name", "columns", "_names")

    def __init__(self, name: str, columns: tuple[str, ...]) -> None:
        self.name, self.columns, self._names = name, columns, frozenset(columns)

    def row(self, **values) -> Insert:
        if not values.keys() <= self._names:
            raise KeyError(f"{self.name} has no column {sorted(values.keys() - self._names)[0]!r}")
        return Insert(self.name, tuple(map(values.get, self.columns)))


USERS = Table("aibridge_users", ("id", "name", "role", "created_at"))
INTERCEPTIONS = Table("aibridge_interceptions", (
    "id", "initiator_id", "provider", "provider_name", "model", "client", "user_agent",
    "client_session_id", "thread_parent_id", "thread_root_id", "credential_kind", "credential_hint",
    "status", "started_at", "ended_at", "metadata", "api", "stream", "http_status", "error",
    "on_behalf_of_id", "on_behalf_of_name", "purpose",
))
TOKEN_USAGES = Table("aibridge_token_usages", (
    "id", "interception_id", "provider_response_id", "input_tokens", "output_tokens",
    "cache_read_input_tokens", "cache_write_input_tokens", "metadata", "created_at", "usage_estimated",
    "cost_usd", "price",
))
USER_PROMPTS = Table("aibridge_user_prompts", ("id", "interception_id", "provider_response_id", "prompt", "created_at",
                                               "typed"))
TOOL_USAGES = Table("aibridge_tool_usages", (
    "id", "interception_id", "provider_response_id", "provider_tool_call_id", "tool", "server_url",
    "input", "injected", "invocation_error", "created_at",
))
MODEL_THOUGHTS = Table("aibridge_model_thoughts", ("id", "interception_id", "source", "content", "created_at"))
# A provider object paid work outlives its call in (a message batch, a Batch API output file, a background response):
# who created it, and the interception that recorded its usage once (metered_at/metered_by; see objects.py).
PROVIDER_OBJECTS = Table("aibridge_provider_objects", (
    "id", "provider_name", "kind", "object_id", "parent_id", "user_id", "user_name", "on_behalf_of_id",
    "on_behalf_of_name", "interception_id", "created_at", "metered_at", "metered_by",
))

# What a policy rule decided for one request or tool call (see Recorder.policy_decision): `detectors` is a JSON
# array of the detector types that fired (["aws-key"]), never the text they found.
POLICY_DECISIONS = Table("aibridge_policy_decisions", (
    "id", "interception_id", "created_at", "user_id", "rule", "policy_version", "hook", "action", "enforced",
    "detectors", "message", "tool", "tool_call_id",
))

# One call an agent made through the MCP gateway (/aibridge/mcp; see Recorder.mcp_call): `tool` is the server's own
# name for it (the resource URI for resources/read, the prompt's name for prompts/get), `arguments` a JSON object
# as stored (masked when policies mask what is stored, never a credential).
MCP_CALLS = Table("aibridge_mcp_calls", (
    "id", "created_at", "user_id", "user_name", "on_behalf_of_id", "on_behalf_of_name", "client", "client_version",
    "session_id", "method", "server", "tool", "arguments", "is_error", "outcome", "error", "result_bytes",
    "duration_ms",
))

TABLES = (USERS, INTERCEPTIONS, TOKEN_USAGES, USER_PROMPTS, TOOL_USAGES, MODEL_THOUGHTS, PROVIDER_OBJECTS,
          POLICY_DECISIONS, MCP_CALLS)
COLUMNS: dict[str, tuple[str, ...]] = {t.name: t.columns for t in TABLES}
JSON_COLUMNS = frozenset({"metadata", "detectors", "arguments"})

# Columns an interception's end sets; the row was inserted when the request arrived.
# credential_hint: the key a failover pool actually used (None keeps the hint recorded at the start).
END_COLUMNS = ("status", "ended_at", "http_status", "error", "metadata", "credential_hint")
KEPT_UNLESS_SET = frozenset({"credential_hint"})


def interception_end(id: str, *, status: str, ended_at, http_status: int | None, error: str | None,
                     metadata: str | None, credential_hint: str | None = None) -> EndInterception:
    return EndInterception(id, (status, ended_at, http_status, error, metadata, credential_hint))
