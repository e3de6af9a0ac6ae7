"""Per-flow work: routing, the flow's state, bodies and streams, the exchange's facts and its record."""
