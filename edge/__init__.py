"""fedsplit: edge."""
