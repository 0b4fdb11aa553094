"""fedsplit: device profiles and the planner that picks each client's cut, rank and codec."""
