"""Helpers for tests/test_helm.py: render the chart with the real Helm engine, read values.yaml
comments, convert Kubernetes quantities, parse the Dockerfile, run rendered containers locally.

Also a small command line: ``python tests/helm_utils.py --write-readme`` regenerates the values
table of helm/sheap-dask/README.md from the ``# --`` comments of values.yaml.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "sheap-dask"
CHART_README = CHART / "README.md"
TABLE_BEGIN = "<!-- values-table -->"
TABLE_END = "<!-- /values-table -->"


# ---- rendering ------------------------------------------------------------------------------


def render(values: dict | None = None, *, name: str = "rel", namespace: str = "sheap") -> dict[str, str]:
    """Render the chart offline with the Helm engine; returns {template path: text}.

    Helm validates ``values`` against values.schema.json first, as ``helm install`` does.
    """
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=name, namespace=namespace, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict]:
    """Every Kubernetes object of a render (NOTES.txt and empty documents left out)."""
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    """Objects of one kind (and name)."""
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    """(object name, pod spec) of every workload."""
    out = []
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
    return out


def arg_after(args: list[str], flag: str) -> str:
    """The value following ``flag`` in a container's args."""
    if flag not in args:
        raise AssertionError(f"{flag} not in args {args}")
    return args[args.index(flag) + 1]


# ---- values.yaml documentation ------------------------------------------------------------------

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(?P<rest>.*)$")


def value_comments(text: str) -> dict[tuple[str, ...], str]:
    """Map key path -> description from the ``# --`` comments of a values.yaml.

    A description starts with ``# -- `` right above its key and continues over the following
    ``#`` lines; a bare ``#`` line ends it (what follows is a free comment).
    """
    out: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    open_desc = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped[1:].strip()
            if body.startswith("--"):
                pending, open_desc = [body[2:].strip()], True
            elif open_desc and body:
                pending.append(body)
            else:
                open_desc = False
            continue
        if not stripped:
            pending, open_desc = None, False
            continue
        m = _KEY.match(line)
        if m is None or stripped.startswith("-"):
            pending, open_desc = None, False
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        if pending:
            out[tuple(k for _, k in stack)] = " ".join(pending)
        pending, open_desc = None, False
    return out


def documented_values(values_path: Path = CHART / "values.yaml") -> tuple[list[tuple[str, Any, str]], list[str]]:
    """Rows (dotted key, default, description) of every documented value, and undocumented keys.

    A documented key is one row (its sub-keys belong to its default); an undocumented key must be
    a non-empty map whose keys are all documented, else it is reported.
    """
    text = values_path.read_text()
    comments = value_comments(text)
    values = yaml.safe_load(text)
    rows: list[tuple[str, Any, str]] = []
    missing: list[str] = []

    def walk(node: dict, path: tuple[str, ...]) -> None:
        for key, value in node.items():
            p = (*path, key)
            if p in comments:
                rows.append((".".join(p), value, comments[p]))
            elif isinstance(value, dict) and value:
                walk(value, p)
            else:
                missing.append(".".join(p))

    walk(values, ())
    return rows, missing


def values_table(values_path: Path = CHART / "values.yaml") -> str:
    """The Markdown table of every value, generated from values.yaml."""
    rows, missing = documented_values(values_path)
    if missing:
        raise ValueError(f"values without a '# --' comment in {values_path}: {missing}")
    lines = ["| Key | Default | Description |", "|---|---|---|"]
    for key, default, desc in rows:
        shown = json.dumps(default, separators=(", ", ": "))
        lines.append(f"| `{key}` | `{shown}` | {desc.replace('|', '&#124;')} |")
    return "\n".join(lines)


def readme_with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the values-table markers replaced by ``table``."""
    begin, end = readme.index(TABLE_BEGIN), readme.index(TABLE_END)
    return readme[: begin + len(TABLE_BEGIN)] + "\n" + table + "\n" + readme[end:]


# ---- quantities ---------------------------------------------------------------------------------

_SUFFIX = {
    "": 1, "m": Decimal("0.001"),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def k8s_bytes(quantity: str | int) -> int:
    """Bytes of a Kubernetes memory quantity, as Kubernetes computes it (rounded up)."""
    if isinstance(quantity, int):
        return quantity
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(?:([eE])([0-9]+)|([A-Za-z]*))", quantity)
    if not m or (m[4] is not None and m[4] not in _SUFFIX):
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    number = Decimal(m[1])
    value = number * (Decimal(10) ** int(m[3]) if m[2] else Decimal(_SUFFIX[m[4]]))
    return int(value.to_integral_value(rounding="ROUND_CEILING"))


# ---- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_stages(text: str) -> list[dict]:
    """Stages of a Dockerfile: [{"from": image, "name": alias, "instructions": [(INSTR, args)]}].

    Joins continuation lines and drops comments; enough to check the structure, not a full parser.
    """
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[dict] = []
    preamble: list[tuple[str, str]] = []
    for line in logical:
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append({"from": words[0], "name": name, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((instr, args.strip()))
        else:
            preamble.append((instr, args.strip()))
    for stage in stages:
        stage["preamble"] = preamble
    return stages


# ---- running rendered containers as local processes -----------------------------------------------


def expand_k8s_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command/args (``$$`` escapes, unknown names kept)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def container_process(
    pod_name: str,
    pod_spec: dict,
    *,
    host_map: dict[str, str],
    mount_map: dict[str, str],
    extra_rewrites: dict[str, str] | None = None,
    bin_dir: Path = Path(sys.executable).parent,
) -> tuple[list[str], dict[str, str]]:
    """Command line and environment a pod's (only) container would run, for a local process.

    What Kubernetes would provide is emulated: ``fieldRef: metadata.name`` gives ``pod_name``,
    ``$(VAR)`` references in args are expanded from the container env, Service host names are
    mapped with ``host_map`` (no DNS here), emptyDir mount paths with ``mount_map``. Only ``args``
    may be set (the image's ENTRYPOINT, tini, only forwards signals), so args[0] is the program,
    looked up in ``bin_dir`` (the venv that runs the tests).
    """
    (container,) = pod_spec["containers"]
    if "command" in container:
        raise AssertionError(f"{pod_name}: the chart must not override the image ENTRYPOINT (command)")
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = pod_name
        else:
            raise AssertionError(f"{pod_name}: cannot emulate env source {var}")

    def rewrite(s: str) -> str:
        for host, local in host_map.items():
            s = s.replace(host, local)
        for path, local in mount_map.items():
            if s == path or s.startswith(path + "/"):
                s = local + s[len(path):]
        for old, new in (extra_rewrites or {}).items():
            s = s.replace(old, new)
        return s

    env = {k: rewrite(v) for k, v in env.items()}
    args = [rewrite(expand_k8s_vars(a, env)) for a in container["args"]]
    program = bin_dir / args[0]
    if not program.exists():
        raise AssertionError(f"{pod_name}: {args[0]} is not installed in {bin_dir}")
    return [str(program), *args[1:]], env


class LocalProcesses:
    """Processes started in their own sessions and stopped by PID: SIGTERM, then SIGKILL."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        bin_dir = str(Path(cmd[0]).parent)
        full_env = {**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        # Workers first, so that they leave the scheduler cleanly.
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc in self.procs:
            # The process group is the one this object created (start_new_session): it holds the
            # nanny's spawned worker process too.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def _main(argv: list[str]) -> int:
    if argv == ["--write-readme"]:
        CHART_README.write_text(readme_with_table(CHART_README.read_text(), values_table()))
        print(f"wrote the values table of {CHART_README}")
        return 0
    if argv == ["--print-table"]:
        print(values_table())
        return 0
    print(f"usage: python {shlex.quote(sys.argv[0])} --write-readme | --print-table", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
