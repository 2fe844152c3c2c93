"""The Helm chart, rendered and linted by Helm's own engine (helm-python-sdk).

Both the default values and the production-like `values-production.yaml` are
rendered offline, parsed into objects and checked for what a cluster
operator relies on: the kinds, the probes, the migration hook and its order
against the credentials Secret, GPU requests, Secrets referenced rather than
inlined, a restrictive security context and resources on every container.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import pytest
import yaml

from tests.fixtures.server import clean_environment, free_port

CHART = Path(__file__).resolve().parents[2] / "charts" / "peftreg"
PRODUCTION_VALUES = CHART / "values-production.yaml"
RELEASE = "peftreg"
NAMESPACE = "registry"
CREDENTIAL_VARIABLE = re.compile(r"PASSWORD|SECRET|TOKEN|DATABASE_URL|ACCESS_KEY")
WORKLOAD_KINDS = ("Deployment", "Job", "CronJob")
WORKER_METRICS_PORT = 9108

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    """The objects of one offline render, with the raw text they came from."""

    objects: list[Manifest]
    text: str

    def kinds(self) -> Counter[str]:
        return Counter(obj["kind"] for obj in self.objects)

    def of_kind(self, kind: str) -> list[Manifest]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str) -> Manifest:
        matches = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
        return matches[0]

    def pod_template(self, kind: str, name: str) -> Manifest:
        return pod_template(self.one(kind, name))

    def pod_specs(self) -> Iterator[tuple[str, Manifest]]:
        """(workload name, pod spec) of every Deployment, Job and CronJob."""
        for obj in self.objects:
            if obj["kind"] in WORKLOAD_KINDS:
                yield obj["metadata"]["name"], pod_template(obj)["spec"]

    def containers(self) -> Iterator[tuple[str, Manifest]]:
        for workload, spec in self.pod_specs():
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield f"{workload}/{container['name']}", container


def pod_template(workload: Manifest) -> Manifest:
    """The pod template of a Deployment, a Job or a CronJob."""
    spec = workload["spec"]
    template: Manifest = (
        spec["jobTemplate"]["spec"]["template"]
        if workload["kind"] == "CronJob"
        else spec["template"]
    )
    return template


def render(values: dict[str, Any] | None = None) -> Rendered:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    texts = [text for path, text in sorted(manifests.items()) if path.endswith(".yaml")]
    objects = [doc for text in texts for doc in yaml.safe_load_all(text) if doc]
    return Rendered(objects, "\n---\n".join(texts))


def production_values(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION_VALUES.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return values


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render()


@pytest.fixture(scope="module")
def production() -> Rendered:
    return render(production_values())


@pytest.fixture(params=["default", "production"])
def rendered(request: pytest.FixtureRequest) -> Rendered:
    value: Rendered = request.getfixturevalue(request.param)
    return value


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def api_container(rendered: Rendered) -> Manifest:
    containers: list[Manifest] = rendered.pod_template("Deployment", f"{RELEASE}-api")["spec"][
        "containers"
    ]
    assert len(containers) == 1
    return containers[0]


def worker(rendered: Rendered) -> tuple[Manifest, Manifest]:
    """The worker's pod spec and its one container."""
    spec = rendered.pod_template("Deployment", f"{RELEASE}-worker")["spec"]
    (container,) = spec["containers"]
    return spec, container


def hook_weight(obj: Manifest) -> int:
    return int(obj["metadata"]["annotations"]["helm.sh/hook-weight"])


# --- kinds ------------------------------------------------------------------


def test_default_values_render_a_cpu_cluster_layout(default: Rendered) -> None:
    kinds = default.kinds()
    assert kinds["Deployment"] == 2
    for kind in ("Service", "ServiceAccount", "PodDisruptionBudget", "ConfigMap", "Job"):
        assert kinds[kind] == 1, kind
    assert kinds["CronJob"] == 1
    assert kinds["Secret"] == 1  # the chart-managed credentials: no existingSecret by default
    assert "HorizontalPodAutoscaler" not in kinds
    assert "Ingress" not in kinds
    assert default.one("Deployment", f"{RELEASE}-api")["spec"]["replicas"] == 2


def test_production_values_render_hpa_ingress_and_no_chart_secret(production: Rendered) -> None:
    kinds = production.kinds()
    assert kinds["Deployment"] == 2
    for kind in (
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Ingress",
        "Job",
        "CronJob",
        "ServiceMonitor",
        "PodMonitor",
    ):
        assert kinds[kind] == 1, kind
    # Every credential comes from an existing Secret: the chart creates none.
    assert "Secret" not in kinds

    hpa = production.one("HorizontalPodAutoscaler", f"{RELEASE}-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{RELEASE}-api",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    # The HPA owns the replica count: a fixed one would fight it on every upgrade.
    assert "replicas" not in production.one("Deployment", f"{RELEASE}-api")["spec"]

    ingress = production.one("Ingress", RELEASE)
    assert ingress["spec"]["tls"] == [
        {"secretName": "peftreg-tls", "hosts": ["peftreg.example.com"]}
    ]
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": RELEASE, "port": {"name": "http"}}
    pdb = production.one("PodDisruptionBudget", f"{RELEASE}-api")
    assert pdb["spec"]["minAvailable"] == 2
    assert "maxUnavailable" not in pdb["spec"]


def test_service_selects_the_api_pods_only(rendered: Rendered) -> None:
    service = rendered.one("Service", RELEASE)
    api_labels = rendered.pod_template("Deployment", f"{RELEASE}-api")["metadata"]["labels"]
    worker_labels = rendered.pod_template("Deployment", f"{RELEASE}-worker")["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= api_labels.items()
    assert not selector.items() <= worker_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    ports = api_container(rendered)["ports"]
    assert ports == [{"name": "http", "containerPort": 8750, "protocol": "TCP"}]


# --- probes and commands ----------------------------------------------------


def test_api_probes_readiness_on_readyz_and_liveness_on_healthz(rendered: Rendered) -> None:
    container = api_container(rendered)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["args"][:3] == ["serve", "--host", "0.0.0.0"]


def test_probed_and_scraped_paths_are_routes_of_the_service(rendered: Rendered) -> None:
    from peftreg.registry.api.routes import health, metrics

    served = {
        getattr(route, "path", None) for route in [*health.router.routes, *metrics.router.routes]
    }
    container = api_container(rendered)
    probed = {container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")}
    scraped = set()
    for monitor in rendered.of_kind("ServiceMonitor"):
        scraped |= {endpoint["path"] for endpoint in monitor["spec"]["endpoints"]}
    annotations = rendered.pod_template("Deployment", f"{RELEASE}-api")["metadata"]["annotations"]
    if "prometheus.io/path" in annotations:
        scraped.add(annotations["prometheus.io/path"])
    assert scraped == {"/metrics"}
    assert probed | scraped <= served


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook(rendered: Rendered) -> None:
    job = rendered.one("Job", f"{RELEASE}-migrate")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    spec = pod_template(job)["spec"]
    (container,) = spec["containers"]
    assert container["args"] == ["db", "upgrade"]
    assert spec["restartPolicy"] == "Never"
    # Release objects do not exist while pre-install hooks run: the Job must not
    # need the chart's ConfigMap or ServiceAccount.
    assert "envFrom" not in container
    assert "serviceAccountName" not in spec
    # It gets the database URL, and no other credential.
    credentials = {name for name in env_of(container) if CREDENTIAL_VARIABLE.search(name)}
    assert credentials == {"PEFTREG_DATABASE_URL"}


def test_chart_managed_secret_is_a_hook_created_before_the_migration(default: Rendered) -> None:
    (secret,) = default.of_kind("Secret")
    annotations = secret["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert hook_weight(secret) < hook_weight(default.one("Job", f"{RELEASE}-migrate"))
    (job_container,) = default.pod_template("Job", f"{RELEASE}-migrate")["spec"]["containers"]
    job_env = env_of(job_container)
    reference = job_env["PEFTREG_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert reference["name"] == secret["metadata"]["name"]
    assert reference["key"] in secret["data"]


def test_gc_runs_as_a_cronjob_and_can_be_a_dry_run_or_off() -> None:
    cronjob = render(production_values()).one("CronJob", f"{RELEASE}-gc")
    assert cronjob["spec"]["schedule"] == "17 3 * * *"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert pod_template(cronjob)["spec"]["containers"][0]["args"] == ["gc"]

    dry = render(production_values(gc__dryRun=True, gc__schedule="*/30 * * * *"))
    cronjob = dry.one("CronJob", f"{RELEASE}-gc")
    assert cronjob["spec"]["schedule"] == "*/30 * * * *"
    assert pod_template(cronjob)["spec"]["containers"][0]["args"] == ["gc", "--dry-run"]

    assert "CronJob" not in render(production_values(gc__enabled=False)).kinds()


def test_config_map_turns_off_the_embedded_worker_and_in_process_gc(rendered: Rendered) -> None:
    data = rendered.one("ConfigMap", f"{RELEASE}-config")["data"]
    assert data["PEFTREG_EMBEDDED_WORKER"] == "false"
    assert data["PEFTREG_GC_INTERVAL_SECONDS"] == "0"
    assert data["PEFTREG_AUTO_MIGRATE"] == "false"
    assert data["PEFTREG_STORAGE"] == "s3"
    assert data["PEFTREG_LOG_FORMAT"] == "json"
    assert data["PEFTREG_ANONYMOUS"] == "none"
    assert data["PEFTREG_GC_GRACE_SECONDS"] == "86400"
    assert not [key for key in data if CREDENTIAL_VARIABLE.search(key)]


def test_production_config_names_the_bucket(production: Rendered) -> None:
    data = production.one("ConfigMap", f"{RELEASE}-config")["data"]
    assert data["PEFTREG_S3_ENDPOINT_URL"] == "https://s3.example.internal"
    assert data["PEFTREG_S3_BUCKET"] == "peftreg-prod"
    assert data["PEFTREG_S3_REDIRECT"] == "true"


def test_default_config_leaves_the_endpoint_unset_for_aws(default: Rendered) -> None:
    # An empty endpoint URL would reach boto3 as "" and fail: the key is absent.
    assert "PEFTREG_S3_ENDPOINT_URL" not in default.one("ConfigMap", f"{RELEASE}-config")["data"]


# --- workers and GPUs -------------------------------------------------------


def test_default_worker_is_cpu_only(default: Rendered) -> None:
    spec, container = worker(default)
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container["resources"][section]
    assert container["args"][:5] == ["worker", "--device", "cpu", "--concurrency", "1"]
    assert container["image"] == "peftreg:0.2.0"
    assert "nodeSelector" not in spec
    assert "tolerations" not in spec


def test_production_workers_request_gpus_on_the_gpu_pool(production: Rendered) -> None:
    deployment = production.one("Deployment", f"{RELEASE}-worker")
    assert deployment["spec"]["replicas"] == 2
    spec, container = worker(production)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["args"][:5] == ["worker", "--device", "cuda", "--concurrency", "1"]
    assert container["image"] == "registry.example.com/ml-platform/peftreg:0.2.0-cuda"
    assert spec["nodeSelector"] == {"node-pool": "gpu", "nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # No surge pod: it would wait for a spare GPU.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    # The API stays off the GPU nodes.
    api_spec = production.pod_template("Deployment", f"{RELEASE}-api")["spec"]
    assert "nvidia.com/gpu" not in str(api_spec)


def test_production_workers_can_be_cpu_only_by_values() -> None:
    rendered = render(production_values(worker__gpu={"enabled": False}))
    _, container = worker(rendered)
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert container["image"].endswith(":0.2.0")
    assert "--device" in container["args"]
    assert container["args"][container["args"].index("--device") + 1] == "cpu"


def test_worker_scratch_and_grace_period(rendered: Rendered) -> None:
    spec, container = worker(rendered)
    period = spec["terminationGracePeriodSeconds"]
    assert period >= 600
    # A running job may finish before the kubelet kills the pod, with time to hand it back.
    shutdown_grace = float(container["args"][container["args"].index("--shutdown-grace") + 1])
    assert 0 < shutdown_grace <= period - 30
    work_dir = env_of(container)["PEFTREG_WORK_DIR"]["value"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volume = {volume["name"]: volume for volume in spec["volumes"]}[mounts[work_dir]]
    if "emptyDir" in volume:
        size = volume["emptyDir"]["sizeLimit"]
        # The scheduler must find that much node disk.
        assert container["resources"]["requests"]["ephemeral-storage"] == size
    else:
        claim = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert claim["resources"]["requests"]["storage"] == "400Gi"


# --- worker metrics ---------------------------------------------------------


def worker_metrics_port(container: Manifest) -> int:
    """The port the worker's `--metrics-port` names; it must be the container's `metrics` port."""
    args: list[str] = container["args"]
    assert args.count("--metrics-port") == 1
    port = int(args[args.index("--metrics-port") + 1])
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    return port


def test_workers_serve_metrics_on_a_named_container_port(rendered: Rendered) -> None:
    _, container = worker(rendered)
    assert worker_metrics_port(container) == WORKER_METRICS_PORT
    command, params = parse_peftreg_command(container["args"])
    assert (command, params["metrics_port"]) == ("worker", WORKER_METRICS_PORT)


def test_default_worker_pods_carry_scrape_annotations(default: Rendered) -> None:
    annotations = default.pod_template("Deployment", f"{RELEASE}-worker")["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(WORKER_METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    # Without the Prometheus Operator switch there is no PodMonitor.
    assert "PodMonitor" not in default.kinds()


def test_production_pod_monitor_scrapes_the_worker_metrics_port(production: Rendered) -> None:
    monitor = production.one("PodMonitor", f"{RELEASE}-worker")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    # Selected by the same label as the API's ServiceMonitor.
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service_monitor = production.one("ServiceMonitor", RELEASE)
    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    worker_labels = production.pod_template("Deployment", f"{RELEASE}-worker")["metadata"]["labels"]
    api_labels = production.pod_template("Deployment", f"{RELEASE}-api")["metadata"]["labels"]
    assert selector.items() <= worker_labels.items()
    assert not selector.items() <= api_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "30s"}
    _, container = worker(production)
    assert endpoint["port"] in {port["name"] for port in container["ports"]}
    # metrics.podAnnotations is off in production: the PodMonitor is the one scrape.
    annotations = production.pod_template("Deployment", f"{RELEASE}-worker")["metadata"][
        "annotations"
    ]
    assert not [key for key in annotations if key.startswith("prometheus.io/")]


def test_worker_metrics_port_follows_values() -> None:
    _, container = worker(render(production_values(worker__metrics={"port": 9200})))
    assert worker_metrics_port(container) == 9200
    assert parse_peftreg_command(container["args"])[1]["metrics_port"] == 9200


def test_worker_metrics_can_be_switched_off() -> None:
    rendered = render(production_values(worker__metrics={"enabled": False}))
    _, container = worker(rendered)
    assert "--metrics-port" not in container["args"]
    assert "ports" not in container
    assert parse_peftreg_command(container["args"])[1]["metrics_port"] is None
    assert "PodMonitor" not in rendered.kinds()
    # The API's ServiceMonitor stays.
    assert rendered.kinds()["ServiceMonitor"] == 1
    annotations = render({"worker": {"metrics": {"enabled": False}}}).pod_template(
        "Deployment", f"{RELEASE}-worker"
    )["metadata"]["annotations"]
    assert "prometheus.io/port" not in annotations


def test_no_pod_monitor_without_workers() -> None:
    kinds = render(production_values(worker__enabled=False)).kinds()
    assert "PodMonitor" not in kinds
    assert kinds["ServiceMonitor"] == 1


# --- credentials ------------------------------------------------------------


def test_credentials_are_secret_references_never_literal_values(rendered: Rendered) -> None:
    for where, container in rendered.containers():
        for entry in container.get("env", []):
            if CREDENTIAL_VARIABLE.search(entry["name"]):
                assert "value" not in entry, f"{where} inlines {entry['name']}"
                assert "secretKeyRef" in entry["valueFrom"], f"{where}: {entry['name']}"


def test_production_references_the_existing_secrets(production: Rendered) -> None:
    expected = {
        "PEFTREG_DATABASE_URL": {"name": "peftreg-database", "key": "database-url"},
        "PEFTREG_S3_ACCESS_KEY_ID": {"name": "peftreg-s3", "key": "access-key-id"},
        "PEFTREG_S3_SECRET_ACCESS_KEY": {"name": "peftreg-s3", "key": "secret-access-key"},
        "PEFTREG_ADMIN_TOKEN": {"name": "peftreg-admin", "key": "admin-token"},
        "PEFTREG_TOKEN_SIGNING_KEY": {"name": "peftreg-token-signing", "key": "token-signing-key"},
    }
    env = env_of(api_container(production))
    for name, reference in expected.items():
        assert env[name]["valueFrom"]["secretKeyRef"] == reference, name
    # Workers and gc get the database and the bucket, not the admin token.
    _, worker_container = worker(production)
    assert "PEFTREG_ADMIN_TOKEN" not in env_of(worker_container)
    assert "PEFTREG_TOKEN_SIGNING_KEY" not in env_of(worker_container)
    worker_secret_key = env_of(worker_container)["PEFTREG_S3_SECRET_ACCESS_KEY"]
    assert worker_secret_key == env["PEFTREG_S3_SECRET_ACCESS_KEY"]


def test_inline_credentials_appear_only_base64_in_the_chart_secret() -> None:
    credentials = {
        "database-url": "postgresql+psycopg://peftreg:db-pw-8c1f@db:5432/peftreg",
        "s3-access-key-id": "AKIA-EXAMPLE-7d2e",
        "s3-secret-access-key": "s3-secret-5b9a",
        "admin-token": "admin-token-31c4",
    }
    rendered = render(
        {
            "database": {"url": credentials["database-url"]},
            "s3": {
                "accessKeyId": credentials["s3-access-key-id"],
                "secretAccessKey": credentials["s3-secret-access-key"],
            },
            "auth": {"adminToken": credentials["admin-token"]},
        }
    )
    for value in credentials.values():
        assert value not in rendered.text
    (secret,) = rendered.of_kind("Secret")
    decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert decoded == credentials
    env = env_of(api_container(rendered))
    for variable, key in (
        ("PEFTREG_DATABASE_URL", "database-url"),
        ("PEFTREG_S3_ACCESS_KEY_ID", "s3-access-key-id"),
        ("PEFTREG_S3_SECRET_ACCESS_KEY", "s3-secret-access-key"),
        ("PEFTREG_ADMIN_TOKEN", "admin-token"),
    ):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"],
            "key": key,
        }


def test_s3_credentials_are_omitted_for_a_workload_identity(default: Rendered) -> None:
    env = env_of(api_container(default))
    assert "PEFTREG_S3_ACCESS_KEY_ID" not in env
    assert "PEFTREG_S3_SECRET_ACCESS_KEY" not in env
    assert "PEFTREG_ADMIN_TOKEN" not in env


def test_pods_restart_when_configuration_changes() -> None:
    def checksums(rendered: Rendered) -> dict[str, str]:
        annotations = rendered.pod_template("Deployment", f"{RELEASE}-api")["metadata"][
            "annotations"
        ]
        return {key: value for key, value in annotations.items() if key.startswith("checksum/")}

    base = checksums(render())
    assert set(base) == {"checksum/config", "checksum/credentials"}
    changed_config = checksums(render({"gc": {"graceSeconds": 3600}}))
    assert changed_config["checksum/config"] != base["checksum/config"]
    assert changed_config["checksum/credentials"] == base["checksum/credentials"]
    changed_secret = checksums(render({"auth": {"adminToken": "rotated"}}))
    assert changed_secret["checksum/credentials"] != base["checksum/credentials"]


# --- security context and resources -----------------------------------------


def test_every_pod_and_container_runs_restricted(rendered: Rendered) -> None:
    pod_specs = list(rendered.pod_specs())
    assert len(pod_specs) == 4  # api, worker, migrate, gc
    for workload, spec in pod_specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, workload
        assert pod["runAsUser"] == 10001, workload
        assert pod["fsGroup"] == 10001, workload
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        assert spec["automountServiceAccountToken"] is False, workload
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for container in spec["containers"]:
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            # A read-only root needs writable /tmp and PEFTREG_HOME.
            for path in ("/tmp", "/var/lib/peftreg"):
                assert "emptyDir" in volumes[mounts[path]], f"{workload}: {path}"
    for where, container in rendered.containers():
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, where
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["capabilities"] == {"drop": ["ALL"]}, where


def test_every_container_has_requests_and_limits(rendered: Rendered) -> None:
    containers = list(rendered.containers())
    assert len(containers) == 4
    for where, container in containers:
        resources = container["resources"]
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= resources[section].keys(), f"{where} {section}"


def test_api_and_worker_image_come_from_values(production: Rendered) -> None:
    images = {where: container["image"] for where, container in production.containers()}
    assert images == {
        f"{RELEASE}-api/api": "registry.example.com/ml-platform/peftreg:0.2.0",
        f"{RELEASE}-worker/worker": "registry.example.com/ml-platform/peftreg:0.2.0-cuda",
        f"{RELEASE}-migrate/migrate": "registry.example.com/ml-platform/peftreg:0.2.0",
        f"{RELEASE}-gc/gc": "registry.example.com/ml-platform/peftreg:0.2.0",
    }


# --- lint and values errors -------------------------------------------------


@pytest.mark.parametrize("values_file", [None, PRODUCTION_VALUES], ids=["default", "production"])
def test_lint_passes_strict(values_file: Path | None) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info) is only "icon is recommended".
    assert [message for message in report["messages"] if message["severity"] >= 2] == []


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        ({"api": {"replicas": 0}}, helm.HelmValuesError, "at '/api/replicas': minimum: got 0"),
        (
            {"api": {"replicas": "three"}},
            helm.HelmValuesError,
            "at '/api/replicas': got string, want integer",
        ),
        ({"worker": {"gpu": {"count": 0}}}, helm.HelmValuesError, "at '/worker/gpu/count'"),
        (
            {"worker": {"metrics": {"port": 80}}},
            helm.HelmValuesError,
            "at '/worker/metrics/port': minimum: got 80",
        ),
        (
            {"worker": {"metrics": {"enabled": True, "path": "/m"}}},
            helm.HelmValuesError,
            "additional properties 'path'",
        ),
        ({"auth": {"anonymous": "everyone"}}, helm.HelmValuesError, "at '/auth/anonymous'"),
        ({"apiReplicas": 3}, helm.HelmValuesError, "additional properties 'apiReplicas'"),
        (
            {"database": {"url": ""}},
            helm.HelmRenderError,
            "set database.existingSecret (recommended) or database.url",
        ),
        (
            {"database": {"url": "sqlite:////data/peftreg.db"}},
            helm.HelmRenderError,
            "database.url must be a PostgreSQL URL",
        ),
        (
            {"s3": {"accessKeyId": "AKIA"}},
            helm.HelmRenderError,
            "set both s3.accessKeyId and s3.secretAccessKey",
        ),
        (
            {"api": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
            helm.HelmRenderError,
            "api.autoscaling.minReplicas (5) is greater than api.autoscaling.maxReplicas (2)",
        ),
        (
            {"api": {"podDisruptionBudget": {"maxUnavailable": 1}}},
            helm.HelmRenderError,
            "set exactly one of minAvailable and maxUnavailable",
        ),
    ],
    ids=[
        "replicas-zero",
        "replicas-string",
        "gpu-count-zero",
        "worker-metrics-privileged-port",
        "worker-metrics-unknown-key",
        "anonymous-unknown",
        "unknown-key",
        "no-database",
        "sqlite-database",
        "half-s3-keys",
        "hpa-min-above-max",
        "pdb-both",
    ],
)
def test_invalid_values_fail_rendering_with_a_clear_message(
    values: dict[str, Any], error: type[helm.HelmError], message: str
) -> None:
    with pytest.raises(error) as raised:
        render(values)
    assert message in str(raised.value)


def test_invalid_values_fail_lint() -> None:
    report = helm.lint(CHART, {"api": {"replicas": 0}}, strict=True)
    assert any("/api/replicas" in error for error in report["errors"])


def test_a_database_url_is_never_echoed_in_an_error() -> None:
    with pytest.raises(helm.HelmRenderError) as raised:
        render({"database": {"url": "mysql://root:hunter2@db/peftreg"}})
    assert "hunter2" not in str(raised.value)
    assert '"mysql://..."' in str(raised.value)


# --- the chart against the application it deploys ---------------------------


def parse_peftreg_command(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Resolve args against the real `peftreg` CLI without running anything.

    Returns the command's path (e.g. `db upgrade`) and its parsed parameters;
    an unknown command, option or choice raises click's usage error.
    """
    import click

    from peftreg.cli.main import cli

    command: click.Command = cli
    path: list[str] = []
    rest = list(args)
    while isinstance(command, click.Group):
        name, *rest = rest
        subcommand = command.get_command(click.Context(command), name)
        assert subcommand is not None, f"no command `peftreg {' '.join([*path, name])}`"
        path.append(name)
        command = subcommand
    context = command.make_context(" ".join(path), rest)
    return " ".join(path), context.params


def test_every_command_line_parses_with_the_peftreg_cli(rendered: Rendered) -> None:
    """Each container's args name a real `peftreg` command with real options."""
    commands = {
        where.split("/")[1]: parse_peftreg_command(container["args"])
        for where, container in rendered.containers()
    }
    assert commands.keys() == {"api", "worker", "migrate", "gc"}
    assert commands["api"][0] == "serve"
    assert commands["api"][1]["host"] == "0.0.0.0"
    assert commands["api"][1]["port"] == 8750
    assert commands["worker"][0] == "worker"
    assert commands["worker"][1]["device"] in ("cpu", "cuda")
    grace_period = worker(rendered)[0]["terminationGracePeriodSeconds"]
    assert commands["worker"][1]["shutdown_grace"] == grace_period - 60
    assert commands["worker"][1]["metrics_port"] == WORKER_METRICS_PORT
    assert commands["migrate"][0] == "db upgrade"
    assert commands["gc"][0] == "gc"
    assert commands["gc"][1]["dry_run"] is False


def test_gc_dry_run_parses_with_the_peftreg_cli() -> None:
    cronjob = render(production_values(gc__dryRun=True)).one("CronJob", f"{RELEASE}-gc")
    command, params = parse_peftreg_command(pod_template(cronjob)["spec"]["containers"][0]["args"])
    assert (command, params["dry_run"]) == ("gc", True)


def run_peftreg(args: list[str], environment: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "peftreg.cli.main", *args],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_the_rendered_worker_serves_metrics_where_the_chart_points_prometheus(
    tmp_path: Path,
) -> None:
    """The worker command line, run for real, answers at the pod's scrape port and path."""
    port = free_port()
    rendered = render({"worker": {"metrics": {"port": port}}})
    template = rendered.pod_template("Deployment", f"{RELEASE}-worker")
    (container,) = template["spec"]["containers"]
    assert worker_metrics_port(container) == port
    scrape_port = int(template["metadata"]["annotations"]["prometheus.io/port"])
    scrape_path = template["metadata"]["annotations"]["prometheus.io/path"]
    assert scrape_port == port
    (migrate,) = rendered.pod_template("Job", f"{RELEASE}-migrate")["spec"]["containers"]

    environment = {**clean_environment(), "PEFTREG_HOME": str(tmp_path / "home")}
    log = tmp_path / "worker.log"
    assert run_peftreg(migrate["args"], environment, log).wait(60) == 0, log.read_text()
    process = run_peftreg(container["args"], environment, log)
    try:
        body = ""
        deadline = time.monotonic() + 60
        while 'worker_last_heartbeat_timestamp_seconds{worker="' not in body:
            assert process.poll() is None, f"the worker exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no worker metrics in 60 s:\n{log.read_text()}"
            try:
                response = httpx.get(f"http://127.0.0.1:{scrape_port}{scrape_path}", timeout=2)
                body = response.text if response.status_code == 200 else ""
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling with a deadline, not synchronisation by sleep
        assert response.headers["content-type"].startswith("text/plain")
        assert "# TYPE job_duration_seconds histogram" in body
        assert "# TYPE jobs_queue_depth gauge" in body
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        code = process.wait(30)
    assert code == 0, log.read_text()


def container_environment(rendered: Rendered, container: Manifest) -> dict[str, str]:
    """The environment Kubernetes would give the container; Secret values are stand-ins."""
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environment.update(rendered.one("ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            environment[entry["name"]] = entry["value"]
        else:
            reference = entry["valueFrom"]["secretKeyRef"]
            environment[entry["name"]] = f"postgresql+psycopg://{reference['name']}/db"
    return environment


def test_chart_configuration_is_accepted_by_the_service_settings(
    rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each container's environment, read by the service's own `Settings`."""
    from peftreg.registry.settings import Settings

    known = {f"PEFTREG_{field.upper()}" for field in Settings.model_fields}
    for where, container in rendered.containers():
        environment = container_environment(rendered, container)
        unknown = {name for name in environment if name.startswith("PEFTREG_")} - known
        assert not unknown, f"{where} sets variables peftreg does not read: {unknown}"
        with monkeypatch.context() as patch:
            for name in [name for name in os.environ if name.startswith("PEFTREG_")]:
                patch.delenv(name)
            for name, value in environment.items():
                patch.setenv(name, value)
            settings = Settings()
        assert str(settings.home) == "/var/lib/peftreg", where
        assert settings.resolved_database_url().startswith("postgresql+psycopg://"), where
        assert settings.log_format == "json", where
        if where.endswith("/migrate"):
            continue
        assert settings.storage == "s3", where
        assert settings.host == "0.0.0.0", where
        assert settings.anonymous_scope() == "none", where
        assert settings.should_run_embedded_worker() is False, where
        assert settings.should_auto_migrate() is False, where
        assert settings.gc_interval_seconds == 0, where
        if where.endswith("/worker"):
            mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
            assert str(settings.resolved_work_dir()) in mounts - {"/tmp", "/var/lib/peftreg"}
