"""The settings of a fedsplit run on Flower, read from the Flower app's run
config (``[tool.flwr.app.config]`` in examples/flower/pyproject.toml, ``-c``
overrides) and checked before anything starts.

The ServerApp reads them from its run config; it hands the clients the part
they need (``client_part``) in its join message, and each ClientApp checks
that part again with ``FlowerRun.from_config``, since it came off the network.
Pure: no Flower import, so the core installs without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from .linkcodecs import LinkCodecs
from .partition import Cut

PARTITIONS = ("iid", "dirichlet", "shards")


class SettingsError(ValueError):
    """A run-config value fedsplit cannot run with; the text names the key and what to give."""


@dataclass(frozen=True)
class FlowerRun:
    """One fedsplit federation run through Flower (keys as in the run config, ``-`` for ``_``)."""

    strategy: str = "fedit"
    strategy_options: dict = field(default_factory=dict)  # the run config gives a JSON object as text
    rounds: int = 3
    fraction: float = 1.0
    local_steps: int = 10
    seed: int = 0
    ranks: tuple[int, ...] = (8,)  # client k trains rank ranks[k % len(ranks)]
    alpha: float = 16.0  # LoRA alpha
    clients: int = 2  # partitions of the data, and clients that must join before round 0
    partition: str = "dirichlet"
    partition_alpha: float = 0.5
    model: str = ""  # "": the built-in all-MiniLM-L6-v2
    tokenizer: str = ""  # "": the model folder's
    data: str = "builtin"  # the built-in task, or a JSONL/CSV file every node can read
    cut: str = "1,1"
    lr: float = 5e-3
    head_lr: float = 2e-2
    batch_size: int = 16
    max_length: int = 64
    codec_up: str = "fp32"  # hidden states and gradients over the backbone link (split/codecs.py)
    codec_down: str = "fp32"
    client_init: str = "avg"
    deadline: float = 600.0  # seconds a round waits for its replies
    checkpoint_dir: str = ""  # "": no round_N/ checkpoints
    backbone_bind: str = "tcp://127.0.0.1:0"  # where the backbone server in the ServerApp listens
    backbone_address: str = ""  # what clients connect to ("": the bound address, for a simulation)
    secret_key: str = ""  # the backbone server's NAME.key_secret (CurveZMQ, with allow)
    allow: str = ""  # folder of the client public keys it admits

    def __post_init__(self):
        for name in ("rounds", "local_steps", "clients", "batch_size"):
            _at_least(name, getattr(self, name), 1)
        _at_least("max_length", self.max_length, 2)
        _at_least("seed", self.seed, 0)
        if not self.ranks or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in self.ranks):
            raise SettingsError(f"ranks must list LoRA ranks >= 1 (e.g. \"8\" or \"4,8\"), got {self.ranks!r}")
        if not 0 < self.fraction <= 1:
            raise SettingsError(f"fraction must be in (0, 1], got {self.fraction}")
        for name in ("alpha", "partition_alpha", "lr", "head_lr", "deadline"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SettingsError(f"{_key(name)} must be a finite number > 0, got {value}")
        if self.partition not in PARTITIONS:
            raise SettingsError(f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if not isinstance(self.strategy_options, dict):
            raise SettingsError("strategy-options must be a JSON object, e.g. '{\"beta\": 0.5}'")
        try:
            Cut.parse(self.cut)
            LinkCodecs.parse(self.codec_up, self.codec_down)
        except ValueError as exc:
            raise SettingsError(f"cut or codec: {exc}") from None
        if bool(self.secret_key) != bool(self.allow):
            raise SettingsError("secret-key and allow go together: the backbone server's key and the folder of "
                                "the client keys it admits (README, Security)")

    @classmethod
    def from_config(cls, config) -> "FlowerRun":
        """Settings from a run config (a mapping of kebab-case keys to str,
        int, float or bool); an unknown key or a value of the wrong kind is a
        ``SettingsError`` naming it."""
        if not hasattr(config, "items"):
            raise SettingsError(f"the run config must be a mapping, got {type(config).__name__}")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in config.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise SettingsError(f"unknown run-config key {key!r}; fedsplit's keys are "
                                    f"{', '.join(sorted(_key(n) for n in known))}")
            values[name] = _value(name, value, cls.__dataclass_fields__[name].default)
        return cls(**values)

    def to_config(self) -> dict:
        """The run config that reads back as these settings (values Flower's ConfigRecord holds)."""
        out = {}
        for name, value in asdict(self).items():
            if name == "strategy_options":
                value = json.dumps(value, sort_keys=True)
            elif name == "ranks":
                value = ",".join(str(r) for r in value)
            out[_key(name)] = value
        return out

    def client_part(self) -> dict:
        """What a ClientApp needs of these settings (no server keys or paths)."""
        keep = ("seed", "ranks", "alpha", "clients", "partition", "partition_alpha", "model", "tokenizer", "data",
                "cut", "lr", "head_lr", "batch_size", "max_length", "codec_up", "codec_down")
        config = self.to_config()
        return {_key(n): config[_key(n)] for n in keep}

    def rank_of(self, partition: int) -> int:
        """The LoRA rank partition ``partition`` trains."""
        return self.ranks[partition % len(self.ranks)]


def _key(name: str) -> str:
    return name.replace("_", "-")


def _at_least(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SettingsError(f"{_key(name)} must be an integer >= {low}, got {value!r}")


def _value(name: str, value, default):
    """``value`` as the kind of ``default``, or a SettingsError naming the key."""
    key = _key(name)
    if name == "strategy_options":
        if not isinstance(value, str):
            raise SettingsError(f"{key} must be a JSON object as text, got {value!r}")
        try:
            return json.loads(value or "{}")
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{key} is not valid JSON ({exc}): give e.g. '{{\"beta\": 0.5}}'") from None
    if name == "ranks":
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str):
            raise SettingsError(f"{key} must be ranks separated by commas, e.g. \"4,8\", got {value!r}")
        try:
            return tuple(int(part) for part in text.split(","))
        except ValueError:
            raise SettingsError(f"{key} must be ranks separated by commas, e.g. \"4,8\", got {value!r}") from None
    if isinstance(default, bool) or isinstance(value, bool):
        if type(value) is not type(default):
            raise SettingsError(f"{key} must be {type(default).__name__}, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(default)):
        raise SettingsError(f"{key} must be {'a number' if isinstance(default, float) else type(default).__name__}"
                            f", got {value!r}")
    return value
