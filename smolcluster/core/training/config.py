"""Typed training configs, loaded and validated in one place.

Three files live in a config dir (default `configs/`):
- `nn_config.yaml`            model and optimisation (shared by both algorithms)
- `cluster_config_edp.yaml`   cluster layout and EDP settings
- `cluster_config_syncps.yaml` cluster layout and SyncPS settings

and `gpt_config.yaml`, the original project's GPT language-model config (sections model, training,
lr_schedule, data, logging): `smolcluster train` reads it, and an nn_config.yaml that says
`gpt_config: gpt_config.yaml` trains that GPT on the cluster (its model and optimisation then come
from the GPT config, see gpt_nn_config).

Every bad value raises ConfigError naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from smolcluster.common.errors import ConfigError
from smolcluster.common.fields import INT64_MAX, checked, from_text, parse_fields, rule_of, shown, unknown_key_fix
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
    ff_dim: int | None = checked(None, **_POSITIVE | {"fix": "use e.g. 4 * n_embd, or null for that"})  # null: 4 * n_embd
    dropout: float = checked(0.0, min=0, below=1, fix="use e.g. 0.1, or 0 for none")

    def feed_forward(self) -> int:
        return self.ff_dim or 4 * self.n_embd

    def parameter_count(self) -> int:
        if self.type == "GPT":
            per_layer = 4 * self.n_embd * self.n_embd + 2 * self.n_embd * self.feed_forward() \
                + 9 * self.n_embd + self.feed_forward()
            return self.n_layer * per_layer + (2 * self.vocab_size + self.block_size) * self.n_embd
        return self.input_dim * self.hidden + self.hidden + self.hidden * self.out + self.out


@dataclass(frozen=True)
class NNConfig:
    batch_size: int = checked(32, min=1, max=1 << 20, fix="use e.g. 32")
    learning_rate: float = checked(0.001, above=0, max=1e3, fix="use e.g. 0.001")
    optimizer: Literal["adam", "adamw", "sgd"] = checked("adam", fix="use adam or sgd (or adamw, with weight_decay)")
    weight_decay: float = checked(0.0, min=0, max=10, fix="use e.g. 0.01 (AdamW), or 0 for none")
    num_epochs: int = checked(1, min=1, max=1_000_000, fix="use e.g. 1")
    eval_steps: int = checked(200, min=1, fix="use e.g. 200")
    track_gradients: bool = True
    polyak_alpha: float = checked(1.0, above=0, max=1, fix="1.0 takes the server weights as they are")
    # max global grad norm; null disables. The original's {enabled: true, max_norm: 1.0} is read too.
    gradient_clipping: float | None = checked(1.0, above=0, fix="use e.g. 1.0, or null to disable")
    device: Literal["auto", "cpu", "mps", "cuda"] = checked("auto", fix="use auto, cpu, mps or cuda")
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: Literal["MNIST", "text", "wikitext-2"] = checked("MNIST", fix="use MNIST (or text with model GPT)")
    data_dir: str | None = None  # IDX files; else $SMOLCLUSTER_DATA_DIR; else download
    text_file: str | None = None  # dataset text: a UTF-8 file (default: a corpus of Python stdlib sources)
    gpt_config: str | None = None  # train the GPT of this gpt_config.yaml (relative to this file's folder)


# nn_config keys a gpt_config decides (the GPT config's key that does, for the error message)
GPT_DECIDES = {"batch_size": "training.batch_size", "learning_rate": "training.learning_rate",
               "optimizer": "(AdamW)", "weight_decay": "training.weight_decay", "num_epochs": "training.epochs",
               "eval_steps": "training.eval_interval", "gradient_clipping": "training.grad_clip_norm",
               "model": "model", "dataset": "data.dataset", "text_file": "data.dir"}
GPT_DATASETS = ("text", "wikitext-2")


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
    # SyncPS straggler deadline (s), or auto: median + timeout_k MAD of the recent arrival delays (core/algorithms/deadline.py)
    timeout: float | Literal["auto"] = checked(1.0, **_SECONDS, fix="use e.g. 1.0 (seconds), or auto")
    timeout_k: float = checked(3.0, above=0, max=1000, fix="use e.g. 3 (MADs above the median arrival delay)")
    timeout_window: int = checked(64, min=4, max=100_000, fix="use e.g. 64 (arrivals)")
    timeout_min: float = checked(0.001, min=0, max=MAX_SECONDS, unit="seconds", fix="use e.g. 0.001")
    timeout_max: float = checked(10.0, **_SECONDS, fix="use e.g. 10.0")
    ddp_routes: bool = False  # DDP: gloo's connections go through the routes the rendezvous store names (the local sim's proxies)
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
    _expect(file, "dataset", (cfg.dataset in GPT_DATASETS) == (model.type == "GPT"),
            f"dataset {cfg.dataset} does not fit model {model.type}", "use MNIST with SimpleNN, or text with GPT")
    if cfg.gpt_config:
        for key, decided_by in GPT_DECIDES.items():
            _expect(file, key, key not in raw and not (key == "model" and model_raw), f"is decided by {cfg.gpt_config} ({decided_by})",
                    f"remove it here and set it in {cfg.gpt_config}")
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
    _expect(file, "timeout_min", cfg.timeout_min <= cfg.timeout_max, f"{cfg.timeout_min:g} is above timeout_max ({cfg.timeout_max:g})",
            "bound the adaptive deadline with timeout_min <= timeout_max")
    _expect(file, "heartbeat_timeout", cfg.heartbeat_timeout > cfg.heartbeat_interval,
            "heartbeat_timeout must exceed heartbeat_interval, both > 0", "e.g. heartbeat_interval: 1, heartbeat_timeout: 10")
    return cfg


# --------------------------------------------------------------------------- gpt_config.yaml (the original's GPT)

# Auto batch size: this many tokens per batch, as the original's 32 sequences of 128 (16 of 256).
AUTO_BATCH_TOKENS = 4096
AUTO_EPOCHS = {"wikitext-2": 30}  # the original's choice for wikitext
GPT2_TOKENIZER_NAMES = ("openai-community/gpt2", "gpt2")


@dataclass(frozen=True)
class GPTModelSection:
    model_dim: int = checked(256, **_POSITIVE)
    num_layers: int = checked(6, min=1, max=1024, fix="use a positive integer, e.g. 6")
    num_heads: int = checked(4, min=1, max=1024, fix="use a positive integer that divides model_dim, e.g. 4")
    ff_dim: int = checked(1024, **_POSITIVE | {"fix": "use e.g. 4 * model_dim"})
    dropout: float = checked(0.1, min=0, below=1, fix="use e.g. 0.1, or 0 for none")
    max_seq_len: int = checked(128, min=2, max=1 << 16, fix="use e.g. 128 or 256")


@dataclass(frozen=True)
class GPTTrainingSection:
    batch_size: int | None = checked(None, min=1, max=1 << 20, fix=f"use e.g. 32, or null for {AUTO_BATCH_TOKENS} tokens a batch")
    epochs: int | None = checked(None, min=1, max=1_000_000, fix="use e.g. 5, or null for auto (30 on wikitext-2)")
    max_steps: int | None = checked(None, min=1, fix="use e.g. 1000, or null to run the epochs")
    learning_rate: float = checked(6e-4, above=0, max=10, fix="use e.g. 6e-4")
    weight_decay: float = checked(0.01, min=0, max=10, fix="use e.g. 0.01")
    grad_clip_norm: float | None = checked(1.0, above=0, fix="use e.g. 1.0, or null to disable")
    eval_interval: int = checked(200, min=1, fix="use e.g. 200 (steps between validation runs)")
    eval_batches: int | None = checked(None, min=1, fix="use e.g. 20, or null for the whole validation split")
    checkpoint_interval: int = checked(500, min=0, fix="use e.g. 500, or 0 for only the final and best checkpoints")
    seed: int = checked(42, min=0, max=INT64_MAX - (1 << 20), fix="use e.g. 42")
    device: Literal["auto", "cpu", "mps", "cuda"] = checked("auto", fix="use auto, cpu, mps or cuda")


@dataclass(frozen=True)
class LRScheduleSection:
    warmup_iters: int = checked(100, min=0, fix="use e.g. 100 (steps of linear warmup), or 0")
    min_lr: float = checked(6e-5, min=0, fix="use e.g. learning_rate / 10")


@dataclass(frozen=True)
class GPTDataSection:
    dataset: Literal["wikitext-2"] = checked("wikitext-2", fix="use wikitext-2")
    # GPT-2's BPE (openai-community/gpt2 or gpt2) where its files are to be had, else a byte-level BPE trained
    # on the training split; bpe trains one always; byte is raw bytes (vocab 256); or a tokenizer.json path.
    tokenizer: str = "openai-community/gpt2"
    dir: str | None = None  # a folder with the splits; else $SMOLCLUSTER_TEXT_DIR; else download
    bpe_vocab_size: int = checked(8192, min=257, max=65536, fix="use e.g. 8192")


@dataclass(frozen=True)
class GPTLoggingSection:
    project_name: str = "smolcluster-gpt-wikitext2"
    wandb: Literal["auto", "online", "offline", "off"] = checked("auto", fix="use auto, online, offline or off")


@dataclass(frozen=True)
class GPTConfig:
    model: GPTModelSection = field(default_factory=GPTModelSection)
    training: GPTTrainingSection = field(default_factory=GPTTrainingSection)
    lr_schedule: LRScheduleSection = field(default_factory=LRScheduleSection)
    data: GPTDataSection = field(default_factory=GPTDataSection)
    logging: GPTLoggingSection = field(default_factory=GPTLoggingSection)
    file: Path | None = None  # where it was read from (relative data.dir is relative to its folder)

    def batch_size(self) -> int:
        """training.batch_size, or the auto choice: 4096 tokens a batch (32 x 128, 16 x 256)."""
        return self.training.batch_size or max(1, AUTO_BATCH_TOKENS // self.model.max_seq_len)

    def epochs(self) -> int:
        return self.training.epochs or AUTO_EPOCHS[self.data.dataset]

    def data_dir(self) -> str | None:
        raw = self.data.dir
        if raw and self.file is not None and not Path(raw).expanduser().is_absolute():
            return str((Path(self.file).parent / raw).resolve())
        return str(Path(raw).expanduser()) if raw else None

    def model_config(self, vocab_size: int = 256) -> ModelConfig:
        m = self.model
        return ModelConfig(type="GPT", vocab_size=vocab_size, block_size=m.max_seq_len, n_layer=m.num_layers,
                           n_head=m.num_heads, n_embd=m.model_dim, ff_dim=m.ff_dim, dropout=m.dropout)

    def resolved(self) -> dict[str, Any]:
        """The config as a run uses it: auto values filled in (what a run dir's config.yaml holds)."""
        out = to_dict(self)
        out.pop("file")
        out["training"] |= {"batch_size": self.batch_size(), "epochs": self.epochs()}
        return out


GPT_SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(GPTConfig)[f.name]
                                 for f in dataclasses.fields(GPTConfig) if f.name != "file"}


def gpt_keys() -> list[str]:
    """Every settable key as section.name, e.g. training.batch_size."""
    return [f"{s}.{f.name}" for s, cls in GPT_SECTIONS.items() for f in dataclasses.fields(cls)]


def apply_gpt_overrides(raw: dict, overrides: list[str], file: str | Path = "--override") -> dict:
    """`training.batch_size=16`-style overrides merged into a raw GPT config mapping. The value is read as
    the key's type (16 an int, 6e-4 a float, null where allowed); an unknown key lists the valid ones."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(file, item, "is not KEY=VALUE", "write e.g. --override training.batch_size=16")
        section, dot, name = key.partition(".")
        if section not in GPT_SECTIONS:
            raise ConfigError(file, key, "unknown key", unknown_key_fix(key, gpt_keys()))
        fields_of = {f.name: f for f in dataclasses.fields(GPT_SECTIONS[section])}
        if not dot or name not in fields_of:
            raise ConfigError(file, key, "unknown key" if dot else f"'{section}' is a section, not a key",
                              unknown_key_fix(key, gpt_keys()))
        hint = typing.get_type_hints(GPT_SECTIONS[section])[name]
        value = from_text(file, key, text, hint, rule_of(fields_of[name]))
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][name] = value
    return raw


def parse_gpt_config(raw: dict, file: Path | None) -> GPTConfig:
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in GPT_SECTIONS:
            raise ConfigError(file, name, "unknown section", unknown_key_fix(name, list(GPT_SECTIONS)))
        value = {} if value is None else value
        _expect(file, name, isinstance(value, dict), "must be a mapping of keys", f"e.g. {name}: {{...}} (see configs/gpt_config.yaml)")
        cls = GPT_SECTIONS[name]
        if name == "logging" and isinstance(value.get("wandb"), bool):  # YAML reads a bare off/on as a boolean
            value = value | {"wandb": "auto" if value["wandb"] else "off"}
        sections[name] = cls(**parse_fields(cls, value, file, f"{name}."))
    cfg = GPTConfig(**sections, file=file)
    m, t, lr = cfg.model, cfg.training, cfg.lr_schedule
    _expect(file, "model.model_dim", m.model_dim % m.num_heads == 0, f"{m.model_dim} is not divisible by model.num_heads ({m.num_heads})",
            "pick model_dim as a multiple of num_heads")
    _expect(file, "lr_schedule.min_lr", lr.min_lr <= t.learning_rate,
            f"{lr.min_lr:g} is above training.learning_rate ({t.learning_rate:g}); the schedule decays towards it",
            "use a min_lr at most learning_rate, e.g. learning_rate / 10")
    _expect(file, "data.tokenizer", cfg.data.tokenizer.strip() != "", "is empty",
            "use openai-community/gpt2 (GPT-2 BPE), bpe, byte or a tokenizer.json path")
    size = cfg.model_config(vocab_size=50257).parameter_count()
    _expect(file, "model", size <= MAX_PARAMETERS, f"{size:,} parameters is more than {MAX_PARAMETERS:,}",
            "use smaller sizes (model_dim, num_layers, ff_dim)")
    return cfg


def load_gpt_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> GPTConfig:
    path = Path(path)
    raw = read_yaml(path, what="GPT config", missing_fix="pass --config FILE, or copy configs/gpt_config.yaml")
    return parse_gpt_config(apply_gpt_overrides(raw, list(overrides)), path)


def gpt_nn_config(gpt: GPTConfig, nn: NNConfig, *, device_given: bool) -> NNConfig:
    """The nn config a cluster node runs for a GPT config: its model, batch, epochs, AdamW with weight
    decay, clipping and eval interval; polyak_alpha, track_gradients and (when given) device stay the node's."""
    t = gpt.training
    return dataclasses.replace(
        nn, batch_size=gpt.batch_size(), learning_rate=t.learning_rate, optimizer="adamw", weight_decay=t.weight_decay,
        num_epochs=gpt.epochs(), eval_steps=t.eval_interval, gradient_clipping=t.grad_clip_norm,
        device=nn.device if device_given else t.device, model=gpt.model_config(), dataset=gpt.data.dataset)


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
    gpt: GPTConfig | None = None  # set when nn_config.yaml names a gpt_config


def cluster_config_file(config_dir: Path, algorithm: str) -> Path:
    return Path(config_dir) / f"cluster_config_{algorithm}.yaml"


def load_run_config(config_dir: str | Path, algorithm: str) -> RunConfig:
    algorithms.get(algorithm)  # an unknown --algo fails here, before any file is read
    config_dir = Path(config_dir)
    nn_file = config_dir / "nn_config.yaml"
    cl_file = cluster_config_file(config_dir, algorithm)
    nn_raw = read_yaml(nn_file)
    nn = parse_nn_config(nn_raw, nn_file)
    cluster = parse_cluster_config(read_yaml(cl_file), cl_file, algorithm)
    gpt = None
    if nn.gpt_config:
        gpt_file = Path(nn.gpt_config).expanduser()
        gpt = load_gpt_config(gpt_file if gpt_file.is_absolute() else config_dir / gpt_file)
        nn = gpt_nn_config(gpt, nn, device_given="device" in nn_raw)
        if cluster.max_steps is None and gpt.training.max_steps is not None:
            cluster = dataclasses.replace(cluster, max_steps=gpt.training.max_steps)  # the cluster config's wins
    return RunConfig(nn=nn, cluster=cluster, config_dir=config_dir, gpt=gpt)


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
