"""The Flower run's settings (split/flower_settings.py) read from a run config,
and refused with the key named; no Flower needed."""

from __future__ import annotations

import pytest

from split.flower_settings import FlowerRun, SettingsError


def test_run_config_reads_back():
    run = FlowerRun.from_config({"strategy": "flexlora", "ranks": "4,8", "rounds": 2, "alpha": 8,
                                 "strategy-options": '{"beta": 0.5}', "checkpoint-dir": "/tmp/x"})
    assert (run.strategy, run.ranks, run.rounds, run.alpha) == ("flexlora", (4, 8), 2, 8.0)
    assert run.strategy_options == {"beta": 0.5}
    assert [run.rank_of(k) for k in range(3)] == [4, 8, 4]
    assert FlowerRun.from_config(run.to_config()) == run
    part = run.client_part()
    assert "checkpoint-dir" not in part and "secret-key" not in part
    assert FlowerRun.from_config(part).ranks == (4, 8)


@pytest.mark.parametrize("config, named", [
    ({"rounds": 0}, "rounds must be an integer >= 1"),
    ({"rounds": "3"}, "rounds must be int"),
    ({"ranks": "4,x"}, "ranks must be ranks separated by commas"),
    ({"ranks": "0"}, "ranks must list LoRA ranks >= 1"),
    ({"fraction": 1.5}, "fraction must be in"),
    ({"partition": "zipf"}, "partition must be one of"),
    ({"strategy-options": "{beta"}, "strategy-options is not valid JSON"),
    ({"cut": "x"}, "cut or codec"),
    ({"secret-key": "k.key_secret"}, "secret-key and allow go together"),
    ({"num-server-rounds": 3}, "unknown run-config key 'num-server-rounds'"),
])
def test_bad_run_config_names_the_key(config, named):
    with pytest.raises(SettingsError, match=named):
        FlowerRun.from_config(config)
