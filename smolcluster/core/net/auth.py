"""Cluster key and the challenge-response handshake.

With a cluster key, a connection starts with a mutual handshake (both sides prove they hold the key
without sending it), then every frame carries an HMAC under a per-connection, per-direction session key
derived from both nonces, so a frame recorded on one connection cannot be replayed on another or
reflected back to its sender.

    client -> server  AUTH_CHALLENGE {nonce: nonce_c}      (sent first, so a keyless server notices at once)
    server -> client  AUTH_CHALLENGE {nonce: nonce_s}      (sent on accept)
    client -> server  AUTH_RESPONSE  {proof: HMAC(key, nonce_s + nonce_c + "client")}
    server -> client  AUTH_OK        {proof: HMAC(key, nonce_s + nonce_c + "server")}

Handshake frames carry no MAC (there is no session key yet); their sequence number is 0.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolcluster.common.errors import AuthFailed, ConfigError, FrameTooLarge, MissingKey, RemoteError
from smolcluster.core.net.wire import Message, MessageKind, WireLimits, encode_frame, read_frame, send_frame

KEY_ENV = "SMOLCLUSTER_CLUSTER_KEY"
NONCE_BYTES = 32
# Handshake frames are tiny; a peer cannot make us allocate more than this before it is authenticated.
HANDSHAKE_LIMITS = WireLimits(max_header_bytes=4096, max_payload_bytes=0, max_tensors=0)


def _parse_key(text: str) -> bytes:
    """Hex strings are decoded (what keygen writes); anything else is used as UTF-8 bytes."""
    text = text.strip()
    try:
        return bytes.fromhex(text) if text and len(text) % 2 == 0 else text.encode()
    except ValueError:
        return text.encode()


MIN_KEY_BYTES = 16


def _checked(key: bytes, source: str | Path, key_name: str) -> bytes:
    """The same rule for every source of a key: a short key can be guessed online in seconds."""
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(source, key_name, f"the cluster key is only {len(key)} bytes long, at least {MIN_KEY_BYTES} are needed",
                          "generate one with `smolcluster keygen PATH` (32 random bytes) and use that on every node")
    return key


def load_cluster_key(key_file: str | Path | None = None) -> bytes | None:
    """The cluster key: $SMOLCLUSTER_CLUSTER_KEY first, then `key_file`; None when neither is set.
    Either way it must be at least MIN_KEY_BYTES long (hex is decoded first, as keygen writes it)."""
    env = os.environ.get(KEY_ENV)
    if env is not None and env.strip():
        return _checked(_parse_key(env), f"${KEY_ENV}", KEY_ENV)
    if key_file is None:
        return None
    path = Path(key_file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "key_file", "the cluster key file does not exist",
                          f"create one with `smolcluster keygen {path}` and copy it to every node") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, "key_file", f"cannot read the cluster key file ({e})",
                          "check its permissions, or regenerate it with `smolcluster keygen PATH --force`") from None
    return _checked(_parse_key(text), path, "key_file")


def write_key_file(path: str | Path, *, force: bool = False) -> None:
    """Write 32 random bytes as hex to `path`, readable by the owner only (mode 0600)."""
    path = Path(path).expanduser()
    if path.exists() and not force:
        raise ConfigError(path, "key_file", "the file already exists and would be overwritten",
                          "pass --force to replace it (every node must then get the new key)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Create with 0600 from the start so the key is never readable by others, even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_hex(32) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- handshake


@dataclass(frozen=True)
class SessionKeys:
    send: bytes  # MAC key for frames this side sends
    recv: bytes  # MAC key for frames this side receives


def _prf(key: bytes, label: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    return hmac.new(key, label + nonce_s + nonce_c, hashlib.sha256).digest()


def proof(key: bytes, role: str, nonce_s: bytes, nonce_c: bytes) -> bytes:
    """What `role` ("client" or "server") sends to prove it holds the key."""
    return _prf(key, b"smolcluster/proof/" + role.encode(), nonce_s, nonce_c)


def session_keys(key: bytes, role: str, nonce_s: bytes, nonce_c: bytes) -> SessionKeys:
    c2s = _prf(key, b"smolcluster/mac/c2s", nonce_s, nonce_c)
    s2c = _prf(key, b"smolcluster/mac/s2c", nonce_s, nonce_c)
    return SessionKeys(send=c2s, recv=s2c) if role == "client" else SessionKeys(send=s2c, recv=c2s)


def _send(sock: Any, kind: MessageKind, **fields: Any) -> None:
    send_frame(sock, encode_frame(Message(kind, fields), limits=HANDSHAKE_LIMITS))


def _hex_field(msg: Message, name: str, peer: str | None) -> bytes:
    value = msg.fields.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != NONCE_BYTES:
        raise AuthFailed(f"{msg.kind.name} has no valid '{name}' field", peer=peer)
    return raw


def _expect(sock: Any, kind: MessageKind, peer: str | None, keyed_side: str) -> Message:
    """Read one handshake frame; turn the other side's refusal or lack of a key into a clear error."""
    fix = f"set the same {KEY_ENV} (or key file) on every node, or on none"
    try:
        msg = read_frame(sock, limits=HANDSHAKE_LIMITS, peer=peer)
    except FrameTooLarge as e:
        # A data frame where a handshake frame belongs: the peer skipped the handshake (it has no key).
        raise MissingKey(f"expected {kind.name} but the peer sent a data frame ({e.problem}): this {keyed_side} "
                         f"has a cluster key and the peer has none; {fix}", peer=peer) from None
    if msg.kind == kind:
        return msg
    if msg.kind == MessageKind.ERROR:
        remote_type = str(msg.fields.get("error", "Error"))
        text = str(msg.fields.get("message", ""))
        if remote_type == "MissingKey":
            raise MissingKey(f"this {keyed_side} has a cluster key but the peer has none; {fix}", peer=peer)
        if remote_type == "AuthFailed":
            raise AuthFailed(f"the peer refused our handshake: {text}", peer=peer)
        raise RemoteError(remote_type, text, peer=peer)
    raise MissingKey(f"expected {kind.name} during the handshake but the peer sent {msg.kind.name}: "
                     f"this {keyed_side} has a cluster key and the peer has none; {fix}", peer=peer)


def client_handshake(sock: Any, key: bytes, *, peer: str | None = None) -> SessionKeys:
    """Run the client side on a connected socket (anything with recv_into and sendmsg/sendall)."""
    nonce_c = secrets.token_bytes(NONCE_BYTES)
    _send(sock, MessageKind.AUTH_CHALLENGE, nonce=nonce_c.hex())
    nonce_s = _hex_field(_expect(sock, MessageKind.AUTH_CHALLENGE, peer, "client"), "nonce", peer)
    _send(sock, MessageKind.AUTH_RESPONSE, proof=proof(key, "client", nonce_s, nonce_c).hex())
    ok = _expect(sock, MessageKind.AUTH_OK, peer, "client")
    if not hmac.compare_digest(_hex_field(ok, "proof", peer), proof(key, "server", nonce_s, nonce_c)):
        raise AuthFailed("the server could not prove it holds the cluster key (different key on the server?)", peer=peer)
    return session_keys(key, "client", nonce_s, nonce_c)


def server_handshake(sock: Any, key: bytes, *, peer: str | None = None) -> SessionKeys:
    """Run the server side on an accepted socket. Raises AuthError subclasses on any failure."""
    nonce_s = secrets.token_bytes(NONCE_BYTES)
    _send(sock, MessageKind.AUTH_CHALLENGE, nonce=nonce_s.hex())
    nonce_c = _hex_field(_expect(sock, MessageKind.AUTH_CHALLENGE, peer, "server"), "nonce", peer)
    response = _expect(sock, MessageKind.AUTH_RESPONSE, peer, "server")
    if not hmac.compare_digest(_hex_field(response, "proof", peer), proof(key, "client", nonce_s, nonce_c)):
        raise AuthFailed("the client's proof does not match: it holds a different cluster key", peer=peer)
    _send(sock, MessageKind.AUTH_OK, proof=proof(key, "server", nonce_s, nonce_c).hex())
    return session_keys(key, "server", nonce_s, nonce_c)
