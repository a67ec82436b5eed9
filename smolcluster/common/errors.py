"""Typed exceptions. Every failure a user can meet is one of these, with a message they understand."""

from __future__ import annotations

from pathlib import Path


class SmolclusterError(Exception):
    """Base class for every error smolcluster raises on purpose."""


class ConfigError(SmolclusterError):
    """A config or topology file has a bad value. Names the file, the key and the fix."""

    def __init__(self, file: str | Path | None, key: str, problem: str, fix: str = ""):
        self.file = str(file) if file is not None else "<config>"
        self.key = key
        self.problem = problem
        self.fix = fix
        msg = f"{self.file}: key '{key}': {problem}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


class DockerUnavailable(SmolclusterError):
    """The compose backend needs a docker CLI, a running engine and compose (v2 or v1); one is missing."""


class DockerCommandFailed(SmolclusterError):
    """A docker / compose command failed or timed out; the message carries its output."""


class DataError(SmolclusterError):
    """A dataset cannot be found, read or downloaded."""


class ReportError(SmolclusterError):
    """A run directory cannot be reported on (missing, no metrics, unreadable summary)."""


class WaitTimeout(SmolclusterError, TimeoutError):
    """Something waited for did not happen in time (smolcluster.common.wait.wait_until)."""


class QuantizationError(SmolclusterError):
    """A quantized tensor set is malformed (missing scale/zero companion, unknown scheme, bad shapes)."""


# --------------------------------------------------------------------------- wire format


class WireError(SmolclusterError):
    """A frame broke the wire format or a limit. The stream may be desynchronised: drop the connection."""

    def __init__(self, problem: str, *, peer: str | None = None):
        self.problem = problem
        self.peer = peer
        super().__init__(f"bad frame from {peer}: {problem}" if peer else f"bad frame: {problem}")


class TruncatedFrame(WireError):
    """The connection ended in the middle of a frame."""


class BadMagic(WireError):
    """The bytes are not a smolcluster frame (wrong program or port, or a desynchronised stream)."""


class UnsupportedVersion(WireError):
    """The peer speaks another wire-format version (mixed smolcluster versions)."""


class FrameTooLarge(WireError):
    """A declared length or count exceeds WireLimits; nothing was allocated for it."""


class BadHeader(WireError):
    """The JSON header is not valid JSON or misses required fields."""


class BadTensorTable(WireError):
    """The tensor table is malformed: offsets out of range or overlapping, bad names, bad quant params."""


class UnknownDtype(WireError):
    """A tensor's dtype is not on the allow-list."""


class ShapeMismatch(WireError):
    """A tensor's shape times its item size does not equal its byte length."""


class SchemaMismatch(WireError):
    """A tensor's name, shape or dtype does not match the model."""


class NonFiniteTensor(WireError):
    """A floating tensor contains NaN or Inf and the receiver rejects those."""


class BadField(SmolclusterError):
    """A message field has the wrong type, is not finite, or is out of range. The frame itself was well formed,
    so the stream is still in sync: the message is rejected (counted under `reason`) and the connection kept."""

    def __init__(self, kind: str, field: str, problem: str):
        self.kind = kind
        self.field = field
        self.problem = problem
        self.reason = f"bad-field:{field}"
        super().__init__(f"{kind} field '{field}': {problem}")


class AuthError(WireError):
    """Authentication failed: the peer does not hold the same cluster key, or a frame was forged or replayed."""

    def __init__(self, problem: str, *, peer: str | None = None):
        self.problem = problem
        self.peer = peer
        SmolclusterError.__init__(self, f"authentication with {peer} failed: {problem}" if peer else f"authentication failed: {problem}")


class BadMac(AuthError):
    """A frame's HMAC does not verify: it was altered, or the peer uses a different key."""


class ReplayedFrame(AuthError):
    """A frame's sequence number is not the next one expected: replayed, reordered or dropped."""


class MissingKey(AuthError):
    """One side has a cluster key and the other does not."""


class AuthFailed(AuthError):
    """The challenge-response handshake failed (wrong key, no answer, or the peer refused us)."""


# --------------------------------------------------------------------------- transport


class TransportError(SmolclusterError):
    """A connection could not be made, went silent, or closed."""

    def __init__(self, problem: str, *, peer: str | None = None):
        self.problem = problem
        self.peer = peer
        super().__init__(f"{peer}: {problem}" if peer else problem)


class ConnectFailed(TransportError):
    """Could not connect (and authenticate) within the retry policy's deadline."""


class PeerTimeout(TransportError):
    """The peer sent nothing at all (not even a heartbeat) for too long, or stopped reading."""


class ConnectionClosed(TransportError):
    """The peer closed the connection, or it was closed locally."""


class RecvTimeout(TransportError):
    """No message arrived within the caller's timeout (the peer was alive: heartbeats only)."""


class RemoteError(TransportError):
    """The peer sent an ERROR frame (it rejected something we sent) and closed the connection."""

    def __init__(self, remote_type: str, remote_message: str, *, peer: str | None = None):
        self.remote_type = remote_type
        self.remote_message = remote_message
        super().__init__(f"peer rejected us with {remote_type}: {remote_message}", peer=peer)


class ProxyError(SmolclusterError):
    """A link-emulation (Toxiproxy API) request failed: unknown proxy or toxic, bad toxic, address in use.

    `status` is the HTTP status the Toxiproxy API answers with (400, 404, 409, 500)."""

    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


class ServerFailed(SmolclusterError):
    """The server stopped because of an internal error (not a peer's input); it wrote its summary and a final checkpoint."""


class SimError(SmolclusterError):
    """A simulated run could not start or ended badly (a node failed to start, the server crashed, ...)."""
