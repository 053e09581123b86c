//! The Prometheus/OpenMetrics endpoint (`--metrics-addr`): time in state
//! as a histogram in seconds by state, closes by side, and connection ends
//! by how (and the reset's reason), each by comm, pod, namespace and
//! container; TIME_WAIT held now, resets that ended no connection, and
//! what was lost. Labels
//! stay bounded by what runs on the node: no pid, no port, no address.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    ops::ControlFlow,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{
    cgroup::{Workload, Workloads},
    ends::EndKind,
    event::{Comm, ConnectionEnd, ResetReason, Transition},
    histogram::TEARDOWN_STATES,
    session::{Consumer, Status},
};

/// Counters here mirror totals kept elsewhere: move one up to its total.
fn advance_to(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// Not 9090/9091/9100 (Prometheus, Pushgateway, node exporter).
pub const DEFAULT_PORT: u16 = 9866;

/// Bucket bounds in seconds: 10 µs to past TIME_WAIT's 60 s.
const BUCKETS: [f64; 16] = [
    1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 61.0, 120.0,
];

// Label sets are fixed-size (static names, the kernel's 16-byte comm):
// recording an event looks its series up without allocating.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    /// `active` (closed first) or `passive`.
    side: &'static str,
    comm: Comm,
    /// The Kubernetes pod (name, else UID), its namespace and the
    /// container (name, else short id); empty where not in one.
    pod: Name,
    namespace: Name,
    container: Name,
}

/// A label value shared by every series of one cgroup: cloning it for a
/// lookup does not allocate.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
struct Name(Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &self.0)
    }
}

/// The pod, namespace and container of one cgroup, as labels.
#[derive(Clone, Debug, Default)]
struct WorkloadLabels {
    pod: Name,
    namespace: Name,
    container: Name,
}

impl WorkloadLabels {
    fn of(w: Option<&Workload>) -> Self {
        let name = |s: Option<String>| Name(Arc::from(s.unwrap_or_default()));
        let Some(w) = w else {
            return Self::default();
        };
        Self {
            pod: name(w.pod.clone().or_else(|| w.pod_uid.clone())),
            namespace: name(w.k8s_namespace.clone()),
            container: name(
                w.container_name
                    .clone()
                    .or_else(|| w.container.as_ref().map(|id| id.chars().take(12).collect())),
            ),
        }
    }
}

/// Cgroup ids to their labels, each named once.
struct CgroupLabels {
    workloads: Workloads,
    by_id: HashMap<u64, WorkloadLabels>,
    /// For owners in no cgroup twtrace can name.
    none: WorkloadLabels,
}

impl CgroupLabels {
    fn of(&mut self, id: u64) -> WorkloadLabels {
        if let Some(labels) = self.by_id.get(&id) {
            return labels.clone();
        }
        // Unknown ids are not kept: the cgroup may show up on a rescan.
        let Some(w) = self.workloads.get(id) else {
            return self.none.clone();
        };
        let labels = WorkloadLabels::of(Some(w));
        self.by_id.insert(id, labels.clone());
        labels
    }
}

/// How a connection ended (`ends::EndKind`), why this host reset it
/// (`reset_reason` names; empty for other ends), and the owner's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    end: &'static str,
    reason: &'static str,
    comm: Comm,
    pod: Name,
    namespace: Name,
    container: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LossLabel {
    kind: &'static str,
}

impl EncodeLabelValue for Comm {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, &self.to_str())
    }
}

fn new_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Fed by the session like any consumer; read by the HTTP server.
impl Consumer for Metrics {
    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        self.record(t);
        Ok(())
    }

    fn tick(&mut self, status: &Status) -> io::Result<ControlFlow<()>> {
        self.update(status);
        Ok(ControlFlow::Continue(()))
    }
}

/// The metrics, shared between the tracing loop and the HTTP server.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    time_in_state: Family<StateLabel, Histogram, fn() -> Histogram>,
    closes: Family<CloseLabels, Counter>,
    connection_ends: Family<EndLabels, Counter>,
    resets_without_connection: Family<ReasonLabel, Counter>,
    time_wait_now: Gauge,
    lost: Family<LossLabel, Counter>,
    time_wait_skipped: Counter,
    sockets_now: Family<StateLabel, Gauge>,
    oldest_age: Family<StateLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    older_than_leak: Family<StateLabel, Gauge>,
    cgroups: Arc<Mutex<CgroupLabels>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[must_use]
    pub fn new() -> Self {
        Self::naming_with(Workloads::new())
    }

    /// Metrics whose pod, namespace and container labels `workloads` names.
    #[must_use]
    pub fn naming_with(workloads: Workloads) -> Self {
        let mut registry = Registry::with_prefix("twtrace");
        let time_in_state =
            Family::<StateLabel, Histogram, fn() -> Histogram>::new_with_constructor(new_histogram);
        registry.register(
            "time_in_state_seconds",
            "Time TCP sockets spent in each teardown state",
            time_in_state.clone(),
        );
        let closes = Family::<CloseLabels, Counter>::default();
        registry.register(
            "closes",
            "Connections closed, by which side closed first and the owner's command",
            closes.clone(),
        );
        let connection_ends = Family::<EndLabels, Counter>::default();
        registry.register(
            "connection_ends",
            "Connections ended, by how (fin, reset_sent, reset_received, timeout, error, abandoned, expired, cancelled), the reason of a reset this host sent, and the owner's command",
            connection_ends.clone(),
        );
        let resets_without_connection = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "resets_without_connection",
            "Resets sent that ended no connection twtrace follows (a SYN to a closed port, a segment for a TIME_WAIT socket), by reason",
            resets_without_connection.clone(),
        );
        let time_wait_now = Gauge::default();
        registry.register(
            "time_wait_sockets",
            "TIME_WAIT mini-sockets alive now (born while traced)",
            time_wait_now.clone(),
        );
        let lost = Family::<LossLabel, Counter>::default();
        registry.register(
            "lost_events",
            "Events lost, births missed, TIME_WAIT ends without a record and records evicted, by kind",
            lost.clone(),
        );
        let time_wait_skipped = Counter::default();
        registry.register(
            "time_wait_skipped",
            "Closes that skipped TIME_WAIT because tcp_max_tw_buckets was full",
            time_wait_skipped.clone(),
        );
        let sockets_now = Family::<StateLabel, Gauge>::default();
        registry.register(
            "sockets",
            "TCP sockets in each teardown state now, over every network namespace (those from before twtrace started included)",
            sockets_now.clone(),
        );
        let oldest_age = Family::<StateLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "oldest_socket_age_seconds",
            "How long the oldest socket in each teardown state has been in it (an upper bound for full sockets that predate twtrace)",
            oldest_age.clone(),
        );
        let older_than_leak = Family::<StateLabel, Gauge>::default();
        registry.register(
            "sockets_older_than_leak_threshold",
            "Sockets in each teardown state for over 60 s (in CLOSE_WAIT: a leak, the application never called close())",
            older_than_leak.clone(),
        );
        // Every state appears from the start, so rates work from scrape one.
        for state in TEARDOWN_STATES {
            let label = StateLabel {
                state: state.name(),
            };
            let _ = time_in_state.get_or_create(&label);
            let _ = sockets_now.get_or_create(&label);
            let _ = oldest_age.get_or_create(&label);
            let _ = older_than_leak.get_or_create(&label);
        }
        Self {
            registry: Arc::new(registry),
            time_in_state,
            closes,
            connection_ends,
            resets_without_connection,
            time_wait_now,
            lost,
            time_wait_skipped,
            sockets_now,
            oldest_age,
            older_than_leak,
            cgroups: Arc::new(Mutex::new(CgroupLabels {
                workloads,
                by_id: HashMap::new(),
                none: WorkloadLabels::of(None),
            })),
        }
    }

    pub fn record(&self, t: &Transition) {
        if let Some(ns) = t.in_state_ns
            && TEARDOWN_STATES.contains(&t.old)
        {
            #[expect(clippy::cast_precision_loss, reason = "seconds for Prometheus")]
            let seconds = ns as f64 / 1e9;
            self.time_in_state
                .get_or_create(&StateLabel {
                    state: t.old.name(),
                })
                .observe(seconds);
        }
        let side = t.close_side();
        let end = EndKind::of(t);
        if side.is_none() && end.is_none() {
            return;
        }
        let cgroup = t.owner.map_or(0, |o| o.cgroup);
        let workload = self
            .cgroups
            .lock()
            .map(|mut c| c.of(cgroup))
            .unwrap_or_default();
        let comm = t.owner.map_or(Comm::UNKNOWN, |o| o.comm);
        if let Some(end) = end {
            let reason = t.ending.and_then(ConnectionEnd::reset_reason);
            self.connection_ends
                .get_or_create(&EndLabels {
                    end: end.name(),
                    reason: reason.map_or("", ResetReason::name),
                    comm,
                    pod: workload.pod.clone(),
                    namespace: workload.namespace.clone(),
                    container: workload.container.clone(),
                })
                .inc();
        }
        if let Some(side) = side {
            self.closes
                .get_or_create(&CloseLabels {
                    side: side.name(),
                    comm,
                    pod: workload.pod,
                    namespace: workload.namespace,
                    container: workload.container,
                })
                .inc();
        }
    }

    pub fn update(&self, status: &Status) {
        let held = status.mini_sockets;
        self.time_wait_now
            .set(i64::try_from(held).unwrap_or(i64::MAX));
        let loss = &status.loss;
        for (kind, value) in [
            ("ringbuf_full", loss.ringbuf_full),
            ("recursion_misses", loss.recursion_misses),
            ("unreadable", loss.read_failed),
            ("undecodable", loss.decode_errors),
            ("tw_births_missed", loss.tw_births_missed),
            ("tw_births_owner_unknown", loss.tw_births_owner_unknown),
            ("tw_ends_without_record", status.loss.tw_untracked_ends),
            ("tw_evictions", status.time_wait.evictions),
        ] {
            advance_to(&self.lost.get_or_create(&LossLabel { kind }), value);
        }
        advance_to(&self.time_wait_skipped, status.time_wait.skipped);
        for (reason, count) in status.resets_apart.nonzero() {
            let label = ReasonLabel {
                reason: reason.name(),
            };
            advance_to(&self.resets_without_connection.get_or_create(&label), count);
        }
        for state in TEARDOWN_STATES {
            let label = StateLabel {
                state: state.name(),
            };
            let now = status.now.state(state);
            let older = status.now.older_than.get(&state).copied().unwrap_or(0);
            self.sockets_now
                .get_or_create(&label)
                .set(i64::try_from(now.count).unwrap_or(i64::MAX));
            #[expect(clippy::cast_precision_loss, reason = "seconds for Prometheus")]
            let oldest = now.oldest_age_ns as f64 / 1e9;
            self.oldest_age.get_or_create(&label).set(oldest);
            self.older_than_leak
                .get_or_create(&label)
                .set(i64::try_from(older).unwrap_or(i64::MAX));
        }
    }

    /// The exposition, in the `OpenMetrics` text format.
    pub fn encode(&self) -> anyhow::Result<String> {
        let mut body = String::new();
        encode(&mut body, &self.registry).context("encoding metrics")?;
        Ok(body)
    }

    /// New metrics served on `addr`, if one is given.
    pub async fn serve_if(addr: Option<SocketAddr>) -> anyhow::Result<Option<Self>> {
        let Some(addr) = addr else {
            return Ok(None);
        };
        let metrics = Self::new();
        metrics.clone().serve(addr).await?;
        Ok(Some(metrics))
    }

    /// Serves `GET /metrics` (any path) on `addr` until the runtime ends.
    pub async fn serve(self, addr: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for --metrics-addr"))?;
        Ok(tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let metrics = self.clone();
                tokio::spawn(async move {
                    // The request itself does not matter: one page is served.
                    let mut request = [0u8; 1024];
                    let _ = stream.read(&mut request).await;
                    let (status, body) = match metrics.encode() {
                        Ok(body) => ("200 OK", body),
                        Err(e) => ("500 Internal Server Error", format!("{e:#}\n")),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(body.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Owner, TcpState};
    use std::os::unix::fs::MetadataExt;

    fn close(cgroup: u64) -> Transition {
        Transition {
            ts_ns: 0,
            sock_id: 0,
            owner: Some(Owner {
                pid: 7,
                comm: Comm::from("app"),
                cgroup,
            }),
            src: "127.0.0.1:1".parse().unwrap(),
            dst: "127.0.0.1:2".parse().unwrap(),
            old: TcpState::Established,
            new: TcpState::FinWait1,
            in_state_ns: None,
            end: None,
            netns: 0,
            accepted: false,
            ending: None,
        }
    }

    #[test]
    fn closes_carry_the_pod_namespace_and_container() {
        let dir = std::env::temp_dir().join(format!("twtrace-ml-{}", std::process::id()));
        let uid = "1a2b3c4d-0000-1111-2222-333344445555";
        let id = "ab".repeat(32);
        let cgroup = dir.join(format!("cg/kubepods/besteffort/pod{uid}/{id}"));
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::create_dir_all(dir.join(format!("logs/pods/shop_web-7d9f_{uid}"))).unwrap();
        std::fs::create_dir_all(dir.join("logs/containers")).unwrap();
        std::fs::write(
            dir.join(format!("logs/containers/web-7d9f_shop_server-{id}.log")),
            "",
        )
        .unwrap();
        let inode = std::fs::metadata(&cgroup).unwrap().ino();
        let metrics = Metrics::naming_with(
            Workloads::at(Some(dir.join("cg"))).with_kubelet_logs(dir.join("logs")),
        );
        metrics.record(&close(inode));
        metrics.record(&close(inode));
        metrics.record(&close(0));
        let page = metrics.encode().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            page.contains(r#"twtrace_closes_total{side="active",comm="app",pod="web-7d9f",namespace="shop",container="server"} 2"#),
            "{page}"
        );
        assert!(
            page.contains(r#"twtrace_closes_total{side="active",comm="app",pod="",namespace="",container=""} 1"#),
            "{page}"
        );
    }

    #[test]
    fn connection_ends_carry_the_end_and_the_reset_reason() {
        let metrics = Metrics::naming_with(Workloads::at(None));
        let mut aborted = close(0);
        aborted.new = TcpState::Close;
        aborted.ending = Some(ConnectionEnd::ResetSent(
            ResetReason::from_code(twtrace_common::reset_reason::LINGER_ZERO).unwrap(),
        ));
        metrics.record(&aborted);
        metrics.record(&aborted);
        let mut reset = aborted.clone();
        reset.ending = Some(ConnectionEnd::ResetReceived);
        metrics.record(&reset);
        let page = metrics.encode().unwrap();
        assert!(
            page.contains(r#"twtrace_connection_ends_total{end="reset_sent",reason="linger_zero",comm="app",pod="",namespace="",container=""} 2"#),
            "{page}"
        );
        assert!(
            page.contains(r#"twtrace_connection_ends_total{end="reset_received",reason="",comm="app",pod="",namespace="",container=""} 1"#),
            "{page}"
        );
        // Neither is a close's first move.
        assert!(!page.contains("twtrace_closes_total{"), "{page}");
    }
}
