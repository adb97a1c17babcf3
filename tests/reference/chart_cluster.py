"""Runs what the Helm chart renders as processes on this machine, as Kubernetes would run it.

Driven by ``tests/tests/helm_chart.rs``. ``helm template`` renders the chart; every Deployment
and StatefulSet becomes its pods, and every container of a pod a process started from the
container's own ``command``, ``args``, ``env`` and volumes, nothing else:

- each pod gets its own loopback address (``--net``.10 and up) as its pod IP: what a container
  binds on ``0.0.0.0`` it binds on its pod's address, as in its own network namespace;
- cluster DNS names (``svc``, ``svc.ns``, ``svc.ns.svc.<domain>``, ``pod.headless-svc...``)
  are replaced in arguments and environment values by the address they resolve to;
- ``$(VAR)`` in command and args expands from the container's env; env ``fieldRef``s give
  the pod's name, namespace, IP and labels (``apps.kubernetes.io/pod-index`` included);
- volumes become folders: emptyDir, Secret and ConfigMap files (from the rendered objects,
  with their ``items``), hostPath; a mount path in an argument becomes its folder;
- ``helios``, ``helios-worker`` and ``etcd`` run from ``--bin-dir`` and ``--etcd``; a container
  that exits is restarted (restartPolicy Always), and counted;
- each ClusterIP Service gets an address (``--net``.2 and up) and a TCP proxy per port to a ready
  pod its selector picks, at the named ``targetPort``; readiness is the container's own
  readinessProbe (httpGet or tcpSocket), probed every 0.5 s.

Then the scenario: wait for the API pod to be ready, run ``--requests`` greedy prompts through
the Service's gRPC port (the baseline), run them again in ``--streams`` concurrent streams
while pod ``--kill`` is killed (SIGKILL) and recreated (``--restart new-ip``: a new pod of the
same name with a new address, as a StatefulSet recreates a deleted pod; ``same-ip``: its
container restarted in place), and record every answer, and what the API pod's liveness and
readiness probes said meanwhile. It never judges: it prints one JSON object and the test
checks it.

Usage: chart_cluster.py --helm HELM --chart DIR --values FILE [--set K=V ...] --bin-dir DIR
                        --etcd ETCD --workdir DIR --kill POD [--restart new-ip|same-ip]
                        [--net 127.0.N] [--tokens N]
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from base64 import b64decode

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak import Api  # noqa: E402  (the gRPC client built by reflection)

NAMESPACE = "helios-test"
RELEASE = "demo"
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colours are",
    "Water boils at",
    "My favourite animal is",
]
READY_TIMEOUT = 240
STREAM_TIMEOUT = 180
MAX_RESTARTS = 20


def render(args):
    cmd = [args.helm, "template", RELEASE, args.chart, "--namespace", NAMESPACE, "-f", args.values]
    for s in args.set:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"helm template failed: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class Addresses:
    """Loopback addresses in `net` (e.g. 127.0.10): pods from .10, Services from .2."""

    def __init__(self, net):
        self.net = net
        self.next_pod = 10
        self.next_service = 2

    def pod(self):
        self.next_pod += 1
        if self.next_pod > 255:
            sys.exit("out of pod addresses")
        return f"{self.net}.{self.next_pod - 1}"

    def service(self):
        self.next_service += 1
        if self.next_service > 9:
            sys.exit("more than 8 ClusterIP Services")
        return f"{self.net}.{self.next_service - 1}"


class Dns:
    """Cluster DNS names and what they resolve to, applied as text replacements."""

    def __init__(self, domain):
        self.domain = domain
        self.names = {}

    def add(self, name, ip):
        for n in (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc",
                  f"{name}.{NAMESPACE}.svc.{self.domain}"):
            self.names[n] = ip

    def add_pod(self, pod, service, ip):
        # Only the qualified forms: a bare pod name is not a DNS name.
        base = f"{pod}.{service}"
        for n in (f"{base}.{NAMESPACE}", f"{base}.{NAMESPACE}.svc",
                  f"{base}.{NAMESPACE}.svc.{self.domain}"):
            self.names[n] = ip

    def resolve(self, text):
        for name in sorted(self.names, key=len, reverse=True):
            text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.\w)", self.names[name], text)
        return text


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


class Pod:
    def __init__(self, name, template, labels, ip, cluster):
        self.name = name
        self.spec = template["spec"]
        self.labels = dict(labels)
        self.ip = ip
        self.cluster = cluster
        self.dir = os.path.join(cluster.workdir, "pods", name)
        self.processes = {}
        self.restarts = 0
        self.stopped = False
        self.is_ready = False  # the kubelet's last readiness verdict
        os.makedirs(self.dir, exist_ok=True)
        self.mounts = self.make_volumes()

    # -- volumes -------------------------------------------------------------------------
    def make_volumes(self):
        folders = {}
        for vol in self.spec.get("volumes", []):
            name = vol["name"]
            path = os.path.join(self.dir, "volumes", name)
            if "emptyDir" in vol:
                os.makedirs(path, exist_ok=True)
            elif "secret" in vol:
                obj = self.cluster.object("Secret", vol["secret"]["secretName"])
                data = {k: b64decode(v) for k, v in (obj.get("data") or {}).items()}
                data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
                self.write_files(path, data, vol["secret"])
            elif "configMap" in vol:
                obj = self.cluster.object("ConfigMap", vol["configMap"]["name"])
                data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
                self.write_files(path, data, vol["configMap"])
            elif "hostPath" in vol:
                path = vol["hostPath"]["path"]
            elif "persistentVolumeClaim" in vol:
                sys.exit(f"pod {self.name}: a PVC cannot be emulated; use model.source hostPath")
            else:
                sys.exit(f"pod {self.name}: volume {vol} cannot be emulated")
            folders[name] = path
        return folders

    @staticmethod
    def write_files(path, data, source):
        os.makedirs(path, exist_ok=True)
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        mode = source.get("defaultMode", 0o644)
        for item in items:
            if item["key"] not in data:
                sys.exit(f"key {item['key']} missing from {source}")
            file = os.path.join(path, item["path"])
            with open(file, "wb") as f:
                f.write(data[item["key"]])
            # The owner keeps write access so that the test can clean up.
            os.chmod(file, mode | 0o200)

    def mount_map(self, container):
        """Container paths to host folders, longest first."""
        pairs = []
        for m in container.get("volumeMounts", []):
            if m["mountPath"] == "/dev/shm":
                continue  # the host's own
            pairs.append((m["mountPath"], self.mounts[m["name"]]))
        return sorted(pairs, key=lambda p: len(p[0]), reverse=True)

    # -- env, args -----------------------------------------------------------------------
    def env(self, container):
        env = {}
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = str(e["value"])
                continue
            ref = e.get("valueFrom", {})
            if "fieldRef" in ref:
                env[e["name"]] = self.field(ref["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                env[e["name"]] = b64decode(self.cluster.object("Secret", r["name"])["data"][r["key"]]).decode()
            else:
                sys.exit(f"{self.name}: env {e} cannot be emulated")
        return env

    def field(self, path):
        m = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        if m:
            return self.labels[m.group(1)]
        fields = {"metadata.name": self.name, "metadata.namespace": NAMESPACE, "status.podIP": self.ip}
        if path not in fields:
            sys.exit(f"{self.name}: fieldRef {path} cannot be emulated")
        return fields[path]

    def localize(self, text, env, mounts):
        text = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)
        text = self.cluster.dns.resolve(text)
        text = text.replace("0.0.0.0", self.ip)
        if mounts:  # one pass: a folder put in must not be matched again
            pattern = "|".join(re.escape(m) for m, _ in mounts)
            hosts = dict(mounts)
            text = re.sub(rf"(?<![\w/])({pattern})(?=/|$|[^\w])", lambda m: hosts[m.group(1)], text)
        return text

    def argv(self, container):
        env = self.env(container)
        mounts = self.mount_map(container)
        words = [self.localize(w, env, mounts) for w in container.get("command", []) + container.get("args", [])]
        if not words:
            sys.exit(f"{self.name}: container {container['name']} has no command")
        words[0] = self.cluster.binary(words[0])
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.dir, "HOSTNAME": self.name}
        base.update({k: self.localize(v, env, mounts) for k, v in env.items()})
        return words, base

    # -- processes -----------------------------------------------------------------------
    def start(self):
        if self.spec.get("initContainers"):
            sys.exit(f"{self.name}: init containers are not emulated")
        self.stopped = False
        for c in self.spec["containers"]:
            self.start_container(c)

    def start_container(self, container):
        argv, env = self.argv(container)
        log = open(os.path.join(self.dir, f"{container['name']}.log"), "ab")
        log.write(f"== start {time.time():.1f} {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.processes[container["name"]] = (proc, container)

    def supervise(self):
        """restartPolicy Always: a container that exited starts again."""
        if self.stopped:
            return
        for name, (proc, container) in list(self.processes.items()):
            if proc.poll() is not None and self.restarts < MAX_RESTARTS:
                self.restarts += 1
                time.sleep(0.5)
                self.start_container(container)

    def kill(self):
        self.stopped = True
        for proc, _ in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def terminate(self, grace):
        self.stopped = True
        for proc, _ in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + grace
        for proc, _ in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # -- probes --------------------------------------------------------------------------
    def port(self, port):
        if isinstance(port, int):
            return port
        for c in self.spec["containers"]:
            for p in c.get("ports", []):
                if p.get("name") == port:
                    return p["containerPort"]
        sys.exit(f"{self.name}: no container port named {port}")

    def probe(self, kind):
        """None if the pod's first container has no such probe; else whether it passes."""
        probe = self.spec["containers"][0].get(kind)
        if probe is None:
            return None
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                url = f"http://{self.ip}:{self.port(get['port'])}{get.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=1) as r:
                    return 200 <= r.status < 400
            if "tcpSocket" in probe:
                with socket.create_connection((self.ip, self.port(probe["tcpSocket"]["port"])), timeout=1):
                    return True
        except OSError:
            return False
        sys.exit(f"{self.name}: probe {probe} cannot be emulated")

    def ready(self):
        alive = all(p.poll() is None for p, _ in self.processes.values())
        return alive and self.probe("readinessProbe") is not False


class Proxy:
    """A ClusterIP Service's port: TCP to a ready pod of its selector."""

    def __init__(self, cluster, ip, port, selector, target):
        self.cluster, self.selector, self.target = cluster, selector, target
        self.sock = socket.create_server((ip, port))
        self.connections = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def backend(self):
        for pod in self.cluster.pods.values():
            if matches(self.selector, pod.labels) and pod.is_ready:
                return pod.ip, pod.port(self.target)
        return None

    def accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            backend = self.backend()
            if backend is None:
                client.close()  # no endpoints: refused, as kube-proxy does
                continue
            try:
                upstream = socket.create_connection(backend, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # a stream may be silent while its replica recovers
            self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Cluster:
    def __init__(self, args, objects):
        self.args = args
        self.objects = objects
        self.workdir = args.workdir
        self.addresses = Addresses(args.net)
        self.dns = Dns(args.cluster_domain)
        self.pods = {}
        self.proxies = []
        self.service_ips = {}
        self.stop = threading.Event()

    def object(self, kind, name):
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        sys.exit(f"no {kind} {name} in the rendered chart")

    def binary(self, command):
        known = {"helios": os.path.join(self.args.bin_dir, "helios"),
                 "helios-worker": os.path.join(self.args.bin_dir, "helios-worker"),
                 "etcd": self.args.etcd}
        if command not in known:
            sys.exit(f"command {command} cannot be emulated")
        return known[command]

    def workloads(self):
        """(pod name, template, labels) of every pod the controllers would make."""
        for o in self.objects:
            kind, name, spec = o["kind"], o["metadata"]["name"], o.get("spec", {})
            template = spec.get("template")
            labels = (template or {}).get("metadata", {}).get("labels", {})
            if kind == "Deployment":
                for i in range(spec.get("replicas", 1)):
                    yield f"{name}-{i:05x}", template, labels, None
            elif kind == "StatefulSet":
                for i in range(spec.get("replicas", 1)):
                    yield f"{name}-{i}", template, {**labels, "apps.kubernetes.io/pod-index": str(i)}, spec["serviceName"]

    def start(self):
        planned = list(self.workloads())
        # Names first: every pod's arguments may name any other pod or Service.
        ips = {}
        for name, _, _, headless in planned:
            ips[name] = self.addresses.pod()
            if headless:
                self.dns.add_pod(name, headless, ips[name])
        for o in self.objects:
            if o["kind"] != "Service":
                continue
            name, spec = o["metadata"]["name"], o["spec"]
            if spec.get("clusterIP") == "None":
                backing = [ips[n] for n, _, labels, _ in planned if matches(spec["selector"], labels)]
                if backing:
                    self.dns.add(name, backing[0])
            else:
                ip = self.addresses.service()
                self.service_ips[name] = ip
                self.dns.add(name, ip)
                for p in spec["ports"]:
                    self.proxies.append(Proxy(self, ip, p["port"], spec["selector"], p["targetPort"]))
        for name, template, labels, _ in planned:
            pod = Pod(name, template, labels, ips[name], self)
            self.pods[name] = pod
            pod.start()
        threading.Thread(target=self.kubelet, daemon=True).start()

    def kubelet(self):
        while not self.stop.is_set():
            for pod in list(self.pods.values()):
                pod.supervise()
                pod.is_ready = pod.ready()
            time.sleep(0.5)

    def recreate(self, name, new_ip):
        old = self.pods[name]
        old.kill()
        time.sleep(1.0)  # the controller notices, the scheduler places the new pod
        ip = self.addresses.pod() if new_ip else old.ip
        template = {"spec": old.spec}
        pod = Pod(name, template, old.labels, ip, self)
        pod.restarts = old.restarts
        self.pods[name] = pod
        pod.start()
        return ip

    def shutdown(self):
        self.stop.set()
        for pod in self.pods.values():
            pod.terminate(5)
        for p in self.proxies:
            p.sock.close()

    def logs(self, lines=30):
        out = {}
        for pod in self.pods.values():
            for c in pod.spec["containers"]:
                path = os.path.join(pod.dir, f"{c['name']}.log")
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        out[f"{pod.name}/{c['name']}"] = f.read().decode(errors="replace").splitlines()[-lines:]
        return out


def api_pod(cluster):
    for pod in cluster.pods.values():
        if pod.labels.get("app.kubernetes.io/component") in ("server", "coordinator"):
            return pod
    sys.exit("no API pod")


def run(api, prompt, tokens, started=None):
    """The greedy answer to `prompt` through a stream; `started` is set at its first token."""
    req = api.request(parameters={"max_new_tokens": tokens, "ignore_eos": True}, prompt=prompt)
    ids, finish = [], 0
    for resp in api.stream(req, timeout=STREAM_TIMEOUT):
        ids.extend(resp.token_ids)
        finish = resp.finish_reason or finish
        if started is not None:
            started.set()
    return ids, api.reason(finish)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--helm", required=True)
    p.add_argument("--chart", required=True)
    p.add_argument("--values", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--etcd", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--kill", required=True, help="the pod to kill, e.g. demo-helios-worker-1")
    p.add_argument("--restart", choices=["new-ip", "same-ip"], default="new-ip")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--cluster-domain", default="cluster.local")
    p.add_argument("--net", default="127.0.10", help="the loopback /24 the pods and Services get")
    args = p.parse_args()

    objects = render(args)
    cluster = Cluster(args, objects)
    result = {"objects": sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)}
    try:
        cluster.start()
        result["pods"] = {n: pod.ip for n, pod in cluster.pods.items()}
        server = api_pod(cluster)
        started = time.time()
        while not server.is_ready and time.time() - started < READY_TIMEOUT:
            time.sleep(0.5)
        result["ready_s"] = round(time.time() - started, 1)
        result["ready"] = server.is_ready
        if not server.is_ready:
            return result
        service = api_pod_service(cluster, server)
        grpc_port = next(p for p in cluster.object("Service", service)["spec"]["ports"] if p["name"] == "grpc")["port"]
        result["service"] = f"{cluster.service_ips[service]}:{grpc_port}"
        api = Api(result["service"])
        result["baseline"] = [run(api, prompt, args.tokens) for prompt in PROMPTS]
        result.update(disrupted(cluster, api, server, args))
        result["proxied_connections"] = sum(p.connections for p in cluster.proxies)
        result["restarts"] = {n: pod.restarts for n, pod in cluster.pods.items()}
    finally:
        result["logs"] = cluster.logs()
        cluster.shutdown()
    return result


def api_pod_service(cluster, pod):
    for o in cluster.objects:
        spec = o.get("spec", {})
        if o["kind"] == "Service" and spec.get("clusterIP") != "None" and matches(spec["selector"], pod.labels):
            return o["metadata"]["name"]
    sys.exit("no Service selects the API pod")


def disrupted(cluster, api, server, args):
    """The prompts again, concurrently, while a pod is killed and comes back."""
    answers = [None] * len(PROMPTS)
    failures = []
    started = [threading.Event() for _ in PROMPTS]

    def one(i):
        try:
            answers[i] = run(api, PROMPTS[i], args.tokens, started[i])
        except Exception as e:  # noqa: BLE001 (a failure is what we record)
            failures.append(f"{PROMPTS[i]!r}: {e}")

    probes = {"live_failures": 0, "ready_false": 0, "samples": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            probes["samples"] += 1
            if server.probe("livenessProbe") is False:
                probes["live_failures"] += 1
            if server.probe("readinessProbe") is False:
                probes["ready_false"] += 1
            time.sleep(0.25)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for e in started:  # every stream is under way
        e.wait(STREAM_TIMEOUT)
    in_flight = sum(1 for a in answers if a is None)
    killed_at = time.time()
    new_ip = cluster.recreate(args.kill, args.restart == "new-ip")
    for t in threads:
        t.join(STREAM_TIMEOUT + 10)
    finished = time.time() - killed_at
    # Readiness must come back once the replica has recovered.
    deadline = time.time() + 60
    while server.probe("readinessProbe") is False and time.time() < deadline:
        time.sleep(0.5)
    stop.set()
    watcher.join()
    return {
        "disrupted": answers,
        "failures": failures,
        "killed": args.kill,
        "in_flight_at_kill": in_flight,
        "killed_pod_new_ip": new_ip,
        "finished_after_kill_s": round(finished, 1),
        "probes": probes,
        "ready_after": server.probe("readinessProbe"),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
