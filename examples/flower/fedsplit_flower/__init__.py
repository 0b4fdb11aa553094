"""fedsplit as a Flower app: the ServerApp and ClientApp components."""
