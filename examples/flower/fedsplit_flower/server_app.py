"""The ServerApp component: fedsplit's backbone server and strategy (server/flower_app.py)."""

from edge.shard import ShardSpec, num_labels
from server.flower_app import server_app

app = server_app(lambda run: num_labels(ShardSpec.of(run)))
