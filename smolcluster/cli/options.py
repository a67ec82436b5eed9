"""Option help texts shared by several commands."""

from smolcluster.core.algorithms import BUILTIN

ALGO_HELP = "Training algorithm: " + " or ".join(f"{a.name} ({a.description})" for a in BUILTIN) + "."
