"""smolcluster: parameter-server training (EDP, SyncPS) over plain TCP, and a testbed for it."""

__version__ = "0.1.0"
