"""Files that ship inside the package: link and device profiles, the bundled topologies and configs,
the bundled experiments, the logging/ stack (compose file, Loki/Alloy configs, Grafana provisioning).

They live at the top of the checkout (netem/, topologies/, configs/, logging/), where users edit them; the
entries in this folder are links to them, so `pip install .` copies them into the wheel and an
editable install reads them in place. Look them up with `resource_path`, never relative to a checkout.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_path(*parts: str) -> Path:
    """The path of a shipped file, e.g. resource_path("netem", "profiles.yaml")."""
    return Path(str(files(__name__).joinpath(*parts)))
