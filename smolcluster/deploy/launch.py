"""`smolcluster launch FILE --algo A`: a real run from the topology file, and the verbs that follow it.

    launch      preflight -> sync -> verify the synced code -> server port + every worker's route -> start
    --preflight the checks only (nothing is changed on any host)
    --status / --stop / --wait / --collect [DIR] / --attach   on the named run (default: the latest)
    --check     the real links measured like `smolcluster sim --check` (deploy/check.py)
Every phase prints one line per host and step; a failure names the host, the step, the cause and
the fix, and a failed preflight starts nothing. Exit codes: 0 ok, 1 a node or step failed, 2 bad input.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from smolcluster.common.errors import ConfigError
from smolcluster.deploy import preflight as pf
from smolcluster.deploy.collect import collect
from smolcluster.deploy.plan import DeployPlan, ensure_key, load_plan, plan_from_config_dir, plan_from_topology
from smolcluster.deploy.runner import Runner
from smolcluster.deploy.shipping import loki_urls
from smolcluster.deploy.start import start
from smolcluster.deploy.status import all_status, format_status
from smolcluster.deploy.stop import reap_workers, stop
from smolcluster.deploy.sync import local_mnist_files, sync
from smolcluster.deploy.wait import wait
from smolcluster.testbed.sim.plan import RunOverrides
from smolcluster.testbed.topology import HostSpec, load_topology

ACTIONS = ("launch", "preflight", "status", "stop", "collect", "attach", "check")


@dataclass
class LaunchOptions:
    topology: Optional[Path] = None
    algo: Optional[str] = None
    action: str = "launch"
    wait: bool = False
    run_name: Optional[str] = None
    runs_dir: Path = Path("runs")
    ssh_config: Optional[str] = None
    dry_run: bool = False
    sync: bool = True
    key_file: Optional[Path] = None
    port: Optional[int] = None
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    seed: Optional[int] = None
    collect_dir: Optional[Path] = None
    as_json: bool = False
    write_profiles: Optional[Path] = None
    config_dir: Optional[Path] = None  # the original project's layout instead of a topology
    host_defaults: HostSpec = field(default_factory=lambda: HostSpec(ssh=""))  # for --config-dir: --ssh-user, ...
    grace_s: float = 30.0
    logging: bool = False  # ship every node's lines to Loki (deploy/shipping.py)
    loki_url: Optional[str] = None
    controller: Optional[str] = None  # which topology node this machine is (for --logging's addresses)
    gpt_config: Optional[Path] = None  # train this gpt_config.yaml's GPT (launch_edp_gpt.sh)


def run(opts: LaunchOptions, out: TextIO = sys.stdout) -> int:
    log = sys.stderr if opts.as_json else out  # with --json, stdout carries only the JSON

    def echo(line: str) -> None:
        print(line, file=log, flush=True)

    runner = Runner(ssh_config=opts.ssh_config, dry_run=opts.dry_run, echo=echo)
    if opts.action in ("launch", "preflight", "check"):
        return _new_run(opts, runner, echo, out)
    plan = load_plan(opts.runs_dir, opts.run_name)
    if opts.action == "status":
        statuses = all_status(runner, plan)
        echo(format_status(plan, statuses))
        return 0 if all(s.state != "unreachable" for s in statuses) else 1
    if opts.action == "stop":
        return 0 if stop(runner, plan, echo, grace=opts.grace_s) else 1
    if opts.action == "collect":
        return 0 if collect(runner, plan, opts.collect_dir or plan.local_dir, echo) else 1
    if opts.action == "attach":
        from smolcluster.deploy.attach import attach

        return 0 if attach(runner, plan, echo) else 1
    raise ConfigError(None, "launch", f"unknown action {opts.action!r}", f"use one of {', '.join(ACTIONS)}")


def _plan(opts: LaunchOptions) -> DeployPlan:
    runs_dir = Path(tempfile.mkdtemp(prefix="smolcluster-dry-run-")) if opts.dry_run else opts.runs_dir
    if opts.topology is None:
        if opts.config_dir is None:
            raise ConfigError(None, "FILE", "no topology file and no --config-dir", "e.g. smolcluster launch topologies/hybrid.yaml --algo edp")
        return plan_from_config_dir(opts.config_dir, algorithm=opts.algo or "edp", runs_dir=runs_dir, run_name=opts.run_name,
                                    host_defaults=opts.host_defaults)
    topo = load_topology(opts.topology)
    algo = opts.algo or topo.training.algorithm
    overrides = RunOverrides(algorithm=algo, epochs=opts.epochs, max_steps=opts.max_steps, seed=opts.seed,
                             gpt_config=opts.gpt_config)
    return plan_from_topology(topo, algorithm=algo, runs_dir=runs_dir, run_name=opts.run_name, overrides=overrides,
                              port=opts.port)


def _new_run(opts: LaunchOptions, runner: Runner, echo, out: TextIO) -> int:
    if opts.run_name and not opts.dry_run and (opts.runs_dir / opts.run_name / "launch.json").is_file() and opts.action == "launch":
        if opts.wait:  # waiting on a run that is already going
            return _wait_and_collect(runner, load_plan(opts.runs_dir, opts.run_name), opts, echo, out)
        raise ConfigError(opts.runs_dir / opts.run_name, "--run-name", "a run of that name was already launched",
                          "pick another name, or act on it with --status / --stop / --wait / --collect")
    plan = _plan(opts)
    where = f"{opts.topology}" if opts.topology else f"{opts.config_dir}"
    echo(f"smolcluster launch: {plan.run_name} ({plan.algorithm}, {len(plan.nodes)} nodes from {where})"
         + ("  [dry run: printing commands, running none]" if opts.dry_run else ""))
    if opts.logging:
        urls = loki_urls(load_topology(opts.topology) if opts.topology else None, plan, loki_url=opts.loki_url,
                         controller=opts.controller, runs_dir=opts.runs_dir, echo=echo, dry_run=opts.dry_run)
        plan.nodes = [dataclasses.replace(n, loki_url=urls.get(n.name)) for n in plan.nodes]
    have_data = bool(local_mnist_files())
    facts, checks = pf.gather_facts(runner, plan, synced=False, will_sync=opts.sync, have_local_data=have_data and opts.sync)
    ok = pf.report(checks, echo)
    if ok:
        reach = pf.reachability(runner, plan) + pf.loki_reachability(runner, plan)
        ok = pf.report(reach, echo)
    if not ok:
        echo("preflight  failed: nothing was started")
        return 1
    if opts.action == "preflight":
        echo("preflight  passed")
        return 0
    key = ensure_key(plan, opts.key_file) if not opts.dry_run else b"<key>\n"
    if opts.sync:
        if not sync(runner, plan, key, facts, echo):
            echo("sync       failed: nothing was started")
            return 1
        _, verify = pf.gather_facts(runner, plan, synced=True, will_sync=False, have_local_data=True)
        verify = [c for c in verify if c.step in ("project", "torch", "modules")]
        if not pf.report([_as_phase(c, "verify") for c in verify], echo):
            echo("verify     failed: nothing was started")
            return 1
    if opts.action == "check":
        from smolcluster.deploy.check import check_links

        return check_links(runner, plan, load_topology(opts.topology) if opts.topology else None, echo,
                           as_json=opts.as_json, write_profiles=opts.write_profiles, out=out)
    if not opts.dry_run:
        plan.save()
    if not start(runner, plan, echo):
        echo("start      failed: stopping what was started")
        stop(runner, plan, echo, grace=5.0)
        return 1
    if opts.dry_run:
        return 0
    echo(f"launched {plan.run_name}: smolcluster launch --status | --attach | --stop | --collect"
         f" (--run-name {plan.run_name}; the latest run is the default)")
    if opts.wait:
        return _wait_and_collect(runner, plan, opts, echo, out)
    return 0


def _wait_and_collect(runner: Runner, plan: DeployPlan, opts: LaunchOptions, echo, out: TextIO) -> int:
    server = wait(runner, plan, out)
    echo(f"wait       the server {server.describe}")
    reap_workers(runner, plan, echo)
    ok = collect(runner, plan, opts.collect_dir or plan.local_dir, echo)
    return 0 if ok and server.exit_code == 0 else 1


def _as_phase(c: pf.Check, phase: str) -> pf.Check:
    return pf.Check(c.node, c.step, c.level, c.message, c.fix, phase=phase)
