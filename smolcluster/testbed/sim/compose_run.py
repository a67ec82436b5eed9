"""`smolcluster sim FILE --backend compose`: a topology trained (or link-checked) in containers.

    configs -> RUN_DIR/config          (same files as on hardware; workers dial their Toxiproxy proxy)
    render  -> RUN_DIR/compose/        (docker-compose.yml, entrypoints/, toxiproxy.json; usable by hand)
    up      -> routes + tc shaping in every container (netem where the kernel has it, else tbf, with
               iptables dropping the profiles' loss), IFB shaping of what a node receives where needed
    toxics  -> latency/jitter on each worker's proxy when the kernel cannot delay (tbf / none)
    wait    -> progress from RUN_DIR/nodes/<server>/metrics.jsonl until the server container exits
    collect -> RUN_DIR/summary.json (+ backend "compose", links with their mechanism), container logs
    down    -> always: on success, failure, Ctrl-C or SIGTERM

The running project is compose_cluster.ComposeCluster; --check is compose_check.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, TextIO

import yaml

from smolcluster.common.errors import SimError
from smolcluster.common.files import write_atomic
from smolcluster.testbed.faults import schedule_for
from smolcluster.testbed.logstack import loki_for_run
from smolcluster.testbed.sim import compose as cmp
from smolcluster.testbed.sim.compose_check import run_compose_check
from smolcluster.testbed.sim.compose_cluster import SERVER_PORT, ComposeCluster, host_mnist_dir, image_for
from smolcluster.testbed.sim.compose_logging import LokiRelay
from smolcluster.testbed.sim.docker_env import DockerEnv, DockerUnavailable, detect_docker
from smolcluster.testbed.sim.image import offline_image_tag
from smolcluster.testbed.sim.options import SimOptions, default_run_dir, overrides_for
from smolcluster.testbed.sim.plan import RunOverrides, write_run_configs
from smolcluster.testbed.topology import Topology, load_topology, server_address_for, to_dict


def _prepare(topo: Topology, run_dir: Path, algo: str, overrides: RunOverrides, env: Optional[DockerEnv],
             node_env: Optional[dict[str, dict[str, str]]] = None) -> cmp.ComposeProject:
    """Configs and the rendered project. env None (render only): the image is named, not built."""
    data = host_mnist_dir()
    if env is not None:
        image, container_data = image_for(env, data)
    else:
        image = cmp.offline_image_spec(offline_image_tag(), data)
        container_data = str(data) if data else ""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "topology.yaml", yaml.safe_dump(to_dict(topo), sort_keys=False))
    write_run_configs(topo, run_dir / "config", overrides, server_address=lambda w: str(server_address_for(topo, w)),
                      port=SERVER_PORT, data_dir=container_data or None)
    (run_dir / "nodes" / topo.server.name / cmp.RESUME_MARKER).unlink(missing_ok=True)
    # the proxies' addresses come from rendering; the commands need them (and the chosen algorithm)
    cp = cmp.render_compose(topo, run_dir, image, server_port=SERVER_PORT, commands={n: [] for n in topo.nodes})
    commands = cmp.default_commands(topo, image, cp.proxies, algorithm=algo)
    return cmp.render_compose(topo, run_dir, image, server_port=SERVER_PORT, commands=commands, project=cp.project,
                              node_env=node_env)


def run_compose(opts: SimOptions, out: TextIO = sys.stdout) -> int:
    """`smolcluster sim FILE --backend compose [--check | --render-only]`. Returns the exit code."""
    topo = load_topology(opts.file)
    if opts.toxiproxy:
        raise SimError("--toxiproxy URL is for the local backend; the compose backend runs Toxiproxy as a service "
                       "of the project (see RUN_DIR/compose/docker-compose.yml)")
    algo = opts.algo or topo.training.algorithm
    run_dir = (Path(opts.run_dir) if opts.run_dir else default_run_dir(topo, algo)).resolve()
    if opts.render_only:
        cp = _prepare(topo, run_dir, algo, overrides_for(topo, opts, algo), env=None)
        print(render_only_text(cp), file=out)
        return 0
    try:
        env = detect_docker()
    except DockerUnavailable as e:
        raise SimError(f"--backend compose needs Docker: {e}. Use --backend local (no Docker needed), "
                       "or --render-only to write the compose project without running it") from None
    if opts.check:
        return run_compose_check(topo, env, run_dir, as_json=opts.as_json, out=out)

    schedule = schedule_for(topo, opts.faults)  # a bad fault entry fails here, before anything starts
    relay = None
    if opts.logging:
        loki = loki_for_run(run_dir.parent, lambda line: print(line, file=out), loki_url=opts.loki_url)
        relay = LokiRelay(topo, loki) if loki else None
        if relay:
            print(f"logging: containers push through their network gateways ({', '.join(sorted(set(relay.gateways.values())))}"
                  f", port {relay.port}), relayed to {loki}", file=out)
    # the nodes' Loki URL goes in their environment, not their configs: each dials its own gateway
    cp = _prepare(topo, run_dir, algo, overrides_for(topo, opts, algo), env, node_env=relay.node_env() if relay else None)
    cluster = ComposeCluster(topology=topo, run_dir=run_dir, algorithm=algo, env=env, cp=cp, seed=opts.seed, loki_relay=relay)
    print(f"smolcluster sim: {topo.name} ({opts.file}), {algo}, compose backend ({' '.join(env.compose)}), "
          f"project {cp.project}, run dir {run_dir}", file=out)
    out.flush()

    def announce() -> None:
        for link in cluster.summary_links():
            pr = link.profile
            loss = f", loss {pr['loss_pct']:g}%" if pr["loss_pct"] else ""
            print(f"  link {link.name:<16} {pr['name']}: {pr['delay_ms']:g}±{pr['jitter_ms']:g} ms one way, "
                  f"{pr['up_mbit']:g} Mbit/s up, {pr['down_mbit']:g} down{loss}  [{link.mechanism}]", file=out)
            for note in link.notes:
                if note.startswith(("loss not applied", "down rate not shaped")):
                    print(f"    {note}", file=out)
        kinds = sorted(set(cp.mechanisms.values()))
        print(f"  kernel shaping: {', '.join(kinds) or 'none'} on {len(cp.mechanisms)} interfaces", file=out)
        out.flush()

    return cluster.run(schedule, seed=opts.seed if opts.seed is not None else topo.training.seed, out=out,
                       progress_interval=opts.progress_interval, announce=announce)


def render_only_text(cp: cmp.ComposeProject) -> str:
    f = cp.compose_file
    lat = [p for p in cp.proxies if round(p.latency_ms) or round(p.jitter_ms)]
    lines = [f"rendered {f} (+ entrypoints/, toxiproxy.json) and configs in {cp.run_dir / 'config'}",
             "run it by hand (compose v2, or Debian's docker-compose v1):",
             f"  docker compose -p {cp.project} -f {f} up",
             f"  docker-compose -p {cp.project} -f {f} up",
             "stop and clean up:",
             f"  docker compose -p {cp.project} -f {f} down -v --remove-orphans"]
    if lat:
        lines += ["on kernels without netem, add the paths' latency on the Toxiproxy API (port 8474 of the toxiproxy "
                  "service, published on 127.0.0.1) — `smolcluster sim --backend compose` does this itself:"]
        lines += [f"  {p.name}: latency {round(p.latency_ms)} ms, jitter {round(p.jitter_ms)} ms on upstream and downstream"
                  for p in lat]
    return "\n".join(lines)
