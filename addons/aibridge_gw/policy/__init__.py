"""Who may do what: gateway tokens, budgets, circuit breakers, throttles and egress rules."""
