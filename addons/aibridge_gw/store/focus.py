"""The audit's spend as FOCUS 1.2 (the FinOps Foundation's cost and usage format): `aibridge export --focus`.

One row per UTC day, person charged (the person a service account acted for, else the caller), model billed and
provider instance: a `Usage` charge whose `BilledCost` is what those calls cost — the sum of the costs stored
with their usage rows, plus today's price of usage recorded without one (store/reports.py `_cost`, the same rule
`aibridge usage` and the dashboard follow, so the totals agree). Costs are unrounded. Token counts by kind, the
calls and the caller ride in `x_` columns, as FOCUS's extensibility rules ask. A model no price book knows gets
`BilledCost` 0 with `x_Unpriced` true (FOCUS requires a number; the flag says it is not free).

Every column FOCUS 1.2 defines is present, in its order (alphabetical), the ones that do not apply null.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from ..pricing import PriceTable
from . import reports

FOCUS_VERSION = "1.2"
FOCUS_COLUMNS = (
    "AvailabilityZone", "BilledCost", "BillingAccountId", "BillingAccountName", "BillingAccountType",
    "BillingCurrency", "BillingPeriodEnd", "BillingPeriodStart", "CapacityReservationId", "CapacityReservationStatus",
    "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargeFrequency", "ChargePeriodEnd", "ChargePeriodStart",
    "CommitmentDiscountCategory", "CommitmentDiscountId", "CommitmentDiscountName", "CommitmentDiscountQuantity",
    "CommitmentDiscountStatus", "CommitmentDiscountType", "CommitmentDiscountUnit", "ConsumedQuantity",
    "ConsumedUnit", "ContractedCost", "ContractedUnitPrice", "EffectiveCost", "InvoiceId", "InvoiceIssuerName",
    "ListCost", "ListUnitPrice", "PricingCategory", "PricingCurrency", "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost", "PricingCurrencyListUnitPrice", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "RegionId", "RegionName", "ResourceId", "ResourceName", "ResourceType",
    "ServiceCategory", "ServiceName", "ServiceSubcategory", "SkuId", "SkuMeter", "SkuPriceDetails", "SkuPriceId",
    "SubAccountId", "SubAccountName", "SubAccountType", "Tags",
)
EXTRA_COLUMNS = ("x_InputTokens", "x_OutputTokens", "x_CacheReadTokens", "x_CacheWriteTokens", "x_Interceptions",
                 "x_Unpriced", "x_ProviderType", "x_Groups")
COLUMNS = FOCUS_COLUMNS + EXTRA_COLUMNS
# Provider types → who provides and publishes the service, and its name.
PROVIDERS = {"anthropic": ("Anthropic", "Claude API"), "openai": ("OpenAI", "OpenAI API"),
             "chatgpt": ("OpenAI", "ChatGPT (Codex)"), "gemini": ("Google", "Gemini API"),
             "bedrock": ("AWS", "Amazon Bedrock"), "copilot": ("GitHub", "GitHub Copilot")}

_QUERY = """
    SELECT CAST(date_trunc('day', i.started_at AT TIME ZONE 'UTC') AS DATE) AS day,
           CAST(coalesce(i.on_behalf_of_id, i.initiator_id) AS VARCHAR) AS person_id,
           coalesce(i.on_behalf_of_name, usr.name) AS person, {billed} AS billed_model,
           i.provider_name, i.provider, count(*) AS interceptions, {sums}, sum(u.stored_cost) AS stored_cost
    FROM aibridge_interceptions i LEFT JOIN aibridge_users usr ON usr.id = i.initiator_id
    LEFT JOIN ({usage}) u ON u.interception_id = i.id
    {where}
    GROUP BY 1, 2, 3, 4, 5, 6
    ORDER BY 1, 3, 4, 5
"""


def rows(conn, prices: PriceTable, since: str | None = None, until: str | None = None,
         groups: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """The FOCUS rows of every interception with usage that started in [since, until); `groups`: user id -> the
    user's groups (for Tags)."""
    filters = {k: v for k, v in (("started_after", since), ("started_before", until)) if v}
    where, params = reports._where(reports.Viewer.everyone(), filters)
    sums = ", ".join(f"coalesce(sum(u.{k}), 0) AS {k}" for k in reports.TOKEN_FIELDS + reports.OPEN_FIELDS)
    sql = _QUERY.format(billed=reports.BILLED_MODEL, sums=sums, usage=reports.usage_sums(conn), where=where)
    groups = groups or {}
    out = []
    for r in reports._rows(conn.execute(sql, params)):
        tokens = [int(r[k] or 0) for k in reports.TOKEN_FIELDS]
        if not any(tokens):
            continue  # refused or failed before any usage: nothing was consumed
        cost = reports._cost(r, prices)
        out.append(_row(r, tokens, cost, groups.get(r["person_id"] or "", [])))
    return out


def _row(r: dict, tokens: list[int], cost: float | None, groups: list[str]) -> dict[str, Any]:
    day = dt.date.fromisoformat(str(r["day"])[:10])
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    month = start.replace(day=1)
    next_month = month.replace(year=month.year + (month.month == 12), month=month.month % 12 + 1)
    ptype = r.get("provider") or ""
    provider, service = PROVIDERS.get(ptype, (ptype or "unknown", f"{ptype or 'AI'} API"))
    model = r.get("billed_model") or "unknown"
    inp, out, cache_read, cache_write = tokens
    total = sum(tokens)
    billed = cost if cost is not None else 0.0
    row = dict.fromkeys(COLUMNS)
    row.update({
        "BilledCost": billed, "EffectiveCost": billed, "ListCost": billed, "ContractedCost": billed,
        "PricingCurrencyEffectiveCost": billed,
        "BillingAccountId": r.get("provider_name") or ptype, "BillingAccountName": r.get("provider_name") or ptype,
        "BillingAccountType": "Provider instance", "BillingCurrency": "USD", "PricingCurrency": "USD",
        "BillingPeriodStart": _iso(month), "BillingPeriodEnd": _iso(next_month),
        "ChargePeriodStart": _iso(start), "ChargePeriodEnd": _iso(start + dt.timedelta(days=1)),
        "ChargeCategory": "Usage", "ChargeFrequency": "Usage-Based",
        "ChargeDescription": f"{model}: {inp} input, {out} output, {cache_read} cache-read and {cache_write} "
                             f"cache-write tokens in {r['interceptions']} call(s)"
                             + ("; unpriced (no price for this model)" if cost is None else ""),
        "ConsumedQuantity": total, "ConsumedUnit": "Tokens", "PricingQuantity": total, "PricingUnit": "Tokens",
        "PricingCategory": "Standard", "ProviderName": provider, "PublisherName": provider,
        "InvoiceIssuerName": provider, "ResourceId": model, "ResourceName": model, "ResourceType": "Model",
        "ServiceCategory": "AI and Machine Learning", "ServiceSubcategory": "Generative AI", "ServiceName": service,
        "SkuId": f"{ptype}:{model}", "SkuMeter": "Tokens",
        "SubAccountId": r.get("person_id"), "SubAccountName": r.get("person"), "SubAccountType": "User",
        "Tags": json.dumps({"aibridge_user": r.get("person"), "aibridge_groups": ",".join(groups)},
                           separators=(",", ":")),
        "x_InputTokens": inp, "x_OutputTokens": out, "x_CacheReadTokens": cache_read,
        "x_CacheWriteTokens": cache_write, "x_Interceptions": int(r["interceptions"]), "x_Unpriced": cost is None,
        "x_ProviderType": ptype, "x_Groups": ",".join(groups),
    })
    return row


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def write(rows: list[dict], fmt: str, path) -> None:
    """The rows as a CSV file (a header of the column names) or a Parquet file (typed: costs DOUBLE, quantities
    BIGINT, timestamps as ISO 8601 UTC text as FOCUS specifies them)."""
    if fmt == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else
                                "true" if v is True else "false" if v is False else v) for k, v in r.items()})
        return
    import duckdb

    con = duckdb.connect()
    try:
        types = {c: "DOUBLE" for c in COLUMNS if c.endswith("Cost") or c.endswith("UnitPrice")
                 or c == "CommitmentDiscountQuantity"}
        types.update({c: "BIGINT" for c in ("ConsumedQuantity", "PricingQuantity", "x_InputTokens", "x_OutputTokens",
                                            "x_CacheReadTokens", "x_CacheWriteTokens", "x_Interceptions")})
        types["x_Unpriced"] = "BOOLEAN"
        cols = ", ".join(f'"{c}" {types.get(c, "VARCHAR")}' for c in COLUMNS)
        con.execute(f"CREATE TABLE focus ({cols})")
        if rows:
            con.executemany(f"INSERT INTO focus VALUES ({', '.join('?' * len(COLUMNS))})",
                            [[r[c] for c in COLUMNS] for r in rows])
        target = str(path).replace("'", "''")
        con.execute(f"COPY focus TO '{target}' (FORMAT parquet)")
    finally:
        con.close()
