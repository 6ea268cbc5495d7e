"""The container image and the Helm chart, with the real Helm engine (helm-python-sdk), the
Kubernetes JSON schemas (kubernetes-validate, strict) and, at the end, by running what the chart
starts (scheduler and workers from the rendered manifests) as local processes."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the Helm engine) is a test dependency")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

import sheap_dask  # noqa: E402
from helm_utils import (  # noqa: E402
    CHART,
    CHART_README,
    ROOT,
    LocalProcesses,
    arg_after,
    container_process,
    documented_values,
    dockerfile_stages,
    find,
    k8s_bytes,
    manifests,
    pod_specs,
    readme_with_table,
    render,
    value_comments,
    values_table,
)

KUBE_VERSIONS = ["1.29.0", "1.33.0"]
GPU_GROUP = {
    "replicas": 1,
    "image": {"tag": f"{sheap_dask.__version__}-gpu"},
    "resources": {"limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1}},
    "daskResources": {"GPU": 1},
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "env": {"JAX_PLATFORMS": "cuda,cpu"},
}
VALUE_SETS = {
    "defaults": {},
    "gpu": {"additionalWorkerGroups": {"gpu": GPU_GROUP}},
    "notebook": {"notebook": {"enabled": True}},
    "job": {
        "fitJob": {"enabled": True, "input": "s3://survey/dr16q.zarr", "output": "s3://survey/fits.zarr",
                   "method": "lm", "numSteps": 300, "chunk": 256, "ttlSecondsAfterFinished": 86400},
        "objectStorage": {"secretEnv": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"},
                          "mountPath": "/var/run/secrets/sheap-dask"},
    },
    "ingress": {"ingress": {"enabled": True, "className": "nginx", "host": "dask.example.org",
                            "tls": [{"secretName": "dask-tls", "hosts": ["dask.example.org"]}]},
                "networkPolicy": {"allowedClients": [
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]}},
    "everything": {
        "additionalWorkerGroups": {"gpu": GPU_GROUP, "big": {"replicas": 0, "resources": {"limits": {"cpu": "8", "memory": "64Gi"}}}},
        "notebook": {"enabled": True, "existingTokenSecret": "my-token"},
        "ingress": {"enabled": True},
        "fitJob": {"enabled": True, "input": "gs://b/in.zarr", "output": "gs://b/out.zarr"},
        "objectStorage": {"existingSecret": "gcs-credentials", "mountPath": "/var/run/secrets/gcs"},
        "sheapConfig": {"fit": {"method": "adam", "num_steps": 3000}, "fallback": {"method": "none"}},
        "env": {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "60s"},
        "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "fit@proj.iam.gserviceaccount.com"}},
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, str]]:
    return {name: render(values) for name, values in VALUE_SETS.items()}


def worker_container(objs: list[dict], group: str = "default") -> dict:
    (dep,) = [o for o in find(objs, "Deployment")
              if o["metadata"]["labels"].get("sheap-dask.io/worker-group") == group]
    return dep["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# ---- chart metadata, lint, schema ---------------------------------------------------------------


def test_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == sheap_dask.__version__
    assert chart["apiVersion"] == "v2"


def test_lint_is_clean():
    for values in VALUE_SETS.values():
        report = helm.lint(CHART, values, strict=True, namespace="sheap")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], report


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"worker": {"replica": 3}}, "replica"),                                   # misspelt key
        ({"wroker": {"replicas": 3}}, "wroker"),                                   # misspelt top-level key
        ({"worker": {"replicas": -1}}, "/worker/replicas"),                        # negative replicas
        ({"worker": {"replicas": "2"}}, "/worker/replicas"),                       # wrong type
        ({"worker": {"resources": {"limits": {"memory": "4GB"}}}}, "memory"),      # Dask, not Kubernetes, units
        ({"worker": {"resources": {"limits": {"memory": "lots"}}}}, "memory"),     # malformed quantity
        ({"worker": {"resources": {"limits": {"cpu": "two"}}}}, "cpu"),
        ({"image": {"tag": 1.1}}, "/image/tag"),                                   # numeric tag (YAML 1.1 -> 1.1)
        ({"additionalWorkerGroups": {"gpu": {"replicas": -2}}}, "replicas"),
        ({"additionalWorkerGroups": {"gpu": {"nodeselector": {}}}}, "nodeselector"),
        ({"additionalWorkerGroups": {"default": {"replicas": 1}}}, "default"),     # clashes with the main group
        ({"scheduler": {"service": {"type": "External"}}}, "/scheduler/service/type"),
        ({"fitJob": {"numSteps": 0}}, "numSteps"),
    ],
)
def test_schema_rejects(bad, where):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.render(bad, name="rel", namespace="sheap")
    assert where in str(err.value)


def test_schema_accepts_the_defaults_and_every_value_set():
    with helm.Chart.load(CHART) as chart:
        for values in VALUE_SETS.values():
            chart.validate_schema(chart.merge_values(values))


def test_schema_is_strict_at_every_object_level():
    schema = json.loads((CHART / "values.schema.json").read_text())
    loose = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
                loose.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "")
    assert not loose, f"objects with properties but without additionalProperties: false: {loose}"
    # every key of values.yaml is described by the schema
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def resolve(node):
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    def check(vals, node, path):
        node = resolve(node)
        for key, value in vals.items():
            assert key in node.get("properties", {}), f"{path}.{key} is not in values.schema.json"
            sub = resolve(node["properties"][key])
            if isinstance(value, dict) and "properties" in sub:
                check(value, sub, f"{path}.{key}")

    check(values, schema, "values")


def test_job_requires_input_and_output():
    with pytest.raises(helm.HelmRenderError, match="fitJob.input is required"):
        render({"fitJob": {"enabled": True, "output": "out.zarr"}})


# ---- what renders --------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_passes_kubernetes_validate_strict(rendered, kube_version):
    for name, out in rendered.items():
        for obj in manifests(out):
            try:
                kubernetes_validate.validate(obj, kube_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"[{name}] {obj['kind']}/{obj['metadata']['name']} invalid for {kube_version} at {path}: {exc.message}")


def test_default_render_objects(rendered):
    objs = manifests(rendered["defaults"])
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs)
    assert kinds == [
        "Deployment/rel-sheap-dask-scheduler",
        "Deployment/rel-sheap-dask-worker",
        "NetworkPolicy/rel-sheap-dask-scheduler",
        "NetworkPolicy/rel-sheap-dask-worker",
        "Service/rel-sheap-dask-scheduler",
        "ServiceAccount/rel-sheap-dask",
    ]
    for o in objs:
        labels = o["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, (o["metadata"]["name"], key)


def test_nothing_exposed_outside_the_cluster_by_default(rendered):
    objs = manifests(rendered["defaults"])
    for svc in find(objs, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not find(objs, "Ingress")
    for _, spec in pod_specs(objs):
        assert not spec.get("hostNetwork")
        for c in spec["containers"]:
            assert all("hostPort" not in p for p in c.get("ports", []))


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_pod_and_container_runs_non_root_and_locked_down(rendered, name):
    objs = manifests(rendered[name])
    for sa in find(objs, "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    assert not [o for o in objs if o["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    for obj_name, spec in pod_specs(objs):
        assert spec["automountServiceAccountToken"] is False, obj_name
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, obj_name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        mounts = set()
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, (obj_name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
            assert not sc.get("privileged")
            mounts |= {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "resources" in c and c["resources"].get("limits"), (obj_name, c["name"])
        assert "/tmp" in mounts, f"{obj_name}: a read-only root needs a writable /tmp"


@pytest.mark.parametrize(
    "resources, threads, expected_threads, expected_memory",
    [
        ({"limits": {"cpu": "500m", "memory": "4Gi"}}, None, "1", "4GiB"),
        ({"limits": {"cpu": "2", "memory": "1500Mi"}}, None, "2", "1500MiB"),
        ({"limits": {"cpu": 3, "memory": "8G"}}, None, "3", "8GB"),
        ({"limits": {"cpu": "1.5", "memory": "512k"}}, None, "2", "512kB"),
        ({"limits": {"cpu": "2500m", "memory": 2147483648}}, None, "3", "2147483648"),
        ({"limits": {"cpu": "4", "memory": "1.5Ti"}}, 2, "2", "1.5TiB"),
        ({"limits": {"cpu": "1", "memory": "129e6"}}, None, "1", "129e6"),
        ({"limits": {"memory": "2000000000000m"}}, None, "1", "2000000000"),
        ({"requests": {"cpu": "2", "memory": "1Gi"}, "limits": None}, None, "1", "auto"),  # null drops the default limits
    ],
)
def test_worker_threads_and_memory_follow_the_values(resources, threads, expected_threads, expected_memory):
    from dask.utils import parse_bytes

    objs = manifests(render({"worker": {"resources": resources, "threadsPerWorker": threads}}))
    c = worker_container(objs)
    assert arg_after(c["args"], "--nthreads") == expected_threads
    memory = arg_after(c["args"], "--memory-limit")
    assert memory == expected_memory
    if "memory" in (resources.get("limits") or {}):
        # Dask reads exactly the bytes Kubernetes enforces
        assert parse_bytes(memory) == k8s_bytes(resources["limits"]["memory"])
    env = env_of(c)
    assert env["OMP_NUM_THREADS"] == expected_threads
    assert env["XLA_FLAGS"] == f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={expected_threads}"
    # JAX must never run in a forked process: the nanny spawns
    assert env["DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"] == "spawn"


def test_explicit_memory_limit_and_dask_resources_and_extra_args():
    objs = manifests(render({"worker": {"memoryLimit": "3GiB", "daskResources": {"GPU": 1, "MEM": 2},
                                        "extraArgs": ["--lifetime", "1h"]}}))
    args = worker_container(objs)["args"]
    assert arg_after(args, "--memory-limit") == "3GiB"
    assert arg_after(args, "--resources") == "GPU=1 MEM=2"
    assert args[-2:] == ["--lifetime", "1h"]


def test_image_tags_default_to_app_version(rendered):
    version = sheap_dask.__version__
    objs = manifests(rendered["everything"])
    images = {name: spec["containers"][0]["image"] for name, spec in pod_specs(objs)}
    assert images["rel-sheap-dask-scheduler"] == f"ghcr.io/sheap-dask/sheap-dask:{version}"
    assert images["rel-sheap-dask-worker"] == f"ghcr.io/sheap-dask/sheap-dask:{version}"
    assert images["rel-sheap-dask-worker-big"] == f"ghcr.io/sheap-dask/sheap-dask:{version}"
    assert images["rel-sheap-dask-worker-gpu"] == f"ghcr.io/sheap-dask/sheap-dask:{version}-gpu"
    assert images["rel-sheap-dask-notebook"] == f"ghcr.io/sheap-dask/sheap-dask:{version}-notebook"
    assert images["rel-sheap-dask-fit-1"] == f"ghcr.io/sheap-dask/sheap-dask:{version}"
    pinned = manifests(render({"image": {"tag": "abc123", "repository": "registry.example/sd"}}))
    assert {spec["containers"][0]["image"] for _, spec in pod_specs(pinned)} == {"registry.example/sd:abc123"}


def test_scheduler_address_matches_the_scheduler_service(rendered):
    for name in ("defaults", "everything"):
        objs = manifests(rendered[name])
        (svc,) = find(objs, "Service", "rel-sheap-dask-scheduler")
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        address = f"tcp://{svc['metadata']['name']}:{ports['scheduler']['port']}"
        (sched,) = find(objs, "Deployment", "rel-sheap-dask-scheduler")
        spec = sched["spec"]["template"]["spec"]
        container_ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
        # the Service selects the scheduler pod, on the ports it listens on
        assert svc["spec"]["selector"].items() <= sched["spec"]["template"]["metadata"]["labels"].items()
        assert container_ports[ports["scheduler"]["targetPort"]] == int(arg_after(spec["containers"][0]["args"], "--port"))
        dashboard = arg_after(spec["containers"][0]["args"], "--dashboard-address")
        assert container_ports[ports["dashboard"]["targetPort"]] == int(dashboard.rsplit(":", 1)[1])
        for probe in ("readinessProbe", "livenessProbe"):
            assert spec["containers"][0][probe]["httpGet"] == {"path": "/health", "port": "dashboard"}
        for dep in find(objs, "Deployment"):
            if dep["metadata"]["labels"]["app.kubernetes.io/component"] == "worker":
                args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
                assert args[:3] == ["dask", "worker", address]
        for job in find(objs, "Job"):
            assert arg_after(job["spec"]["template"]["spec"]["containers"][0]["args"], "--scheduler") == address
        for nb in find(objs, "Deployment", "rel-sheap-dask-notebook"):
            assert env_of(nb["spec"]["template"]["spec"]["containers"][0])["DASK_SCHEDULER_ADDRESS"] == address


def test_scheduler_port_values_move_everything_together():
    objs = manifests(render({"scheduler": {"port": 9786, "dashboardPort": 9787}, "ingress": {"enabled": True}}))
    (svc,) = find(objs, "Service", "rel-sheap-dask-scheduler")
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [9786, 9787]
    assert worker_container(objs)["args"][2] == "tcp://rel-sheap-dask-scheduler:9786"
    (policy,) = find(objs, "NetworkPolicy", "rel-sheap-dask-scheduler")
    assert sorted(p["port"] for p in policy["spec"]["ingress"][0]["ports"]) == [9786, 9787]
    (ing,) = find(objs, "Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rel-sheap-dask-scheduler", "port": {"name": "dashboard"}}


def test_network_policy_admits_only_release_pods_and_configured_clients(rendered):
    objs = manifests(rendered["ingress"])
    (policy,) = find(objs, "NetworkPolicy", "rel-sheap-dask-scheduler")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "scheduler"
    (rule,) = policy["spec"]["ingress"]
    peers = rule["from"]
    assert peers[0] == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "sheap-dask", "app.kubernetes.io/instance": "rel"}}}
    assert peers[1] == VALUE_SETS["ingress"]["networkPolicy"]["allowedClients"][0]
    # every pod of the release carries the labels the policies admit
    for dep in find(objs, "Deployment"):
        assert peers[0]["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    off = manifests(render({"networkPolicy": {"enabled": False}}))
    assert not find(off, "NetworkPolicy")


def test_env_config_and_precedence():
    values = {
        "sheapConfig": {"fit": {"method": "adam", "num_steps": 2500, "robust": True, "tag": "it's \\ 1"},
                        "fallback": {"method": "none"}, "loss": {"robust_scale": 2.5, "label": "true", "steps": "300"},
                        "worker": {"xla-threads": 2}, "screen": {"skip": ["a", "b"]}},
        "env": {"DASK_SHEAP_DASK__FIT__METHOD": "lbfgs", "SHARED": "1"},
        "worker": {"env": {"SHARED": "worker", "OMP_NUM_THREADS": "7"}},
    }
    import dask.config

    objs = manifests(render(values))
    env = env_of(worker_container(objs))
    assert env["DASK_SHEAP_DASK__FIT__NUM_STEPS"] == "2500"
    assert env["DASK_SHEAP_DASK__FIT__METHOD"] == "lbfgs"          # env wins over sheapConfig
    assert env["SHARED"] == "worker" and env["OMP_NUM_THREADS"] == "7"  # component env wins
    names = [e["name"] for e in worker_container(objs)["env"]]
    assert len(names) == len(set(names)), "duplicate environment variables"
    # what dask.config makes of them in a worker
    cfg = dask.config.collect_env({k: v for k, v in env.items() if v is not None and k.startswith("DASK_SHEAP")})
    assert cfg["sheap_dask"]["fit"] == {"method": "lbfgs", "num_steps": 2500, "robust": True, "tag": "it's \\ 1"}
    # YAML types survive: the string "none" stays a string, "true" and "300" too
    assert cfg["sheap_dask"]["fallback"]["method"] == "none"
    assert cfg["sheap_dask"]["loss"] == {"robust_scale": 2.5, "label": "true", "steps": "300"}
    assert cfg["sheap_dask"]["worker"]["xla_threads"] == 2
    assert cfg["sheap_dask"]["screen"]["skip"] == ["a", "b"]
    (sched,) = find(objs, "Deployment", "rel-sheap-dask-scheduler")
    assert env_of(sched["spec"]["template"]["spec"]["containers"][0])["DASK_SHEAP_DASK__FIT__NUM_STEPS"] == "2500"


def test_gpu_group(rendered):
    objs = manifests(rendered["gpu"])
    dep = [d for d in find(objs, "Deployment") if d["metadata"]["name"] == "rel-sheap-dask-worker-gpu"][0]
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert dep["spec"]["replicas"] == 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == GPU_GROUP["nodeSelector"]
    assert spec["tolerations"] == GPU_GROUP["tolerations"]
    assert arg_after(c["args"], "--nthreads") == "4" and arg_after(c["args"], "--memory-limit") == "16GiB"
    assert arg_after(c["args"], "--resources") == "GPU=1"
    assert env_of(c)["JAX_PLATFORMS"] == "cuda,cpu"
    # the default group keeps its own settings and the selectors do not overlap
    default = worker_container(objs)
    assert "nvidia.com/gpu" not in default["resources"]["limits"]
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in find(objs, "Deployment")]
    assert len(selectors) == len(set(selectors))
    zero = manifests(render({"additionalWorkerGroups": {"gpu": {**GPU_GROUP, "replicas": 0}}}))
    assert find(zero, "Deployment", "rel-sheap-dask-worker-gpu")[0]["spec"]["replicas"] == 0


def test_notebook_token_is_generated_never_a_default(rendered):
    objs = manifests(rendered["notebook"])
    (secret,) = find(objs, "Secret", "rel-sheap-dask-notebook-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", token)
    again = manifests(render(VALUE_SETS["notebook"]))
    assert find(again, "Secret", "rel-sheap-dask-notebook-token")[0]["data"]["token"] != secret["data"]["token"]
    (nb,) = find(objs, "Deployment", "rel-sheap-dask-notebook")
    c = nb["spec"]["template"]["spec"]["containers"][0]
    (tok,) = [e for e in c["env"] if e["name"] == "JUPYTER_TOKEN"]
    assert tok["valueFrom"]["secretKeyRef"] == {"name": "rel-sheap-dask-notebook-token", "key": "token"}
    assert not any("token" in a.lower() or "password" in a.lower() for a in c["args"])
    (svc,) = find(objs, "Service", "rel-sheap-dask-notebook")
    assert svc["spec"]["type"] == "ClusterIP"
    existing = manifests(rendered["everything"])
    assert not find(existing, "Secret", "rel-sheap-dask-notebook-token")
    # the template keeps an installed token on upgrade (lookup; offline it finds nothing)
    secrets_tpl = (CHART / "templates" / "secrets.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in secrets_tpl


def test_fit_job(rendered):
    objs = manifests(rendered["job"])
    (job,) = find(objs, "Job")
    assert job["metadata"]["name"] == "rel-sheap-dask-fit-1"
    spec = job["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["args"][:4] == ["sheap-dask", "fit", "s3://survey/dr16q.zarr", "s3://survey/fits.zarr"]
    assert arg_after(c["args"], "--model") == "hbeta"
    assert arg_after(c["args"], "--method") == "lm"
    assert arg_after(c["args"], "--num-steps") == "300" and arg_after(c["args"], "--chunk") == "256"
    assert "--no-resume" not in c["args"]
    assert spec["restartPolicy"] == "Never" and job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert c["envFrom"] == [{"secretRef": {"name": "rel-sheap-dask-object-storage"}}]
    (secret,) = find(objs, "Secret", "rel-sheap-dask-object-storage")
    assert secret["stringData"] == VALUE_SETS["job"]["objectStorage"]["secretEnv"]
    # workers read and write the stores too: same credentials, same files
    w = worker_container(objs)
    assert w["envFrom"] == c["envFrom"]
    assert {"name": "object-storage", "mountPath": "/var/run/secrets/sheap-dask", "readOnly": True} in w["volumeMounts"]
    # the CLI accepts the rendered arguments
    from sheap_dask.cli import _parser

    args = _parser().parse_args(c["args"][1:])
    assert (args.input, args.output, args.model, args.num_steps) == ("s3://survey/dr16q.zarr", "s3://survey/fits.zarr", "hbeta", 300)
    # a new revision is a new Job (a Job's template is immutable), resuming into the same output
    with helm.Chart.load(CHART) as chart:
        upgraded = manifests(chart.render(VALUE_SETS["job"], name="rel", namespace="sheap", revision=2, is_upgrade=True))
    assert find(upgraded, "Job")[0]["metadata"]["name"] == "rel-sheap-dask-fit-2"
    existing = manifests(rendered["everything"])
    assert not find(existing, "Secret", "rel-sheap-dask-object-storage")
    assert find(existing, "Job")[0]["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "gcs-credentials"}}]


def test_notes_render_how_to_connect(rendered):
    notes = rendered["defaults"]["sheap-dask/templates/NOTES.txt"]
    assert "kubectl --namespace sheap port-forward service/rel-sheap-dask-scheduler 8786:8786 8787:8787" in notes
    assert 'Client("tcp://localhost:8786")' in notes
    assert "http://localhost:8787/status" in notes
    assert "--set worker.replicas=" in notes
    full = rendered["everything"]["sheap-dask/templates/NOTES.txt"]
    assert "service/rel-sheap-dask-notebook 8888:8888" in full and "secret my-token" in full
    assert "logs -f job/rel-sheap-dask-fit-1" in full
    assert "group gpu: 1 worker(s)" in full and "group big: 0 worker(s)" in full


# ---- documentation -------------------------------------------------------------------------------


def test_every_value_has_a_comment_and_a_readme_row():
    rows, missing = documented_values()
    assert not missing, f"values.yaml keys without a '# --' comment: {missing}"
    readme = CHART_README.read_text()
    assert readme_with_table(readme, values_table()) == readme, (
        "helm/sheap-dask/README.md's values table is stale: run `python tests/helm_utils.py --write-readme`")
    for key, _, _ in rows:
        assert f"| `{key}` |" in readme


def test_value_comment_parser():
    text = "# -- top\na: 1\nb:\n  # -- nested\n  # continued\n  c: 2\n  #\n  # free comment\n  d: 3\n# -- list\ne:\n  - x: 1\n"
    assert value_comments(text) == {("a",): "top", ("b", "c"): "nested continued", ("e",): "list"}


def test_chart_readme_covers_operations():
    readme = CHART_README.read_text()
    for needle in ("helm install", "helm upgrade", "--set worker.replicas=", "helm uninstall",
                   "DaskCluster", "DaskAutoscaler", "port-forward", "additionalWorkerGroups"):
        assert needle in readme, needle


def test_k8s_bytes():
    assert k8s_bytes("4Gi") == 4 * 2**30 and k8s_bytes("4G") == 4 * 10**9 and k8s_bytes("129e6") == 129 * 10**6
    assert k8s_bytes("1500m") == 2 and k8s_bytes(123) == 123
    with pytest.raises(ValueError):
        k8s_bytes("4GB")


# ---- the image -----------------------------------------------------------------------------------


def test_dockerfile_structure():
    text = (ROOT / "Dockerfile").read_text()
    stages = dockerfile_stages(text)
    assert len(stages) >= 2, "multi-stage: a builder and a slim runtime"
    final = stages[-1]
    assert re.fullmatch(r"python:(\$\{PYTHON_VERSION\}|3\.1[1-9])-slim", final["from"])
    assert ("ARG", "PYTHON_VERSION=3.11") in final["preamble"]
    instrs = final["instructions"]
    users = [args for instr, args in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage must run as non-root"
    assert users[-1].split(":")[0] == "1000", "uid 1000 is what the chart's securityContext expects"
    runs = " ".join(args for instr, args in instrs if instr == "RUN")
    for tool in ("build-essential", "gcc", "g++", "make ", "cmake"):
        assert tool not in runs, f"{tool} in the final stage"
    copies_from = [args for instr, args in instrs if instr == "COPY" and "--from=" in args]
    assert copies_from, "the runtime stage copies the built environment from the builder"
    entry = [args for instr, args in instrs if instr == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1])[0] == "tini", "exec-form ENTRYPOINT with an init"
    env = " ".join(args for instr, args in instrs if instr == "ENV")
    assert "/opt/sheap-dask/bin" in env and "DASK_TEMPORARY_DIRECTORY=/tmp/dask" in env
    builder = " ".join(args for _, args in stages[0]["instructions"])
    assert "requirements/image.lock" in builder and "jax[cuda12]" in builder
    assert "--no-deps /src" in builder
    # everything the build copies exists and passes .dockerignore
    ignore = (ROOT / ".dockerignore").read_text()
    for stage in stages:
        for instr, args in stage["instructions"]:
            if instr == "COPY" and "--from=" not in args:
                for src in args.split()[:-1]:
                    assert (ROOT / src).exists(), src
                    assert f"!{src.rstrip('/')}" in ignore.replace("/\n", "\n"), f"{src} is excluded by .dockerignore"


def test_image_lock_pins_every_dependency():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lock = {}
    for line in (ROOT / "requirements" / "image.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"unpinned line in image.lock: {line}"
            lock[canonicalize_name(name)] = version
    wanted = pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"]["sdss"]
    wanted += ["s3fs", "gcsfs", "bokeh"]
    for spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not pinned in requirements/image.lock"
        assert req.specifier.contains(lock[name], prereleases=True), f"{req.name}=={lock[name]} violates {req.specifier}"


# ---- what the chart starts, run as local processes ----------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, procs: LocalProcesses, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not ready after {timeout}s")
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(480)
def test_what_the_chart_starts_fits_spectra(tmp_path):
    """Scheduler and workers exactly as rendered (args, env, probes), on 127.0.0.1."""
    import xarray as xr
    from dask.distributed import Client
    from dask.utils import parse_bytes

    import sheap_dask as sd
    from sheap_dask.status import Status

    port, dashboard = _free_ports(2)
    values = {
        "scheduler": {"port": port, "dashboardPort": dashboard},
        # 2Gi: the smallest worker fit_dataset does not warn about (a 1Gi worker pauses once JAX
        # has compiled the model, and the fit stalls)
        "worker": {"replicas": 2, "resources": {"limits": {"cpu": "1", "memory": "2Gi"}}},
        "sheapConfig": {"fit": {"progress": False}},
        # the stores on a volume mounted at /data in the Job and worker pods (here: a local folder)
        # the solver's defaults everywhere: the client's fit, the Job and the example script
        # share one compiled program per worker (each option set compiles its own)
        "fitJob": {"enabled": True, "input": "/data/in.zarr", "output": "/data/out.zarr"},
    }
    objs = manifests(render(values))
    (svc,) = find(objs, "Service", "rel-sheap-dask-scheduler")
    service_host = svc["metadata"]["name"]
    # No cluster DNS here: the Service name maps to 127.0.0.1; each pod's emptyDir /tmp to a folder,
    # the shared data volume /data to another.
    data = tmp_path / "data"
    data.mkdir()
    (sched_dep,) = find(objs, "Deployment", "rel-sheap-dask-scheduler")
    (worker_dep,) = find(objs, "Deployment", "rel-sheap-dask-worker")
    procs = LocalProcesses(tmp_path)

    def pod(dep_or_job, pod_name, extra=None):
        d = tmp_path / pod_name / "tmp"
        d.mkdir(parents=True)
        return container_process(pod_name, dep_or_job["spec"]["template"]["spec"],
                                 host_map={f"tcp://{service_host}:": "tcp://127.0.0.1:"},
                                 mount_map={"/tmp": str(d), "/data": str(data)}, extra_rewrites=extra)

    try:
        cmd, env = pod(sched_dep, "rel-sheap-dask-scheduler-0")
        procs.start("scheduler", cmd, env)
        # the readiness probe of the manifest, against the local process
        sched_c = sched_dep["spec"]["template"]["spec"]["containers"][0]
        probe = sched_c["readinessProbe"]["httpGet"]
        probe_port = {p["name"]: p["containerPort"] for p in sched_c["ports"]}[probe["port"]]
        _wait_http(f"http://127.0.0.1:{probe_port}{probe['path']}", procs, timeout=90)

        n_workers = worker_dep["spec"]["replicas"]
        for i in range(n_workers):
            # Pods have their own network namespaces; local processes share one, so each
            # worker's HTTP server takes a free port instead of the manifest's fixed one.
            worker_c = worker_dep["spec"]["template"]["spec"]["containers"][0]
            cmd, env = pod(worker_dep, f"rel-sheap-dask-worker-{i}",
                           extra={arg_after(worker_c["args"], "--dashboard-address"): "127.0.0.1:0"})
            procs.start(f"worker-{i}", cmd, env)

        with Client(f"tcp://127.0.0.1:{port}", timeout="60s") as client:
            client.wait_for_workers(n_workers, timeout=180)
            procs.check_alive()
            info = client.scheduler_info()["workers"]
            assert sorted(w["name"] for w in info.values()) == [f"rel-sheap-dask-worker-{i}" for i in range(n_workers)]
            assert all(w["nthreads"] == 1 for w in info.values())
            assert all(w["memory_limit"] == parse_bytes("2GiB") for w in info.values())
            # same package version on scheduler, workers and client
            assert client.submit(lambda: __import__("sheap_dask").__version__, pure=False).result() == sd.__version__
            assert set(client.run(lambda: __import__("sheap_dask").__version__).values()) == {sd.__version__}
            assert client.run_on_scheduler(lambda: __import__("sheap_dask").__version__) == sd.__version__
            worker_env = client.run(lambda: (
                __import__("os").environ["XLA_FLAGS"],
                __import__("dask").config.get("distributed.worker.multiprocessing-method"),
                __import__("dask").config.get("sheap_dask.fit.progress"),
            ))
            assert set(worker_env.values()) == {
                ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1", "spawn", False)}

            # the job: fit_dataset through the client, on the cluster the chart starts
            ds = sd.io.synthetic_spectra(16, seed=3).chunk({"spectrum": 8})
            model = sd.models.region("hbeta")
            with warnings.catch_warnings():
                warnings.simplefilter("error", sd.errors.ClusterWarning)
                fits = sd.fit_dataset(ds, model, client=client)
            fits = fits.compute()
            statuses = fits.status.values
            assert statuses.shape == (16,)
            good = (int(Status.CONVERGED), int(Status.CONVERGED_AFTER_FALLBACK))
            assert all(int(s) in good for s in statuses), fits.status.to_series().value_counts()
            assert bool(fits.params.notnull().all())

            # the batch Job as rendered: `sheap-dask fit IN OUT --scheduler <service>`, twice (resume)
            ds.to_zarr(data / "in.zarr", mode="w")
            (job,) = find(objs, "Job")
            written = {}
            for attempt in range(2):
                cmd, env = pod(job, f"rel-sheap-dask-fit-1-{attempt}")
                run = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True,
                                     text=True, timeout=300)
                assert run.returncode == 0, run.stdout + run.stderr
                params_dir = data / "out.zarr" / "params"
                written[attempt] = {p: p.stat().st_mtime_ns for p in params_dir.rglob("*")
                                    if p.is_file() and p.name != "zarr.json"}
            out = xr.open_zarr(data / "out.zarr")
            assert out.sizes["spectrum"] == 16
            assert all(int(s) in good for s in out.status.values)
            # the re-run resumed: no chunk of the fitted parameters was written again
            assert written[0] and written[1] == written[0]

            # the example client script, against the same cluster
            example = ROOT / "examples" / "kubernetes" / "fit_on_kubernetes.py"
            run = subprocess.run([sys.executable, str(example), "--scheduler", f"tcp://127.0.0.1:{port}",
                                  "--n", "16", "--chunk", "8"], capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout + run.stderr
            assert "fitted 16 spectra" in run.stdout
            assert not any(w["status"] == "paused" for w in client.scheduler_info()["workers"].values())
    except BaseException:
        for name, _ in procs.procs:
            print(f"----- {name} log -----\n{procs.log(name)}")
        raise
    finally:
        procs.stop()
    for name, proc in procs.procs:
        assert proc.poll() is not None, f"{name} still running"
