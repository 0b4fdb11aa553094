"""The fedsplit ServerApp: the backbone server and a fedsplit strategy in one
Flower ServerApp process (server/flower_host.py says why there).

``server_app`` builds it. The settings come from the run config
(``FlowerRun.from_config``) unless given; ``num_labels`` tells how many
classes the run's task has (the app's composition root passes the data
module's count: the server side does not read client data).
"""

from __future__ import annotations

import logging
from typing import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from split.flower_settings import FlowerRun

from .flower_host import FlowerHost
from .flower_strategy import FedsplitStrategy

log = logging.getLogger(__name__)

ROUND_TIMEOUT = 3600.0  # seconds Flower waits for a round's replies, unless the run's deadline is longer


def server_app(num_labels: Callable[[FlowerRun], int], run: FlowerRun | None = None,
               results: list | None = None) -> ServerApp:
    """A ServerApp running ``run`` (None: the run config's settings); each
    finished run's strategy is appended to ``results`` if given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = run or FlowerRun.from_config(context.run_config)
        with FlowerHost(settings, num_labels(settings), settings.clients) as host:
            strategy = FedsplitStrategy(settings, host)
            strategy.start(grid, timeout=max(ROUND_TIMEOUT, settings.deadline))
            if results is not None:
                results.append(strategy)
            where = f"; checkpoints in {settings.checkpoint_dir}" if settings.checkpoint_dir else ""
            log.info("fedsplit run done: %d rounds of %s%s", host.coordinator.round, settings.strategy, where)

    return app
