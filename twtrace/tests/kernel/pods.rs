//! Two "pods" on one host — each a kubelet-shaped cgroup and a network
//! namespace of its own, named by kubelet-shaped log directories — told
//! apart by `summary --by pod`, the live view's `--by pod` and, through the
//! real Prometheus server scraping twtrace, by per-pod series.

use std::{
    io::{Read, Write},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Test,
    namespaces::{Cgroups, makers},
    support::{self, interrupt, scratch_dir, spawn_attached},
};

pub const TESTS: &[Test] = crate::tests![two_pods_are_grouped_by_summary_and_scraped_per_pod];

/// A pod as the kubelet lays it out: the cgroup of its one container
/// (systemd driver, containerd), and the names its log directories say.
struct Pod {
    namespace: String,
    name: String,
    container: String,
    uid: String,
    container_id: String,
}

impl Pod {
    fn new(tag: u32, letter: char) -> Self {
        let n = u32::from(letter);
        Self {
            namespace: format!("team-{letter}"),
            name: format!("web-{letter}-{tag:x}"),
            container: format!("server-{letter}"),
            uid: format!("{tag:08x}-{n:04x}-4000-8000-{tag:012x}"),
            container_id: format!("{n:x}{tag:x}").repeat(16)[..64].to_owned(),
        }
    }

    fn cgroup(&self) -> String {
        format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
            self.uid.replace('-', "_"),
            self.container_id
        )
    }

    /// `pods/<namespace>_<pod>_<uid>/<container>/` and
    /// `containers/<pod>_<namespace>_<container>-<id>.log`, as the
    /// kubelet makes them.
    fn write_logs(&self, logs: &std::path::Path) {
        let pod_dir = logs.join(format!(
            "pods/{}_{}_{}/{}",
            self.namespace, self.name, self.uid, self.container
        ));
        std::fs::create_dir_all(&pod_dir).expect("pod log directory");
        std::fs::write(pod_dir.join("0.log"), "").expect("container log");
        std::fs::create_dir_all(logs.join("containers")).expect("containers directory");
        std::os::unix::fs::symlink(
            pod_dir.join("0.log"),
            logs.join(format!(
                "containers/{}_{}_{}-{}.log",
                self.name, self.namespace, self.container, self.container_id
            )),
        )
        .expect("container log link");
    }
}

/// Two pods make 5 and 7 connections, each closed first by its client.
/// `summary --by pod` and the live view (`twtrace --by pod`) give each pod
/// exactly its own closes under its `namespace/name`, and Prometheus,
/// scraping the same run, returns one `twtrace_closes_total` series per
/// pod with its namespace and container.
fn two_pods_are_grouped_by_summary_and_scraped_per_pod() {
    let Some(root) = twtrace::cgroup::v2_root() else {
        support::skip("no cgroup v2 hierarchy is mounted: cgroup ids name nothing");
    };
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        support::skip("prometheus is not installed (cargo xtask test installs Debian's)");
    }
    let tag = std::process::id();
    let pods = [Pod::new(tag, 'a'), Pod::new(tag, 'b')];
    let scratch = scratch_dir("pods");
    let logs = scratch.join("log");
    let dirs: Vec<_> = pods.iter().map(|p| root.join(p.cgroup())).collect();
    for (pod, dir) in pods.iter().zip(&dirs) {
        std::fs::create_dir_all(dir).expect("making a cgroup");
        pod.write_logs(&logs);
    }
    let _cleanup = Cgroups(dirs.clone());
    let mut both = makers();
    for ((_, maker), dir) in both.iter().zip(&dirs) {
        std::fs::write(dir.join("cgroup.procs"), maker.pid.to_string())
            .expect("moving a closer into its pod");
    }
    let [metrics_port, prometheus_port] = [free_port(), free_port()];
    let mut prometheus = Prometheus::start(&scratch, metrics_port, prometheus_port);
    let makers_pids: Vec<String> = both.iter().map(|(_, m)| m.pid.to_string()).collect();
    let summary = spawn_attached(
        Command::new(env!("CARGO_BIN_EXE_twtrace"))
            .args(["summary", "-o", "json", "--by", "pod"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--pid", &makers_pids[0], "--pid", &makers_pids[1]])
            .env("TWTRACE_KUBELET_LOGS", &logs)
            .stdout(Stdio::piped()),
    );
    // The live view, as a new user starts it on a node: plain text here.
    let live = spawn_attached(
        Command::new(env!("CARGO_BIN_EXE_twtrace"))
            .args(["--by", "pod", "-b", "-n", "4", "-i", "1s"])
            .args(["--pid", &makers_pids[0], "--pid", &makers_pids[1]])
            .env("TWTRACE_KUBELET_LOGS", &logs)
            .stdout(Stdio::piped()),
    );
    for (_, maker) in &mut both {
        maker.go();
    }
    for (_, maker) in &mut both {
        maker.wait_done();
    }
    let expected: Vec<(String, String, String, u64)> = pods
        .iter()
        .zip([5, 7])
        .map(|(p, n)| (p.namespace.clone(), p.name.clone(), p.container.clone(), n))
        .collect();
    let (scraped, diagnosis) = prometheus.scrape(&expected, &scratch);
    interrupt(&summary);
    let out = summary.wait_with_output().expect("summary");
    prometheus.stop();
    let _ = std::fs::remove_dir_all(&scratch);
    assert_eq!(
        scraped, expected,
        "Prometheus's per-pod active closes; {diagnosis}"
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary JSON");
    assert_eq!(v["by"], "pod", "{v}");
    let groups: Vec<(String, String, u64, u64)> = v["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap().to_owned(),
                g["pod_uid"].as_str().unwrap_or("").to_owned(),
                g["active_closes"].as_u64().unwrap(),
                g["passive_closes"].as_u64().unwrap(),
            )
        })
        .collect();
    // Busiest closer first; each maker's server end is closed second.
    let want: Vec<(String, String, u64, u64)> = pods
        .iter()
        .zip([5, 7])
        .rev()
        .map(|(p, n)| (format!("{}/{}", p.namespace, p.name), p.uid.clone(), n, n))
        .collect();
    assert_eq!(groups, want, "{v}");
    // The live view's last table: a row per pod, one process each, with
    // its closes (each maker is both ends of its connections).
    let live = live.wait_with_output().expect("live view");
    let text = String::from_utf8_lossy(&live.stdout);
    let last = text.rsplit("closes/s").next().unwrap_or_default();
    for (pod, n) in pods.iter().zip([5, 7]) {
        let name = format!("{}/{}", pod.namespace, pod.name);
        let row: Vec<&str> = last
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no row for {name}:\n{text}"))
            .split_whitespace()
            .collect();
        assert_eq!(row[0], "1", "processes in {name}: {row:?}");
        assert_eq!(row[row.len() - 1], (2 * n).to_string(), "{name}: {row:?}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Debian's Prometheus, scraping twtrace every second, on loopback only.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(scratch: &std::path::Path, target: u16, port: u16) -> Self {
        let config = scratch.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
                 scrape_configs:\n  - job_name: twtrace\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .expect("prometheus.yml");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                scratch.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.join("prometheus.log")).expect("prometheus.log"))
            .spawn()
            .expect("starting prometheus");
        Self { child, port }
    }

    /// `sum by (namespace, pod, container) (twtrace_closes_total{side="active"})`
    /// once it equals `expected` or `within` has passed: the last answer,
    /// sorted.
    fn active_closes_until(
        &self,
        expected: &[(String, String, String, u64)],
        within: Duration,
    ) -> Vec<(String, String, String, u64)> {
        let deadline = Instant::now() + within;
        let mut last = Vec::new();
        while Instant::now() < deadline {
            if let Some(answer) = self.query(
                "sum%20by%20(namespace%2Cpod%2Ccontainer)%20(twtrace_closes_total%7Bside%3D%22active%22%7D)",
            ) {
                last = answer;
                if last == expected {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        last
    }

    /// The per-pod active closes once they equal `expected`, or the last
    /// answer and what Prometheus showed. Under emulation it takes its time
    /// to start (its storage, then the first scrape): the 30 s count from
    /// when it says it is ready.
    fn scrape(
        &self,
        expected: &[(String, String, String, u64)],
        scratch: &std::path::Path,
    ) -> (Vec<(String, String, String, u64)>, String) {
        let ready = self.wait_ready(Duration::from_mins(2));
        let scraped = self.active_closes_until(expected, Duration::from_secs(30));
        let diagnosis = if scraped == expected {
            String::new()
        } else {
            format!("ready: {ready}; {}", self.diagnosis(scratch))
        };
        (scraped, diagnosis)
    }

    /// Whether `/-/ready` answered 200 within `within`.
    fn wait_ready(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self
                .get("/-/ready")
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    }

    /// What its scrape target says, and the end of its log.
    fn diagnosis(&self, scratch: &std::path::Path) -> String {
        let targets = self
            .get("/api/v1/targets")
            .and_then(|r| Some(r.split_once("\r\n\r\n")?.1.to_owned()))
            .unwrap_or_default();
        let log = std::fs::read_to_string(scratch.join("prometheus.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        format!("targets: {targets}; log: {}", tail.join(" | "))
    }

    /// A GET's whole response.
    fn get(&self, path: &str) -> Option<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    }

    fn query(&self, query: &str) -> Option<Vec<(String, String, String, u64)>> {
        let response = self.get(&format!("/api/v1/query?query={query}"))?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        // The JSON document, whether or not the body came chunked.
        let json = body.get(body.find('{')?..=body.rfind('}')?)?;
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        let label =
            |s: &serde_json::Value, name: &str| s["metric"][name].as_str().unwrap_or("").to_owned();
        let mut series: Vec<_> = v["data"]["result"]
            .as_array()?
            .iter()
            .map(|s| {
                let value = s["value"][1].as_str().and_then(|n| n.parse::<f64>().ok());
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a count"
                )]
                let count = value.unwrap_or(-1.0) as u64;
                (
                    label(s, "namespace"),
                    label(s, "pod"),
                    label(s, "container"),
                    count,
                )
            })
            .collect();
        series.sort();
        Some(series)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}
