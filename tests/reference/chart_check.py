"""What the Helm chart renders, read as Kubernetes and as our binaries would read it.

Driven by ``tests/tests/helm_chart.rs``; it never judges, it prints one JSON object.

``render``: for each values file, ``helm lint --strict`` and ``helm template``, then
``kubernetes-validate --strict`` of every object against Kubernetes 1.30 and the newest schemas
it ships, and what the objects say, as ``problems`` (each a sentence):

- every pod and container runs restricted: non-root, read-only root filesystem, no privilege
  escalation, every capability dropped;
- every ``--flag`` a container passes to ``helios`` or ``helios-worker`` is one that binary's
  ``--help`` (of its subcommand) lists: a renamed flag shows here;
- an API container has a startup probe, readiness on ``/health`` and liveness on ``/live``, and
  its pod's termination grace exceeds its ``--shutdown-grace``;
- ``/dev/shm`` is a memory-backed emptyDir; GPU limits are what the topology needs;
- Services, NetworkPolicies and ServiceMonitors select pods that exist, on ports they name.

``refuse``: each case of bad values (``--set``s) run through ``helm template``: refused or not,
and Helm's message.

Usage: chart_check.py --helm HELM --chart DIR --bin-dir DIR render VALUES...
       chart_check.py --helm HELM --chart DIR --bin-dir DIR refuse
"""

import argparse
import json
import os
import re
import subprocess
import sys

import yaml

RELEASE = "demo"
NAMESPACE = "llm"
# The schemas kubernetes-validate ships; "newest" is its default version.
KUBERNETES = ["1.30.0", None]
# Objects of these kinds are custom resources: no schema ships with Kubernetes.
CUSTOM_KINDS = {"ServiceMonitor", "ScaledObject"}

# (name, --set arguments): values the chart must refuse, each with a word its message names.
BAD_VALUES = [
    ("tp zero", ["tp=0"], "tp"),
    ("unknown topology", ["topology=sideways"], "topology"),
    ("a typo'd key", ["replicas=3"], "replicas"),
    ("a PVC without a claim", ["model.source=pvc"], "claimName"),
    ("a hostPath without a path", ["model.source=hostPath"], "hostPath"),
    ("a model path out of its volume", ["model.path=../etc/passwd"], "path"),
    ("an absolute model path", ["model.path=/etc/passwd"], "path"),
    ("a port out of range", ["ports.grpc=70000"], "grpc"),
    ("a bad /dev/shm size", ["shm.size=lots"], "size"),
    ("autoscaling multi-pod", ["topology=multi-pod", "autoscaling.enabled=true"], "topology"),
    ("two coordinators", ["topology=multi-pod", "server.pods=2"], "pods"),
    ("external etcd without endpoints", ["topology=multi-pod", "etcd.bundled=false"], "endpoints"),
    ("an etcd endpoint without a scheme",
     ["topology=multi-pod", "etcd.bundled=false", "etcd.endpoints={etcd:2379}"], "endpoints"),
    ("an etcd user without a password",
     ["topology=multi-pod", "etcd.bundled=false", "etcd.endpoints={http://etcd:2379}", "etcd.user=helios"],
     "passwordSecret"),
    ("client certificates without TLS", ["tls.clientCaSecret=clients"], "secretName"),
    ("metrics behind keys without keys", ["apiKeys.protectMetrics=true"], "protectMetrics"),
    ("fewer max pods than min", ["autoscaling.enabled=true", "autoscaling.minPods=5",
                                  "autoscaling.maxPods=2"], "minPods"),
    ("an unknown membership", ["topology=multi-pod", "membership=gossip"], "membership"),
    ("a placement typo", ["worker.placement=spreaded"], "placement"),
]


def helm(args, *cmd):
    out = subprocess.run([args.helm, *cmd], capture_output=True, text=True, check=False)
    # Helm warns about the chart's link to scripts/fetch-model.sh on every load; not a problem.
    stderr = "\n".join(l for l in out.stderr.splitlines() if "found symbolic link in path" not in l)
    return out.returncode, out.stdout, stderr


def validate(args, rendered):
    """kubernetes-validate's complaints per version, custom kinds aside."""
    path = os.path.join(args.workdir, "rendered.yaml")
    with open(path, "w") as f:
        f.write(rendered)
    found = {}
    for version in KUBERNETES:
        cmd = [args.kubernetes_validate, "--strict", "--quiet"]
        if version:
            cmd += ["-k", version]
        cmd.append(path)
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
        found[version or "newest"] = [l for l in lines if not any(f"kind {k} " in l for k in CUSTOM_KINDS)]
    return found


class Flags:
    """The flags each binary (and subcommand) documents in its --help."""

    def __init__(self, bin_dir):
        self.bin_dir = bin_dir
        self.cache = {}

    def known(self, command, sub):
        key = (command, sub)
        if key not in self.cache:
            argv = [os.path.join(self.bin_dir, command)] + ([sub] if sub else []) + ["--help"]
            text = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            self.cache[key] = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", text))
        return self.cache[key]


def pods_of(objects):
    """(object, pod template spec, pod labels) of every workload."""
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            t = o["spec"]["template"]
            yield o, t["spec"], t["metadata"].get("labels", {})


def arg_value(args, flag):
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_container(problems, where, c, flags):
    sc = c.get("securityContext") or {}
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: the root filesystem is writable")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: privilege escalation is allowed")
    if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
        problems.append(f"{where}: capabilities are not all dropped")
    command = (c.get("command") or [None])[0]
    if command in ("helios", "helios-worker"):
        args = c.get("args", [])
        sub = args[0] if command == "helios" and args and not args[0].startswith("-") else None
        known = flags.known(command, sub)
        for a in args:
            if a.startswith("--") and a.split("=", 1)[0] not in known:
                problems.append(f"{where}: {command} {sub or ''} has no flag {a.split('=', 1)[0]}")


def check_pod(problems, o, spec):
    where = f"{o['kind']}/{o['metadata']['name']}"
    psc = spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
        problems.append(f"{where}: the pod may run as root")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec.get("initContainers", []) + spec["containers"]:
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                problems.append(f"{where}: mount of a missing volume {m['name']}")
            elif m["mountPath"] == "/dev/shm" and (volumes[m["name"]].get("emptyDir") or {}).get("medium") != "Memory":
                problems.append(f"{where}: /dev/shm is not memory")
    c = spec["containers"][0]
    args = c.get("args", [])
    if (c.get("command") or [None])[0] == "helios":
        for probe, path in (("startupProbe", "/live"), ("readinessProbe", "/health"), ("livenessProbe", "/live")):
            got = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
            if got != path:
                problems.append(f"{where}: {probe} is on {got}, not {path}")
        grace = arg_value(args, "--shutdown-grace")
        if grace is None or spec.get("terminationGracePeriodSeconds", 30) <= int(grace):
            problems.append(f"{where}: termination grace {spec.get('terminationGracePeriodSeconds')} "
                            f"does not exceed --shutdown-grace {grace}")
    gpus = ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
    return gpus


def check_selectors(problems, objects, pods):
    def ports_of(labels_match):
        names = set()
        for _, spec, labels in pods:
            if labels_match(labels):
                for c in spec["containers"]:
                    names |= {p["name"] for p in c.get("ports", []) if "name" in p}
        return names

    def selects(selector):
        return lambda labels: all(labels.get(k) == v for k, v in selector.items())

    services = {}
    for o in objects:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Service":
            services[o["metadata"]["name"]] = o
            ports = ports_of(selects(o["spec"]["selector"]))
            if not ports:
                problems.append(f"{name}: selects no pod")
            for p in o["spec"]["ports"]:
                if isinstance(p["targetPort"], str) and p["targetPort"] not in ports:
                    problems.append(f"{name}: no pod port named {p['targetPort']}")
        elif o["kind"] == "NetworkPolicy":
            sel = o["spec"]["podSelector"]["matchLabels"]
            ports = ports_of(selects(sel))
            if not ports:
                problems.append(f"{name}: selects no pod")
            for rule in o["spec"].get("ingress", []):
                for p in rule.get("ports", []):
                    if isinstance(p["port"], str) and p["port"] not in ports:
                        problems.append(f"{name}: no pod port named {p['port']}")
                for peer in rule.get("from", []):
                    if "podSelector" in peer and not ports_of(selects(peer["podSelector"]["matchLabels"])):
                        problems.append(f"{name}: a peer selector matches no pod")
    for o in objects:
        if o["kind"] == "ServiceMonitor":
            sel = o["spec"]["selector"]["matchLabels"]
            matched = [s for s in services.values()
                       if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())]
            if not matched:
                problems.append("ServiceMonitor: selects no Service")
            for e in o["spec"]["endpoints"]:
                if not any(e["port"] == p["name"] for s in matched for p in s["spec"]["ports"]):
                    problems.append(f"ServiceMonitor: no Service port named {e['port']}")


def render(args):
    flags = Flags(args.bin_dir)
    report = {}
    for values in args.values:
        entry = {}
        code, out, err = helm(args, "lint", "--strict", args.chart, "-f", values)
        entry["lint"] = {"ok": code == 0, "output": (out + err)[-2000:]}
        code, rendered, err = helm(args, "template", RELEASE, args.chart, "-f", values, "--namespace", NAMESPACE)
        if code != 0:
            entry["template_error"] = err
            report[os.path.basename(values)] = entry
            continue
        objects = [d for d in yaml.safe_load_all(rendered) if d]
        entry["objects"] = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
        entry["validate"] = validate(args, rendered)
        problems = []
        pods = list(pods_of(objects))
        gpus = {}
        rendered_names = {(o["kind"], o["metadata"]["name"]) for o in objects}
        external = set()
        for o, spec, _ in pods:
            for c in spec.get("initContainers", []) + spec["containers"]:
                check_container(problems, f"{o['kind']}/{o['metadata']['name']}/{c['name']}", c, flags)
            gpus[f"{o['kind']}/{o['metadata']['name']}"] = check_pod(problems, o, spec)
            for v in spec.get("volumes", []):
                if "secret" in v and ("Secret", v["secret"]["secretName"]) not in rendered_names:
                    external.add(v["secret"]["secretName"])
                if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in rendered_names:
                    problems.append(f"ConfigMap {v['configMap']['name']} is not rendered")
        check_selectors(problems, objects, pods)
        entry["gpus"] = gpus
        entry["replicas"] = {f"{o['kind']}/{o['metadata']['name']}": o["spec"].get("replicas")
                             for o, _, _ in pods}
        entry["external_secrets"] = sorted(external)
        entry["problems"] = problems
        report[os.path.basename(values)] = entry
    return report


def refuse(args):
    report = {}
    for name, sets, word in BAD_VALUES:
        cmd = ["template", RELEASE, args.chart]
        for s in sets:
            cmd += ["--set", s]
        code, _, err = helm(args, *cmd)
        report[name] = {"refused": code != 0, "message": err.strip()[-600:], "names": word}
    return report


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--helm", required=True)
    p.add_argument("--chart", required=True)
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--kubernetes-validate",
                   default=os.path.join(os.path.dirname(sys.executable), "kubernetes-validate"))
    p.add_argument("mode", choices=["render", "refuse"])
    p.add_argument("values", nargs="*")
    args = p.parse_args()
    print(json.dumps(render(args) if args.mode == "render" else refuse(args)))


if __name__ == "__main__":
    main()
