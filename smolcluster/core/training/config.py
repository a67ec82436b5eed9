"""Typed training configs, loaded and validated in one place.

Three files live in a config dir (default `configs/`):
- `nn_config.yaml`            model and optimisation (shared by both algorithms)
- `cluster_config_edp.yaml`   cluster layout and EDP settings
- `cluster_config_syncps.yaml` cluster layout and SyncPS settings

Every bad value raises ConfigError naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from smolcluster.common.errors import ConfigError

Algorithm = Literal["edp", "syncps"]
ALGORITHMS: tuple[str, ...] = ("edp", "syncps")


@dataclass(frozen=True)
class ModelConfig:
    type: str = "SimpleNN"  # SimpleNN | GPT
    input_dim: int = 784
    hidden: int = 128
    out: int = 10
    activation: str = "relu"
    # GPT only
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0


@dataclass(frozen=True)
class NNConfig:
    batch_size: int = 32
    learning_rate: float = 0.001
    optimizer: str = "adam"  # adam | sgd
    num_epochs: int = 1
    eval_steps: int = 200
    track_gradients: bool = True
    polyak_alpha: float = 1.0
    gradient_clipping: float | None = 1.0  # max global grad norm; null disables
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: str = "MNIST"
    data_dir: str | None = None  # IDX files; else $SMOLCLUSTER_DATA_DIR; else download
    text_file: str | None = None  # dataset text: a UTF-8 file (default: a corpus of Python stdlib sources)


@dataclass(frozen=True)
class ClusterConfig:
    algorithm: str
    host_ip: dict[str, str]
    port: int = 65432
    num_workers: int = 2
    workers: tuple[str, ...] = ()
    server: str = "server"
    worker_update_interval: int = 1
    use_quantization: bool = False
    timeout: float = 1.0  # SyncPS straggler deadline (s)
    seed: int = 42
    min_workers: int = 1  # SyncPS: contributions needed to close a step at the deadline
    server_trains: bool = False  # the server is also training rank 0
    push_interval: int = 1  # EDP: push every N local steps
    push_mode: str = "weights"  # EDP: weights | gradients
    track_gradients: bool = True
    max_steps: int | None = None  # stop after this many server updates (None: epochs decide)
    checkpoint_dir: str | None = None  # default: RUN_DIR/checkpoints
    checkpoint_interval: int = 200  # server updates between checkpoints; 0 = only at the end
    cluster_key_file: str | None = None  # or $SMOLCLUSTER_CLUSTER_KEY
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    idle_timeout: float = 30.0  # server stops if no worker is connected this long
    wandb: str = "auto"  # auto (online with a key, else offline) | online | offline | off
    robust_aggregation: bool = True  # reject updates whose norm is far above the recent ones (median + k MAD)
    robust_k: float = 20.0  # the k of that rule (honest MNIST batches stay below 0.7 of the limit)

    def server_address_for(self, hostname: str) -> str:
        return self.host_ip[hostname]


# --------------------------------------------------------------------------- validation


def _expect(file: Path, key: str, ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(file, key, problem, fix)


def _coerce(file: Path, key: str, value: Any, kind: type, *, optional: bool = False) -> Any:
    """Check one scalar; ints are accepted where floats are expected."""
    if value is None and optional:
        return None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    expected = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[kind]
    raise ConfigError(file, key, f"got {value!r}, expected {expected}" + (" or null" if optional else ""),
                      f"set '{key}' to {expected}")


def _scalar_fields(cls: type, file: Path, raw: dict, prefix: str = "") -> dict[str, Any]:
    """Coerce the plain scalar fields of a dataclass from a raw YAML mapping."""
    out: dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in raw.items():
        f = hints.get(name)
        if f is None:
            known = ", ".join(sorted(hints))
            raise ConfigError(file, prefix + name, "unknown key", f"remove it or use one of: {known}")
        t = str(f.type)
        optional = "None" in t
        base = float if t.startswith("float") else int if t.startswith("int") else bool if t.startswith("bool") else str if t.startswith("str") else None
        if base is None:
            continue  # structured field, handled by the caller
        out[name] = _coerce(file, prefix + name, value, base, optional=optional)
    return out


def read_yaml(path: Path, *, what: str = "file", missing_fix: str | None = None,
              layout: str = "write 'key: value' lines") -> dict:
    """A YAML file whose top level is a mapping; every problem is a ConfigError naming the file.
    `what`, `missing_fix` and `layout` tailor the messages to the kind of file (config, topology, profiles)."""
    if not path.exists():
        raise ConfigError(path, "<file>", f"{what} not found",
                          missing_fix or f"create it or pass --config-dir pointing at a folder with {path.name}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(path, "<file>", f"not valid YAML: {e}", "fix the YAML syntax (indentation, colons, quotes)") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "<file>", "top level must be a mapping", layout)
    return data


def parse_nn_config(raw: dict, file: Path) -> NNConfig:
    raw = dict(raw)
    model_raw = raw.pop("model", {}) or {}
    dataset = raw.pop("dataset", "MNIST")
    if isinstance(dataset, dict):
        dataset = dataset.get("name", "MNIST")
    _expect(file, "model", isinstance(model_raw, dict), "must be a mapping", "e.g. model: {type: SimpleNN, hidden: 128}")
    model = ModelConfig(**_scalar_fields(ModelConfig, file, model_raw, "model."))
    _expect(file, "model.type", model.type in ("SimpleNN", "GPT"), f"unknown model {model.type!r}", "use SimpleNN or GPT")
    _expect(file, "model.activation", model.activation in ("relu", "gelu", "tanh"), f"unknown activation {model.activation!r}", "use relu, gelu or tanh")
    for k in ("input_dim", "hidden", "out", "vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        _expect(file, f"model.{k}", getattr(model, k) > 0, "must be positive", "use a positive integer")
    _expect(file, "model.n_embd", model.n_embd % model.n_head == 0, "must be divisible by model.n_head", "pick n_embd as a multiple of n_head")
    cfg = NNConfig(**_scalar_fields(NNConfig, file, raw), model=model, dataset=str(dataset))
    _expect(file, "batch_size", cfg.batch_size >= 1, f"got {cfg.batch_size}, must be >= 1", "use e.g. 32")
    _expect(file, "learning_rate", cfg.learning_rate > 0, f"got {cfg.learning_rate}, must be > 0", "use e.g. 0.001")
    _expect(file, "num_epochs", cfg.num_epochs >= 1, f"got {cfg.num_epochs}, must be >= 1", "use e.g. 1")
    _expect(file, "eval_steps", cfg.eval_steps >= 1, f"got {cfg.eval_steps}, must be >= 1", "use e.g. 200")
    _expect(file, "optimizer", cfg.optimizer in ("adam", "sgd"), f"unknown optimizer {cfg.optimizer!r}", "use adam or sgd")
    _expect(file, "polyak_alpha", 0.0 < cfg.polyak_alpha <= 1.0, f"got {cfg.polyak_alpha}, must be in (0, 1]", "1.0 takes the server weights as they are")
    _expect(file, "gradient_clipping", cfg.gradient_clipping is None or cfg.gradient_clipping > 0,
            f"got {cfg.gradient_clipping}, must be > 0 or null", "use e.g. 1.0, or null to disable")
    _expect(file, "dataset", cfg.dataset in ("MNIST", "text"), f"unknown dataset {cfg.dataset!r}", "use MNIST (or text with model GPT)")
    _expect(file, "dataset", (cfg.dataset == "text") == (model.type == "GPT"),
            f"dataset {cfg.dataset} does not fit model {model.type}", "use MNIST with SimpleNN, or text with GPT")
    return cfg


def parse_cluster_config(raw: dict, file: Path, algorithm: str) -> ClusterConfig:
    raw = dict(raw)
    if isinstance(raw.get("wandb"), bool):  # YAML reads a bare off/on as a boolean
        raw["wandb"] = "auto" if raw["wandb"] else "off"
    host_ip = raw.pop("host_ip", None)
    workers = raw.pop("workers", None)
    _expect(file, "host_ip", isinstance(host_ip, dict) and len(host_ip) > 0,
            "must map each hostname to the server address it uses", "e.g. host_ip: {mini2: 10.10.0.1}")
    _expect(file, "workers", isinstance(workers, list) and all(isinstance(w, str) for w in workers),
            "must be a list of worker hostnames", "e.g. workers: [mini2, mini3]")
    cfg = ClusterConfig(algorithm=algorithm, host_ip={str(k): str(v) for k, v in host_ip.items()},
                        workers=tuple(workers), **_scalar_fields(ClusterConfig, file, raw))
    _expect(file, "port", 0 <= cfg.port <= 65535, f"got {cfg.port}", "use a TCP port, e.g. 65432")
    _expect(file, "num_workers", cfg.num_workers == len(cfg.workers),
            f"is {cfg.num_workers} but 'workers' lists {len(cfg.workers)}", "make them agree")
    _expect(file, "workers", len(set(cfg.workers)) == len(cfg.workers), "lists a hostname twice", "list each worker once")
    _expect(file, "workers", cfg.server not in cfg.workers, f"contains the server {cfg.server!r}", "use server_trains: true to train on the server")
    for w in cfg.workers:
        _expect(file, "host_ip", w in cfg.host_ip, f"has no entry for worker {w!r}", f"add '{w}: <server address as seen from {w}>'")
    _expect(file, "worker_update_interval", cfg.worker_update_interval >= 1, "must be >= 1", "use e.g. 1 (every step)")
    _expect(file, "timeout", cfg.timeout > 0, f"got {cfg.timeout}, must be > 0 seconds", "use e.g. 1.0")
    _expect(file, "min_workers", 1 <= cfg.min_workers <= cfg.num_workers + int(cfg.server_trains),
            f"got {cfg.min_workers}, must be between 1 and the number of training ranks", "use e.g. 1")
    _expect(file, "push_interval", cfg.push_interval >= 1, "must be >= 1", "use e.g. 1")
    _expect(file, "push_mode", cfg.push_mode in ("weights", "gradients"), f"got {cfg.push_mode!r}", "use weights or gradients")
    _expect(file, "max_steps", cfg.max_steps is None or cfg.max_steps >= 1, "must be >= 1 or null", "use e.g. 500")
    _expect(file, "checkpoint_interval", cfg.checkpoint_interval >= 0, "must be >= 0", "0 writes only the final checkpoint")
    _expect(file, "heartbeat_timeout", cfg.heartbeat_timeout > cfg.heartbeat_interval > 0,
            "heartbeat_timeout must exceed heartbeat_interval, both > 0", "e.g. heartbeat_interval: 1, heartbeat_timeout: 10")
    _expect(file, "wandb", cfg.wandb in ("auto", "online", "offline", "off"), f"got {cfg.wandb!r}", "use auto, online, offline or off")
    _expect(file, "robust_k", cfg.robust_k > 0, f"got {cfg.robust_k}, must be > 0", "use e.g. 20 (or robust_aggregation: false)")
    return cfg


@dataclass(frozen=True)
class RunConfig:
    """Everything one node needs: model/optimisation plus the cluster for one algorithm."""

    nn: NNConfig
    cluster: ClusterConfig
    config_dir: Path


def cluster_config_file(config_dir: Path, algorithm: str) -> Path:
    return Path(config_dir) / f"cluster_config_{algorithm}.yaml"


def load_run_config(config_dir: str | Path, algorithm: str) -> RunConfig:
    if algorithm not in ALGORITHMS:
        raise ConfigError("command line", "--algo", f"unknown algorithm {algorithm!r}", "use edp or syncps")
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
