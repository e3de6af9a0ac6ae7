"""Who may see and call which central MCP tools: the `mcp_access` rules, evaluated per user.

Order of checks for one tool: the server's own `tool_allow_regex`/`tool_deny_regex` first (a tool they exclude
exists for nobody), then the rules. Without any rule every user may use every tool (the behaviour before rules
existed). With rules, a tool is allowed when at least one allow rule matches the user, the server and the tool and
no deny rule does: a deny wins whatever the order. `servers` and `tools` are glob patterns (`delete_*`) on the
server's name and on the server's own tool names; a rule applies to the users it names and to the members of the
groups it names (neither: every user).

Resources and prompts have no rules of their own: a user sees those of every server on which some tool could be
allowed to them, unless a deny rule takes the whole server (one without `tools`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..config import McpAccessRule, McpServer
from .tools import MAX_TOOL_NAME, model_tool_name


@dataclass(frozen=True, slots=True)
class Caller:
    """Whom access is decided for: the user's name and groups (`Actor.groups`)."""

    user_name: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    why: str  # for `aibridge mcp access` and the refusal a client reads


def _matches(patterns: tuple[str, ...] | None, value: str) -> bool:
    return patterns is None or any(fnmatchcase(value, p) for p in patterns)


def describe(rule: McpAccessRule) -> str:
    """A rule in words, named by its place in the file: `mcp_access[1] (deny; servers github; tools delete_*)`."""
    parts = ["deny" if rule.deny else "allow"]
    if rule.servers is not None:
        parts.append("servers " + ", ".join(rule.servers))
    if rule.tools is not None:
        parts.append("tools " + ", ".join(rule.tools))
    if rule.users:
        parts.append("users " + ", ".join(rule.users))
    if rule.groups:
        parts.append("groups " + ", ".join(rule.groups))
    return f"mcp_access[{rule.index}] ({'; '.join(parts)})"


class McpAccess:
    """One configuration's rules; built once per configuration, asked per tool (microseconds, on the loop)."""

    def __init__(self, rules: tuple[McpAccessRule, ...]) -> None:
        self.rules = rules

    @property
    def open(self) -> bool:
        """No rules: everything the servers list is everyone's."""
        return not self.rules

    def applies(self, rule: McpAccessRule, caller: Caller) -> bool:
        if not rule.users and not rule.groups:
            return True
        return caller.user_name in rule.users or any(g in caller.groups for g in rule.groups)

    def decide(self, server: McpServer, tool: str, caller: Caller) -> Verdict:
        """Whether `caller` may see and call `tool` of `server`, and why."""
        if not server.permits(tool):
            which = "tool_deny_regex" if server.deny is not None and server.deny.search(tool) else "tool_allow_regex"
            return Verdict(False, f"excluded by {which} of server {server.name}")
        if self.open:
            return Verdict(True, "no mcp_access rules: every tool is every user's")
        allowed_by = None
        for rule in self.rules:
            if not (self.applies(rule, caller) and _matches(rule.servers, server.name) and _matches(rule.tools, tool)):
                continue
            if rule.deny:
                return Verdict(False, f"denied by {describe(rule)}")
            allowed_by = allowed_by or rule
        if allowed_by is None:
            return Verdict(False, "no mcp_access rule allows it")
        return Verdict(True, f"allowed by {describe(allowed_by)}")

    def server_visible(self, server: McpServer, caller: Caller) -> bool:
        """Whether any of the server's tools could be allowed to `caller` (and its resources and prompts shown):
        an allow rule for the user covers the server, and no deny rule takes the whole server."""
        if self.open:
            return True
        mine = [r for r in self.rules if self.applies(r, caller) and _matches(r.servers, server.name)]
        if any(r.deny and r.tools is None for r in mine):
            return False
        return any(not r.deny for r in mine)


ACCESS_COLUMNS = ["server", "tool", "name", "allowed", "why"]


def access_rows(servers, listings: dict, access: McpAccess, caller: Caller, name_limit: int = MAX_TOOL_NAME
                ) -> list[list]:
    """What `caller` may call and why, one row per tool of every server (`aibridge mcp access`). `listings`: server
    name -> its listing for this user (mcp/registry.Listing), or None when it takes each user's own token and the
    user has none, or a text saying why it could not be listed."""
    rows = []
    for server in servers:
        listing = listings.get(server.name)
        if listing is None and server.oauth:
            rows.append([server.name, "*", "", False, f"oauth: {caller.user_name} has not signed in to it (aibridge "
                                                       f"mcp login --server {server.name} --user {caller.user_name})"])
            continue
        if listing is None:
            rows.append([server.name, "*", "", False, f"per_user_token: {caller.user_name} has no token for it "
                                                       f"(aibridge mcp-token set --server {server.name})"])
            continue
        if isinstance(listing, str):
            rows.append([server.name, "*", "", None, listing])
            continue
        if not listing.tools:
            why = f"unavailable: {listing.error}" if listing.error else "the server lists no tools"
            rows.append([server.name, "*", "", None, why])
            continue
        for tool in listing.tools:
            verdict = access.decide(server, tool.name, caller)
            rows.append([server.name, tool.name, model_tool_name(f"{server.name}__{tool.name}", name_limit), verdict.allowed,
                         verdict.why])
    return rows
