"""fedsplit: profiles."""
