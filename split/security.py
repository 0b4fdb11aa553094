"""Who may talk to a fedsplit server, and over what: CurveZMQ on both sides,
plain ZeroMQ on loopback only.

With keys, every frame on the wire (hidden states, gradients, LoRA factors,
headers) is encrypted, the client checks that it reached the server whose
public key it holds, and the server admits only the client keys in its
allowlist folder; each message then carries the sender's key (``User-Id``),
and the server binds a session to it. Without keys nothing is encrypted or
authenticated, so plain mode is refused on any endpoint another machine could
reach. The key files themselves are ``split/keys.py``'s.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from .keys import KEYS_HINT, KeyPair, load_allowlist, load_key_pair, load_public_key

log = logging.getLogger(__name__)

PLAIN_WARNING = ("plain mode on %s: traffic is neither encrypted nor authenticated, which is allowed on loopback "
                 "only; for other machines, " + KEYS_HINT)


# ---------------------------------------------------------------- the loopback rule


def is_loopback(endpoint: str) -> bool:
    """Whether only this machine can reach ``endpoint``: tcp on a loopback
    address or localhost, ipc or inproc. Anything not recognised is not."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(";", 1)[-1].rpartition(":")[0]  # "source;destination": the destination's host
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", a host name or an interface name: other machines may reach it


def check_plain(endpoint: str, option: str, key_options: str) -> None:
    """Refuse plain (keyless) ZeroMQ on an endpoint other machines can reach."""
    if not is_loopback(endpoint):
        raise ValueError(
            f"{option} {endpoint} reaches beyond this machine, and without keys the traffic (hidden states, "
            f"gradients, LoRA) would cross unencrypted and unauthenticated; {KEYS_HINT} and pass {key_options}, "
            f"or use a loopback endpoint (tcp://127.0.0.1:PORT) to try fedsplit on one machine")


def check_pair(first: tuple[str, str | None], second: tuple[str, str | None]) -> bool:
    """Whether encryption is on: both key options given (True) or neither
    (False); one without the other is refused."""
    (name1, value1), (name2, value2) = first, second
    if (value1 is None) != (value2 is None):
        given, missing = (name1, name2) if value1 is not None else (name2, name1)
        raise ValueError(f"{given} needs {missing} too: encryption takes both ({KEYS_HINT})")
    return value1 is not None


# ---------------------------------------------------------------- the server side


@dataclass(frozen=True)
class ServerKeys:
    """The server's key pair and the client keys it admits."""

    pair: KeyPair
    allowed: dict[bytes, str]  # Z85 public key -> the allowlist file it came from
    folder: Path


def load_server_keys(secret_key: str | None, allow: str | None) -> ServerKeys | None:
    """The server's keys from ``--secret-key`` and ``--allow`` (None: plain mode)."""
    if not check_pair(("--secret-key", secret_key), ("--allow", allow)):
        return None
    return ServerKeys(load_key_pair(secret_key, "--secret-key"), load_allowlist(allow), Path(allow))


class _Allowlist:
    """ZAP credentials provider: admits the allowlisted keys, logs every refusal
    (the client is told too, by its handshake monitor)."""

    def __init__(self, keys: ServerKeys):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys.allowed:
            return True
        log.warning("refused a client: its key %s is not in --allow %s", key.decode(), self.keys.folder)
        return False


class CurveServer:
    """CurveZMQ for a server socket: the server's key pair on the socket and a
    ZAP authenticator thread on ``context`` admitting only the allowlist.
    One authenticator serves a whole context, so give each server a context
    of its own; ``stop`` when the server stops."""

    def __init__(self, keys: ServerKeys, context: zmq.Context):
        self.keys = keys
        self.authenticator = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
        self.authenticator.start()
        self.authenticator.configure_curve_callback("*", credentials_provider=_Allowlist(keys))

    def secure(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CurveZMQ server with this server's key pair (before it binds)."""
        socket.curve_secretkey = self.keys.pair.secret
        socket.curve_publickey = self.keys.pair.public
        socket.curve_server = True

    def stop(self) -> None:
        """Stop the authenticator thread."""
        self.authenticator.stop()


def peer_key(frame: zmq.Frame) -> str:
    """The CurveZMQ public key (Z85) that sent ``frame``, which the ZAP
    authenticator attached as its ``User-Id``; a frame received without
    copying (``copy=False``) carries it."""
    return frame.get("User-Id")


# ---------------------------------------------------------------- the client side


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the public key of the server it trusts."""

    pair: KeyPair
    server: bytes
    server_file: Path


def load_client_keys(key: str | None, server_key: str | None) -> ClientKeys | None:
    """The client's keys from ``--key`` and ``--server-key`` (None: plain mode)."""
    if not check_pair(("--key", key), ("--server-key", server_key)):
        return None
    return ClientKeys(load_key_pair(key, "--key"), load_public_key(server_key, "--server-key"), Path(server_key))


def secure_client(socket: zmq.Socket, keys: ClientKeys) -> None:
    """Make ``socket`` a CurveZMQ client of the server ``keys.server`` (before it connects)."""
    socket.curve_secretkey = keys.pair.secret
    socket.curve_publickey = keys.pair.public
    socket.curve_serverkey = keys.server


# A server that drops the handshake this many times in a row, never completing
# it, is refusing us; a single drop may be a server restarting.
DROPS_BEFORE_GIVING_UP = 3
_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
             | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class HandshakeWatch:
    """A monitor on a client socket that turns a failed handshake into a
    sentence naming the likely cause. ZeroMQ itself only retries quietly, so
    without it a refused client would wait out its whole timeout."""

    def __init__(self, socket: zmq.Socket, address: str, keys: ClientKeys | None):
        self.address = address
        self.keys = keys
        self.socket = socket.get_monitor_socket(_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._owner = socket
        self._drops = 0
        self._established = False  # a handshake succeeded and no disconnect followed
        self._disconnected = False
        self.refused: str | None = None

    def problem(self) -> str | None:
        """Read the pending events; the reason the server refuses this client,
        if it does. A refusal stays: ZeroMQ does not reconnect after a failed
        authentication or protocol, and three drops are taken as final."""
        while self.refused is None and self.socket.poll(0):
            event = parse_monitor_message(self.socket.recv_multipart())
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_DISCONNECTED:
                # Only the loss of an established connection can lose a request;
                # a failed handshake disconnects too, and is counted below.
                self._disconnected |= self._established
                self._established = False
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._drops = 0
                self._established = True
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.refused = self._auth_failed(value)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self.refused = self._protocol(value)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._drops += 1
                if self._drops >= DROPS_BEFORE_GIVING_UP:
                    self.refused = self._dropped()
        return self.refused

    def take_drop(self) -> bool:
        """Whether an established connection dropped since the last call (a
        request in flight on it, or its reply, may be lost)."""
        self.problem()
        dropped, self._disconnected = self._disconnected, False
        return dropped

    def _auth_failed(self, status: int) -> str:
        if self.keys is None:
            return f"the server at {self.address} refused the handshake (authentication status {status})"
        if status == 400:
            return (f"the server at {self.address} does not accept this client's key: add "
                    f"{self.keys.pair.public_file} (the public half of --key {self.keys.pair.path}) to the "
                    "server's --allow folder and restart the server")
        return (f"the server at {self.address} could not check this client's key (authentication status "
                f"{status}); see the server's log")

    def _protocol(self, code: int) -> str:
        if code == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self.keys is None:
                return (f"the server at {self.address} requires encryption: pass --key and --server-key (this "
                        f"client's NAME.key_secret, the server's public NAME.key; {KEYS_HINT})")
            return (f"the server at {self.address} runs in plain mode (no encryption, loopback only): drop "
                    "--key and --server-key, or restart the server with --secret-key and --allow")
        return f"the handshake with the server at {self.address} broke the ZeroMQ protocol (error {code:#x})"

    def _dropped(self) -> str:
        # A dropped handshake names no cause; these are the ones a fedsplit server gives.
        if self.keys is None:
            return (f"the server at {self.address} closed the connection during the ZeroMQ handshake "
                    f"{self._drops} times in a row, as a server that requires encryption does with a client "
                    f"without keys: pass --key and --server-key ({KEYS_HINT}); if it runs in plain mode, is a "
                    "fedsplit server listening there?")
        return (f"the server at {self.address} dropped the CurveZMQ handshake {self._drops} times in a row, as a "
                f"server does when a client's --server-key is not its public key (check that --server-key "
                f"{self.keys.server_file} is the public half of the server's --secret-key) or when it runs in "
                "plain mode (then drop --key and --server-key)")

    def close(self) -> None:
        """Stop monitoring and close the monitor socket."""
        try:
            self._owner.disable_monitor()
        except zmq.ZMQError:
            pass  # the watched socket is already closed, which ends its monitor too
        self.socket.close(linger=0)
