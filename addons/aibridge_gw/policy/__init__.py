"""Policy layer: rules, detectors, redaction and guardrails that decide what a call may do (issue #24)."""
