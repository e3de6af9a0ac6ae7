"""The price book: what a model's tokens cost, from three sources, the first that knows the model winning:

1. prices set in the database (`aibridge prices set MODEL …`: custom and fine-tuned models, negotiated rates),
2. the file `pricing:` names (YAML, USD per 1M tokens; see docs/prices.md),
3. the `genai-prices` package's bundled data (maintained upstream: Anthropic, OpenAI, Google, Bedrock and many
   more, cache reads and writes, tiered prices), never fetched at run time.

A model no source knows is *unpriced* — reported as such, never as free. Lookups are cached per (model, provider);
a cost is a few float operations, so reports over many rows and the recorder's per-call cost stay cheap (the
package's own calculator works in Decimal and takes ~0.1 ms a call). A tier (Gemini's prompts over 200k tokens)
applies its rate to all of a call's tokens once the call's whole input crosses it, as the package defines it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger("aibridge")

_DATE_SUFFIX = re.compile(r"-(\d{8}|\d{4}-\d{2}-\d{2}|latest)$")
LOOKUP_CACHE_MAX = 4096  # distinct model names remembered (client-supplied names are unbounded)
# Provider types (apis/) → the package's provider ids, to tell e.g. Bedrock's model ids from others.
PACKAGE_PROVIDERS = {"anthropic": "anthropic", "openai": "openai", "chatgpt": "openai", "gemini": "google",
                     "bedrock": "aws", "azure": "azure"}

Rate = float | tuple[float, tuple[tuple[int, float], ...]]  # per 1M tokens, or (base, ((above, rate), …))


def _rate(rate: Rate, total_input: int) -> float:
    if isinstance(rate, tuple):
        base, tiers = rate
        for start, value in reversed(tiers):
            if total_input > start:
                return value
        return base
    return rate


@dataclass(frozen=True)
class Price:
    input: Rate
    output: Rate
    cache_read: Rate
    cache_write: Rate
    source: str = "file"  # database, file, or genai-prices <version>

    def cost(self, inp: int, out: int, cache_read: int, cache_write: int) -> float:
        total = inp + cache_read + cache_write
        return (inp * _rate(self.input, total) + out * _rate(self.output, total)
                + cache_read * _rate(self.cache_read, total) + cache_write * _rate(self.cache_write, total)) / 1e6

    def rates(self) -> dict:
        """The rates as stored with a usage row (and shown): USD per 1M tokens, tiers as [[above, rate], …]."""
        def plain(r: Rate):
            return {"base": r[0], "tiers": [list(t) for t in r[1]]} if isinstance(r, tuple) else r
        return {"input": plain(self.input), "output": plain(self.output), "cache_read": plain(self.cache_read),
                "cache_write": plain(self.cache_write), "source": self.source}


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genai-prices")
    except PackageNotFoundError:
        return "unknown"


def _decimal_rate(value) -> Rate:
    from genai_prices.types import TieredPrices

    if value is None:
        return 0.0
    if isinstance(value, TieredPrices):
        return float(value.base), tuple((int(t.start), float(t.price)) for t in value.tiers)
    return float(value)


class PackagePrices:
    """The genai-prices package's bundled data, looked up by model name and (optionally) provider."""

    def __init__(self) -> None:
        self.version = _package_version()
        self.source = f"genai-prices {self.version}"

    def warm(self) -> None:
        from genai_prices import data_snapshot

        data_snapshot.get_snapshot()

    def lookup(self, model: str, provider: str | None) -> Price | None:
        import datetime as dt

        from genai_prices import data_snapshot

        snapshot = data_snapshot.get_snapshot()
        pid = PACKAGE_PROVIDERS.get(provider or "")
        for attempt in ((pid,) if pid else ()) + (None,):
            try:
                _, info = snapshot.find_provider_model(model, None, attempt, None)
            except (LookupError, ValueError):
                continue
            mp = info.get_prices(dt.datetime.now(dt.UTC))
            return Price(_decimal_rate(mp.input_mtok), _decimal_rate(mp.output_mtok),
                         _decimal_rate(mp.cache_read_mtok), _decimal_rate(mp.cache_write_mtok), self.source)
        return None


_PACKAGE: PackagePrices | None = None


def package_prices() -> PackagePrices:
    global _PACKAGE
    if _PACKAGE is None:
        _PACKAGE = PackagePrices()
    return _PACKAGE


class PriceTable:
    """The price book of one configuration: `overrides` (the database's), `models` (the file's), then, with
    `package`, the genai-prices data."""

    def __init__(self, models: dict[str, Price], taken: str | None = None, *,
                 overrides: dict[str, Price] | None = None, package: bool = False) -> None:
        self.models = models
        self.overrides = overrides or {}
        self.package = package_prices() if package else None
        self.taken = taken or (self.package.source if self.package else None)
        self._cache: dict[tuple[str, str | None], Price | None] = {}

    @classmethod
    def load(cls, path: Path | None = None, overrides: dict[str, Price] | None = None) -> "PriceTable":
        """The file's prices (if any) over the package's; `overrides` (the database's) over both."""
        models: dict[str, Price] = {}
        taken = None
        if path is not None and Path(path).exists():
            raw = yaml.safe_load(Path(path).read_text()) or {}
            for name, p in (raw.get("models") or {}).items():
                price = Price(float(p.get("input", 0)), float(p.get("output", 0)),
                              float(p.get("cache_read", 0)), float(p.get("cache_write", 0)), "file")
                models[str(name).lower()] = price
                for alias in p.get("aliases") or []:
                    models[str(alias).lower()] = price
            taken = f"{Path(path).name} ({raw['taken']})" if raw.get("taken") else None
        table = cls(models, None, overrides=overrides, package=True)
        table.package.warm()  # the package's data is loaded here (a thread at reload), not at a first call
        if taken:
            table.taken = f"{taken} over {table.package.source}"
        return table

    def set_overrides(self, overrides: dict[str, Price]) -> None:
        """The database's prices, as last loaded (they change at run time; the file's and the package's do not)."""
        if overrides != self.overrides:
            self.overrides = overrides
            self._cache = {}

    def resolve(self, model: str | None, provider: str | None = None) -> Price | None:
        """The price of a model: an exact name (or alias) in the database's or the file's prices, else the family
        of a dated name (claude-sonnet-4-20250514 → claude-sonnet-4), else the package's data."""
        if not model:
            return None
        key = (model, provider)
        if key in self._cache:
            return self._cache[key]
        price = self._find(model, provider)
        if len(self._cache) >= LOOKUP_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = price
        return price

    def _find(self, model: str, provider: str | None) -> Price | None:
        name = model.lower()
        if "/" in name:  # provider-qualified names (anthropic/claude-…)
            name = name.rsplit("/", 1)[1]
        for book in (self.overrides, self.models):
            if not book:
                continue
            seen, n = set(), name
            while n and n not in seen:
                seen.add(n)
                if n in book:
                    return book[n]
                n = _DATE_SUFFIX.sub("", n)
        if self.package is not None:
            try:
                return self.package.lookup(name, provider)
            except Exception:  # the package's data must never fail a call or a report
                log.exception("aibridge: genai-prices lookup of %r failed", name[:100])
        return None

    def cost(self, model: str | None, inp: int, out: int, cache_read: int, cache_write: int,
             provider: str | None = None) -> float | None:
        price = self.resolve(model, provider)
        return None if price is None else price.cost(inp, out, cache_read, cache_write)
