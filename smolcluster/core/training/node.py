"""Start one node: load and check configs, set up telemetry, then run the algorithm's role."""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
from pathlib import Path

import torch

from smolcluster.core import algorithms
from smolcluster.core.net.auth import load_cluster_key
from smolcluster.core.training.config import ClusterConfig, RunConfig, cluster_config_file, load_run_config, rank_of, to_dict
from smolcluster.common.errors import ConfigError, SmolclusterError
from smolcluster.core.training.context import NodeContext
from smolcluster.core.training.device import pick_device, torch_build, torch_info
from smolcluster.core.training.lokipush import LokiLogHandler, LokiPusher, push_metrics_line
from smolcluster.core.training.telemetry import (WANDB_PROJECT, LogfmtFormatter, MetricsWriter, WandbRun, node_labels,
                                                 peak_rss_mb, setup_logging)
from smolcluster.core.net.transport import TransportConfig

LOKI_URL_ENV = "SMOLCLUSTER_LOKI_URL"


def _key_for(cfg: RunConfig) -> bytes | None:
    key_file = cfg.cluster.cluster_key_file
    if key_file:
        p = Path(key_file).expanduser()
        key_file = str(p if p.is_absolute() else cfg.config_dir / p)
    return load_cluster_key(key_file)


def _transport(cluster: ClusterConfig) -> TransportConfig:
    return TransportConfig(heartbeat_interval=cluster.heartbeat_interval, heartbeat_timeout=cluster.heartbeat_timeout)


def default_run_name(run_dir: Path, hostname: str) -> str:
    """The run a node belongs to, from its run dir: RUN/nodes/HOST (sim), runs/RUN/HOST (launch), or RUN itself."""
    parts = list(Path(run_dir).resolve().parts)
    if len(parts) > 1 and parts[-1] == hostname:
        parts.pop()
    if len(parts) > 1 and parts[-1] == "nodes":
        parts.pop()
    return parts[-1] if parts else "run"


def _context(cfg: RunConfig, *, role: str, rank: int, hostname: str, run_dir: Path, slowdown: float,
             run_name: str | None) -> NodeContext:
    import_rss = peak_rss_mb()  # torch and the CLI imported, no data loaded yet
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # many nodes share few cores; one thread each avoids oversubscription
    device = pick_device(cfg.nn.device, file=cfg.config_dir / "nn_config.yaml")
    labels = node_labels(role=role, rank=rank, hostname=hostname, algorithm=cfg.cluster.algorithm,
                         run=run_name or default_run_name(run_dir, hostname))
    log = setup_logging(run_dir / f"{role}.log", labels=labels)
    log.info(f"computing on {device} with torch {torch_build()}, Python {platform.python_version()} in {sys.prefix}")
    shipper = _loki_shipper(cfg, labels, log)
    metrics = MetricsWriter(run_dir / "metrics.jsonl",
                            ship=(lambda line: push_metrics_line(shipper, line)) if shipper is not None else None)
    wandb = WandbRun(mode=cfg.cluster.wandb, algorithm=cfg.cluster.algorithm, role=role, hostname=hostname, rank=rank,
                     lr=cfg.nn.learning_rate, batch_size=cfg.nn.batch_size,
                     config={"cluster": to_dict(cfg.cluster), "nn": to_dict(cfg.nn)} | ({"gpt": cfg.gpt.resolved()} if cfg.gpt else {}),
                     run_dir=run_dir, logger=log, project=cfg.gpt.logging.project_name if cfg.gpt else WANDB_PROJECT)
    return NodeContext(cfg=cfg, role=role, rank=rank, hostname=hostname, run_dir=run_dir, log=log, metrics=metrics,
                       wandb=wandb, key=_key_for(cfg), transport=_transport(cfg.cluster), slowdown=slowdown, device=device,
                       torch=torch_info(import_rss), shipper=shipper)


def _loki_shipper(cfg: RunConfig, labels: dict, log: logging.Logger) -> LokiPusher | None:
    """With loki_url (config) or $SMOLCLUSTER_LOKI_URL, the node pushes its own log and metrics lines to Loki:
    no agent on a Pi. Batched on a background thread with a bounded queue: it never slows training."""
    url = cfg.cluster.loki_url or os.environ.get(LOKI_URL_ENV)
    if not url:
        return None
    shipper = LokiPusher(url, labels, logger=log)
    handler = LokiLogHandler(shipper, LogfmtFormatter(labels))
    handler._smolcluster = True  # type: ignore[attr-defined]  # setup_logging replaces it like its own handlers
    log.addHandler(handler)
    log.info(f"shipping logs and metrics to Loki at {shipper.url}")
    return shipper


def _check_checkpoint_dir(cfg: RunConfig) -> None:
    """A checkpoint_dir that cannot be created fails now, with the key to change, not at the first checkpoint."""
    raw = cfg.cluster.checkpoint_dir
    if not raw:
        return
    try:
        Path(raw).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(cluster_config_file(cfg.config_dir, cfg.cluster.algorithm), "checkpoint_dir",
                          f"cannot create {raw}: {e.strerror or e}",
                          "point it at a folder this user can write, or remove it to use RUN_DIR/checkpoints") from None


def run_server(*, algo: str, config_dir: Path, run_dir: Path, resume: bool = False, bind: str | None = None,
               port: int | None = None, slowdown: float = 1.0, run_name: str | None = None) -> dict:
    cfg = load_run_config(config_dir, algo)
    _check_checkpoint_dir(cfg)
    hostname = cfg.cluster.server
    ctx = _context(cfg, role="server", rank=0, hostname=hostname, run_dir=Path(run_dir), slowdown=slowdown, run_name=run_name)
    bind = bind or "0.0.0.0"  # all interfaces, as the original did; the listener warns when there is no cluster key
    server_cls = algorithms.get(algo).server_class()
    try:
        server = server_cls(ctx, bind=bind, port=cfg.cluster.port if port is None else port, resume=resume)
        return server.serve()
    except SmolclusterError as e:
        ctx.log.error(f"stopped: {e}")  # why the node died, in its log (and Loki), not only on its terminal
        raise
    finally:
        ctx.close()


def run_worker(*, rank: int, hostname: str, algo: str, config_dir: Path, run_dir: Path, connect: str | None = None,
               slowdown: float = 1.0, run_name: str | None = None) -> None:
    cfg = load_run_config(config_dir, algo)
    file = f"{config_dir}/cluster_config_{algo}.yaml"
    if hostname not in cfg.cluster.workers:
        raise ConfigError(file, "workers", f"hostname {hostname!r} is not listed", f"use one of {list(cfg.cluster.workers)}")
    if rank_of(cfg.cluster, hostname) != rank:
        raise ConfigError(file, "workers", f"{hostname!r} has rank {rank_of(cfg.cluster, hostname)}, not {rank}",
                          f"start it as: smolcluster worker {rank_of(cfg.cluster, hostname)} {hostname} --algo {algo}")
    if connect:
        host, _, port_s = connect.rpartition(":")
        if not host or not port_s.isdigit():
            raise ConfigError(None, "--connect", f"{connect!r} is not HOST:PORT", "e.g. --connect 127.0.0.1:65432")
        port = int(port_s)
    else:
        host, port = cfg.cluster.server_address_for(hostname), cfg.cluster.port
    ctx = _context(cfg, role="worker", rank=rank, hostname=hostname, run_dir=Path(run_dir), slowdown=slowdown, run_name=run_name)
    ctx.log.info(f"worker {hostname} (rank {rank}) on {socket.gethostname()} -> server {host}:{port}")
    try:
        algorithms.get(algo).worker_class()(ctx, host=host, port=port).run()
    except SmolclusterError as e:
        ctx.log.error(f"stopped: {e}")
        raise
    finally:
        ctx.close()
