"""An emulated client's share of its round records (``--emulate``): what
the device would have spent in each round, from the emulator's counters
(``edge.emulate.Counters``), as keys of ``split.records``:

- ``emulated_compute_s``: compute as long as the device takes (this host's
  time x host GFLOP/s / device GFLOP/s, with no floor at host speed);
- ``emulated_link_s``: the delays the device's link imposed on every message;
- ``emulated_train_s``: both, within the round's training steps only.

A round's figures run from the previous round's record (just before its
upload) to this one's, so they hold the previous upload, the polls, the
download and the steps. These are the device's busy times: unlike the
round's wall-clock they are not lengthened by other processes sharing this
machine's cores (with ``--emulate-clock cpu``), nor by the server's queue.
"""

from __future__ import annotations

from .emulate import EmulatedDevice
from .metering import RoundObserver

KEYS = ("emulated_compute_s", "emulated_link_s", "emulated_train_s")


class EmulatedRounds(RoundObserver):
    """Adds each round's emulated times to the round's record."""

    def __init__(self, emulator: EmulatedDevice):
        self.emulator = emulator
        self.mark = emulator.counters()

    def record_extra(self) -> dict:
        now = self.emulator.counters()
        spent = now - self.mark
        self.mark = now
        return {"emulated_compute_s": spent.device_compute_s, "emulated_link_s": spent.network_s,
                "emulated_train_s": spent.train_s}


def emulated_rounds(emulator: EmulatedDevice | None) -> list[EmulatedRounds]:
    """The observers an emulated client adds to its rounds (none without emulation)."""
    return [] if emulator is None else [EmulatedRounds(emulator)]
