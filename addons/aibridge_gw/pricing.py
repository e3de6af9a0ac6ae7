"""Model prices (the packaged prices.yaml, or the file `pricing:` names) and the cost of recorded tokens."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")  # package data: works installed, not only in a checkout
_DATE_SUFFIX = re.compile(r"-(\d{8}|\d{4}-\d{2}-\d{2}|latest)$")


@dataclass(frozen=True)
class Price:
    input: float
    output: float
    cache_read: float
    cache_write: float

    def cost(self, inp: int, out: int, cache_read: int, cache_write: int) -> float:
        return (inp * self.input + out * self.output + cache_read * self.cache_read
                + cache_write * self.cache_write) / 1_000_000


class PriceTable:
    def __init__(self, models: dict[str, Price], taken: str | None = None) -> None:
        self.models = models
        self.taken = taken

    @classmethod
    def load(cls, path: Path | None = None) -> "PriceTable":
        path = Path(path or DEFAULT_PRICES)
        if not path.exists():
            return cls({})
        raw = yaml.safe_load(path.read_text()) or {}
        models: dict[str, Price] = {}
        for name, p in (raw.get("models") or {}).items():
            price = Price(float(p.get("input", 0)), float(p.get("output", 0)),
                          float(p.get("cache_read", 0)), float(p.get("cache_write", 0)))
            models[str(name)] = price
            for alias in p.get("aliases") or []:
                models[str(alias)] = price
        return cls(models, str(raw.get("taken")) if raw.get("taken") else None)

    def resolve(self, model: str | None) -> Price | None:
        """Exact name or alias, else the family of a dated name (claude-sonnet-4-20250514 → claude-sonnet-4)."""
        if not model:
            return None
        name = model.lower()
        if "/" in name:  # provider-qualified names (anthropic/claude-…)
            name = name.rsplit("/", 1)[1]
        seen = set()
        while name and name not in seen:
            seen.add(name)
            if name in self.models:
                return self.models[name]
            name = _DATE_SUFFIX.sub("", name)
        return None

    def cost(self, model: str | None, inp: int, out: int, cache_read: int, cache_write: int) -> float | None:
        price = self.resolve(model)
        return None if price is None else price.cost(inp, out, cache_read, cache_write)
