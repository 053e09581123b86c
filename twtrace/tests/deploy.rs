//! The shipped deployments grant exactly what twtrace needs: the systemd
//! unit's sandbox as systemd itself rates it, and the `DaemonSet` as the
//! Kubernetes schemas accept it, both with the same capabilities.
//! `cargo xtask test` installs the two checkers (`systemd-analyze` from
//! Debian's systemd, `kubernetes-validate` from `PyPI` in `.tools/python`).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// What both deployments grant, without the `CAP_` prefix.
const CAPABILITIES: [&str; 6] = [
    "BPF",
    "PERFMON",
    "SYSLOG",
    "DAC_READ_SEARCH",
    "SYS_ADMIN",
    "SYS_PTRACE",
];

/// The bound on `systemd-analyze security`'s exposure (0–10), and the
/// same as its `--threshold` takes it (0–100).
const MAX_EXPOSURE: f64 = 3.0;
const THRESHOLD: u32 = 30;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

fn run(command: &mut Command, what: &str) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("running {what} ({e}); `cargo xtask test` installs it"))
}

fn expected() -> BTreeSet<String> {
    CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()
}

#[test]
fn the_unit_is_sandboxed_to_an_exposure_of_three_or_less() {
    let unit = repo().join("deploy/twtrace.service");
    let threshold = format!("--threshold={THRESHOLD}");
    let out = run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", &threshold])
            .arg(&unit),
        "systemd-analyze",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure in: {text}"));
    let exposure: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable: {overall}"));
    assert!(out.status.success(), "{overall}");
    assert!(exposure <= MAX_EXPOSURE, "{overall}");
}

#[test]
fn the_unit_grants_exactly_the_capabilities_twtrace_needs() {
    let unit = std::fs::read_to_string(repo().join("deploy/twtrace.service")).unwrap();
    for key in ["AmbientCapabilities=", "CapabilityBoundingSet="] {
        let line = unit
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key}"));
        let granted: BTreeSet<String> = line[key.len()..]
            .split_whitespace()
            .map(|c| c.trim_start_matches("CAP_").to_owned())
            .collect();
        assert_eq!(granted, expected(), "{key}");
    }
    for setting in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ] {
        assert!(unit.lines().any(|l| l == setting), "missing {setting}");
    }
}

fn kubernetes_validate() -> (PathBuf, PathBuf) {
    let python = Path::new(env!("TWTRACE_TOOLS_DIR")).join("python");
    let script = python.join("bin/kubernetes-validate");
    assert!(
        script.is_file(),
        "{} is missing: `cargo xtask test` installs it",
        script.display()
    );
    (python, script)
}

#[test]
fn the_daemonset_passes_the_kubernetes_schemas() {
    let (python, script) = kubernetes_validate();
    let manifest = repo().join("deploy/daemonset.yaml");
    let validate = |path: &Path| {
        run(
            Command::new("python3")
                .arg(&script)
                .arg("--strict")
                .arg(path)
                .env("PYTHONPATH", &python),
            "kubernetes-validate",
        )
    };
    let out = validate(&manifest);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A manifest the schemas reject is caught, so a pass means something.
    let broken = std::env::temp_dir().join(format!("twtrace-ds-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&broken, text.replace("hostPID: true", "hostPID: sometimes")).unwrap();
    let out = validate(&broken);
    let _ = std::fs::remove_file(&broken);
    assert!(!out.status.success(), "a broken manifest passed");
}

#[test]
fn the_daemonset_is_unprivileged_with_exactly_the_capabilities_twtrace_needs() {
    let (python, _) = kubernetes_validate();
    // The manifest as JSON, through the YAML parser the validator ships.
    let out = run(
        Command::new("python3")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            ])
            .arg(repo().join("deploy/daemonset.yaml"))
            .env("PYTHONPATH", &python),
        "python3",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"], true,
        "other namespaces are reached via /proc"
    );
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let security = &containers[0]["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let added: BTreeSet<String> = security["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(added, expected());
    for mount in containers[0]["volumeMounts"].as_array().unwrap() {
        assert_eq!(mount["readOnly"], true, "{mount}");
    }
}
