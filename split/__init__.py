"""fedsplit: split."""

import logging

# peft imports bitsandbytes whenever it is installed, and bitsandbytes then logs
# that an optional faster CPU kernel package is missing: its own CPU kernels
# run instead, so the line tells a user nothing (split/quant.py uses them).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
