"""Who may do what: gateway tokens, budgets, circuit breakers, throttles, egress rules, and the admin's policies
(CEL rules, secret and PII detectors, redaction, external guardrails)."""
