//! The Helm chart `deploy/helm/helios`, checked with real Helm (`scripts/install-helm.sh`), the
//! Kubernetes schemas of `kubernetes-validate`, our own binaries, and a cluster run from what
//! it renders:
//! - every values file of `deploy/helm/helios/ci/` lints (`--strict`), renders, validates
//!   against Kubernetes 1.30 and the newest schemas, and passes `tests/reference/chart_check.py`
//!   (restricted pods, flags the binaries know, probes, grace, selectors and ports);
//! - bad values are refused by Helm, naming the value;
//! - the multi-pod manifests run as processes here (`tests/reference/chart_cluster.py`): etcd,
//!   three worker pods and the coordinator, requests through the Service's port, and a worker
//!   pod killed and recreated while requests stream: none fails, each gives the tokens of an
//!   undisturbed run.

use std::path::PathBuf;

use helios_tests::{binary, make_tiny_model, reference_json, repo_root, TP3_MODEL};
use serde_json::Value;

fn chart() -> PathBuf {
    repo_root().join("deploy/helm/helios")
}

/// Helm: `$HELIOS_HELM`, else the one `scripts/install-helm.sh` puts in `.tools/`.
fn helm() -> String {
    let path = std::env::var("HELIOS_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".tools/helm"));
    assert!(
        path.is_file(),
        "no helm at {} (run scripts/install-helm.sh, or set HELIOS_HELM)",
        path.display()
    );
    path.display().to_string()
}

fn bin_dir() -> String {
    let helios = binary("helios");
    helios
        .parent()
        .expect("the binaries' folder")
        .display()
        .to_string()
}

/// `chart_check.py MODE [VALUES...]`'s report.
fn chart_check(mode: &str, values: &[PathBuf]) -> Value {
    let work = tempfile::tempdir().expect("tempdir");
    let helm = helm();
    let bins = bin_dir();
    let chart = chart().display().to_string();
    let workdir = work.path().display().to_string();
    let mut args = vec![
        "--helm",
        &helm,
        "--chart",
        &chart,
        "--bin-dir",
        &bins,
        "--workdir",
        &workdir,
        mode,
    ];
    let values: Vec<String> = values.iter().map(|v| v.display().to_string()).collect();
    args.extend(values.iter().map(String::as_str));
    reference_json("chart_check.py", &args)
}

fn ci_values() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .expect("deploy/helm/helios/ci")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

#[test]
fn every_example_lints_renders_validates_and_matches_the_binaries() {
    let files = ci_values();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for wanted in [
        "minimal-values.yaml",
        "cpu-single-pod-values.yaml",
        "gpu-tp8-values.yaml",
        "multi-pod-etcd-values.yaml",
        "external-etcd-tls-values.yaml",
    ] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
    }
    let report = chart_check("render", &files);
    for name in &names {
        let r = &report[name.as_str()];
        assert_eq!(
            r["lint"]["ok"], true,
            "{name}: helm lint --strict: {}",
            r["lint"]
        );
        assert!(
            r["template_error"].is_null(),
            "{name}: {}",
            r["template_error"]
        );
        for version in ["1.30.0", "newest"] {
            assert_eq!(
                r["validate"][version],
                serde_json::json!([]),
                "{name} against Kubernetes {version}"
            );
        }
        assert_eq!(r["problems"], serde_json::json!([]), "{name}");
    }

    // What each topology deploys.
    let objects = |name: &str| strings(&report[name]["objects"]);
    let minimal = objects("minimal-values.yaml");
    assert!(minimal.contains(&"Deployment/demo-helios".to_string()));
    assert!(!minimal.iter().any(|o| o.starts_with("StatefulSet/")
        || o.starts_with("PodDisruptionBudget/")
        || o.starts_with("HorizontalPodAutoscaler/")));
    let gpu = &report["gpu-tp8-values.yaml"];
    assert_eq!(gpu["gpus"]["Deployment/demo-helios"], 8, "tp 8 in one pod");
    assert!(objects("gpu-tp8-values.yaml").contains(&"ScaledObject/demo-helios".to_string()));
    let multi = &report["multi-pod-etcd-values.yaml"];
    assert_eq!(
        multi["replicas"]["StatefulSet/demo-helios-worker"], 8,
        "tp 4 × dp 2"
    );
    assert_eq!(multi["gpus"]["StatefulSet/demo-helios-worker"], 1);
    assert_eq!(multi["replicas"]["Deployment/demo-helios-coordinator"], 1);
    assert!(objects("multi-pod-etcd-values.yaml").contains(&"StatefulSet/demo-helios-etcd".into()));
    assert!(objects("cpu-single-pod-values.yaml")
        .contains(&"HorizontalPodAutoscaler/demo-helios".to_string()));
    // External etcd: no etcd of ours, and every secret comes from the operator.
    let external = &report["external-etcd-tls-values.yaml"];
    assert!(!objects("external-etcd-tls-values.yaml")
        .iter()
        .any(|o| o.contains("etcd")));
    assert_eq!(
        strings(&external["external_secrets"]),
        [
            "helios-api-keys",
            "helios-client-ca",
            "helios-cluster-secret",
            "helios-etcd-client",
            "helios-etcd-password",
            "helios-tls"
        ]
    );
}

/// The checks above can fail: a flag the binary does not have, and an object Kubernetes
/// would refuse, are both reported.
#[test]
fn a_renamed_flag_and_an_invalid_object_are_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flag = dir.path().join("renamed-flag.yaml");
    std::fs::write(&flag, "extraArgs: [\"--kv-cache-mib=1\"]\n").expect("write");
    let object = dir.path().join("bad-object.yaml");
    std::fs::write(&object, "env: [{name: X, valu: \"1\"}]\n").expect("write");
    let report = chart_check("render", &[flag, object]);
    let problems = report["renamed-flag.yaml"]["problems"].to_string();
    assert!(
        problems.contains("has no flag --kv-cache-mib"),
        "{problems}"
    );
    let complaints = report["bad-object.yaml"]["validate"]["1.30.0"].to_string();
    assert!(complaints.contains("'valu' was unexpected"), "{complaints}");
}

#[test]
fn bad_values_are_refused_naming_the_value() {
    let report = chart_check("refuse", &[]);
    let cases = report.as_object().expect("cases");
    assert!(cases.len() >= 15, "{report}");
    for (case, r) in cases {
        assert_eq!(r["refused"], true, "{case}: rendered anyway");
        let message = r["message"].as_str().expect("message");
        let word = r["names"].as_str().expect("word");
        assert!(
            message.contains(word),
            "{case}: {message:?} does not name {word}"
        );
    }
}

/// Runs `chart_cluster.py` over `values` with a tiny tp-3 model and kills `pod`; its pods and
/// Services take addresses in `net` (a loopback /24 of its own: tests run side by side).
fn run_cluster(values: &str, net: &str, pod: &str, restart: &str) -> Value {
    let models = tempfile::tempdir().expect("tempdir");
    make_tiny_model(&models.path().join("tiny"), 3, &TP3_MODEL).expect("tiny model");
    let work = tempfile::tempdir().expect("tempdir");
    let etcd = helios_tests::etcd::etcd_binary().expect("etcd");
    let (helm, bins) = (helm(), bin_dir());
    let values = chart().join("ci").join(values).display().to_string();
    let chart = chart().display().to_string();
    let host_path = format!("model.hostPath={}", models.path().display());
    let (etcd, workdir) = (
        etcd.display().to_string(),
        work.path().display().to_string(),
    );
    let mut args = vec![
        "--helm",
        &helm,
        "--chart",
        &chart,
        "--values",
        &values,
        "--bin-dir",
        &bins,
        "--etcd",
        &etcd,
        "--workdir",
        &workdir,
        "--kill",
        pod,
        "--restart",
        restart,
        "--net",
        net,
    ];
    for set in [
        "tp=3",
        "dp=1",
        "gpu.enabled=false",
        "model.source=hostPath",
        &host_path,
        "model.path=tiny",
        "worker.threads=1",
    ] {
        args.extend(["--set", set]);
    }
    reference_json("chart_cluster.py", &args)
}

fn assert_no_request_failed(r: &Value) {
    let logs = serde_json::to_string_pretty(&r["logs"]).unwrap_or_default();
    assert_eq!(r["ready"], true, "the API pod never turned ready: {logs}");
    assert_eq!(r["failures"], serde_json::json!([]), "{logs}");
    assert!(
        r["in_flight_at_kill"].as_u64().expect("in flight") >= 1,
        "no stream was in flight when the pod was killed: {r}"
    );
    // Every request finished with exactly the tokens of the undisturbed run.
    assert_eq!(r["disrupted"], r["baseline"], "{logs}");
    for answer in r["baseline"].as_array().expect("baseline") {
        assert_eq!(answer[1], "FINISH_REASON_LENGTH", "{answer}");
    }
    // Liveness held through the recovery (the pod was not restarted), readiness turned false
    // while the replica recovered and true again.
    assert_eq!(r["probes"]["live_failures"], 0, "{}", r["probes"]);
    assert!(
        r["probes"]["ready_false"].as_u64().unwrap() >= 1,
        "{}",
        r["probes"]
    );
    assert_eq!(r["ready_after"], true);
    assert!(
        r["proxied_connections"].as_u64().unwrap() >= 1,
        "not through the Service"
    );
}

#[test]
fn the_multi_pod_chart_runs_here_and_a_recreated_worker_pod_rejoins() {
    let r = run_cluster(
        "multi-pod-etcd-values.yaml",
        "127.0.10",
        "demo-helios-worker-1",
        "new-ip",
    );
    assert_no_request_failed(&r);
    let pods = r["pods"].as_object().expect("pods");
    for pod in [
        "demo-helios-etcd-0",
        "demo-helios-worker-0",
        "demo-helios-worker-2",
    ] {
        assert!(pods.contains_key(pod), "{pod} in {pods:?}");
    }
    // The recreated pod came back on a new address and registered it through etcd.
    assert_ne!(r["killed_pod_new_ip"], r["pods"]["demo-helios-worker-1"]);
}

#[test]
fn static_membership_survives_a_worker_container_restart() {
    let r = run_cluster(
        "multi-pod-static-values.yaml",
        "127.0.11",
        "demo-helios-worker-2",
        "same-ip",
    );
    assert_no_request_failed(&r);
    let objects = strings(&r["objects"]);
    assert!(!objects.iter().any(|o| o.contains("etcd")), "{objects:?}");
}
