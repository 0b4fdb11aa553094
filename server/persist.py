"""Per-client server-side adapters on disk, so a restarted server gives each
client back what it trained.

A record is one safetensors file per client: the adapter's tensors (LoRA
factors and, in a two-part split, the head), the AdamW state of the trained
ones, and a JSON header: the client id, the SHA-256 of its session token
(never the token itself), its CurveZMQ key, its cut, LoRA spec, seed,
optimizer settings, step count and, in a federation, its delta sync and round
counts. Files are named by a hash of the client id (ids are free text) and
written atomically: to a temporary file, flushed, then renamed into place.

When they are written (``server/service.py``):

- plain split training: every ``--save-every`` steps of a client, at the start
  of its next training forward (the client has then received every earlier
  reply, so a restored adapter never holds a step the client will redo);
- federation: at every round boundary, inside the ``round_N`` folder, so a
  record commits with its round.

A record is restored at a client's hello only for its owner: the same token,
or on an encrypted socket the same key; and only for the same cut, LoRA spec
and seed (anything else is a different adapter).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .sessions import Session, Sessions, make_optimizer

log = logging.getLogger(__name__)

CLIENTS = "clients"  # the folder of records, in --checkpoint-dir and in each round_N
ADAPTER = "{adapter}"  # stands for the session's adapter name in saved parameter names
META_KEY = "fedsplit"


def token_digest(token: str) -> str:
    """SHA-256 of a session token, the only form a token is stored in."""
    return hashlib.sha256(token.encode()).hexdigest()


def record_path(folder: str | Path, client: str) -> Path:
    """Where ``client``'s record lives in ``folder``."""
    return Path(folder) / f"{hashlib.sha256(client.encode()).hexdigest()[:32]}.safetensors"


@dataclass
class Record:
    """One client's saved server-side adapter."""

    meta: dict
    tensors: dict[str, torch.Tensor]


def _adapter_params(sessions: Sessions, session: Session) -> dict[str, torch.nn.Parameter]:
    """The session's adapter parameters under names that do not depend on its adapter name."""
    tag = f".{session.adapter}."
    return {n.replace(tag, f".{ADAPTER}."): p for n, p in sessions.model.named_parameters() if tag in n}


def session_record(sessions: Sessions, session: Session, federation: dict | None = None) -> Record:
    """What ``session`` holds now, as a record."""
    params = _adapter_params(sessions, session)
    names = {id(p): n for n, p in params.items()}
    trained = [names[id(p)] for p in session.params]
    tensors = {f"param/{n}": p.detach().to("cpu").contiguous().clone() for n, p in params.items()}
    for i, p in enumerate(session.params):
        for key, value in session.optimizer.state.get(p, {}).items():
            tensors[f"adam/{i}/{key}"] = torch.as_tensor(value).detach().to("cpu").contiguous().clone()
    meta = {"client": session.client, "token_sha256": token_digest(session.token), "peer": session.peer,
            "cut": [session.cut.front, session.cut.back], "lora": session.spec.to_dict(), "seed": session.seed,
            "optim": {"lr": session.optimizer_settings.lr, "weight_decay": session.optimizer_settings.weight_decay},
            "steps": session.steps, "trained": trained, "federation": federation, "saved_at": time.time()}
    return Record(meta, tensors)


def write_record(folder: str | Path, record: Record) -> Path:
    """Write ``record`` into ``folder`` atomically; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = record_path(folder, record.meta["client"])
    tmp = path.with_name(path.name + ".tmp")
    save_file(record.tensors, str(tmp), metadata={META_KEY: json.dumps(record.meta)})
    with open(tmp, "rb") as fh:  # the rename must not expose an unflushed file
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_record(path: str | Path) -> Record:
    """A record written by ``write_record``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()[META_KEY])
    return Record(meta, load_file(str(path)))


def owned_by(record: Record, token: str, peer: str) -> bool:
    """Whether a hello with ``token`` from ``peer`` proves it owns ``record``:
    on an encrypted socket the same key is enough; otherwise the token's hash
    must match."""
    if record.meta["peer"]:
        return peer == record.meta["peer"]
    return bool(token) and hmac.compare_digest(token_digest(token), record.meta["token_sha256"])


def mismatch(record: Record, session: Session) -> str | None:
    """Why ``record`` cannot be restored into ``session`` (None: it can)."""
    meta = record.meta
    if meta["cut"] != [session.cut.front, session.cut.back]:
        return f"it was saved for cut {tuple(meta['cut'])}, the client now asks {session.cut}"
    if meta["lora"] != session.spec.to_dict():
        return f"it was saved for LoRA {meta['lora']}, the client now asks {session.spec.to_dict()}"
    if meta["seed"] != session.seed:
        return f"it was saved for seed {meta['seed']}, the client now gives {session.seed}"
    return None


def restore(sessions: Sessions, session: Session, record: Record) -> None:
    """Load ``record`` into ``session`` (freshly opened with the same spec):
    adapter tensors, which of them train, and their AdamW state."""
    params = _adapter_params(sessions, session)
    saved = {k[len("param/"):]: v for k, v in record.tensors.items() if k.startswith("param/")}
    if set(saved) != set(params):
        odd = sorted(set(saved) ^ set(params))[:3]
        raise ValueError(f"the saved adapter of {session.client} does not fit its new one (differs at {odd})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    session.params = [params[n] for n in record.meta["trained"]]
    for p in params.values():
        p.requires_grad_(False)
    for p in session.params:
        p.requires_grad_(True)
    session.optimizer = make_optimizer(session.params, session.optimizer_settings)
    for i, p in enumerate(session.params):
        state = {k.split("/")[2]: v for k, v in record.tensors.items() if k.startswith(f"adam/{i}/")}
        if state:
            session.optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in state.items()}
    session.steps = int(record.meta["steps"])
    session.saved_steps = session.steps
    sessions.forget_active()


class SessionStore:
    """Where records are written (plain split training) and read back from
    (at a hello, for a resumed server or a client whose session expired)."""

    def __init__(self, folder: str | Path | None, save_every: int, restore_from: Path | None):
        self.folder = None if folder is None else Path(folder) / CLIENTS
        self.save_every = save_every
        self.restore_from = restore_from  # a --resume source: checkpoint_dir/clients or round_N/clients
        self.written: set[str] = set()  # clients this server saved itself

    def due(self, session: Session) -> bool:
        """Whether ``session`` has trained ``save_every`` steps since it was last saved."""
        return (self.folder is not None and self.save_every > 0 and not session.shared
                and session.steps - session.saved_steps >= self.save_every)

    def save(self, sessions: Sessions, session: Session) -> Path:
        """Write ``session``'s record into the store's folder."""
        path = write_record(self.folder, session_record(sessions, session))
        session.saved_steps = session.steps
        self.written.add(session.client)
        log.info("saved the server-side adapter of %s at step %d", session.client, session.steps)
        return path

    def find(self, client: str) -> Record | None:
        """The newest record of ``client`` this server may restore: its own,
        else one from the --resume source."""
        folders = []
        if self.folder is not None and client in self.written:
            folders.append(self.folder)
        if self.restore_from is not None:
            folders.append(self.restore_from)
        for folder in folders:
            path = record_path(folder, client)
            if path.exists():
                return read_record(path)
        return None
