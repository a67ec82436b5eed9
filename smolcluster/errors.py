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


class QuantizationError(SmolclusterError):
    """A quantized tensor set is malformed (missing scale/zero companion, unknown scheme, bad shapes)."""
