"""The Kubernetes manifests, without a cluster: the Helm chart rendered by Helm itself, every object
checked against the Kubernetes API schemas, and the parts that run on a node run here for real.

Rendering: `helm-python-sdk` (PyPI) is Helm's Go SDK built as a shared library (its build info,
`strings libhelm_c.so | grep -E '^(dep|mod)'`, names helm.sh/helm/v4 v4.2.3, sprig v3.3.0 and
k8s.io/api v0.36.1) behind a ctypes binding. So the chart goes through the real engine: Go's
text/template, sprig, Helm's builtins (`include`, `toYaml`, `.Values`, `.Release`, `.Chart`,
`.Template`), values coalescing and values.schema.json, and `helm lint`; nothing in the chart has
to stay within what an imitation handles. The alternatives were worse: Debian 12 has no helm
binary and only PyPI, Debian and npm are reachable; a Go text/template + sprig renderer (Go 1.19
and golang-github-masterminds-sprig-dev are there) would re-implement Helm's builtins and its
values merging, so the test would check our imitation; `helm-sdkpy`, also Helm in a library,
needs Python 3.12; `kubectl --dry-run=client` still asks an API server for discovery.

Validation, two independent checks of every rendered object and of the plain manifest:
- `kubernetes-validate`: the OpenAPI-derived JSON schemas, strict (an unknown or misspelt field is
  an error), for every Kubernetes minor from the chart's kubeVersion (1.25) to 1.37;
- the `kubernetes` client's models (pydantic, client-side validation on): deserialized, serialized
  back and compared, so a field the model does not know, dropped in the round trip, fails too.

What runs on a node is run here: the daemon's config from the ConfigMap is loaded by the daemon's
own loader, the readiness probe's command is run against a real daemon (and a socket that does not
answer), and the init container's command merges into a containerd config tree that containerd
itself (`containerd config dump`) then reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
kubernetes_client = pytest.importorskip("kubernetes.client")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "packaging" / "helm" / "peersync"
MANIFEST = ROOT / "packaging" / "kubernetes" / "peersync-daemonset.yaml"
SETUP = ROOT / "packaging" / "containerd" / "containerd-setup.py"
VERSIONS = [f"1.{minor}.0" for minor in range(25, 38)]  # Chart.yaml kubeVersion >=1.25 .. latest schemas
MODELS = {"DaemonSet": "V1DaemonSet", "ConfigMap": "V1ConfigMap", "Namespace": "V1Namespace"}
BIN = str(Path(sys.executable).parent)  # `peersync` and `python3` of this checkout's virtualenv

CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "metrics-http-probes": {
        "metrics": {"enabled": True, "port": 9400, "path": "/metrics"},
        "probes": {
            "type": "http", "http": {"port": 9400, "path": "/healthz"}, "liveness": {"enabled": False},
        },
    },
    "k3s-no-init": {"containerd": {"configure": False}, "probes": {"liveness": {"timeoutSeconds": 20}}},
    "metrics-off": {"metrics": {"enabled": False}},
    "site-config": {
        "config": {
            "peer": {"peers": ["10.0.0.12:5381", "10.0.0.13:5381"], "listen": "0.0.0.0:7381"},
            "store": {"chunk_size": 4194304},
            "mirror": {"listen": "127.0.0.1:7380", "tag_ttl": 2.5},
            "origin": {"plain_http": ["registry.lan:5000"],
                       "auth": {"registry.example.com": {"username": "edge", "password": "p\"w"}}},
        },
        "containerd": {"cri": "never", "registries": ["docker.io", "registry.lan:5000"], "addImport": False},
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"example.com/site": "north"},
    },
    "other-paths": {
        "config": {"root": "/data/peersync", "socket": "/run/ps/ps.sock"},
        "containerd": {"configDir": "/opt/containerd-etc", "config": "main.toml"},
        "image": {"repository": "registry.lan:5000/edge/peersync", "tag": "0.1.0-site"},
    },
}


def render(values: dict[str, Any] | None = None, namespace: str = "peersync") -> dict[str, str]:
    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="peersync", namespace=namespace)
    return {Path(name).name: text for name, text in out.items()}


def objects(rendered: dict[str, str]) -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind (NOTES.txt is not a manifest)."""
    out: dict[str, dict[str, Any]] = {}
    for name, text in rendered.items():
        if name.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    assert doc["kind"] not in out, f"two {doc['kind']} objects"
                    out[doc["kind"]] = doc
    return out


def merged_values(case: dict[str, Any]) -> dict[str, Any]:
    with helm_python.Chart.load(str(CHART)) as chart:
        values: dict[str, Any] = chart.merge_values(case)
    return values


def check_against_schemas(obj: dict[str, Any]) -> None:
    """Strict OpenAPI schemas of every supported minor, then the client model's round trip."""
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']} invalid for Kubernetes {version}: {exc}") from None
    assert kubernetes_client.Configuration().client_side_validation
    api = kubernetes_client.ApiClient()
    model = api.deserialize(json.dumps(obj), MODELS[obj["kind"]], None)
    back = api.sanitize_for_serialization(model)
    assert back == obj, f"{obj['kind']}: the model dropped or changed fields (unknown keys?)"


# -- the chart and the plain manifest ----------------------------------------------------------


def test_chart_lints_without_warnings() -> None:
    result = helm_python.lint(str(CHART), strict=True)
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] >= 2] == []  # 2: warning, 3: error


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_objects_are_valid_kubernetes_objects(case: str) -> None:
    rendered = render(CASES[case])
    objs = objects(rendered)
    assert set(objs) == {"ConfigMap", "DaemonSet"}
    for obj in objs.values():
        check_against_schemas(obj)
    check_daemonset(objs["DaemonSet"], objs["ConfigMap"], merged_values(CASES[case]))


def check_daemonset(ds: dict[str, Any], cm: dict[str, Any], values: dict[str, Any]) -> None:
    """What the chart promises, read off the rendered objects."""
    cfg = tomllib.loads(cm["data"]["config.toml"])
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (daemon,) = spec["containers"]
    assert daemon["securityContext"]["privileged"] is True
    command = ["peersync", "daemon", "--config", "/etc/peersync/config.toml"]
    if values["metrics"]["enabled"]:  # /metrics on the node's address, not loopback, not 0.0.0.0
        command += ["--metrics-listen", f"$(PEERSYNC_NODE_IP):{values['metrics']['port']}"]
        (env,) = daemon["env"]
        assert env == {"name": "PEERSYNC_NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
    assert daemon["command"] == command
    assert daemon["resources"]["requests"] and daemon["resources"]["limits"]["memory"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in daemon["volumeMounts"]}
    # root and socket dir are hostPaths at the same paths inside, as the daemon's config says
    assert volumes["root"]["hostPath"]["path"] == mounts["root"] == cfg["root"]
    socket_dir = str(Path(cfg["socket"]).parent)
    assert volumes["socket-dir"]["hostPath"]["path"] == mounts["socket-dir"] == socket_dir
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert mounts["config"] == "/etc/peersync"
    peer_port = int(cfg["peer"]["listen"].rsplit(":", 1)[1])
    assert {"name": "peer", "containerPort": peer_port, "protocol": "TCP"} in daemon["ports"]
    annotations = pod["metadata"]["annotations"]
    if values["metrics"]["enabled"]:
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(values["metrics"]["port"])
        assert annotations["prometheus.io/path"] == values["metrics"]["path"]
        metrics_port = {"name": "metrics", "containerPort": values["metrics"]["port"], "protocol": "TCP"}
        assert metrics_port in daemon["ports"]
    else:
        assert not any(k.startswith("prometheus.io/") for k in annotations)
    probe = daemon["readinessProbe"]
    if values["probes"]["type"] == "socket":
        assert f'unix://{cfg["socket"]}' in probe["exec"]["command"][2]
        for kind in ("readiness", "liveness"):  # each call gives up before kubelet does
            if kind == "readiness" or values["probes"]["liveness"]["enabled"]:
                code = daemon[f"{kind}Probe"]["exec"]["command"][2]
                assert f'timeout={values["probes"][kind]["timeoutSeconds"] - 2})' in code
    else:
        assert probe["httpGet"] == {"host": "127.0.0.1", "port": values["probes"]["http"]["port"],
                                    "path": values["probes"]["http"]["path"]}
    assert ("livenessProbe" in daemon) == values["probes"]["liveness"]["enabled"]
    c = values["containerd"]
    if not c["configure"]:
        assert "initContainers" not in spec and "containerd-config" not in volumes
        return
    (init,) = spec["initContainers"]
    assert init["image"] == daemon["image"]
    args = dict(a.removeprefix("--").split("=", 1) for a in init["command"][3:] if "=" in a)
    base = c["configDir"]
    assert args["config"] == f"{base}/{c['config']}" and args["hosts-dir"] == f"{base}/{c['hostsDir']}"
    assert args["dropin"] == f"{base}/{c['dropinDir']}/peersync.toml" and args["cri"] == c["cri"]
    assert args["socket"] == cfg["socket"]  # the socket containerd dials is the daemon's
    mirror = cfg["mirror"]["listen"].replace("0.0.0.0:", "127.0.0.1:")
    assert args["mirror"] == f"http://{mirror}"
    assert [a.split("=", 1)[1] for a in init["command"] if a.startswith("--registry=")] == c["registries"]
    assert ("--add-import" in init["command"]) == c["addImport"]
    assert volumes["containerd-config"]["hostPath"]["path"] == base
    assert {m["mountPath"] for m in init["volumeMounts"]} == {f"/host{base}"}


def test_values_schema_rejects_what_the_chart_cannot_use() -> None:
    for bad in ({"containerd": {"crii": "auto"}}, {"probes": {"type": "tcp"}}, {"metrics": {"port": "9400"}},
                {"config": {"root": "relative/path"}}, {"image": {"repository": ""}}, {"replicas": 3}):
        with pytest.raises(helm_python.HelmValuesError):
            render(bad)


def test_configmap_is_a_config_the_daemon_loads(tmp_path: Path) -> None:
    """The chart writes TOML itself (Helm's toToml turns 1048576 into 1.048576e+06): whatever the
    values, the daemon's own loader takes the result, with the values' types."""
    from kernel import config

    values = CASES["site-config"]
    cm = objects(render(values))["ConfigMap"]
    path = tmp_path / "config.toml"
    path.write_text(cm["data"]["config.toml"])
    cfg = config.load(path)
    assert cfg.store.chunk_size == 4194304
    assert cfg.mirror.tag_ttl == 2.5 and cfg.mirror.listen == "127.0.0.1:7380"
    assert cfg.peer.peers == ["10.0.0.12:5381", "10.0.0.13:5381"]
    assert cfg.origin.auth == {"registry.example.com": {"username": "edge", "password": 'p"w'}}
    assert cfg.log.format == "json" and cfg.root == Path("/var/lib/peersync")
    helm_own = render({"config": {"store": {"chunk_size": 4194304}}})["configmap.yaml"]
    assert "chunk_size = 4194304" in helm_own


def load_renderer() -> ModuleType:
    path = ROOT / "packaging" / "kubernetes" / "render.py"
    spec = importlib.util.spec_from_file_location("k8s_render", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_manifest_is_the_chart_rendered_and_valid() -> None:
    assert MANIFEST.read_text() == load_renderer().plain_manifest(), \
        "packaging/kubernetes/peersync-daemonset.yaml is stale: run packaging/kubernetes/render.py"
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert [d["kind"] for d in docs] == ["Namespace", "ConfigMap", "DaemonSet"]
    for doc in docs:
        check_against_schemas(doc)
        labels = doc["metadata"].get("labels", {})
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/managed-by" not in labels
    ns, cm, ds = docs
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert cm["metadata"]["namespace"] == ds["metadata"]["namespace"] == ns["metadata"]["name"]
    check_daemonset(ds, cm, merged_values({}))


def test_dockerfile_provides_what_the_daemonset_runs() -> None:
    """The image is not built here (no builder, no base image offline): at least every file it
    copies exists, and it puts the commands the DaemonSet runs where the DaemonSet runs them."""
    text = (ROOT / "packaging" / "kubernetes" / "Dockerfile").read_text()
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            for source in words[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repo"
    assert "packaging/containerd/containerd-setup.py /usr/share/peersync/containerd-setup.py" in text
    assert 'ENV PATH="/opt/peersync/bin:$PATH"' in text  # `peersync` and `python3` with grpc


# -- what runs on a node -----------------------------------------------------------------------


def probe_command(socket_path: Path) -> list[str]:
    ds = objects(render({"config": {"socket": str(socket_path)}}))["DaemonSet"]
    command: list[str] = ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    return command


def run_probe(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.integration
def test_readiness_probe_passes_only_while_the_daemon_answers(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("runs the daemon (needs root)")
    from testbed.peersyncd import start_peersync

    with start_peersync(tmp_path / "node") as daemon:
        command = probe_command(daemon.socket)
        ok = run_probe(command)
        assert ok.returncode == 0, ok.stderr
    gone = run_probe(command)
    assert gone.returncode != 0 and "UNAVAILABLE" in gone.stderr
    # a socket that accepts connections but never speaks: a hung daemon
    silent = Path(f"/tmp/ps-probe-{os.getpid()}.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(silent))
        sock.listen(16)
        try:
            hung = run_probe(probe_command(silent))
        finally:
            silent.unlink()
    assert hung.returncode != 0, hung.stderr


def init_command(host_root: Path, values: dict[str, Any] | None = None) -> list[str]:
    """The init container's command from the rendered DaemonSet, run with this checkout's script,
    interpreter and `peersync`, the node's / being `host_root`."""
    ds = objects(render(values or {}))["DaemonSet"]
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    command: list[str] = init["command"]
    assert command[:2] == ["python3", "/usr/share/peersync/containerd-setup.py"]
    rest = [f"--host-root={host_root}" if a == "--host-root=/host" else a for a in command[2:]]
    return [sys.executable, str(SETUP), *rest]


def run_setup(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


DEBIAN_CONFIG = """\
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
"""
USER_HOSTS = """\
server = "https://registry-1.docker.io"

[host."https://mirror.corp"]
  capabilities = ["pull"]
"""


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_init_step_merges_into_containerd_config_and_hosts_never_clobbering(tmp_path: Path) -> None:
    host = tmp_path / "node"
    etc = host / "etc" / "containerd"
    (etc / "certs.d" / "docker.io").mkdir(parents=True)
    (etc / "config.toml").write_text(DEBIAN_CONFIG)
    (etc / "certs.d" / "docker.io" / "hosts.toml").write_text(USER_HOSTS)
    command = init_command(host, {"containerd": {"registries": ["_default", "docker.io"]}})
    first = run_setup(command)
    assert first.returncode == 0, first.stderr
    # The Debian config sets CRI cni dirs: a drop-in CRI section would hide them, so it stays out.
    assert "CRI left out of the drop-in" in first.stdout and "cni.bin_dir" in first.stdout
    dropin = (etc / "conf.d" / "peersync.toml").read_text()
    assert "io.containerd.grpc.v1.cri" not in dropin
    assert 'address = "/run/peersync/peersync.sock"' in dropin
    config = (etc / "config.toml").read_text()
    line = 'imports = ["/etc/containerd/conf.d/*.toml"]\n'
    assert config == DEBIAN_CONFIG.replace("version = 2\n\n", f"version = 2\n\n{line}")
    user = tomllib.loads((etc / "certs.d" / "docker.io" / "hosts.toml").read_text())
    assert list(user["host"]) == ["http://127.0.0.1:5380", "https://mirror.corp"]
    assert user["server"] == "https://registry-1.docker.io"
    assert list(tomllib.loads((etc / "certs.d" / "_default" / "hosts.toml").read_text())["host"]) == [
        "http://127.0.0.1:5380"]
    before = snapshot(host)
    again = run_setup(command)  # every pod start runs it: nothing changes the second time
    assert again.returncode == 0, again.stderr
    assert snapshot(host) == before and "restart containerd" not in again.stdout
    # taken off again by hand: the user's hosts.toml byte for byte, our files gone
    remove = [sys.executable, str(SETUP), "remove", f"--host-root={host}"]
    removed = run_setup(remove)
    assert removed.returncode == 0, removed.stderr
    assert (etc / "certs.d" / "docker.io" / "hosts.toml").read_text() == USER_HOSTS
    assert not (etc / "certs.d" / "_default").exists() and not (etc / "conf.d" / "peersync.toml").exists()


def test_init_step_refuses_what_is_not_its_own(tmp_path: Path) -> None:
    host = tmp_path / "node"
    etc = host / "etc" / "containerd"
    (etc / "conf.d").mkdir(parents=True)
    own_imports = 'version = 2\nimports = ["/etc/containerd/extra.toml"]\n'
    (etc / "config.toml").write_text(own_imports)
    refused = run_setup(init_command(host))
    assert refused.returncode == 2 and "add it to that list by hand" in refused.stderr
    assert (etc / "config.toml").read_text() == own_imports
    (etc / "conf.d" / "peersync.toml").write_text("# mine\nversion = 2\n")
    refused = run_setup(init_command(host))
    assert refused.returncode == 2 and "not written by peersync" in refused.stderr
    assert (etc / "conf.d" / "peersync.toml").read_text() == "# mine\nversion = 2\n"


@pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd reads the result")
@pytest.mark.parametrize("debian_config", [True, False], ids=["own-cri-settings", "no-cri-settings"])
def test_containerd_reads_what_the_init_step_wrote(tmp_path: Path, debian_config: bool) -> None:
    """`containerd config dump` (containerd's own loader and import merging) of the result: the
    plugins are there, CRI points at peersync only when that hides none of the user's settings."""
    etc = tmp_path / "etc-containerd"
    etc.mkdir()
    if debian_config:
        (etc / "config.toml").write_text(DEBIAN_CONFIG)
    values = {"containerd": {"configDir": str(etc)}}
    command = [a for a in init_command(Path("/"), values) if not a.startswith("--registry=")]
    done = run_setup(command)
    assert done.returncode == 0, done.stderr
    dumped = subprocess.run(["containerd", "--config", str(etc / "config.toml"), "config", "dump"],
                            capture_output=True, text=True, check=True).stdout
    cfg = tomllib.loads(dumped)
    assert cfg["proxy_plugins"]["peersync"] == {"type": "snapshot", "address": "/run/peersync/peersync.sock"}
    assert cfg["proxy_plugins"]["peersync-content"]["type"] == "content"
    assert "io.containerd.content.v1.content" in cfg["disabled_plugins"]
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    if debian_config:  # untouched: the user's cni dir and containerd's default snapshotter
        assert cri["cni"]["bin_dir"] == "/usr/lib/cni" and cri["containerd"]["snapshotter"] == "overlayfs"
    else:
        assert cri["containerd"]["snapshotter"] == "peersync"
        assert cri["containerd"]["disable_snapshot_annotations"] is False
        assert cri["registry"]["config_path"] == f"{etc}/certs.d"

