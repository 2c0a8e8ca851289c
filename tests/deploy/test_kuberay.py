"""Static validation of the Kubernetes manifests in deploy/kuberay: offline, a few seconds.

Built-in kinds are validated with ``kubernetes_validate`` in strict mode (an unknown field is an
error, as a typo would otherwise be dropped silently by the API server) at a pinned Kubernetes
version; the RayCluster against the KubeRay CRD's ``openAPIV3Schema`` (tests/deploy/schemas),
converted to JSON Schema with the same strictness. Cross-references are checked as well (Secret
keys, claims, Services and ports, ``DST_*`` settings), so a renamed key fails here, not in a pod
that never starts.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.core.config import Settings
from service.execution import DRIVER_SECRETS, driver_env
from tests.deploy.mlflow_security import mlflow_refusals

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kuberay"
DOCKERFILE = DEPLOY.parent / "Dockerfile"
CRD = Path(__file__).resolve().parent / "schemas" / "ray.io_rayclusters.yaml"
SECRET_EXAMPLE = "secret.example.yaml"
K8S_VERSION = "1.33.0"  # one of the versions kubernetes_validate ships schemas for
RAY_API = "ray.io/v1"
# the Ray Jobs API on the head service that KubeRay creates: <cluster>-head-svc
DASHBOARD_PORT = 8265
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# addresses a person's browser opens, not Services inside the cluster
BROWSER_URLS = {"DST_MLFLOW_UI_URL"}

Doc = dict[str, Any]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_docs(path: Path) -> list[Doc]:
    """The YAML documents of one manifest file (empty documents skipped)."""
    with path.open() as stream:
        return [d for d in yaml.load_all(stream, Loader=_UniqueKeyLoader) if d is not None]


@cache
def kustomization() -> Doc:
    docs = load_docs(DEPLOY / "kustomization.yaml")
    assert len(docs) == 1
    return docs[0]


@cache
def manifests() -> tuple[tuple[str, Doc], ...]:
    """(file, document) for every resource that ``kubectl apply -k`` would create."""
    return tuple(
        (name, doc) for name in kustomization()["resources"] for doc in load_docs(DEPLOY / name)
    )


@cache
def secret_example() -> tuple[Doc, ...]:
    return tuple(load_docs(DEPLOY / SECRET_EXAMPLE))


def by_kind(kind: str) -> list[Doc]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def one(kind: str, name: str) -> Doc:
    (doc,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def doc_id(item: tuple[str, Doc]) -> str:
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


# --- CRD structural schema -> JSON Schema --------------------------------------------------

# OpenAPI keywords that JSON Schema either lacks or that do not constrain a manifest
_DROPPED = {"description", "default", "format", "nullable", "example", "externalDocs"}


def structural_to_jsonschema(node: Doc) -> Doc:
    """JSON Schema for one node of a CRD's structural ``openAPIV3Schema``.

    ``x-kubernetes-*`` annotations only steer the API server (list merging, validation rules)
    and are dropped, except ``x-kubernetes-int-or-string`` (integer or string, as resource
    quantities and ports are: the CRD's ``anyOf`` says so, and its ``pattern`` applies to the
    string form only) and ``x-kubernetes-preserve-unknown-fields`` (an open object).
    ``nullable`` becomes a ``null`` type. Objects with declared properties are closed
    (``additionalProperties: false``): the API server would prune an unknown field without a
    word, so a typo must fail here.
    """
    out: Doc = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {name: structural_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural_to_jsonschema(sub) for sub in value]
        else:  # type, required, enum, pattern, minimum, maxLength, ...
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    open_object = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not open_object:
        out["additionalProperties"] = False
    return out


@cache
def raycluster_validator() -> jsonschema.Draft202012Validator:
    """A validator for ``ray.io/v1`` RayClusters, from the stored KubeRay CRD."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 700 kB
    crd = yaml.load(CRD.read_text(), Loader=loader)
    assert (
        crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayCluster"
    )
    group, version = RAY_API.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = structural_to_jsonschema(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_raycluster(doc: Doc) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``doc`` is a valid RayCluster; its metadata
    is checked as ObjectMeta (the CRD leaves it open) via a strict built-in kind."""
    assert doc["apiVersion"] == RAY_API and doc["kind"] == "RayCluster"
    raycluster_validator().validate(doc)
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    kubernetes_validate.validate(carrier, K8S_VERSION, strict=True)


def validate_builtin(doc: Doc) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``doc`` is a valid built-in resource."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- walking pod specs --------------------------------------------------------------------


def pod_specs(doc: Doc) -> Iterator[tuple[str, Doc, Doc]]:
    """(where, pod template, owning document) for every pod template in ``doc``."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in WORKLOADS:
        yield name, doc["spec"]["template"], doc
    elif doc["kind"] == "RayCluster":
        yield f"{name}/head", doc["spec"]["headGroupSpec"]["template"], doc
        for group in doc["spec"].get("workerGroupSpecs", []):
            yield f"{name}/{group['groupName']}", group["template"], doc


def all_pods() -> list[tuple[str, Doc, Doc]]:
    return [pod for _, doc in manifests() for pod in pod_specs(doc)]


def containers(template: Doc) -> list[Doc]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_lists(doc: Doc) -> Iterator[tuple[str, list[Doc]]]:
    """(where, env list) of every container in ``doc``, the Ray autoscaler's included."""
    for where, template, _ in pod_specs(doc):
        for container in containers(template):
            yield f"{where}/{container['name']}", container.get("env", [])
    if doc["kind"] == "RayCluster":
        yield "autoscaler", doc["spec"].get("autoscalerOptions", {}).get("env", [])


def env_map(env: list[Doc]) -> dict[str, Doc]:
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e for e in env}


def secret_keys() -> dict[str, set[str]]:
    """Secret name -> keys, as documented in secret.example.yaml."""
    return {
        s["metadata"]["name"]: {*s.get("stringData", {}), *s.get("data", {})}
        for s in secret_example()
        if s["kind"] == "Secret"
    }


def generated_configmaps() -> dict[str, dict[str, str]]:
    """ConfigMap name -> data, for the ConfigMaps kustomization.yaml generates."""
    generated = {}
    for generator in kustomization().get("configMapGenerator", []):
        assert not generator.get("files") and not generator.get("envs"), "literals only"
        pairs = (literal.split("=", 1) for literal in generator["literals"])
        generated[generator["name"]] = {key: value for key, value in pairs}
    return generated


def env_value(env: Doc) -> str:
    """The value of an env entry, a generated ConfigMap's key included."""
    if "value" in env:
        return str(env["value"])
    ref = env["valueFrom"]["configMapKeyRef"]
    return generated_configmaps()[ref["name"]][ref["key"]]


def service_ports() -> dict[str, set[int]]:
    """Service name -> ports, for the Services in the manifests and the RayCluster head's."""
    ports = {
        s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in by_kind("Service")
    }
    for cluster in by_kind("RayCluster"):
        head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports[head_service(cluster)] = {p["containerPort"] for p in head.get("ports", [])}
    return ports


def head_service(cluster: Doc) -> str:
    return f"{cluster['metadata']['name']}-head-svc"


# --- the manifests as a whole -------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_not_the_example_secret() -> None:
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources))
    for name in resources:
        assert (DEPLOY / name).is_file(), f"kustomization lists a missing file: {name}"
    assert SECRET_EXAMPLE not in resources, "placeholder secrets must never be applied"
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", SECRET_EXAMPLE}
    assert on_disk == set(resources), "a manifest is not in kustomization.yaml"
    assert all(doc.get("metadata", {}).get("name") for _, doc in manifests())


@pytest.mark.parametrize(
    "item", [m for m in manifests() if m[1]["apiVersion"] != RAY_API], ids=doc_id
)
def test_builtin_kinds_are_valid(item: tuple[str, Doc]) -> None:
    validate_builtin(item[1])


def test_raycluster_matches_the_kuberay_crd() -> None:
    clusters = by_kind("RayCluster")
    assert len(clusters) == 1
    validate_raycluster(clusters[0])


def test_secret_example_is_valid_and_holds_placeholders_only() -> None:
    for secret in secret_example():
        validate_builtin(secret)
        assert secret["kind"] == "Secret" and "data" not in secret
        for key, value in secret["stringData"].items():
            assert "CHANGE-ME" in value, f"{key}: only placeholders belong in the example"


def test_no_two_resources_share_kind_and_name() -> None:
    keys = [(doc["kind"], doc["metadata"]["name"]) for _, doc in manifests()]
    assert len(keys) == len(set(keys))


# --- references ---------------------------------------------------------------------------


def test_every_referenced_secret_key_is_documented() -> None:
    documented = secret_keys()
    refs: list[tuple[str, str, str | None]] = []
    for _, doc in manifests():
        for where, env in env_lists(doc):
            refs += [
                (where, ref["name"], ref["key"])
                for e in env
                if (ref := e.get("valueFrom", {}).get("secretKeyRef"))
            ]
        for where, template, _ in pod_specs(doc):
            for container in containers(template):
                refs += [
                    (where, src["secretRef"]["name"], None)
                    for src in container.get("envFrom", [])
                    if "secretRef" in src
                ]
            refs += [
                (where, v["secret"]["secretName"], None)
                for v in template["spec"].get("volumes", [])
                if "secret" in v
            ]
    assert refs, "the manifests are expected to read their credentials from a Secret"
    for where, name, key in refs:
        assert name in documented, f"{where}: Secret {name} is not in {SECRET_EXAMPLE}"
        assert key is None or key in documented[name], f"{where}: {name}/{key} undocumented"


def test_every_referenced_configmap_key_is_generated() -> None:
    """configMapKeyRefs name a ConfigMap of kustomization.yaml's configMapGenerator (kustomize
    renames it with a hash of its content and rewrites the references) and a key it has."""
    generated = generated_configmaps()
    refs = [
        (where, ref["name"], ref["key"])
        for _, doc in manifests()
        for where, env in env_lists(doc)
        for e in env
        if (ref := e.get("valueFrom", {}).get("configMapKeyRef"))
    ]
    assert refs
    for where, name, key in refs:
        assert name in generated, f"{where}: ConfigMap {name} is not generated"
        assert key in generated[name], f"{where}: {name} has no key {key}"
    for name in generated:
        carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}
        validate_builtin(carrier | {"data": generated[name]})


def test_every_claim_and_volume_is_defined() -> None:
    claims = {doc["metadata"]["name"] for doc in by_kind("PersistentVolumeClaim")}
    for where, template, owner in all_pods():
        templates = {t["metadata"]["name"] for t in owner["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"] for v in template["spec"].get("volumes", [])}
        assert not volumes & templates, f"{where}: a volume shadows a claim template"
        for volume in template["spec"].get("volumes", []):
            if claim := volume.get("persistentVolumeClaim"):
                assert claim["claimName"] in claims, f"{where}: no PVC {claim['claimName']}"
        for container in containers(template):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes | templates, f"{where}: no volume {mount['name']}"


def test_every_referenced_service_and_port_exists() -> None:
    """Service URLs in env values and in the example Secret (the database URL) resolve to a
    Service of the manifests, on a port it serves; StatefulSets name an existing Service."""
    ports = service_ports()
    urls: list[tuple[str, str]] = []
    for _, doc in manifests():
        for where, env in env_lists(doc):
            urls += [
                (where, e["value"])
                for e in env
                if "://" in str(e.get("value", "")) and e["name"] not in BROWSER_URLS
            ]
    for secret in secret_example():
        urls += [(f"secret {k}", v) for k, v in secret["stringData"].items() if "://" in v]
    assert urls
    for where, url in urls:
        parts = urlsplit(url)
        assert parts.hostname in ports, f"{where}: {url} names no Service"
        assert parts.port in ports[parts.hostname], f"{where}: {url}: port not served"
    for statefulset in by_kind("StatefulSet"):
        assert statefulset["spec"]["serviceName"] in ports


def test_services_select_pods_and_target_named_ports() -> None:
    pods = all_pods()
    for service in by_kind("Service"):
        selector = service["spec"]["selector"]
        matches = [
            t
            for _, t, _ in pods
            if selector.items() <= t.get("metadata", {}).get("labels", {}).items()
        ]
        assert matches, f"Service {service['metadata']['name']} selects no pod"
        names = {p.get("name") for t in matches for c in containers(t) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert target in names, f"{service['metadata']['name']}: no port {target}"


def test_workload_selectors_match_their_templates() -> None:
    for kind in WORKLOADS:
        for doc in by_kind(kind):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_dst_env_vars_are_settings_fields() -> None:
    """Every ``DST_*`` variable the manifests set is a real Settings field (a typo would be
    ignored by pydantic-settings, and the service would run on a default)."""
    fields = {f"DST_{name.upper()}" for name in Settings.model_fields}
    seen = set()
    for _, doc in manifests():
        for where, env in env_lists(doc):
            for name in env_map(env):
                if name.startswith("DST_"):
                    assert name in fields, f"{where}: {name} is not a Settings field"
                    seen.add(name)
    assert "DST_RAY_ADDRESS" in seen


# --- the components -----------------------------------------------------------------------


def api_container() -> Doc:
    (container,) = one("Deployment", "dst-api")["spec"]["template"]["spec"]["containers"]
    return container


def test_api_runs_against_the_cluster_services() -> None:
    api = one("Deployment", "dst-api")
    container = api_container()
    env = env_map(container["env"])
    # create_app refuses to start without these; the token and database come from the Secret
    for name in ("DST_RAY_ADDRESS", "DST_MLFLOW_TRACKING_URI"):
        assert env[name].get("value"), name
    for name in ("DST_DATABASE_URL", "DST_API_TOKEN", "RAY_AUTH_TOKEN"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    (cluster,) = by_kind("RayCluster")
    assert env["DST_RAY_ADDRESS"]["value"] == f"http://{head_service(cluster)}:{DASHBOARD_PORT}"
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["DST_STORAGE_PATH"]["value"].startswith("/shared/")
    # the factory: configured from the environment, starts no local Ray or MLflow
    assert container["command"][:3] == ["uvicorn", "--factory", "service.main:app_factory"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "/shared" in {m["mountPath"] for m in container["volumeMounts"]}
    service = one("Service", "dst-api")
    assert service["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]


def test_raycluster_layout() -> None:
    (cluster,) = by_kind("RayCluster")
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head only schedules
    assert head["rayStartParams"]["num-gpus"] == "0"  # (even on a host with GPUs)
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= groups.keys()
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = groups["gpu"]
    assert gpu["replicas"] == 0
    (worker,) = gpu["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])


def test_the_ray_head_holds_what_the_job_drivers_record_with() -> None:
    """The API hands its job drivers no secret (``DST_DRIVER_SECRETS=head``): the head pod,
    where they run, has each one the API would hand on, from the same source (the same
    Secret key, the same MLflow server); no worker pod has any, and the head runs no trial."""
    api = env_map(api_container()["env"])
    assert api["DST_DRIVER_SECRETS"]["value"] == "head"
    handed = {  # what driver_env takes from the API's settings that is a driver's secret
        name
        for name in driver_env(Settings(database_url="x", mlflow_tracking_uri="y"))
        if name in DRIVER_SECRETS
    }
    assert handed == {"DST_DATABASE_URL", "DST_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"}
    (cluster,) = by_kind("RayCluster")
    for where, template, _ in pod_specs(cluster):
        (container,) = template["spec"]["containers"]
        env = env_map(container["env"])
        if where.endswith("/head"):
            for name in handed:
                assert env[name] == api[name], f"{where}: {name}"
        else:
            assert not set(env) & set(DRIVER_SECRETS), where
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_every_ray_pod_has_storage_auth_and_resources() -> None:
    (cluster,) = by_kind("RayCluster")
    claims = {c["metadata"]["name"]: c for c in by_kind("PersistentVolumeClaim")}
    for where, template, _ in pod_specs(cluster):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        shared = volumes[mounts["/shared"]["name"]]["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in claims[shared]["spec"]["accessModes"], where
        data = mounts["/data"]
        assert "persistentVolumeClaim" in volumes[data["name"]], where
        if not where.endswith("/head"):
            assert data.get("readOnly") is True, f"{where}: /data must be read-only on workers"
        shm = volumes[mounts["/dev/shm"]["name"]]
        assert shm["emptyDir"]["medium"] == "Memory", where
        env = env_map(container["env"])
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], where
        assert env["DST_RAY_AUTOSCALING"]["value"] == "true", where
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), where
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys(), where
        assert container["readinessProbe"] and container["livenessProbe"], where
    autoscaler = env_map(cluster["spec"]["autoscalerOptions"]["env"])
    assert autoscaler["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in autoscaler["RAY_AUTH_TOKEN"]["valueFrom"]


def test_every_container_has_resources_and_runs_as_non_root() -> None:
    for where, template, _ in all_pods():
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, where
        for container in containers(template):
            assert container["resources"]["limits"]["memory"], f"{where}/{container['name']}"
            assert container["resources"]["requests"]["cpu"], f"{where}/{container['name']}"


def test_mlflow_serves_artifacts_from_postgres() -> None:
    (container,) = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert container["command"] == ["mlflow"] and args[0] == "server"
    assert "--serve-artifacts" in args
    assert args[args.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    env = env_map(container["env"])
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    (database,) = [
        u for s in secret_example() for k, u in s["stringData"].items() if k == "database-url"
    ]
    assert database.startswith("postgresql+psycopg://")
    # from the environment (the generated ConfigMap): a flag would override it
    assert "--allowed-hosts" not in args and "--cors-allowed-origins" not in args
    allowed = env_value(env["MLFLOW_SERVER_ALLOWED_HOSTS"]).split(",")
    assert "mlflow:5000" in allowed  # the host DST_MLFLOW_TRACKING_URI names
    uri = env_map(api_container()["env"])["DST_MLFLOW_TRACKING_URI"]["value"]
    assert urlsplit(uri).netloc in allowed


def mlflow_settings() -> tuple[str, str, str]:
    """The MLflow UI's address (the API's DST_MLFLOW_UI_URL), and the allowed hosts and CORS
    origins the MLflow server runs with."""
    (mlflow,) = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    env = env_map(mlflow["env"])
    return (
        env_value(env_map(api_container()["env"])["DST_MLFLOW_UI_URL"]),
        env_value(env["MLFLOW_SERVER_ALLOWED_HOSTS"]),
        env_value(env["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"]),
    )


def test_mlflow_accepts_the_ui_address_the_api_hands_out() -> None:
    """A browser on the UI address (the port-forward of README.md) passes MLflow's Host check
    and may send the UI's POSTs; so does one on an Ingress once the README's three edits are
    made, and not before (MLflow 3 answers 403 to its Host and to its POSTs)."""
    ui_url, hosts, origins = mlflow_settings()
    assert mlflow_refusals(ui_url, hosts, origins) == []
    ingress = "https://mlflow.example.com"
    assert mlflow_refusals(ingress, hosts, origins) == [
        "Host mlflow.example.com",
        f"Origin {ingress}",
    ]
    assert mlflow_refusals(ingress, f"{hosts},mlflow.example.com", origins) == [f"Origin {ingress}"]
    assert mlflow_refusals(ingress, f"{hosts},mlflow.example.com", ingress) == []
    readme = (DEPLOY / "README.md").read_text()
    for edit in ("ui-url=", "allowed-hosts=", "cors-allowed-origins="):
        assert f'"{edit}' in readme and f'"{edit}' in (DEPLOY / "kustomization.yaml").read_text()


def test_the_image_finds_what_the_pods_run_in_a_login_shell_too() -> None:
    """KubeRay operators before v1.4 run the Ray containers under `bash -l`, whose
    /etc/profile drops the venv from PATH: every command our image's pods run (``ray``, which
    KubeRay starts, and each container's command) is linked into /usr/local/bin, and exists in
    the venv."""
    dockerfile = DOCKERFILE.read_text()
    match = re.search(r"for command in ([\w ]+); do", dockerfile)
    assert match, "the Dockerfile links no venv command into /usr/local/bin"
    linked = set(match.group(1).split())
    assert 'ln -s "/app/.venv/bin/$command" /usr/local/bin/' in dockerfile
    assert "/etc/profile.d/" in dockerfile
    run = {"ray"}
    for _, template, _ in all_pods():
        for container in containers(template):
            if container["image"].startswith("dst-lab") and container.get("command"):
                run.add(container["command"][0])
    assert run <= linked, f"not linked into /usr/local/bin: {run - linked}"
    venv = Path(sys.executable).parent
    assert all((venv / name).exists() for name in linked), linked


def test_postgres_keeps_its_data_and_password_in_secret() -> None:
    postgres = one("StatefulSet", "postgres")
    (container,) = postgres["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("postgres:16")
    env = env_map(container["env"])
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] in {m["name"] for m in container["volumeMounts"]}


# --- the validators really reject -----------------------------------------------------------


def _mutated(doc: Doc, path: str, value: Any = None, rename: str | None = None) -> Doc:
    """A deep copy of ``doc`` with the dotted ``path`` set to ``value`` or its last key renamed
    (list indices are numbers in the path)."""
    broken = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = broken
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if rename is not None:
        node[rename] = node.pop(last)
    else:
        node[last] = value
    return broken


HEAD_CONTAINER = "spec.headGroupSpec.template.spec.containers.0"
GPU_CONTAINER = "spec.workerGroupSpecs.1.template.spec.containers.0"
API_CONTAINER = "spec.template.spec.containers.0"


@pytest.mark.parametrize(
    ("path", "value", "rename", "error"),
    [
        ("spec.workerGroupSpecs", None, "workerGroupSpec", "'workerGroupSpec' was unexpected"),
        (f"{HEAD_CONTAINER}.volumeMounts", None, "volumeMount", "'volumeMount' was unexpected"),
        ("spec.headGroupSpec.rayStartParams.num-cpus", 0, None, "not of type 'string'"),
        (f"{GPU_CONTAINER}.resources.limits.memory", "200GB", None, "does not match"),
        ("spec.workerGroupSpecs.0.minReplicas", "zero", None, "not of type 'integer'"),
        ("spec.autoscalerOptions.upscalingMode", "Eager", None, "is not one of"),
        ("metadata.labels", None, "lables", "'lables' was unexpected"),
    ],
)
def test_raycluster_validator_rejects_broken_manifests(
    path: str, value: Any, rename: str | None, error: str
) -> None:
    (cluster,) = by_kind("RayCluster")
    with pytest.raises(jsonschema.ValidationError, match=re.escape(error)):
        validate_raycluster(_mutated(cluster, path, value, rename))


def test_raycluster_validator_requires_worker_group_fields() -> None:
    (cluster,) = by_kind("RayCluster")
    broken = copy.deepcopy(cluster)
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        validate_raycluster(broken)


@pytest.mark.parametrize(
    ("path", "value", "rename", "error"),
    [
        ("spec.replicas", "one", None, "not of type 'integer'"),
        (f"{API_CONTAINER}.ports", None, "containerPorts", "'containerPorts' was unexpected"),
        (f"{API_CONTAINER}.livenessProbe.httpGet.path", 8000, None, "not of type 'string'"),
    ],
)
def test_builtin_validator_rejects_broken_manifests(
    path: str, value: Any, rename: str | None, error: str
) -> None:
    api = one("Deployment", "dst-api")
    validate_builtin(api)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(error)):
        validate_builtin(_mutated(api, path, value, rename))


def test_int_or_string_accepts_both_forms() -> None:
    """Resource quantities may be numbers or strings (the CRD's x-kubernetes-int-or-string)."""
    (cluster,) = by_kind("RayCluster")
    for quantity in (4, "4", "500m", "1.5Gi", "2e3"):
        validate_raycluster(_mutated(cluster, f"{GPU_CONTAINER}.resources.limits.cpu", quantity))
    with pytest.raises(jsonschema.ValidationError):
        validate_raycluster(_mutated(cluster, f"{GPU_CONTAINER}.resources.limits.cpu", 1.5))


def test_loader_refuses_duplicate_keys(tmp_path: Path) -> None:
    """A key given twice (the second silently winning) is an error, not a manifest."""
    path = tmp_path / "dup.yaml"
    path.write_text("kind: Service\nmetadata: {name: a}\nkind: Pod\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'kind'"):
        load_docs(path)


def test_the_ray_cluster_runs_the_locked_ray_version() -> None:
    """KubeRay's ``rayVersion`` must be the Ray the image installs from ``uv.lock``."""
    import ray

    (cluster,) = by_kind("RayCluster")
    assert cluster["spec"]["rayVersion"] == ray.__version__
