"""mcp-guard: one guarded path between AI assistants and databases."""

__version__ = "0.1.0"
