"""The ClientApp component: fedsplit's split client (edge/flower_client.py)."""

from edge.flower_client import client_app

app = client_app()
