"""Typed training configs, loaded and validated in one place.

Three files live in a config dir (default `configs/`):
- `nn_config.yaml`            model and optimisation (shared by both algorithms)
- `cluster_config_edp.yaml`   cluster layout and EDP settings
- `cluster_config_syncps.yaml` cluster layout and SyncPS settings

Every bad value raises ConfigError naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from smolcluster.common.errors import ConfigError
from smolcluster.common.fields import INT64_MAX, checked, parse_fields, shown
from smolcluster.common.yamlfile import read_yaml
from smolcluster.core import algorithms

DEVICES: tuple[str, ...] = ("auto", "cpu", "mps", "cuda")

# Sizes past these are typos (hidden: 1e12 would ask for terabytes), not models this project trains.
MAX_WIDTH = 1 << 20
MAX_PARAMETERS = 2_000_000_000
# Timeouts longer than a week are typos too (and threading waits overflow on huge values).
MAX_SECONDS = 7 * 24 * 3600.0

_POSITIVE = {"min": 1, "max": MAX_WIDTH, "fix": "use a positive integer"}


@dataclass(frozen=True)
class ModelConfig:
    type: Literal["SimpleNN", "GPT"] = checked("SimpleNN", fix="use SimpleNN or GPT")
    input_dim: int = checked(784, **_POSITIVE)
    hidden: int = checked(128, **_POSITIVE)
    out: int = checked(10, **_POSITIVE)
    activation: Literal["relu", "gelu", "tanh"] = checked("relu", fix="use relu, gelu or tanh")
    # GPT only
    vocab_size: int = checked(256, **_POSITIVE)
    block_size: int = checked(64, **_POSITIVE)
    n_layer: int = checked(2, min=1, max=1024, fix="use a positive integer")
    n_head: int = checked(2, min=1, max=1024, fix="use a positive integer")
    n_embd: int = checked(64, **_POSITIVE)
    dropout: float = checked(0.0, min=0, below=1, fix="use e.g. 0.1, or 0 for none")

    def parameter_count(self) -> int:
        if self.type == "GPT":
            per_layer = 12 * self.n_embd * self.n_embd + 13 * self.n_embd
            return self.n_layer * per_layer + (2 * self.vocab_size + self.block_size) * self.n_embd
        return self.input_dim * self.hidden + self.hidden + self.hidden * self.out + self.out


@dataclass(frozen=True)
class NNConfig:
    batch_size: int = checked(32, min=1, max=1 << 20, fix="use e.g. 32")
    learning_rate: float = checked(0.001, above=0, max=1e3, fix="use e.g. 0.001")
    optimizer: Literal["adam", "sgd"] = checked("adam", fix="use adam or sgd")
    num_epochs: int = checked(1, min=1, max=1_000_000, fix="use e.g. 1")
    eval_steps: int = checked(200, min=1, fix="use e.g. 200")
    track_gradients: bool = True
    polyak_alpha: float = checked(1.0, above=0, max=1, fix="1.0 takes the server weights as they are")
    # max global grad norm; null disables. The original's {enabled: true, max_norm: 1.0} is read too.
    gradient_clipping: float | None = checked(1.0, above=0, fix="use e.g. 1.0, or null to disable")
    device: Literal["auto", "cpu", "mps", "cuda"] = checked("auto", fix="use auto, cpu, mps or cuda")
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: Literal["MNIST", "text"] = checked("MNIST", fix="use MNIST (or text with model GPT)")
    data_dir: str | None = None  # IDX files; else $SMOLCLUSTER_DATA_DIR; else download
    text_file: str | None = None  # dataset text: a UTF-8 file (default: a corpus of Python stdlib sources)


_SECONDS = {"above": 0, "max": MAX_SECONDS, "unit": "seconds"}


@dataclass(frozen=True)
class ClusterConfig:
    algorithm: str
    host_ip: dict[str, str]
    server: str  # required: the server's hostname (rank 0)
    port: int = checked(65432, min=0, max=65535, fix="use a TCP port, e.g. 65432")
    num_workers: int = checked(2, min=1, max=1 << 20, fix="make it the length of 'workers'")
    workers: tuple[str, ...] = ()
    worker_update_interval: int = checked(1, min=1, fix="use e.g. 1 (every step)")
    use_quantization: bool = False
    timeout: float = checked(1.0, **_SECONDS, fix="use e.g. 1.0")  # SyncPS straggler deadline (s)
    seed: int = checked(42, min=0, max=INT64_MAX - (1 << 20), fix="use e.g. 42")
    min_workers: int = checked(1, min=1, fix="use e.g. 1")  # SyncPS: contributions needed to close a step at the deadline
    server_trains: bool = False  # the server is also training rank 0
    push_interval: int = checked(1, min=1, fix="use e.g. 1")  # EDP: push every N local steps
    push_mode: Literal["weights", "gradients"] = checked("weights", fix="use weights or gradients")
    track_gradients: bool = True
    max_steps: int | None = checked(None, min=1, fix="use e.g. 500, or null")  # stop after this many server updates
    checkpoint_dir: str | None = None  # default: RUN_DIR/checkpoints
    checkpoint_interval: int = checked(200, min=0, fix="0 writes only the final checkpoint")
    cluster_key_file: str | None = None  # or $SMOLCLUSTER_CLUSTER_KEY
    heartbeat_interval: float = checked(1.0, **_SECONDS, fix="use e.g. 1.0")
    heartbeat_timeout: float = checked(10.0, **_SECONDS, fix="use e.g. 10.0")
    idle_timeout: float = checked(30.0, **_SECONDS, fix="use e.g. 30.0")  # server stops if no worker is connected this long
    wandb: Literal["auto", "online", "offline", "off"] = checked("auto", fix="use auto, online, offline or off")
    loki_url: str | None = None  # ship logs and metrics to this Loki (or $SMOLCLUSTER_LOKI_URL); null: only files
    robust_aggregation: bool = True  # reject updates whose norm is far above the recent ones (median + k MAD)
    # the k of that rule (honest MNIST batches stay below 0.7 of the limit)
    robust_k: float = checked(20.0, above=0, max=1e6, fix="use e.g. 20 (or robust_aggregation: false)")

    def server_address_for(self, hostname: str) -> str:
        return self.host_ip[hostname]


# --------------------------------------------------------------------------- validation


def _expect(file: Path, key: str, ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(file, key, problem, fix)


_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def is_address(text: str) -> bool:
    """An IPv4/IPv6 address or a DNS hostname (RFC 1123 labels)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    if not text or len(text) > 253 or re.fullmatch(r"[0-9.]+", text):  # 10.10.0.300 is a bad address, not a name
        return False
    return all(_HOSTNAME_LABEL.match(label) for label in text.rstrip(".").split("."))


def _gradient_clipping(file: Path, value: Any) -> Any:
    """The original's `{enabled: bool, max_norm: float}` as smolcluster's one number (or null)."""
    if not isinstance(value, dict):
        return value
    for k in value:
        _expect(file, f"gradient_clipping.{k}", k in ("enabled", "max_norm"), "unknown key",
                "use gradient_clipping: {enabled: true, max_norm: 1.0}, or just gradient_clipping: 1.0")
    enabled = value.get("enabled", True)
    _expect(file, "gradient_clipping.enabled", isinstance(enabled, bool), f"got {shown(enabled)}, expected true or false",
            "use enabled: true or enabled: false")
    return value.get("max_norm", 1.0) if enabled else None


def _dataset(file: Path, value: Any) -> Any:
    """`dataset: MNIST`, or the original's `dataset: {name: MNIST}`."""
    if not isinstance(value, dict):
        return value
    for k in value:
        _expect(file, f"dataset.{k}", k == "name", "unknown key", "use dataset: {name: MNIST}, or just dataset: MNIST")
    return value.get("name", "MNIST")


def parse_nn_config(raw: dict, file: Path) -> NNConfig:
    raw = dict(raw)
    model_raw = raw.pop("model", None) or {}
    if "gradient_clipping" in raw:
        raw["gradient_clipping"] = _gradient_clipping(file, raw["gradient_clipping"])
    if "dataset" in raw:
        raw["dataset"] = _dataset(file, raw["dataset"])
    _expect(file, "model", isinstance(model_raw, dict), "must be a mapping", "e.g. model: {type: SimpleNN, hidden: 128}")
    model = ModelConfig(**parse_fields(ModelConfig, model_raw, file, "model."))
    _expect(file, "model.n_embd", model.n_embd % model.n_head == 0, "must be divisible by model.n_head", "pick n_embd as a multiple of n_head")
    _expect(file, "model", model.parameter_count() <= MAX_PARAMETERS,
            f"{model.parameter_count():,} parameters is more than {MAX_PARAMETERS:,}", "use smaller sizes (hidden, n_embd, n_layer)")
    cfg = NNConfig(**parse_fields(NNConfig, raw, file), model=model)
    _expect(file, "dataset", (cfg.dataset == "text") == (model.type == "GPT"),
            f"dataset {cfg.dataset} does not fit model {model.type}", "use MNIST with SimpleNN, or text with GPT")
    return cfg


def parse_cluster_config(raw: dict, file: Path, algorithm: str) -> ClusterConfig:
    raw = dict(raw)
    _expect(file, "algorithm", "algorithm" not in raw, "does not belong in a cluster config: the algorithm is chosen by "
            "--algo (and the file's name)", f"remove it; this file is read by --algo {algorithm}")
    if isinstance(raw.get("wandb"), bool):  # YAML reads a bare off/on as a boolean
        raw["wandb"] = "auto" if raw["wandb"] else "off"
    host_ip = raw.pop("host_ip", None)
    workers = raw.pop("workers", None)
    _expect(file, "host_ip", isinstance(host_ip, dict) and len(host_ip) > 0,
            "must map each hostname to the server address it uses", "e.g. host_ip: {mini2: 10.10.0.1}")
    for host, address in host_ip.items():
        _expect(file, f"host_ip.{host}", isinstance(host, str) and isinstance(address, str) and is_address(address),
                f"{shown(address)} is not an IP address or hostname", 'quote it as a string, e.g. mini2: "10.10.0.1"')
    _expect(file, "workers", isinstance(workers, list) and all(isinstance(w, str) for w in workers),
            "must be a list of worker hostnames", "e.g. workers: [mini2, mini3]")
    _expect(file, "server", isinstance(raw.get("server"), str) and raw.get("server") != "",
            "missing: the server's hostname" if "server" not in raw else f"got {shown(raw.get('server'))}, expected a hostname",
            "add e.g. server: mini1 (the host that runs `smolcluster server`)")
    cfg = ClusterConfig(algorithm=algorithm, host_ip=dict(host_ip), workers=tuple(workers), **parse_fields(ClusterConfig, raw, file))
    _expect(file, "num_workers", cfg.num_workers == len(cfg.workers),
            f"is {cfg.num_workers} but 'workers' lists {len(cfg.workers)}", "make them agree")
    _expect(file, "workers", len(set(cfg.workers)) == len(cfg.workers), "lists a hostname twice", "list each worker once")
    _expect(file, "workers", cfg.server not in cfg.workers, f"contains the server {cfg.server!r}", "use server_trains: true to train on the server")
    for w in cfg.workers:
        _expect(file, "host_ip", w in cfg.host_ip, f"has no entry for worker {w!r}", f"add '{w}: <server address as seen from {w}>'")
    _expect(file, "min_workers", cfg.min_workers <= cfg.num_workers + int(cfg.server_trains),
            f"got {cfg.min_workers}, must be between 1 and the number of training ranks", "use e.g. 1")
    _expect(file, "heartbeat_timeout", cfg.heartbeat_timeout > cfg.heartbeat_interval,
            "heartbeat_timeout must exceed heartbeat_interval, both > 0", "e.g. heartbeat_interval: 1, heartbeat_timeout: 10")
    return cfg


def split_config_keys(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keys of one flat mapping (a topology's training: section) split into nn and cluster config keys.
    Keys neither knows go to nn, whose check names them as unknown."""
    cluster_keys = {f.name for f in dataclasses.fields(ClusterConfig)} - {f.name for f in dataclasses.fields(NNConfig)}
    nn = {k: v for k, v in raw.items() if k not in cluster_keys}
    return nn, {k: v for k, v in raw.items() if k in cluster_keys}


@dataclass(frozen=True)
class RunConfig:
    """Everything one node needs: model/optimisation plus the cluster for one algorithm."""

    nn: NNConfig
    cluster: ClusterConfig
    config_dir: Path


def cluster_config_file(config_dir: Path, algorithm: str) -> Path:
    return Path(config_dir) / f"cluster_config_{algorithm}.yaml"


def load_run_config(config_dir: str | Path, algorithm: str) -> RunConfig:
    algorithms.get(algorithm)  # an unknown --algo fails here, before any file is read
    config_dir = Path(config_dir)
    nn_file = config_dir / "nn_config.yaml"
    cl_file = cluster_config_file(config_dir, algorithm)
    nn = parse_nn_config(read_yaml(nn_file), nn_file)
    cluster = parse_cluster_config(read_yaml(cl_file), cl_file, algorithm)
    return RunConfig(nn=nn, cluster=cluster, config_dir=config_dir)


def training_ranks(cluster: ClusterConfig) -> list[int]:
    """Ranks that own a data shard: 0 (server) when it trains, workers are 1..num_workers."""
    return ([0] if cluster.server_trains else []) + list(range(1, cluster.num_workers + 1))


def rank_of(cluster: ClusterConfig, hostname: str) -> int:
    if hostname == cluster.server:
        return 0
    return cluster.workers.index(hostname) + 1


def to_dict(obj: Any) -> Any:
    """Dataclass config -> plain YAML/JSON-able dict."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
