"""The files in logging/: compose, Loki, Alloy, Grafana provisioning and the dashboard.

Loki, Grafana and Alloy can't be installed here (no image registry; not packaged for Debian or
PyPI), so their own checks run only where their binaries are on PATH; everything a file promises
that can be read without them is checked here: keys, pinned tags, bindings, and that every label
the dashboard and the agent use is one the nodes send."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from smolcluster.core.training.lokipush import CONTRACT_LABELS

LOGGING = Path(__file__).resolve().parents[2] / "logging"
COMPOSE = LOGGING / "docker-compose.yml"
LOKI_CONFIG = LOGGING / "loki" / "loki-config.yaml"
ALLOY_CONFIG = LOGGING / "alloy" / "config.alloy"
DASHBOARD = LOGGING / "grafana" / "dashboards" / "smolcluster.json"
CONTRACT = set(CONTRACT_LABELS)
NOT_HERE = "not installable here (no image registry; not packaged for Debian or PyPI)"


def compose_cmd() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


def compose_config(env_password: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    if env_password is not None:
        env["GRAFANA_ADMIN_PASSWORD"] = env_password
    return subprocess.run([*compose_cmd(), "-f", str(COMPOSE), "--profile", "agent", "config"],
                          capture_output=True, text=True, env=env, timeout=60)


# --------------------------------------------------------------------------- compose


def test_compose_config_is_valid_with_a_password() -> None:
    proc = compose_config("a-test-password")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert set(resolved["services"]) == {"loki", "grafana", "alloy"}
    assert resolved["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "a-test-password"


def test_compose_refuses_to_start_without_a_password_and_says_why() -> None:
    proc = compose_config(None)
    assert proc.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD is not set" in proc.stderr + proc.stdout
    assert compose_config("").returncode != 0  # an empty one is no password either


def test_compose_file_pins_images_binds_localhost_and_keeps_loki_in_a_named_volume() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())
    images = {name: svc["image"] for name, svc in spec["services"].items()}
    assert images == {"loki": images["loki"], "grafana": images["grafana"], "alloy": images["alloy"]}
    for image in images.values():
        assert re.fullmatch(r"grafana/(loki|grafana|alloy):v?\d+\.\d+\.\d+", image), image
    for svc in ("loki", "grafana"):
        (port,) = spec["services"][svc]["ports"]
        bind = port.split("}")[0]  # "${GRAFANA_BIND:-127.0.0.1"
        assert bind.startswith("${") and bind.endswith(":-127.0.0.1"), port
    assert "loki-data:/loki" in spec["services"]["loki"]["volumes"]
    assert "loki-data" in spec["volumes"]
    assert spec["services"]["alloy"]["profiles"] == ["agent"]  # opt-in: nodes push by default
    assert any(v.endswith(":/runs:ro") and "../runs" in v for v in spec["services"]["alloy"]["volumes"])


def test_grafana_has_no_anonymous_access_no_sign_up_and_no_default_password() -> None:
    env = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert "admin" not in env["GF_SECURITY_ADMIN_PASSWORD"].split(":?")[0]


# --------------------------------------------------------------------------- Loki


def test_loki_config_single_binary_tsdb_v13_filesystem_seven_day_retention() -> None:
    cfg = yaml.safe_load(LOKI_CONFIG.read_text())
    assert cfg["auth_enabled"] is False
    (schema,) = cfg["schema_config"]["configs"]
    assert (schema["store"], schema["schema"], schema["object_store"]) == ("tsdb", "v13", "filesystem")
    assert schema["index"]["period"] == "24h"  # retention works only with 24h index tables
    assert cfg["common"]["storage"]["filesystem"]["chunks_directory"].startswith("/loki/")
    assert cfg["common"]["replication_factor"] == 1
    assert cfg["common"]["ring"]["kvstore"]["store"] == "inmemory"
    compactor = cfg["compactor"]
    assert compactor["retention_enabled"] is True and compactor["delete_request_store"] == "filesystem"
    assert compactor["working_directory"].startswith("/loki/")
    limits = cfg["limits_config"]
    assert limits["retention_period"] == "168h"
    assert limits["discover_service_name"] == []  # no label beyond the contract
    assert limits["ingestion_rate_mb"] >= 4 and limits["max_global_streams_per_user"] >= 1000


def test_loki_verifies_its_config() -> None:
    loki = shutil.which("loki")
    if loki is None:
        pytest.skip(f"loki: {NOT_HERE}")
    proc = subprocess.run([loki, f"-config.file={LOKI_CONFIG}", "-verify-config"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- Alloy


def test_alloy_formats_its_config() -> None:
    alloy = shutil.which("alloy")
    if alloy is None:
        pytest.skip(f"alloy: {NOT_HERE}")
    proc = subprocess.run([alloy, "fmt", str(ALLOY_CONFIG)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_alloy_config_tails_the_run_files_and_sets_only_contract_labels() -> None:
    text = ALLOY_CONFIG.read_text()
    code = "\n".join(line.split("//")[0] for line in text.splitlines())
    assert code.count("{") == code.count("}") and code.count("[") == code.count("]")
    for glob in ('"/*/nodes/*/*.log"', '"/*/nodes/*/metrics.jsonl"', '"/*/faults.jsonl"'):
        assert glob in code, glob
    set_labels = set(re.findall(r'target_label\s*=\s*"(\w+)"', code))
    for block in re.findall(r"stage\.(?:labels|static_labels)\s*\{\s*values\s*=\s*\{(.*?)\}", code, re.S):
        set_labels |= set(re.findall(r"(\w+)\s*=", block))
    assert set_labels and set_labels <= CONTRACT, set_labels - CONTRACT
    for kept in re.findall(r"stage\.label_keep\s*\{\s*values\s*=\s*\[(.*?)\]", code, re.S):
        assert set(re.findall(r'"(\w+)"', kept)) == CONTRACT
    kinds = set(re.findall(r'kind\s*=\s*"(\w+)"', code))
    assert kinds == {"log", "metrics", "faults"}


def test_alloy_relabel_rules_take_run_and_node_from_real_paths() -> None:
    code = ALLOY_CONFIG.read_text()
    rules = re.findall(r'regex\s*=\s*"(.*?)"\s*target_label\s*=\s*"(\w+)"\s*replacement\s*=\s*"\$1"', code)
    got: dict[tuple[str, str], str] = {}
    paths = ["/runs/hybrid-edp-20261201/nodes/mini1/server.log", "/runs/hybrid-edp-20261201/nodes/pi4/metrics.jsonl",
             "/runs/hybrid-edp-20261201/faults.jsonl"]
    for regex, label in rules:
        pattern = regex.replace("\\\\", "\\")  # Alloy strings escape the backslash
        for path in paths:
            m = re.fullmatch(pattern, path)  # relabel regexes are anchored at both ends
            if m:
                got[(path.rsplit("/", 1)[-1], label)] = m.group(1)
    assert got == {("server.log", "run"): "hybrid-edp-20261201", ("metrics.jsonl", "run"): "hybrid-edp-20261201",
                   ("metrics.jsonl", "host"): "pi4", ("faults.jsonl", "run"): "hybrid-edp-20261201"}


# --------------------------------------------------------------------------- Grafana


def test_provisioned_datasource_and_dashboard_provider() -> None:
    ds = yaml.safe_load((LOGGING / "grafana/provisioning/datasources/loki.yaml").read_text())
    (loki,) = ds["datasources"]
    assert (loki["type"], loki["uid"], loki["url"]) == ("loki", "smolcluster-loki", "http://loki:3100")
    prov = yaml.safe_load((LOGGING / "grafana/provisioning/dashboards/smolcluster.yaml").read_text())
    (provider,) = prov["providers"]
    mounts = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_queries(d: dict) -> list[str]:
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in d["templating"]["list"] if v["type"] == "query"]
    exprs += [v["query"]["stream"] for v in d["templating"]["list"] if v["type"] == "query" and v["query"]["stream"]]
    return exprs


def used_labels(expr: str) -> set[str]:
    """Label names in stream selectors {...}, `by`/`without` clauses and label_values(...)."""
    expr = re.sub(r"\{\{.*?\}\}", "", expr)  # line_format / legend templates are not selectors
    names: set[str] = set()
    for selector in re.findall(r"\{([^{}]*)\}", expr):
        matchers = re.findall(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"', selector)
        assert matchers, f"no matchers parsed from {{{selector}}} in {expr}"
        names |= set(matchers)
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names |= {g.strip() for g in group.split(",") if g.strip()}
    for args in re.findall(r"label_values\((.*)\)", expr):
        names.add(args.rsplit(",", 1)[-1].strip())
    return names


def test_dashboard_has_the_essentials_of_grafanas_model() -> None:
    d = dashboard()
    assert d["title"] == "smolcluster" and d["uid"] == "smolcluster"
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["type"] in {"timeseries", "logs"}, p["type"]
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "loki", "uid": "smolcluster-loki"}
            assert t["expr"].strip() and t["refId"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    for name in ("job", "component", "host", "rank", "level", "algorithm", "run"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], name
        assert v["definition"].startswith("label_values(") and v["definition"].endswith(f"{name})")
        assert v["allValue"] == ".*"  # "All" must also match streams that lack the label


def test_dashboard_panels_cover_what_users_watch() -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard()["panels"]}
    joined = " ".join(exprs.values())
    assert 'rate_counter(' in joined and "unwrap step" in joined  # steps/s
    for field in ("loss", "test_accuracy", "tau", "staleness"):
        assert f"unwrap {field}" in joined, field
    assert 'event="late"' in joined and 'event="reject"' in joined
    assert any("count_over_time" in e and "by (host" in e and "ERROR" in e for e in exprs.values())
    assert any('kind="faults"' in e for e in exprs.values())
    stream = exprs["Log stream"]
    for var in ("job", "component", "host", "rank", "level", "algorithm", "run"):
        assert f'{var}=~"${var}"' in stream, var
    # a selector must keep one matcher that can't match the empty string, or Loki refuses the query
    for e in all_queries(dashboard()):
        for selector in re.findall(r"\{([^{}]*)\}", re.sub(r"\{\{.*?\}\}", "", e)):
            assert re.search(r'kind(=|=~)"\w', selector), selector


def test_every_label_the_dashboard_uses_is_in_the_contract() -> None:
    used: set[str] = set()
    for expr in all_queries(dashboard()):
        used |= used_labels(expr)
    assert used <= CONTRACT, used - CONTRACT
    assert {"host", "level", "run", "kind"} <= used


def test_label_extraction_sees_what_it_should() -> None:
    assert used_labels('sum by (host, level) (count_over_time({kind="log", job=~"$job"} | json | x="1" [1m]))') \
        == {"host", "level", "kind", "job"}
    assert used_labels('label_values({kind=~"log"}, host)') == {"kind", "host"}
    assert used_labels('{kind="log"} | line_format "{{.msg}}"') == {"kind"}
