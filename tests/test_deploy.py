"""The Helm chart and the container image in deploy/, checked offline with the real tools.

helm (the one `make deploy-tools` puts in .cache/bin, else a `helm` on PATH) and
kubernetes-validate (in the venv) are installed by `make deploy-tools`; without them these
tests fail, they never skip. Every manifest of a built-in kind is validated against
Kubernetes' own schemas with unknown fields rejected; the invariants that matter (shutdown
timing, probes, settings, security) are asserted on the rendered objects.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway.settings import Settings, load_settings
from tests.processes import free_port

REPO = Path(__file__).resolve().parent.parent
LOCAL_HELM = REPO / ".cache" / "bin" / "helm"
HELM = LOCAL_HELM if LOCAL_HELM.is_file() else Path(shutil.which("helm") or LOCAL_HELM)
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
CHART = REPO / "deploy" / "helm" / "vllm-gateway"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
KEYS_FILE = "/etc/vllm-gateway/keys/keys.yaml"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
# The README's two cases: in front of existing vLLM services (default values, whose worker is a
# placeholder), and gateway plus chart-deployed workers only; then every option on.
VALUE_SETS = {
    "default": [],
    "workers-only": [
        "--set-json",
        "config.workers=[]",
        "--set",
        "vllm.enabled=true",
        "--set-json",
        'vllm.models=[{"name": "llama", "model": "meta-llama/Llama-3.1-8B-Instruct"}]',
    ],
    "all-on": ["-f", str(ALL_ON)],
}

Manifest = dict[str, Any]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM.is_file(), f"{HELM} is missing: run `make deploy-tools`"
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=30, check=False
    )


def render(*args: str) -> list[Manifest]:
    result = helm("template", "rel", str(CHART), "--namespace", "llm", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(manifests: list[Manifest], kind: str, component: str = "gateway") -> Manifest:
    found = [
        m
        for m in manifests
        if m["kind"] == kind and m["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects for {component}"
    return found[0]


def config_file(manifests: list[Manifest], tmp_path: Path) -> Path:
    """The rendered ConfigMap's gateway.yaml, with the Secret-mounted keys file (apiKeys) at a
    path of this test, where the pod would have it."""
    keys = tmp_path / "keys.yaml"
    keys.write_text('- {name: team-a, key: "sk-test-key"}\n', encoding="utf-8")
    text = one(manifests, "ConfigMap")["data"]["gateway.yaml"]
    path = tmp_path / "gateway.yaml"
    path.write_text(text.replace(KEYS_FILE, str(keys)), encoding="utf-8")
    return path


def settings_of(manifests: list[Manifest], tmp_path: Path) -> Settings:
    return load_settings(config_file(manifests, tmp_path), {})


def containers(manifests: list[Manifest]) -> Iterator[dict[str, Any]]:
    for m in manifests:
        if m["kind"] in {"Deployment", "StatefulSet"}:
            yield from m["spec"]["template"]["spec"]["containers"]


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> list[Manifest]:
    return render(*VALUE_SETS[request.param])


@pytest.fixture(scope="module")
def all_on() -> list[Manifest]:
    return render("-f", str(ALL_ON))


# --- the tools: lint, render, Kubernetes schemas ---------------------------------------------


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_helm_lint_passes(values: str) -> None:
    result = helm("lint", "--strict", str(CHART), *VALUE_SETS[values])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_builtin_manifest_passes_kubernetes_schemas_strictly(
    rendered: list[Manifest], tmp_path: Path
) -> None:
    builtin = [m for m in rendered if m["kind"] not in CUSTOM_KINDS]
    files = []
    for i, manifest in enumerate(builtin):
        files.append(tmp_path / f"{i}-{manifest['kind']}.yaml")
        files[-1].write_text(yaml.safe_dump(manifest), encoding="utf-8")
    for version in KUBERNETES_VERSIONS:
        result = subprocess.run(
            [str(KUBERNETES_VALIDATE), "--strict", "--quiet", "-k", version, *map(str, files)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"Kubernetes {version}:\n{result.stdout}{result.stderr}"


def test_kubernetes_validate_rejects_an_unknown_field(
    all_on: list[Manifest], tmp_path: Path
) -> None:
    """The control for the test above: --strict really does catch a misplaced key."""
    deployment = one(all_on, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment), encoding="utf-8")
    result = subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "livenessProbes" in result.stdout + result.stderr


def test_all_on_values_render_every_kind(all_on: list[Manifest]) -> None:
    kinds = {m["kind"] for m in all_on}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Ingress",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
        "StatefulSet",
    }


def test_prometheus_rule_is_grafana_alerts_yaml_and_passes_promtool(
    all_on: list[Manifest], tmp_path: Path
) -> None:
    """The chart ships grafana/alerts.yaml itself (through a symlink), not a copy."""
    rule = one(all_on, "PrometheusRule", "monitoring")
    source = yaml.safe_load((REPO / "grafana" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rendered = tmp_path / "rules.yaml"
    rendered.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(rendered)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_configmap_is_grafana_dashboard_json_for_the_sidecar(
    all_on: list[Manifest],
) -> None:
    dashboard = one(all_on, "ConfigMap", "monitoring")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = (REPO / "grafana" / "dashboard.json").read_text()
    assert dashboard["data"]["vllm-gateway.json"] == source


def test_chart_monitoring_files_link_to_the_single_source() -> None:
    for name in ("alerts.yaml", "dashboard.json"):
        link = CHART / "files" / name
        assert link.is_symlink(), f"{link} must link to grafana/{name}, not copy it"
        assert link.resolve() == (REPO / "grafana" / name).resolve()


def test_service_monitors_select_a_service_port_named_http(all_on: list[Manifest]) -> None:
    monitors = [m for m in all_on if m["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == {
        "gateway",
        "vllm",
    }
    services = [m for m in all_on if m["kind"] == "Service"]
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert set(monitor["spec"]) == {"selector", "endpoints"}
        selector = monitor["spec"]["selector"]["matchLabels"].items()
        matched = [s for s in services if selector <= s["metadata"]["labels"].items()]
        assert matched, f"{monitor['metadata']['name']} selects no Service"
        [endpoint] = monitor["spec"]["endpoints"]
        assert {k: endpoint[k] for k in ("port", "path", "interval")} == {
            "port": "http",
            "path": "/metrics",
            "interval": "30s",
        }
        for service in matched:
            assert [p["name"] for p in service["spec"]["ports"]] == ["http"]


# --- values.schema.json ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicaCount=three"], "/replicaCount"),
        (["--set", "replicaCount=-1"], "/replicaCount"),
        (["--set", "replicaCont=3"], "replicaCont"),
        (["--set", "config.server.port=http"], "/config/server/port"),
        (["--set", "config.server.host=127.0.0.1"], "/config/server/host"),
        (["--set", "config.timeouts.firstToken=5"], "firstToken"),
        (["--set", "vllm.startupFailureThreshold=30"], "/vllm/startupFailureThreshold"),
        (["--set", "podAntiAffinity=always"], "/podAntiAffinity"),
    ],
)
def test_schema_rejects_a_bad_value(args: list[str], message: str) -> None:
    result = helm("template", "rel", str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--set", "vllm.enabled=true"],  # enabled, but no model
        ["--set-json", 'vllm.models=[{"name": "llama", "model": "m"}]'],  # models, not enabled
    ],
)
def test_rendering_without_any_worker_fails_with_the_reason(args: list[str]) -> None:
    result = helm("template", "rel", str(CHART), "--set-json", "config.workers=[]", *args)
    assert result.returncode != 0
    assert "no workers" in result.stderr


def test_discovery_services_alone_are_enough_workers(tmp_path: Path) -> None:
    url = "http://vllm-pool.inference.svc.cluster.local:8000"
    manifests = render(
        "--set-json", "config.workers=[]",
        "--set-json", f'config.discovery.services=[{{"url": "{url}"}}]',
    )  # fmt: skip
    settings = settings_of(manifests, tmp_path)
    assert settings.workers == ()
    assert [str(s.url).rstrip("/") for s in settings.discovery.services] == [url]


# --- the gateway ------------------------------------------------------------------------------


def own_port(env: dict[str, str]) -> dict[str, str]:
    """``--check`` binds the port to prove it free: use a free one, not the chart's 8080, which
    another process on the test machine may hold."""
    return {**env, "VLLM_GATEWAY_SERVER__PORT": str(free_port())}


def test_configmap_passes_the_gateways_own_check(rendered: list[Manifest], tmp_path: Path) -> None:
    path = config_file(rendered, tmp_path)
    env = own_port({k: v for k, v in os.environ.items() if not k.startswith("VLLM_GATEWAY_")})
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert settings_of(rendered, tmp_path).server.host == "0.0.0.0"


def test_grace_period_outlasts_prestop_grace_and_drain(
    rendered: list[Manifest], tmp_path: Path
) -> None:
    server = settings_of(rendered, tmp_path).server
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    sleep = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    budget = int(sleep[1]) + server.shutdown_grace + server.drain_timeout
    assert pod["terminationGracePeriodSeconds"] > budget
    assert pod["terminationGracePeriodSeconds"] > server.shutdown_grace + server.drain_timeout


def test_probes_use_health_and_ready_on_the_configured_port(
    rendered: list[Manifest], tmp_path: Path
) -> None:
    port = settings_of(rendered, tmp_path).server.port
    container = one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    service = one(rendered, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_gateway_pod_is_locked_down(rendered: list[Manifest]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = pod["containers"][0]["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    # Service links would inject VLLM_GATEWAY_PORT & co, which the gateway reads as settings.
    assert pod["enableServiceLinks"] is False
    assert not any(
        e["name"].startswith("VLLM_GATEWAY_") for e in pod["containers"][0].get("env", [])
    )


def test_a_config_change_rolls_the_gateway_pods() -> None:
    def checksum(*args: str) -> str:
        pod = one(render(*args), "Deployment")["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/config"])

    assert checksum() != checksum("--set", "config.logging.level=DEBUG")


def test_ingress_keeps_streams_unbuffered_and_open(all_on: list[Manifest], tmp_path: Path) -> None:
    annotations = one(all_on, "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    total = settings_of(all_on, tmp_path).timeouts.total
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{key}"]) >= total
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"


def test_autoscaler_owns_the_replica_count(all_on: list[Manifest]) -> None:
    assert "replicas" not in one(all_on, "Deployment")["spec"]
    hpa = one(all_on, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(all_on, "Deployment")["metadata"]["name"]


# --- vLLM workers -----------------------------------------------------------------------------


def test_every_worker_model_is_a_discovery_service(all_on: list[Manifest], tmp_path: Path) -> None:
    """Each chart-deployed model is found by DNS through its headless Service, which lists
    only ready pods: scaling the workers never touches the gateway's config. The services the
    values give come first, unchanged."""
    settings = settings_of(all_on, tmp_path)
    services = [
        (str(s.url).rstrip("/"), s.models, s.max_in_flight) for s in settings.discovery.services
    ]
    expected = [("http://vllm-pool.inference.svc.cluster.local:8000", ("pool-model",), 32)]
    for sts in (m for m in all_on if m["kind"] == "StatefulSet"):
        name = sts["metadata"]["name"]
        service = next(
            m for m in all_on if m["kind"] == "Service" and m["metadata"]["name"] == name
        )
        assert service["spec"]["clusterIP"] == "None"
        assert not service["spec"].get("publishNotReadyAddresses", False)
        assert (
            service["spec"]["selector"].items()
            <= sts["spec"]["template"]["metadata"]["labels"].items()
        )
        assert sts["spec"]["serviceName"] == name
        container = sts["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        served = (
            args[args.index("--served-model-name") + 1] if "--served-model-name" in args else None
        )
        model = served or args[args.index("--model") + 1]
        port = container["ports"][0]["containerPort"]
        assert service["spec"]["ports"][0]["port"] == port
        expected.append((f"http://{name}.llm.svc.cluster.local:{port}", (model,), None))
    assert len(expected) == 3  # the values' own service and both models
    assert services == expected
    assert settings.discovery.interval == 5.0
    assert [(str(w.url).rstrip("/"), w.max_in_flight) for w in settings.workers] == [
        ("http://vllm-existing.inference.svc.cluster.local:8000", 64)
    ]


def test_gateway_with_only_chart_workers_passes_its_own_check(tmp_path: Path) -> None:
    manifests = render("-f", str(ALL_ON), "--set-json", "config.workers=[]")
    path = config_file(manifests, tmp_path)
    env = own_port({k: v for k, v in os.environ.items() if not k.startswith("VLLM_GATEWAY_")})
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path), "--check"],
        capture_output=True, text=True, timeout=30, check=False, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert settings_of(manifests, tmp_path).workers == ()


def test_scaling_workers_leaves_the_gateway_config_alone() -> None:
    def config_and_checksum(replicas: int) -> tuple[str, str]:
        manifests = render("-f", str(ALL_ON), "--set", f"vllm.models[0].replicas={replicas}")
        pod = one(manifests, "Deployment")["spec"]["template"]
        config = one(manifests, "ConfigMap")["data"]["gateway.yaml"]
        return config, str(pod["metadata"]["annotations"]["checksum/config"])

    assert config_and_checksum(1) == config_and_checksum(5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "config.routing.policy=random"], "policy"),
        (["--set", "config.routing.colour=blue"], "colour"),
        (["--set-json", "config.routing.load_factor=0.5"], "/config/routing/load_factor"),
        (["--set", "config.routing.scrape_timeout=0"], "/config/routing/scrape_timeout"),
        (["--set", "config.resume.max_resumes=9"], "max_resumes"),
        (["--set", "config.discovery.interval=0"], "/config/discovery/interval"),
        (
            ["--set-json", 'config.discovery.services=[{"url": "http://v:8000", "port": 8000}]'],
            "'port' not allowed",
        ),
        (
            ["--set-json", 'config.workers=[{"url": "http://v:8000", "max_in_flight": 0}]'],
            "/config/workers/0/max_in_flight",
        ),
        (["--set-json", 'config.fallbacks={"big": ["small", "small"]}'], "/config/fallbacks/big"),
        (["--set", "config.retry.max_attempts=11"], "/config/retry/max_attempts"),
        (["--set", "config.health.failures_to_eject=0"], "/config/health/failures_to_eject"),
    ],
)
def test_schema_checks_the_routing_settings(args: list[str], message: str) -> None:
    result = helm("template", "rel", str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_install_notes_list_static_workers_and_discovery_services() -> None:
    result = helm(
        "install", "rel", str(CHART), "--namespace", "llm", "--dry-run=client", "-f", str(ALL_ON)
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout[result.stdout.index("NOTES:") :]
    assert "http://vllm-existing.inference.svc.cluster.local:8000 (existing-model)" in notes
    assert "Found by DNS every 5 s" in notes
    for url in (
        "http://vllm-pool.inference.svc.cluster.local:8000 (pool-model)",
        "http://llm-vllm-llama.llm.svc.cluster.local:8000 (llama-3.1-8b)",
        "http://llm-vllm-qwen-72b.llm.svc.cluster.local:8000 (Qwen/Qwen2.5-72B-Instruct)",
    ):
        assert url in notes


def test_worker_pods_get_gpus_shm_and_time_to_load(all_on: list[Manifest]) -> None:
    for sts in (m for m in all_on if m["kind"] == "StatefulSet"):
        pod = sts["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"].startswith("vllm/vllm-openai:")
        assert "--model" in container["args"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/health"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    tensor_parallel = [
        c["args"][c["args"].index("--tensor-parallel-size") + 1]
        for c in containers(all_on)
        if "--tensor-parallel-size" in c["args"]
    ]
    assert tensor_parallel == ["4"]


def pod_of(manifests: list[Manifest], kind: str, component: str = "gateway") -> Manifest:
    return one(manifests, kind, component)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def statefulsets(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == "StatefulSet"}


def test_chart_workers_replace_the_placeholder_worker(tmp_path: Path) -> None:
    manifests = render(*VALUE_SETS["workers-only"][2:])  # vllm on, config.workers left default
    settings = settings_of(manifests, tmp_path)
    assert settings.workers == ()
    assert [str(s.url) for s in settings.discovery.services] == [
        "http://rel-vllm-gateway-vllm-llama.llm.svc.cluster.local:8000/"
    ]


def test_model_cache_is_a_claim_per_pod_or_an_existing_claim(all_on: list[Manifest]) -> None:
    for sts in statefulsets(all_on).values():
        [template] = sts["spec"]["volumeClaimTemplates"]
        assert template["metadata"]["name"] == "cache"
        assert template["spec"]["resources"]["requests"]["storage"] == "500Gi"
        assert template["spec"]["storageClassName"] == "fast-ssd"
        pod = sts["spec"]["template"]["spec"]
        assert "cache" not in {v["name"] for v in pod["volumes"]}
        assert {"name": "cache", "mountPath": "/root/.cache"} in pod["containers"][0][
            "volumeMounts"
        ]
    shared = render("-f", str(ALL_ON), "--set", "vllm.modelCache.existingClaim=weights")
    for sts in statefulsets(shared).values():
        assert "volumeClaimTemplates" not in sts["spec"]
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "weights"}
    for sts in statefulsets(render(*VALUE_SETS["workers-only"])).values():
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert volumes["cache"] == {"name": "cache", "emptyDir": {}}


def test_worker_pods_request_cpu_and_memory(all_on: list[Manifest]) -> None:
    default = statefulsets(render(*VALUE_SETS["workers-only"]))["rel-vllm-gateway-vllm-llama"]
    resources = default["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert resources["limits"] == {"nvidia.com/gpu": 1}
    sets = statefulsets(all_on)
    own = sets["llm-vllm-llama"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert own["requests"] == {"cpu": "4", "memory": "32Gi"}  # the model's own win
    assert own["limits"] == {"memory": "48Gi", "nvidia.com/gpu": 1}
    shared = sets["llm-vllm-qwen-72b"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert shared["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert shared["limits"] == {"nvidia.com/gpu": 4}


def test_runtime_class_extra_env_and_volumes_reach_both_pods(all_on: list[Manifest]) -> None:
    gateway = pod_of(all_on, "Deployment")
    assert gateway["runtimeClassName"] == "gvisor"
    assert {"name": "OTEL_SERVICE_NAME", "value": "llm-gateway"} in gateway["containers"][0]["env"]
    assert {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}} in gateway["volumes"]
    mounts = gateway["containers"][0]["volumeMounts"]
    assert {"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True} in mounts
    for sts in statefulsets(all_on).values():
        pod = sts["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert pod["runtimeClassName"] == "nvidia"
        assert [e["name"] for e in container["env"]] == ["HF_TOKEN", "VLLM_LOGGING_LEVEL"]
        assert {"name": "scratch", "emptyDir": {}} in pod["volumes"]
        assert {"name": "scratch", "mountPath": "/scratch"} in container["volumeMounts"]
    default = pod_of(render(), "Deployment")
    assert "runtimeClassName" not in default
    assert "env" not in default["containers"][0]


def test_api_keys_come_from_a_secret_mounted_as_the_keys_file(all_on: list[Manifest]) -> None:
    gateway = pod_of(all_on, "Deployment")
    volumes = {v["name"]: v for v in gateway["volumes"]}
    assert volumes["api-keys"]["secret"] == {
        "secretName": "llm-api-keys",
        "items": [{"key": "keys.yaml", "path": "keys.yaml"}],
    }
    [mount] = [m for m in gateway["containers"][0]["volumeMounts"] if m["name"] == "api-keys"]
    assert mount == {"name": "api-keys", "mountPath": "/etc/vllm-gateway/keys", "readOnly": True}
    config = yaml.safe_load(one(all_on, "ConfigMap")["data"]["gateway.yaml"])
    assert config["auth"]["keys_file"] == KEYS_FILE
    default = yaml.safe_load(one(render(), "ConfigMap")["data"]["gateway.yaml"])
    assert default["auth"]["keys_file"] is None


def test_chart_redis_shares_the_limits_unless_a_url_is_set(all_on: list[Manifest]) -> None:
    service = one(all_on, "Service", "redis")
    assert service["metadata"]["name"] == "llm-redis"
    assert service["spec"]["ports"][0]["port"] == 6379
    redis = pod_of(all_on, "Deployment", "redis")["containers"][0]
    assert redis["image"].startswith("redis:")
    config = yaml.safe_load(one(all_on, "ConfigMap")["data"]["gateway.yaml"])
    assert config["redis"]["url"] == "redis://llm-redis:6379/0"
    own = render("-f", str(ALL_ON), "--set", "config.redis.url=redis://mine:6379/1")
    assert "redis://mine:6379/1" in one(own, "ConfigMap")["data"]["gateway.yaml"]
    assert not [m for m in render() if m["metadata"]["name"].endswith("-redis")]


def test_vllm_scrape_sets_instance_to_the_workers_host_and_port(all_on: list[Manifest]) -> None:
    """The dashboard's $worker is the host:port of the gateway's worker URL (a pod IP found by
    discovery, with vllm.port) and filters vLLM's series on `instance`."""
    monitor = one(all_on, "ServiceMonitor", "vllm")
    [endpoint] = monitor["spec"]["endpoints"]
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_ip"],
        "targetLabel": "instance",
        "replacement": "${1}:8000",
    } in endpoint["relabelings"]
    dashboard = (REPO / "grafana" / "dashboard.json").read_text(encoding="utf-8")
    assert 'instance=~\\"$worker\\"' in dashboard


def test_kv_events_wire_every_worker_and_the_gateway_to_the_same_sockets(
    all_on: list[Manifest], tmp_path: Path
) -> None:
    """With vllm.kvEvents on, every chart worker runs with prefix caching and publishes its
    KV-cache events on the configured ports (bound on every address, the way vLLM binds
    rather than connects out); the gateway subscribes to each discovered pod on those ports
    and topic, and the workers' network policy lets it in."""
    routing = settings_of(all_on, tmp_path).routing.kv_events
    assert routing.enabled
    assert (routing.endpoint, routing.replay_endpoint) == ("tcp://{host}:6557", "tcp://{host}:6558")
    workers = [m for m in all_on if m["kind"] == "StatefulSet"]
    assert len(workers) == 2
    for sts in workers:
        [container] = sts["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert "--enable-prefix-caching" in args
        published = json.loads(args[args.index("--kv-events-config") + 1])
        assert published == {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": "tcp://*:6557",
            "replay_endpoint": "tcp://*:6558",
            "topic": routing.topic,
        }
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": 8000, "kv-events": 6557, "kv-replay": 6558}
    policy = one(all_on, "NetworkPolicy", "vllm")
    [rule] = policy["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {"http", "kv-events", "kv-replay"}


def test_kv_events_keep_the_users_own_routing_settings(tmp_path: Path) -> None:
    """What the values say about kv_events (tokenizers, weight) is kept; the sockets and topic
    are the chart's, so they cannot disagree with what the workers publish on."""
    manifests = render(
        "-f", str(ALL_ON), "--set-json",
        'config.routing.kv_events={"weight": 4, "topic": "other", "endpoint": "tcp://{host}:1",'
        ' "tokenizers": {"llama-3.1-8b": "/tokenizers/llama/tokenizer.json"}}',
    )  # fmt: skip
    text = one(manifests, "ConfigMap")["data"]["gateway.yaml"]
    kv = yaml.safe_load(text)["routing"]["kv_events"]
    assert kv == {
        "enabled": True,
        "endpoint": "tcp://{host}:6557",
        "replay_endpoint": "tcp://{host}:6558",
        "topic": "kv-events",
        "weight": 4,
        "tokenizers": {"llama-3.1-8b": "/tokenizers/llama/tokenizer.json"},
    }


def test_without_kv_events_workers_publish_nothing() -> None:
    manifests = render(*VALUE_SETS["workers-only"])
    [sts] = [m for m in manifests if m["kind"] == "StatefulSet"]
    [container] = sts["spec"]["template"]["spec"]["containers"]
    assert "--kv-events-config" not in container["args"]
    assert [p["name"] for p in container["ports"]] == ["http"]
    text = one(manifests, "ConfigMap")["data"]["gateway.yaml"]
    assert "kv_events" not in (yaml.safe_load(text).get("routing") or {})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "vllm.modelCache.size=lots"], "/vllm/modelCache/size"),
        (["--set-json", 'vllm.modelCache.accessModes=["Sometimes"]'], "accessModes"),
        (["--set", "apiKeys.secret=x"], "'secret' not allowed"),
        (["--set-json", 'extraVolumeMounts=[{"name": "x"}]'], "mountPath"),
        (["--set", "redis.image.tag="], "/redis/image/tag"),
        (["--set", "vllm.kvEvents.port=0"], "/vllm/kvEvents/port"),
        (["--set", "vllm.kvEvents.host=x"], "'host' not allowed"),
        (["--set", "config.routing.kv_events.colour=x"], "'colour' not allowed"),
        (["--set", "config.routing.kv_events.weight=-1"], "/config/routing/kv_events/weight"),
    ],
)
def test_schema_checks_the_production_values(args: list[str], message: str) -> None:
    result = helm("template", "rel", str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr


# --- the image --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = (line.strip() for line in text.splitlines())
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def test_dockerfile_is_multi_stage_on_a_pinned_slim_base() -> None:
    instructions = dockerfile_instructions()
    arg = dict(v.split("=", 1) for k, v in instructions if k == "ARG" and "=" in v)
    bases = [
        v.split()[0].replace("${PYTHON_IMAGE}", arg.get("PYTHON_IMAGE", ""))
        for k, v in instructions
        if k == "FROM"
    ]
    assert len(bases) >= 2
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    runs = " ".join(v for k, v in instructions if k == "RUN")
    assert "pip install" in runs
    assert "[dev]" not in runs


def test_dockerfile_runs_the_gateway_as_non_root_with_a_health_check() -> None:
    instructions = dockerfile_instructions()
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [v for k, v in final if k == "USER"]
    assert users, "no USER in the final stage"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert ("ENTRYPOINT", '["vllm-gateway"]') in final
    assert ("CMD", '["--config", "/etc/vllm-gateway/gateway.yaml"]') in final
    assert ("EXPOSE", "8080") in final
    healthcheck = next(v for k, v in final if k == "HEALTHCHECK")
    assert '"gateway.healthcheck", "--config", "/etc/vllm-gateway/gateway.yaml"' in healthcheck


def test_locked_dependencies_install_in_their_own_layer_before_the_code() -> None:
    instructions = dockerfile_instructions()
    build = instructions[: max(i for i, (k, _) in enumerate(instructions) if k == "FROM")]
    steps = [f"{k} {v}" for k, v in build]
    lock = next(i for i, s in enumerate(steps) if "pip install" in s and "requirements.lock" in s)
    code = next(i for i, s in enumerate(steps) if s.startswith("COPY gateway"))
    assert lock < code
    assert "--no-deps" in steps[lock]
    package = next(s for s in steps[code:] if "pip install" in s)
    assert "--no-deps" in package and "pip check" in package


def test_lock_file_pins_the_runtime_closure_of_this_venv() -> None:
    """deploy/requirements.lock is what `make lock` writes now: regenerate it after a change."""
    spec = importlib.util.spec_from_file_location("lock", REPO / "deploy" / "lock.py")
    assert spec is not None and spec.loader is not None
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    pins = lock.closure("vllm-gateway")
    text = (REPO / "deploy" / "requirements.lock").read_text(encoding="utf-8")
    locked = dict(line.split("==") for line in text.splitlines() if line and line[0] != "#")
    assert locked == pins
    assert {"aiohttp", "pydantic", "prometheus-client"} <= locked.keys()
    assert {"tokenizers", "jinja2"} <= locked.keys()  # the image routes chat prompts by cache
    assert not {"pytest", "mypy", "ruff"} & locked.keys()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_health_check_follows_the_configured_port() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:

        def check(port: int) -> int:
            env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_GATEWAY_")}
            env["VLLM_GATEWAY_SERVER__PORT"] = str(port)
            command = [sys.executable, "-m", "gateway.healthcheck", "--config"]
            return subprocess.run(
                [*command, "config/local.yaml"], cwd=REPO, env=env, timeout=30, check=False
            ).returncode

        assert check(server.server_address[1]) == 0
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            assert check(unused.getsockname()[1]) == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_build_context_sends_what_copy_needs_and_nothing_else() -> None:
    """deploy/Dockerfile.dockerignore (read by BuildKit) allow-lists the COPY sources."""
    lines = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    patterns = [p.strip() for p in lines.splitlines() if p.strip() and not p.startswith("#")]
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert patterns[0] == "*"
    sources = [
        source.rstrip("/")
        for word, rest in dockerfile_instructions()
        if word == "COPY" and "--from=" not in rest
        for source in [s for s in rest.split() if not s.startswith("--")][:-1]
    ]
    assert sources
    assert set(sources) <= allowed


def test_worker_tls_settings_reach_the_gateways_config() -> None:
    tls = {"ca_file": "/tls/ca.pem", "server_name": "vllm.default.svc"}
    worker = {"url": "https://vllm:8000", "models": ["m"], "tls": tls}
    manifests = render("--set-json", f"config.workers={json.dumps([worker])}")
    config = yaml.safe_load(one(manifests, "ConfigMap")["data"]["gateway.yaml"])
    assert config["workers"][0]["tls"] == tls
    result = helm(
        "template", "rel", str(CHART), "--set-json",
        'config.workers=[{"url": "https://vllm:8000", "tls": {"ca": "/x"}}]',
    )  # fmt: skip
    assert result.returncode != 0
    assert "'ca' not allowed" in result.stderr


# --- the chart's `config` and the gateway's settings --------------------------------------------


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _keys_missing(model: type[BaseModel], node: dict[str, Any], path: str) -> list[str]:
    """Settings keys (``model``'s, recursively) the schema ``node`` does not name."""
    if node.get("type") == "array":
        node = node.get("items", {})
    props = node.get("properties")
    if props is None:
        return []  # a free-form object (a map of models, say): nothing to name
    missing = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        where = f"{path}.{key}" if path else key
        if key not in props:
            missing.append(where)
            continue
        sub = _model_in(field.annotation)
        if sub is not None:
            missing += _keys_missing(sub, props[key], where)
    return missing


def test_the_charts_schema_names_every_setting() -> None:
    """values.schema.json is written by hand and refuses what it does not name: a setting
    added to the gateway and not to the schema could not be set through the chart."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert _keys_missing(Settings, schema["properties"]["config"], "") == []


def test_the_chart_takes_the_documented_settings_file_whole(tmp_path: Path) -> None:
    """The README says the chart's `config` is shaped exactly like config/gateway.yaml: every
    key of that file (set to its documented value) passes the schema and the gateway's check."""
    config = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text(encoding="utf-8"))
    config["server"]["host"] = "0.0.0.0"  # the chart's one constraint: Services must reach it
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": config}), encoding="utf-8")
    manifests = render("-f", str(values))
    assert settings_of(manifests, tmp_path).server.host == "0.0.0.0"
