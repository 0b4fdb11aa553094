"""fedsplit: server."""
