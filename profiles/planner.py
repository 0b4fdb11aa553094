"""The planner: per client device, the cut, LoRA rank, trainable blocks and
batch size that fit its memory and keep pace with the federation.

Pure: a model shape and device profiles in, one ``ClientPlan`` per device
out; every figure comes from the cost model (``profiles.cost``).

Objective. A federated round waits for its slowest client, and every client
runs the same number of local steps, so the round's pace is the slowest
client's step time. The planner

1. gives every device its *floor*: the server's cut, ``min_capacity``
   trainable blocks, the nominal batch (or the largest smaller batch that fits
   its memory) and its rank target (below); the slowest floor step time is the
   pace ``T*``;
2. then lets each device take as much capacity as it can without its predicted
   peak memory exceeding ``budget x (1 - margin)`` or its predicted step time
   exceeding ``T*``, choosing one quantity after the other, each as large as
   it can be given those before it:

   a. trainable blocks: the number ``L_i`` (FedRA's capacity), taken in
      ``order`` ("top": the highest blocks first, which save the fewest
      activations for backward on the client; "bottom": the lowest first);
   b. batch: up to ``max_batch``, for a device that fitted the nominal batch;
   c. with ``offload``, the cut: more blocks on the client, which takes work
      off the shared server (the cost model does not see the server's queue,
      so this is off unless asked for).

Codecs. Before anything else each device gets a wire codec per direction
(``profiles.codec_choice``): among ``codecs`` (default fp32 alone, which
changes nothing), the most precise one whose predicted step time on the
reference plan (below) is within 10% of the fastest allowed choice, the
uplink first, then the downlink. Every later figure of the device (its rank
score, floor, pace and growth) is predicted with those codecs: compression
that buys time buys capacity.

Rank (HetLoRA-style, by capacity). Each device gets a capacity score from
its predicted step time ``t_i`` of one common reference plan (the server's
cut, rank ``r_min``, ``min_capacity`` blocks, the nominal batch), relative to
the fastest device's ``t_f``::

    score_i = 1 - log(t_i / t_f) / log(max(t_slowest / t_f, SPREAD))

so the fastest scores 1 and, across a spread of at least ``SPREAD``, the
slowest 0. The rank target is the candidate rank at position
``round(score_i x (n - 1))`` of the n sorted candidates (one step per halving
of speed with powers of two over a 16x spread); a device gets the largest
candidate rank up to its target that fits its memory at the floor. Ranks are
chosen before blocks, so a faster device never gets a lower rank for having
taken more blocks. ``same_rank`` (strategies that train one rank: fedit,
layermean, ...) gives every device the one largest rank at which every
device's floor fits.

Tie-breaks. Every scan goes from the largest value down and takes the first
that is feasible; cuts with as many client blocks are tried front-heavy first
(front blocks below every trainable block save no activations). Devices are
planned independently given ``T*``, so their order does not matter; a profile
listed twice is an error.

Quantized weights. With ``weights`` listing more than one choice (say
float32, 8bit, 4bit: the order is the preference), a device whose profile says
bitsandbytes works takes the first choice at which its floor fits at the
nominal batch (or, if none does, at batch 1); a device without bitsandbytes
keeps to the unquantized choices. Memory decides alone: the step time does not
count the dequantization (about 10-20% more compute on a CPU, measured in
bench/client_memory.py), and 4 bits cost some accuracy.

A device that cannot fit the smallest plan (the server's cut, rank ``r_min``,
``min_capacity`` blocks, batch 1, its most compressed weights) is an error
naming it, the memory that plan needs and its budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .codec_choice import choose_codecs, parse_codec_list
from .cost import ModelShape, Plan, block_memory, predict_memory, predict_step_time, step_bytes
from .quantized import QUANTIZED, WEIGHTS
from .schema import GIB, DeviceProfile

ORDERS = ("top", "bottom")
SPREAD = 16.0  # speed range (fastest / slowest) that spans the whole rank range at least
DEFAULT_RANKS = (4, 8, 16, 32, 64)
TOLERANCE = 1e-9  # relative slack on the pace: float noise must not exclude the pace-setter's own floor


class PlanningError(ValueError):
    """The devices and options admit no plan (the text names the device and why)."""


@dataclass(frozen=True)
class ClientPlan:
    """What one device trains with, and what the cost model predicts of it.

    ``capacity`` is FedRA's L_i (how many blocks train); ``train_memory_bytes``
    is Fed-piLot's M_i (the memory its trainable blocks take, the sum of
    ``cost.block_memory``). Peak memory and bytes are per training step;
    ``budget_bytes`` is the device's whole budget (before the margin)."""

    device: str
    k1: int
    k2: int
    rank: int
    trainable: list[int]
    batch: int
    seq_len: int
    predicted_peak_bytes: int
    budget_bytes: int
    bytes_up: int
    bytes_down: int
    predicted_step_s: float
    train_memory_bytes: int
    capacity: int
    dtype: str = "float32"  # the frozen weights' dtype the predictions assume
    codec_up: str = "fp32"  # the wire codec of what the client sends (split.codecs text)
    codec_down: str = "fp32"  # the wire codec of the server's replies
    weights: str = "float32"  # how the client's blocks hold their linear weights (cost.Plan.weights)

    def __post_init__(self):
        # Unquantized weights are held in the plan's dtype, as in cost.Plan.
        if self.weights not in QUANTIZED:
            object.__setattr__(self, "weights", self.dtype)

    @property
    def train_memory(self) -> int:
        """Fed-piLot's M_i in bytes (the name layer allocation uses)."""
        return self.train_memory_bytes

    @property
    def cut(self) -> tuple[int, int]:
        return self.k1, self.k2

    def plan(self) -> Plan:
        """The cost model's view of this plan."""
        return Plan(k1=self.k1, k2=self.k2, rank=self.rank, batch=self.batch, seq_len=self.seq_len,
                    trainable=frozenset(self.trainable), dtype=self.dtype, codec_up=self.codec_up,
                    codec_down=self.codec_down, weights=self.weights)

    @property
    def quantize(self) -> str:
        """The client's ``--quantize`` for these weights: "8bit", "4bit" or "none"."""
        return self.weights if self.weights in QUANTIZED else "none"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PlanOptions:
    """How the planner searches (see the module docstring)."""

    seq_len: int
    ranks: tuple[int, ...] = DEFAULT_RANKS
    server_cut: tuple[int, int] = (1, 1)
    margin: float = 0.15
    batch: int = 16  # nominal batch
    max_batch: int = 64
    same_rank: bool = False
    all_blocks: bool = False  # every device trains every block (strategies without block subsets)
    min_capacity: int = 1
    order: str = "top"
    offload: bool = False
    server_seconds: float = 0.0  # the server's share of a step, added to every device's step time
    dtype: str = "float32"  # the client's frozen weights (and the throughput figure that applies)
    codecs: tuple[str, ...] = ("fp32",)  # wire codecs a device may get (split.codecs texts)
    weights: tuple[str, ...] = ("float32",)  # the blocks' linear weights to choose from, preferred first

    def check(self, num_layers: int) -> None:
        """Raise a PlanningError naming the first option out of range."""
        k1, k2 = self.server_cut
        if self.seq_len < 2:
            raise PlanningError(f"seq_len must be >= 2 (a client's --max-length), got {self.seq_len}")
        if not self.ranks or any(r < 1 for r in self.ranks) or len(set(self.ranks)) != len(self.ranks):
            raise PlanningError(f"ranks must be distinct integers >= 1, got {list(self.ranks)}")
        if k1 < 1 or k2 < 0 or k1 + k2 >= num_layers:
            raise PlanningError(f"server cut {k1},{k2} does not fit a model of {num_layers} blocks: it needs "
                                f"K1 >= 1, K2 >= 0 and K1 + K2 <= {num_layers - 1}")
        if not (math.isfinite(self.margin) and 0 <= self.margin < 1):
            raise PlanningError(f"margin must be in [0, 1), got {self.margin}")
        if not 1 <= self.batch <= self.max_batch:
            raise PlanningError(f"batch must be in [1, max_batch={self.max_batch}], got {self.batch}")
        if not 1 <= self.min_capacity <= num_layers:
            raise PlanningError(f"min_capacity must be in [1, {num_layers}] (the model's blocks), "
                                f"got {self.min_capacity}")
        if self.order not in ORDERS:
            raise PlanningError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if not (math.isfinite(self.server_seconds) and self.server_seconds >= 0):
            raise PlanningError(f"server_seconds must be a finite number >= 0, got {self.server_seconds}")
        try:
            parse_codec_list(",".join(self.codecs))
        except ValueError as exc:
            raise PlanningError(str(exc)) from None
        if (not self.weights or len(set(self.weights)) != len(self.weights)
                or any(w not in WEIGHTS for w in self.weights)):
            raise PlanningError(f"weights must list distinct choices of {', '.join(WEIGHTS)}, got "
                                f"{list(self.weights)}")
        for w in self.weights:
            if w not in QUANTIZED and w != "float32" and w != self.dtype:
                raise PlanningError(f"weights {w}: unquantized weights are held in the clients' dtype "
                                    f"({self.dtype}); list float32 (unquantized) or set the dtype")


def weights_list(text: str) -> tuple[str, ...]:
    """Weight choices from ``"float32,8bit,4bit"``, in order of preference; a clear ValueError otherwise."""
    choices = tuple(w.strip() for w in text.split(","))
    bad = [w for w in choices if w not in WEIGHTS]
    if bad or not choices or len(set(choices)) != len(choices):
        raise ValueError(f"weights {text!r}: list distinct choices of {', '.join(WEIGHTS)}, preferred first "
                         "(e.g. float32,8bit,4bit)")
    return choices


def rank_ladder(text: str) -> tuple[int, ...]:
    """Candidate ranks from ``"4..64"`` (the powers of two from 4 to 64) or
    ``"4,8,16"`` (that list), sorted; a clear ValueError otherwise."""
    text = text.strip()
    if ".." in text:
        low_text, _, high_text = text.partition("..")
        try:
            low, high = int(low_text), int(high_text)
        except ValueError:
            raise ValueError(f"ranks {text!r}: expected R_MIN..R_MAX such as 4..64, or a list such as 4,8,16") \
                from None
        if not 1 <= low <= high:
            raise ValueError(f"ranks {text!r}: need 1 <= R_MIN <= R_MAX")
        if low & (low - 1) or high & (high - 1):
            raise ValueError(f"ranks {text!r}: R_MIN..R_MAX spans powers of two; give both as powers of two, or "
                             "list the ranks (4,8,16)")
        return tuple(2 ** i for i in range(low.bit_length() - 1, high.bit_length()))
    try:
        ranks = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"ranks {text!r}: expected R_MIN..R_MAX such as 4..64, or a list such as 4,8,16") from None
    if any(r < 1 for r in ranks) or len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks {text!r}: each rank must be >= 1 and listed once")
    return tuple(sorted(ranks))


def batch_ladder(nominal: int, max_batch: int) -> tuple[int, ...]:
    """Candidate batch sizes: powers of two up to ``max_batch``, and the nominal batch."""
    return tuple(sorted({2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch} | {nominal}))


def trainable_blocks(num_layers: int, capacity: int, order: str) -> frozenset[int]:
    """The ``capacity`` blocks that train: the highest or the lowest."""
    if order == "top":
        return frozenset(range(num_layers - capacity, num_layers))
    return frozenset(range(capacity))


def client_cuts(num_layers: int, server_cut: tuple[int, int]) -> list[tuple[int, int]]:
    """Every cut a server with ``server_cut`` serves, most client blocks first,
    then front-heavy first. A two-part server (K2 = 0) keeps its clients two-part."""
    k1_min, k2_min = server_cut
    backs = [0] if k2_min == 0 else range(k2_min, num_layers)
    cuts = [(k1, k2) for k2 in backs for k1 in range(k1_min, num_layers) if k1 + k2 <= num_layers - 1]
    return sorted(cuts, key=lambda c: (-(c[0] + c[1]), -c[0]))


# ---------------------------------------------------------------- assessing one plan


def assess(shape: ModelShape, profile: DeviceProfile, plan: Plan, server_seconds: float = 0.0) -> ClientPlan:
    """``plan`` on ``profile`` with the cost model's predictions (fitting or not)."""
    memory = predict_memory(shape, plan)
    up, down = step_bytes(shape, plan)
    time = predict_step_time(shape, plan, profile, server_seconds)
    trainable = sorted(plan.trainable)
    return ClientPlan(profile.name, plan.k1, plan.k2, plan.rank, trainable, plan.batch, plan.seq_len,
                      int(memory.total), profile.memory_bytes, int(up), int(down), float(time.total),
                      sum(int(block_memory(shape, plan, b)) for b in trainable), len(trainable), plan.dtype,
                      plan.codec_up, plan.codec_down, plan.weights)


def usable_bytes(profile: DeviceProfile, margin: float) -> int:
    """What a plan may use of ``profile``'s budget: budget x (1 - margin)."""
    return int(profile.memory_bytes * (1 - margin))


def straggler_ratio(plans: list[ClientPlan]) -> float:
    """Slowest over fastest predicted step time (1: perfectly balanced)."""
    times = [p.predicted_step_s for p in plans]
    return max(times) / min(times)


# ---------------------------------------------------------------- the planner


class _Device:
    """One device under planning: its profile, its codecs and the checks on
    its plans (every plan is judged with the device's codecs)."""

    def __init__(self, shape: ModelShape, profile: DeviceProfile, options: PlanOptions):
        self.shape, self.profile, self.options = shape, profile, options
        self.usable = usable_bytes(profile, options.margin)
        self.codecs = ("fp32", "fp32")  # (up, down): chosen by choose_codecs
        # bitsandbytes must work on the device for quantized weights.
        self.choices = [w for w in options.weights if w not in QUANTIZED or profile.bitsandbytes]
        if not self.choices:
            raise PlanningError(f"device {profile.name!r}: its profile says bitsandbytes does not work there, and "
                                f"the weights to choose from ({', '.join(options.weights)}) are all quantized; "
                                "add float32 to them")
        self.weights = self.choices[0]

    def own(self, plan: Plan) -> Plan:
        """``plan`` with this device's weights and codecs."""
        return replace(plan, weights=self.weights, codec_up=self.codecs[0], codec_down=self.codecs[1])

    def choose_codecs(self, reference: Plan) -> None:
        """Pick this device's codecs on ``reference`` (module docstring)."""
        allowed = parse_codec_list(",".join(self.options.codecs))

        def time(up, down) -> float:
            return self._time(replace(reference, weights=self.weights, codec_up=up.text, codec_down=down.text))

        up, down = choose_codecs(time, allowed)
        self.codecs = (up.text, down.text)

    def choose_weights(self, floors: list[Plan]) -> None:
        """The first weight choice at which the first of ``floors`` fits, else
        the next; the most compressed if none fits (the smallest-plan check
        then names the device)."""
        for floor in floors:
            for w in self.choices:
                if self.memory(replace(floor, weights=w), own=False) <= self.usable:
                    self.weights = w
                    return
        self.weights = self.choices[-1]

    def memory(self, plan: Plan, own: bool = True) -> int:
        return int(predict_memory(self.shape, self.own(plan) if own else plan).total)

    def time(self, plan: Plan) -> float:
        return self._time(self.own(plan))

    def _time(self, plan: Plan) -> float:
        return float(predict_step_time(self.shape, plan, self.profile, self.options.server_seconds).total)

    def fits(self, plan: Plan) -> bool:
        return self.memory(plan) <= self.usable

    def feasible(self, plan: Plan, pace: float) -> bool:
        return self.fits(plan) and self.time(plan) <= pace * (1 + TOLERANCE)


def plan_clients(shape: ModelShape, profiles: list[DeviceProfile], *, seq_len: int,
                 ranks: tuple[int, ...] = DEFAULT_RANKS, server_cut: tuple[int, int] = (1, 1),
                 margin: float = 0.15, batch: int = 16, max_batch: int = 64, same_rank: bool = False,
                 all_blocks: bool = False, min_capacity: int = 1, order: str = "top", offload: bool = False,
                 server_seconds: float = 0.0, dtype: str = "float32",
                 codecs: tuple[str, ...] = ("fp32",), weights: tuple[str, ...] = ("float32",)) -> list[ClientPlan]:
    """One plan per profile, in the order given (module docstring: objective
    and tie-breaks). Raises PlanningError for options out of range, a profile
    listed twice, or devices that cannot fit the smallest plan."""
    options = PlanOptions(seq_len, tuple(sorted(ranks)), tuple(server_cut), margin, batch, max_batch, same_rank,
                          all_blocks, min_capacity, order, offload, server_seconds, dtype, tuple(codecs),
                          tuple(weights))
    return plan_with(shape, profiles, options)


def plan_with(shape: ModelShape, profiles: list[DeviceProfile], options: PlanOptions) -> list[ClientPlan]:
    """``plan_clients`` with its options in one object."""
    layers = shape.num_layers
    options.check(layers)
    if not profiles:
        raise PlanningError("no device profiles to plan for")
    names = [p.name for p in profiles]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PlanningError(f"profile {twice[0]!r} is listed twice; each profile gets one plan, which every client "
                            "started with that profile uses: list it once")
    devices = [_Device(shape, p, options) for p in profiles]
    # A LoRA rank above a module's smaller dimension is refused by the server
    # (--max-rank's rule): such candidates are not plans.
    widest = min(min(d_out, d_in) for _, d_out, d_in in shape.lora_targets)
    ranks = tuple(r for r in sorted(options.ranks) if r <= widest)
    if not ranks:
        raise PlanningError(f"every candidate rank {list(options.ranks)} is above {widest}, the smaller dimension "
                            f"of this model's smallest LoRA module; give --ranks up to {widest}")
    k1, k2 = options.server_cut
    capacity = layers if options.all_blocks else options.min_capacity
    floor_blocks = trainable_blocks(layers, capacity, options.order)

    def plan(rank: int, blocks: frozenset[int], batch: int, cut: tuple[int, int] = (k1, k2)) -> Plan:
        return Plan(k1=cut[0], k2=cut[1], rank=rank, batch=batch, seq_len=options.seq_len, trainable=blocks,
                    dtype=options.dtype)

    for d in devices:  # 0. Each device's weights (the first choice at which its floor fits), then its codecs.
        d.choose_weights([plan(ranks[0], floor_blocks, options.batch), plan(ranks[0], floor_blocks, 1)])
        d.choose_codecs(plan(ranks[0], floor_blocks, options.batch))
    _check_smallest(devices, plan(ranks[0], floor_blocks, 1), options)
    batches = batch_ladder(options.batch, options.max_batch)
    nominal = [b for b in batches if b <= options.batch]
    # 1. The floor: the nominal batch (or less, to fit), then the rank.
    floor_batch = {d.profile.name: next(b for b in reversed(nominal) if d.fits(plan(ranks[0], floor_blocks, b)))
                   for d in devices}
    if options.same_rank:
        common = next(r for r in reversed(ranks) if all(
            d.fits(plan(r, floor_blocks, floor_batch[d.profile.name])) for d in devices))
        rank = {d.profile.name: common for d in devices}
    else:
        target = rank_targets([d.time(plan(ranks[0], floor_blocks, options.batch)) for d in devices], ranks)
        rank = {d.profile.name: next(r for r in reversed(ranks) if r <= t and d.fits(
            plan(r, floor_blocks, floor_batch[d.profile.name]))) for d, t in zip(devices, target)}
    pace = max(d.time(plan(rank[d.profile.name], floor_blocks, floor_batch[d.profile.name])) for d in devices)
    # 2. Growth up to the pace: blocks, then batch, then (offload) the cut.
    out = []
    for d in devices:
        name = d.profile.name
        r, b = rank[name], floor_batch[name]
        blocks = floor_blocks
        if not options.all_blocks:
            blocks = next(t for t in (trainable_blocks(layers, c, options.order)
                                      for c in range(layers, capacity - 1, -1))
                          if t == floor_blocks or d.feasible(plan(r, t, b), pace))
        if b == options.batch:
            b = next(x for x in reversed(batches) if x <= b or d.feasible(plan(r, blocks, x), pace))
        cut = (k1, k2)
        if options.offload:
            cut = next(c for c in client_cuts(layers, (k1, k2)) if c == (k1, k2) or d.feasible(
                plan(r, blocks, b, c), pace))
        out.append(assess(shape, d.profile, d.own(plan(r, blocks, b, cut)), options.server_seconds))
    return out


def rank_targets(times: list[float], ranks: tuple[int, ...]) -> list[int]:
    """Each device's HetLoRA rank target from its reference step time (module
    docstring): the fastest gets the largest rank, a device ``SPREAD`` times
    slower (or the slowest, over a wider spread) the smallest."""
    fastest, slowest = min(times), max(times)
    span = math.log(max(slowest / fastest, SPREAD))
    out = []
    for t in times:
        score = 1 - math.log(t / fastest) / span
        out.append(ranks[round(score * (len(ranks) - 1))])
    return out


def _check_smallest(devices: list[_Device], smallest: Plan, options: PlanOptions) -> None:
    """Refuse devices that cannot fit even ``smallest``, naming each with the
    memory it would need and its budget."""
    short = [d for d in devices if not d.fits(smallest)]
    if not short:
        return
    what = (f"cut {smallest.k1},{smallest.k2}, rank {smallest.rank}, {len(smallest.trainable)} trainable "
            f"block{'s' if len(smallest.trainable) > 1 else ''}, batch 1, sequence {smallest.seq_len}")
    lines = [f"device {d.profile.name!r} cannot fit even the smallest plan ({what}, {d.weights} weights): it needs "
             f"{d.memory(smallest) / GIB:.2f} GiB, its budget of {d.profile.memory_gb:g} GiB leaves "
             f"{d.usable / GIB:.2f} GiB after the {options.margin:.0%} margin" for d in short]
    raise PlanningError("; ".join(lines) + ". Give the device a larger memory budget, a shorter --seq-len or a "
                        "smaller --margin, or leave it out")
