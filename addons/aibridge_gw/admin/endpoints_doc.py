"""The table of every endpoint the gateway relays (docs/endpoints.md), generated from the providers' endpoint lists so
it cannot drift from them: `python -m aibridge_gw.admin.endpoints_doc --write docs/endpoints.md` rewrites it in place
(tests/test_paid_objects.py fails when the file differs from what this prints)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..apis import PROVIDERS, WIRE_APIS
from ..flow.objects import WATCHED

BEGIN, END = "<!-- endpoints:begin (generated: python -m aibridge_gw.admin.endpoints_doc --write docs/endpoints.md) -->", \
    "<!-- endpoints:end -->"

_NOTES = {
    "anthropic.message_batches": "request count in the metadata; the batch's creator is remembered",
    "openai.batches": "input file and endpoint in the metadata; the batch's creator is remembered",
    "openai.responses": "with `background: true` the creator is remembered and the usage is recorded at retrieval",
    "anthropic.message_batches.results": "one interception per retrieval, usage summed per model",
    "openai.batches.results": "every download is recorded; a batch's output file carries usage: one interception "
                              "per retrieval, usage summed per model",
    "openai.responses.retrieve": "JSON or `?stream=true`",
}
_WATCH_NOTES = {
    "results_url": "read on the way: `results_url` is pointed at the gateway (base-URL mode)",
    "output_files": "read on the way: `output_file_id`/`error_file_id` are tied to the batch's creator",
}


def treatment(ptype: str, label: str, api: str | None) -> tuple[str, str]:
    if api is None:
        note = _WATCH_NOTES.get(WATCHED.get((ptype, label), ""), "")
        return "passed through, not recorded", note
    codec = WIRE_APIS[api]
    note = _NOTES.get(api, "")
    retrieval = getattr(codec, "retrieval", None)
    if api == "openai.realtime":
        return ("refused 403", "its client secret is billed to the central key and bypasses the gateway; with the "
                "instance's `allow_realtime: true`: relayed and recorded (`openai.realtime`)")
    if retrieval == "results":
        return f"metered at retrieval (`{api}`)", note + "; charged once, to the batch's creator"
    if retrieval == "response":
        return (f"metered at retrieval (`{api}`)", "a background response created through the gateway, the first "
                "time it is retrieved finished, charged to its creator; otherwise passed through, not recorded; "
                + note)
    kind = "metered" if not codec.model_api else "metered (usage, prompt, tool calls)"
    return f"{kind} (`{api}`)", note


def rows() -> list[tuple[str, str, str, str, str]]:
    out = []
    for ptype, provider in PROVIDERS.items():
        prefix = "/v1" if provider.version_in_base_url else ""
        for ep in provider.endpoints:
            what, note = treatment(ptype, ep.label, ep.api)
            for method in sorted(ep.methods):
                out.append((ptype, method, prefix + ep.label, what, note))
    return out


def render() -> str:
    lines = ["| provider type | method | path | treatment | notes |", "|---|---|---|---|---|"]
    for ptype, method, path, what, note in rows():
        lines.append(f"| {ptype} | {method} | `{path}` | {what} | {note} |")
    return "\n".join(lines)


def rewritten(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{render()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write"] and len(argv) == 2:
        path = Path(argv[1])
        path.write_text(rewritten(path.read_text()))
        return 0
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
