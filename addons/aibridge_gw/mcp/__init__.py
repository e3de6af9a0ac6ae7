"""Central MCP tools: list approved servers' tools, inject them, run them in an inner agentic loop."""
