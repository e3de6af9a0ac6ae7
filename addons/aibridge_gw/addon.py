"""The mitmproxy addon: route → auth → relay + tap → record. Wire formats live in codecs/, rows in recording."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
from pathlib import Path

from mitmproxy import ctx, exceptions, http, tls
from mitmproxy.net.http.url import hostport

from .auth import CREDENTIAL_HEADERS, Actor, TokenDirectory, credential_from_headers, mask
from .clients import detect_client, detect_session
from .codecs import BY_API, StreamTap
from .config import Config, ConfigError, load_config
from .control import CONTROL_PATH, remove_runtime_file, write_runtime_file
from .errors import error_response
from .records import BadRequest, ResponseSummary
from .recording import Interception, Recorder
from .routing import Route, Router
from .store import ops
from .store.writer import Store

log = logging.getLogger("aibridge")

# Gateway credentials a client may send besides the provider headers; never forwarded.
GATEWAY_HEADERS = ("proxy-authorization", "x-aibridge-token", "x-coder-ai-governance-token")


class Gateway:
    def __init__(self) -> None:
        self.config: Config | None = None
        self.router: Router | None = None
        self.store: Store | None = None
        self.recorder: Recorder | None = None
        self.tokens = TokenDirectory()
        self.live: dict[str, Interception] = {}
        self._passthrough: set[str] = set()
        self._control_secret: str | None = None
        self.passthrough_total = 0
        self.rejected_total = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option(
            "aibridge_config", str, "",
            "aibridge YAML config (default: $AIBRIDGE_CONFIG, else config/aibridge.yaml).",
        )

    def configure(self, updated: set[str]) -> None:
        if self.config is not None and "aibridge_config" not in updated:
            return
        try:
            config = load_config(ctx.options.aibridge_config or None)
        except ConfigError as e:
            raise exceptions.OptionsError(f"aibridge: {e}") from None
        if self.store is not None and config.duckdb_path.resolve() != self.store.path.resolve():
            raise exceptions.OptionsError("aibridge: storage.duckdb cannot change while the gateway runs")
        self.config, self.router = config, Router(config)
        for p in config.providers:
            if not p.key:
                log.warning("provider %s has no upstream key (%s is empty); its requests will fail", p.name, p.key_source)
        if self.store is None:
            self.store = Store(config.duckdb_path, after_op=self._reload_tokens)
            try:
                self.store.open()
            except Exception as e:
                self.store = None
                raise exceptions.OptionsError(f"aibridge: cannot open {config.duckdb_path}: {e}") from None
            self.tokens.replace(self.store.read(ops.load_directory).result())
            self.recorder = Recorder(self.store)
            log.info(
                "aibridge: %d provider(s) [%s], database %s, %d active token(s)",
                len(config.providers), ", ".join(p.name for p in config.providers),
                config.duckdb_path, len(self.tokens),
            )

    def _reload_tokens(self, conn) -> None:
        self.tokens.replace(ops.load_directory(conn))

    def running(self) -> None:
        if self.store is None:
            return
        addrs = []
        try:
            addrs = ctx.master.addons.get("proxyserver").listen_addrs()
        except Exception:
            pass
        host, port = (addrs[0][0], addrs[0][1]) if addrs else (ctx.options.listen_host, ctx.options.listen_port)
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        self._control_secret = write_runtime_file(self.store.path, f"http://{host}:{port}")

    def done(self) -> None:
        """Graceful shutdown: every queued record reaches DuckDB before the file closes."""
        for ic in list(self.live.values()):
            self._end(ic, ic.tap.summary if ic.tap else ResponseSummary(), None, "gateway shut down")
        self.live.clear()
        if self.store is not None:
            remove_runtime_file(self.store.path, self._control_secret)
            self.store.close()
            log.info("aibridge: %d records written, %d failed", self.store.written, self.store.failed)
            self.store = None

    # --- proxy mode: only AI hosts are decrypted ---------------------------------------------------

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if self.router is not None and not self.router.is_ai_host(data.client_hello.sni):
            data.ignore_connection = True

    # --- request -----------------------------------------------------------------------------------

    def _addressed_to_us(self, flow: http.HTTPFlow) -> bool:
        """Origin-form requests to the listener itself (base-URL mode), as opposed to proxied ones."""
        sock = flow.client_conn.sockname
        req = flow.request
        return req.scheme == "http" and bool(sock) and req.port == sock[1]

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or self.router is None:
            return
        req = flow.request
        if self._addressed_to_us(flow):
            if req.path.startswith("/aibridge/"):
                await self._control(flow)
                return
            route = self.router.match_prefix(req.path)
            if route is None:
                flow.response = error_response(
                    None, 404, f"no provider is served at {req.path.split('?')[0]!r}; use /<provider>/… "
                    f"(configured: {', '.join('/' + p.name for p in self.config.providers)})",
                )
                return
        elif self.router.is_ai_host(req.host):
            route = self.router.match_host(req.host, req.path)
        else:
            return  # proxied traffic to a non-AI host: not ours to touch

        ptype = route.provider.type
        actor = self.tokens.lookup(credential_from_headers(req.headers))
        if actor is None:
            self.rejected_total += 1
            had = credential_from_headers(req.headers) is not None
            flow.response = error_response(
                ptype, 401,
                "aibridge: invalid or revoked gateway token" if had
                else "aibridge: missing gateway token (send it as the API key)",
            )
            return
        if not route.provider.key:
            flow.response = error_response(
                ptype, 500, f"aibridge: no upstream key configured for provider {route.provider.name!r}"
            )
            return

        if route.api and req.method == "POST":
            ic = self._begin(flow, route, actor)
            if ic is None:
                return
            await self.recorder.link_thread(ic)
            self.recorder.started(ic)
            self.live[flow.id] = ic
        else:
            self.passthrough_total += 1
            self._passthrough.add(flow.id)
        self._to_upstream(flow, route)

    def _begin(self, flow: http.HTTPFlow, route: Route, actor: Actor) -> Interception | None:
        req = flow.request
        codec = BY_API[route.api]
        try:
            body = json.loads(req.content or b"")
            if not isinstance(body, dict):
                raise BadRequest("request body must be a JSON object")
            info = codec.parse_request(body)
        except (ValueError, BadRequest) as e:
            msg = str(e) if isinstance(e, BadRequest) else f"request body is not valid JSON: {e}"
            flow.response = error_response(route.provider.type, 400, f"aibridge: {msg}")
            return None
        changed = codec.prepare_request(body)
        if changed is not None:
            req.content = json.dumps(changed, ensure_ascii=False).encode()
        return Interception(
            id=flow.id,
            actor=actor,
            provider=route.provider,
            api=route.api,
            codec=codec,
            info=info,
            client=detect_client(req.headers),
            user_agent=req.headers.get("user-agent"),
            session_id=detect_session(req.headers, info.session_hint),
            credential_kind="centralized",
            credential_hint=mask(route.provider.key),
            upstream_path=route.upstream_path.split("?")[0],
        )

    def _to_upstream(self, flow: http.HTTPFlow, route: Route) -> None:
        req, prov = flow.request, route.provider
        req.scheme, req.host, req.port = prov.scheme, prov.host, prov.port
        req.host_header = hostport(prov.scheme, prov.host, prov.port)
        req.path = route.upstream_path
        for h in CREDENTIAL_HEADERS + GATEWAY_HEADERS:
            req.headers.pop(h, None)
        if prov.type == "anthropic":
            req.headers["x-api-key"] = prov.key
        else:
            req.headers["authorization"] = f"Bearer {prov.key}"
        if flow.id in self.live:
            # The stream tap parses bytes as they pass: ask for them uncompressed.
            req.headers["accept-encoding"] = "identity"

    # --- response ----------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._passthrough:
            flow.response.stream = True
            return
        ic = self.live.get(flow.id)
        if ic is None:
            return
        resp = flow.response
        if 200 <= resp.status_code < 300 and "text/event-stream" in resp.headers.get("content-type", ""):
            ic.tap = StreamTap(ic.codec)
            resp.stream = ic.tap

    def response(self, flow: http.HTTPFlow) -> None:
        self._passthrough.discard(flow.id)
        ic = self.live.pop(flow.id, None)
        if ic is None:
            return
        resp = flow.response
        if ic.tap is not None:
            summary = ic.tap.summary
            ic.codec.finish_stream(summary)
            error = summary.error
            if not error and not summary.complete:
                error = f"stream ended before its final event{f' ({ic.tap.broken})' if ic.tap.broken else ''}"
        else:
            summary, error = self._summarize_body(ic, resp)
        if resp.status_code >= 400:
            error = f"HTTP {resp.status_code}: {error or 'upstream error'}"
        self._end(ic, summary, resp.status_code, error)

    def _summarize_body(self, ic: Interception, resp: http.Response) -> tuple[ResponseSummary, str | None]:
        try:
            body = json.loads(resp.content or b"")
        except ValueError:
            return ResponseSummary(), "response body is not JSON" if resp.status_code < 400 else None
        if not isinstance(body, dict):
            return ResponseSummary(), "response body is not a JSON object"
        summary = ic.codec.summarize(body)
        return summary, summary.error

    def error(self, flow: http.HTTPFlow) -> None:
        self._passthrough.discard(flow.id)
        ic = self.live.pop(flow.id, None)
        if ic is None:
            return
        summary = ic.tap.summary if ic.tap else ResponseSummary()
        if ic.tap:
            ic.codec.finish_stream(summary)
        status = flow.response.status_code if flow.response else None
        self._end(ic, summary, status, flow.error.msg if flow.error else "connection error")

    def _end(self, ic: Interception, summary: ResponseSummary, http_status: int | None, error: str | None) -> None:
        status = self.recorder.ended(ic, summary, http_status, error)
        if status:
            u = summary.usages
            log.info(
                "interception %s user=%s provider=%s model=%s status=%s in=%d out=%d tools=%d%s",
                ic.id, ic.actor.user_name, ic.provider.name, ic.info.model, status,
                sum(x.input_tokens for x in u), sum(x.output_tokens for x in u), len(summary.tool_calls),
                f" error={error!r}" if error else "",
            )

    # --- the gateway's own endpoints ---------------------------------------------------------------

    async def _control(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        path = req.path.split("?")[0]
        if path == "/aibridge/healthz":
            flow.response = _json(200, {"status": "ok", "inflight": len(self.live)})
            return
        if path != CONTROL_PATH or req.method != "POST":
            flow.response = error_response(None, 404, f"unknown endpoint {path}")
            return
        given = credential_from_headers(req.headers) or ""
        if not self._control_secret or not hmac.compare_digest(given.encode(), self._control_secret.encode()):
            flow.response = error_response(None, 401, "control endpoint: bad or missing secret")
            return
        try:
            payload = json.loads(req.content or b"")
            fn, writes = ops.OPS[payload["op"]]
            call = functools.partial(fn, **(payload.get("args") or {}))
        except (ValueError, KeyError, TypeError) as e:
            flow.response = error_response(None, 400, f"bad control request: {e}")
            return
        fut = self.store.call(call) if writes else self.store.read(call)
        try:
            result = await asyncio.wrap_future(fut)
        except (ops.OpError, TypeError) as e:
            flow.response = error_response(None, 400, str(e))
            return
        except Exception as e:
            log.exception("control op failed")
            flow.response = error_response(None, 500, f"{type(e).__name__}: {e}")
            return
        flow.response = _json(200, {"result": result})


def _json(status: int, obj) -> http.Response:
    return http.Response.make(status, json.dumps(obj).encode(), {"content-type": "application/json"})
