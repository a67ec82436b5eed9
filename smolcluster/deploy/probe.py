"""What the launcher asks a host, run ON the host: `python3 - COMMAND ARGS` with this file as stdin.

Standard library only and old-Python syntax, because it runs before anything is synced and on
whatever interpreter the host has (a too-old Python must still be able to say its version).
Each command prints one JSON object on stdout.

    facts WORKDIR DATA_SUBDIR   Python, OS, tools, disk, clock, the project and torch as importable from WORKDIR
    listen PORT SECONDS N       hold PORT open (is it free?) until N connections or SECONDS; report the peers
    connect HOST PORT SECONDS   a TCP connect, plus the next hop the OS routes HOST through
    steptime STEPS              ms per training step of the MNIST model here (for device profiles)
"""

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def source_digest(package_dir):
    """SHA-256 over the package's .py files (relative path + bytes, sorted): the same code or not."""
    h = hashlib.sha256()
    paths = []
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        paths += [os.path.join(root, f) for f in files if f.endswith(".py")]
    for path in sorted(paths, key=lambda p: os.path.relpath(p, package_dir)):
        h.update(os.path.relpath(path, package_dir).replace(os.sep, "/").encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _tool(name):
    path = shutil.which(name)
    if path is None:
        return None
    try:
        flag = "-V" if name == "tmux" else "--version"
        out = subprocess.run([path, flag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10).stdout
        return {"path": path, "version": out.decode(errors="replace").splitlines()[0].strip()}
    except (OSError, subprocess.SubprocessError, IndexError):
        return {"path": path, "version": "?"}


def _free_mb(path):
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or "/").free // (1 << 20)
    except OSError:
        return None


def _project(workdir):
    """Import smolcluster and torch the way the node will: from WORKDIR (python -m smolcluster)."""
    out = {"smolcluster": None, "torch": None}
    if os.path.isdir(workdir):
        sys.path.insert(0, workdir)
        try:
            import smolcluster  # noqa: F401

            pkg = os.path.dirname(os.path.abspath(smolcluster.__file__))
            out["smolcluster"] = {"path": pkg, "digest": source_digest(pkg),
                                  "in_workdir": os.path.realpath(pkg) == os.path.realpath(os.path.join(workdir, "smolcluster"))}
        except Exception as e:  # noqa: BLE001 - report anything, this is a diagnosis
            out["smolcluster_error"] = "%s: %s" % (type(e).__name__, e)
    else:
        out["smolcluster_error"] = "%s does not exist" % workdir
    try:
        import torch

        out["torch"] = torch.__version__
    except Exception as e:  # noqa: BLE001
        out["torch_error"] = "%s: %s" % (type(e).__name__, e)
    missing = []
    for mod in ("numpy", "yaml", "typer", "psutil"):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001
            missing.append(mod)
    out["missing_modules"] = missing
    return out


def facts(workdir, data_subdir):
    workdir = os.path.abspath(os.path.expanduser(workdir))
    data_dir = os.path.join(workdir, data_subdir)
    present = []
    for name in MNIST_FILES:
        if os.path.exists(os.path.join(data_dir, name)) or os.path.exists(os.path.join(data_dir, name + ".gz")):
            present.append(name)
    out = {
        "python": list(sys.version_info[:3]), "executable": sys.executable, "os": platform.system(),
        "machine": platform.machine(), "hostname": socket.gethostname(), "uid": os.getuid() if hasattr(os, "getuid") else None,
        "tmux": _tool("tmux"), "rsync": _tool("rsync"), "workdir": workdir, "workdir_exists": os.path.isdir(workdir),
        "free_mb": _free_mb(workdir), "mnist_present": present,
    }
    if sys.version_info >= (3, 10):  # older Pythons cannot import the project anyway
        out.update(_project(workdir))
    out["time"] = time.time()  # last: closest to the reply, for the clock offset
    return out


def listen(port, seconds, count):
    try:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if os.name != "nt":  # as the server binds: a previous run's TIME_WAIT connections do not block it
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(16)
    except OSError as e:
        print(json.dumps({"ready": False, "error": "%s: %s" % (type(e).__name__, e)}), flush=True)
        return
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)  # the controller kills it when done
    srv.settimeout(0.5)
    peers = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(peers) < count:
        try:
            conn, addr = srv.accept()
        except socket.timeout:
            continue
        peers.append(addr[0])
        # Let the client close first (wait for its EOF): the TIME_WAIT then stays on the client side
        # and not on the port the server is about to bind.
        conn.settimeout(5)
        try:
            conn.recv(1)
        except OSError:
            pass
        conn.close()
    srv.close()
    print(json.dumps({"peers": peers}), flush=True)


def _next_hop(host):
    """(next hop, interface) the OS would use for `host`, from `ip route get` / `route -n get`."""
    for argv in (["ip", "route", "get", host], ["route", "-n", "get", host]):
        if shutil.which(argv[0]) is None:
            continue
        try:
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=5).stdout.decode(errors="replace")
        except (OSError, subprocess.SubprocessError):
            continue
        words = out.split()
        if argv[0] == "ip":
            if "unreachable" in out or "Network is unreachable" in out:
                return {"via": None, "dev": None, "error": out.strip().splitlines()[0] if out.strip() else "unreachable"}
            via = words[words.index("via") + 1] if "via" in words else None
            dev = words[words.index("dev") + 1] if "dev" in words else None
            return {"via": via, "dev": dev}
        info = dict(line.strip().split(": ", 1) for line in out.splitlines() if ": " in line)
        return {"via": info.get("gateway"), "dev": info.get("interface")}
    return None


def connect(host, port, seconds):
    out = {"route": _next_hop(host)}
    t0 = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=seconds).close()
        out.update(connected=True, ms=round((time.monotonic() - t0) * 1000, 2))
    except OSError as e:
        out.update(connected=False, error="%s: %s" % (type(e).__name__, e))
    return out


def steptime(steps):
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    times = []
    for i in range(steps + 5):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 5:  # warm-up steps do not count
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"ms_per_step": round(times[len(times) // 2] * 1000, 4), "batch": 32, "torch": torch.__version__}


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "facts":
        print(json.dumps(facts(args[0], args[1])))
        sys.stdout.flush()
        os._exit(0)  # no interpreter teardown (torch's takes long): the reply follows the clock reading
    elif cmd == "listen":
        listen(int(args[0]), float(args[1]), int(args[2]))
    elif cmd == "connect":
        print(json.dumps(connect(args[0], int(args[1]), float(args[2]))))
    elif cmd == "steptime":
        print(json.dumps(steptime(int(args[0]))))
    else:
        print(json.dumps({"error": "unknown probe command %r" % cmd}))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
