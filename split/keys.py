"""CurveZMQ key files: create a key pair, load one, load a folder of public keys.

The files are ZeroMQ certificates as ``zmq.auth`` writes them: ``NAME.key``
holds a public key and may be copied anywhere; ``NAME.key_secret`` holds the
key pair and never leaves its machine. Every loader checks that a file holds
what its option expects, so a public file given where a secret one belongs (or
the reverse) is refused by name instead of failing inside the handshake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"
KEYS_HINT = "create keys with `fedsplit keys DIR --name NAME` (README: Security)"


class KeyFileError(ValueError):
    """A key file or folder that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class KeyPair:
    """A key pair read from ``path`` (a NAME.key_secret file); keys in Z85 text."""

    public: bytes
    secret: bytes
    path: Path

    @property
    def public_file(self) -> str:
        """The name of the public half that ``fedsplit keys`` wrote beside ``path``."""
        name = self.path.name
        stem = name[:-len(SECRET_SUFFIX)] if name.endswith(SECRET_SUFFIX) else self.path.stem
        return stem + PUBLIC_SUFFIX


def create_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write a new key pair as ``folder/NAME.key`` (public) and
    ``folder/NAME.key_secret`` (secret, readable by its owner only); refuses
    to overwrite either. Returns (public file, secret file)."""
    if not name or name.startswith(".") or any(c in name for c in "/\\") or name != name.strip():
        raise KeyFileError(f"--name {name!r}: give a plain file name such as 'server' or 'client1' "
                           "(no folders, no leading dot)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise KeyFileError(f"{folder} is a file; give a folder for the keys")
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    taken = [str(p) for p in (public, secret) if p.exists()]
    if taken:
        raise KeyFileError(f"{' and '.join(taken)} already exist: a new key pair would lock out whoever holds "
                           "the old public key; remove them first or choose another --name")
    # The secret file is created owner-only before any key is written to it,
    # so the secret is never readable by others, not even for a moment.
    os.close(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    written = zmq.auth.create_certificates(folder, name)
    return Path(written[0]), Path(written[1])


def _read(path: str | Path, option: str) -> tuple[Path, bytes, bytes | None]:
    """(path, public key, secret key or None) of a key file, each key checked."""
    path = Path(path)
    if not path.exists():
        raise KeyFileError(f"{option} {path}: no such file; {KEYS_HINT}")
    if path.is_dir():
        raise KeyFileError(f"{option} {path}: a folder, not a key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, UnicodeDecodeError):
        raise KeyFileError(f"{option} {path}: not a ZeroMQ key file (no public-key line); give a file that "
                           f"`fedsplit keys` wrote") from None
    for kind, key in (("public", public), ("secret", secret)):
        if key is not None and not _is_z85_key(key):
            raise KeyFileError(f"{option} {path}: its {kind} key is not a 40-character Z85 key; the file is "
                               f"damaged: {KEYS_HINT}")
    return path, public, secret


def _is_z85_key(key: bytes) -> bool:
    if len(key) != 40:
        return False
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError):
        return False


def load_key_pair(path: str | Path, option: str = "--key") -> KeyPair:
    """The key pair in a NAME.key_secret file (``option`` names the flag in errors)."""
    path, public, secret = _read(path, option)
    if secret is None:
        raise KeyFileError(f"{option} {path}: this file holds only a public key; {option} needs the secret "
                           f"file (NAME{SECRET_SUFFIX}) that `fedsplit keys` wrote beside it")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{option} {path}: its public and secret keys do not belong together; the file is "
                           f"damaged: {KEYS_HINT}")
    return KeyPair(public, secret, path)


def load_public_key(path: str | Path, option: str = "--server-key") -> bytes:
    """The public key in a NAME.key file; a file holding a secret key is
    refused, so that secret keys are never passed around by mistake."""
    path, public, secret = _read(path, option)
    if secret is not None:
        raise KeyFileError(f"{option} {path}: this file holds a secret key, which never leaves its machine; "
                           f"give the public file (NAME{PUBLIC_SUFFIX}) instead")
    return public


def load_allowlist(folder: str | Path, option: str = "--allow") -> dict[bytes, str]:
    """The client public keys in ``folder/*.key``: key -> file name."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise KeyFileError(f"{option} {folder}: {what}; make a folder and copy each client's "
                           f"NAME{PUBLIC_SUFFIX} into it")
    allowed: dict[bytes, str] = {}
    for file in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
        allowed.setdefault(load_public_key(file, option), file.name)
    if not allowed:
        raise KeyFileError(f"{option} {folder}: no client public keys (*{PUBLIC_SUFFIX}) in it, so no client "
                           f"could connect; copy each client's NAME{PUBLIC_SUFFIX} there ({KEYS_HINT})")
    return allowed
