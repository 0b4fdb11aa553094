"""fedsplit: split."""
