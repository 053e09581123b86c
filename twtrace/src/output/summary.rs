//! The end-of-run report: per-state distributions, who closed first, and
//! what was lost. Shared by `summary` and the end of `trace`.

use std::io::{self, Write};

use serde::Serialize;

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    census::CensusNow,
    cgroup::{Workload, Workloads},
    ends::EndCounts,
    grouping::{self, Group, GroupBy},
    histogram::{OwnerKey, OwnerStats, STATE_COLUMNS, StateStats, TeardownStats},
    session::SessionEnd,
    units,
};

#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    pub comm: String,
    pub active_closes: u64,
    pub passive_closes: u64,
    pub ends: EndsReport,
    pub states: Vec<StateStats>,
}

/// Connections ended, by how (`ends::EndKind`, only those that
/// happened), and the resets sent among them by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EndsReport {
    pub by_end: BTreeMap<&'static str, u64>,
    pub reset_reasons: BTreeMap<&'static str, u64>,
    /// One line for text: `fin 7, reset_sent 3 (linger_zero 3)`.
    #[serde(skip)]
    pub text: String,
}

impl EndsReport {
    #[must_use]
    pub fn of(ends: &EndCounts) -> Self {
        Self {
            by_end: ends.nonzero().map(|(k, n)| (k.name(), n)).collect(),
            reset_reasons: ends.reset_reasons().map(|(r, n)| (r.name(), n)).collect(),
            text: ends.describe(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Lost {
    /// Transitions that never reached twtrace (sum of the next four).
    pub events: u64,
    pub ringbuf_full: u64,
    pub recursion_misses: u64,
    pub unreadable: u64,
    pub undecodable: u64,
    /// Socket records the kernel could not store (owner or time unknown).
    pub sock_records_not_stored: u64,
    /// TIME_WAIT records evicted from the kernel's LRU map (estimate: ends
    /// without a record beyond the mini-sockets alive at start).
    pub tw_evictions: u64,
    pub tw_records_not_stored: u64,
    /// Mini-sockets born without their birth being seen (the hand-over
    /// from the full socket never came).
    pub tw_births_missed: u64,
    /// Mini-sockets that ended while twtrace held no record of them.
    pub tw_ends_without_record: u64,
    /// Mini-sockets born under `--pid` whose owner was never learnt: not
    /// reported, as they may be another process's.
    pub tw_births_owner_unknown: u64,
    /// Children of `record`'s command the kernel could not follow.
    pub followed_children_missed: u64,
    /// Program runs nested too deeply on a CPU to keep TIME_WAIT state.
    pub too_deeply_nested: u64,
}

/// One group's closes and states (`--by`).
#[derive(Clone, Debug, Serialize)]
pub struct GroupReport {
    pub name: String,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    pub active_closes: u64,
    pub passive_closes: u64,
    pub ends: EndsReport,
    pub states: Vec<StateStats>,
}

impl GroupReport {
    #[must_use]
    pub fn of(group: &Group) -> Self {
        Self {
            name: group.name.clone(),
            workload: group.workload.clone(),
            netns: group.netns,
            active_closes: group.stats.active_closes,
            passive_closes: group.stats.passive_closes,
            ends: EndsReport::of(&group.stats.ends),
            states: group.states(),
        }
    }
}

/// One network namespace's states.
#[derive(Clone, Debug, Serialize)]
pub struct NamespaceReport {
    /// The namespace's inode, as `ip netns identify` shows it; 0: unknown.
    pub netns: u64,
    pub states: Vec<StateStats>,
}

/// One JSON document (or a text block) summarising a run.
#[derive(Clone, Debug, Serialize)]
pub struct SummaryReport {
    pub r#type: &'static str,
    /// Transitions reported.
    pub events: u64,
    pub duration_ns: u64,
    pub time_wait_tracking: bool,
    pub active_closes: u64,
    pub passive_closes: u64,
    /// Closes that skipped TIME_WAIT because the namespace's
    /// `tcp_max_tw_buckets` was full, as twtrace saw them.
    pub time_wait_skipped: u64,
    /// The kernel's count of the same (`TcpExtTCPTimeWaitOverflow`), over
    /// every namespace twtrace could enter; `null` if unreadable.
    pub time_wait_overflows_kernel: Option<u64>,
    /// How the connections seen ending ended.
    pub ends: EndsReport,
    /// Resets sent that ended no connection twtrace follows (a SYN to a
    /// closed port, …), by reason.
    pub resets_without_connection: BTreeMap<&'static str, u64>,
    pub lost: Lost,
    pub states: Vec<StateStats>,
    pub processes: Vec<ProcessReport>,
    pub namespaces: Vec<NamespaceReport>,
    /// What `groups` groups by (`--by`; `processes` are always there).
    pub by: GroupBy,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupReport>,
}

impl SummaryReport {
    #[must_use]
    pub fn new(stats: &TeardownStats, end: &SessionEnd) -> Self {
        let now = &end.now;
        let loss = &end.loss;
        let time_wait = &end.time_wait;
        let empty = OwnerStats::default();
        // Owners with transitions, and those that only hold sockets from
        // before the run (a CLOSE_WAIT leak shows even if nothing moves).
        let owners: BTreeSet<&OwnerKey> = stats.owners.keys().chain(now.by_owner.keys()).collect();
        let mut processes: Vec<ProcessReport> = owners
            .into_iter()
            .map(|owner| {
                let s = stats.owners.get(owner).unwrap_or(&empty);
                ProcessReport {
                    pid: owner.pid,
                    comm: owner.comm.to_string(),
                    active_closes: s.active_closes,
                    passive_closes: s.passive_closes,
                    ends: EndsReport::of(&s.ends),
                    states: s.states.stats_with_now(|state| now.of_owner(owner, state)),
                }
            })
            .filter(|p| {
                p.active_closes + p.passive_closes > 0
                    || !p.states.is_empty()
                    || !p.ends.by_end.is_empty()
            })
            .collect();
        // Who closes first, first.
        processes.sort_by(|a, b| {
            b.active_closes
                .cmp(&a.active_closes)
                .then(b.passive_closes.cmp(&a.passive_closes))
                .then(a.pid.cmp(&b.pid))
        });
        Self {
            r#type: "summary",
            events: end.events,
            duration_ns: end.duration_ns,
            time_wait_tracking: end.time_wait_tracking,
            active_closes: stats.total.active_closes,
            passive_closes: stats.total.passive_closes,
            time_wait_skipped: time_wait.skipped,
            time_wait_overflows_kernel: time_wait.kernel_overflows,
            ends: EndsReport::of(&stats.total.ends),
            resets_without_connection: end
                .resets_apart
                .nonzero()
                .map(|(r, n)| (r.name(), n))
                .collect(),
            lost: Lost {
                events: loss.events_lost(),
                ringbuf_full: loss.ringbuf_full,
                recursion_misses: loss.recursion_misses,
                unreadable: loss.read_failed,
                undecodable: loss.decode_errors,
                sock_records_not_stored: loss.sock_update_failed,
                tw_evictions: time_wait.evictions,
                tw_records_not_stored: loss.tw_update_failed,
                tw_births_missed: loss.tw_births_missed,
                tw_ends_without_record: loss.tw_untracked_ends,
                tw_births_owner_unknown: loss.tw_births_owner_unknown,
                followed_children_missed: loss.follow_failed,
                too_deeply_nested: loss.too_deeply_nested,
            },
            states: stats.total.states.stats_with_now(|state| now.state(state)),
            processes,
            namespaces: namespaces(stats, now),
            by: GroupBy::Pid,
            groups: Vec::new(),
        }
    }

    /// Groups by `by` too, in JSON and in place of the per-process tables
    /// in text.
    #[must_use]
    pub fn grouped(mut self, by: GroupBy, groups: &[Group]) -> Self {
        self.by = by;
        if by != GroupBy::Pid {
            self.groups = groups.iter().map(GroupReport::of).collect();
        }
        self
    }

    /// The report of one tracing run, grouped `by` (names looked up on
    /// this host).
    #[must_use]
    pub fn of_session(stats: &TeardownStats, end: &SessionEnd, by: GroupBy) -> Self {
        let report = Self::new(stats, end);
        if by == GroupBy::Pid {
            return report;
        }
        let groups = super::groups_here(stats, &end.now, by, &mut Workloads::new());
        report.grouped(by, &groups)
    }

    /// One line of JSON (the last line of `trace -o json`).
    pub fn write_json_line(&self, out: &mut impl Write) -> io::Result<()> {
        serde_json::to_writer(&mut *out, self)?;
        out.write_all(b"\n")
    }

    pub fn write_json_pretty(&self, out: &mut impl Write) -> io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        out.write_all(b"\n")
    }

    pub fn write_text(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(out, "TIME IN STATE (all processes)")?;
        write_state_header(out, "")?;
        for s in &self.states {
            write_state_row(out, "", s)?;
        }
        if self.states.is_empty() {
            writeln!(out, "  (no teardown seen)")?;
        }
        writeln!(out)?;
        self.write_ends(out)?;
        if self.by == GroupBy::Pid {
            self.write_processes(out)?;
        } else {
            self.write_groups(out)?;
        }
        if self.namespaces.len() > 1 && self.by != GroupBy::Netns {
            writeln!(out, "BY NETWORK NAMESPACE")?;
            write_state_header(out, &format!("{:<11} ", "NETNS"))?;
            for n in &self.namespaces {
                let prefix = format!("{:<11} ", n.netns);
                for s in &n.states {
                    write_state_row(out, &prefix, s)?;
                }
            }
            writeln!(out)?;
        }
        self.write_losses(out)
    }

    fn write_ends(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(out, "CONNECTIONS ENDED (all processes): {}", self.ends.text)?;
        if !self.resets_without_connection.is_empty() {
            let resets: Vec<String> = self
                .resets_without_connection
                .iter()
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect();
            writeln!(
                out,
                "resets sent that ended no connection: {}",
                resets.join(", ")
            )?;
        }
        writeln!(out)
    }

    fn write_groups(&self, out: &mut impl Write) -> io::Result<()> {
        let title = self.by.title();
        let width = self
            .groups
            .iter()
            .take(TEXT_PROCESSES)
            .map(|g| g.name.chars().count())
            .max()
            .unwrap_or(0)
            .clamp(self.by.column().len(), grouping::MAX_NAME_WIDTH);
        let name = |n: &str| format!("{:<width$}", units::clip(n, width));
        writeln!(
            out,
            "CLOSES BY {title} ({} active, {} passive)",
            self.active_closes, self.passive_closes
        )?;
        writeln!(
            out,
            "{} {:>8} {:>8}  ENDS",
            name(self.by.column()),
            "ACTIVE",
            "PASSIVE"
        )?;
        for g in self.groups.iter().take(TEXT_PROCESSES) {
            writeln!(
                out,
                "{} {:>8} {:>8}  {}",
                name(&g.name),
                g.active_closes,
                g.passive_closes,
                g.ends.text
            )?;
        }
        writeln!(out)?;
        writeln!(out, "TIME IN STATE BY {title}")?;
        write_state_header(out, &format!("{} ", name(self.by.column())))?;
        for g in self.groups.iter().take(TEXT_PROCESSES) {
            let prefix = format!("{} ", name(&g.name));
            for s in &g.states {
                write_state_row(out, &prefix, s)?;
            }
        }
        if self.groups.len() > TEXT_PROCESSES {
            writeln!(
                out,
                "  ({} more; -o json lists all)",
                self.groups.len() - TEXT_PROCESSES
            )?;
        }
        writeln!(out)
    }

    fn write_processes(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(
            out,
            "CLOSES BY PROCESS ({} active, {} passive)",
            self.active_closes, self.passive_closes
        )?;
        writeln!(
            out,
            "{:<8} {:<16} {:>8} {:>8}  ENDS",
            "PID", "COMM", "ACTIVE", "PASSIVE"
        )?;
        for p in self.processes.iter().take(TEXT_PROCESSES) {
            writeln!(
                out,
                "{:<8} {:<16} {:>8} {:>8}  {}",
                p.pid, p.comm, p.active_closes, p.passive_closes, p.ends.text
            )?;
        }
        writeln!(out)?;
        writeln!(out, "TIME IN STATE BY PROCESS")?;
        write_state_header(out, &format!("{:<8} {:<16} ", "PID", "COMM"))?;
        for p in self.processes.iter().take(TEXT_PROCESSES) {
            let prefix = format!("{:<8} {:<16} ", p.pid, p.comm);
            for s in &p.states {
                write_state_row(out, &prefix, s)?;
            }
        }
        if self.processes.len() > TEXT_PROCESSES {
            writeln!(
                out,
                "  ({} more processes; -o json lists all)",
                self.processes.len() - TEXT_PROCESSES
            )?;
        }
        writeln!(out)
    }

    fn write_losses(&self, out: &mut impl Write) -> io::Result<()> {
        let lost = &self.lost;
        writeln!(
            out,
            "{} transitions in {}; lost {} (ring buffer full {}, recursion misses {}, unreadable {}, undecodable {}); socket records not stored {}; TIME_WAIT births missed {}, ends without a record {} (records evicted {}), not stored {}{}",
            self.events,
            units::duration(self.duration_ns),
            lost.events,
            lost.ringbuf_full,
            lost.recursion_misses,
            lost.unreadable,
            lost.undecodable,
            lost.sock_records_not_stored,
            lost.tw_births_missed,
            lost.tw_ends_without_record,
            lost.tw_evictions,
            lost.tw_records_not_stored,
            if self.time_wait_tracking {
                ""
            } else {
                "; TIME_WAIT not tracked on this kernel"
            },
        )?;
        if lost.tw_births_owner_unknown > 0 {
            writeln!(
                out,
                "TIME_WAIT births not shown: {} whose owner was never learnt (they may be another process's than --pid's)",
                lost.tw_births_owner_unknown
            )?;
        }
        if self.time_wait_skipped > 0 || self.time_wait_overflows_kernel.is_some_and(|n| n > 0) {
            writeln!(
                out,
                "closes that skipped TIME_WAIT (tcp_max_tw_buckets full): {} seen, {} by the kernel's count",
                self.time_wait_skipped,
                self.time_wait_overflows_kernel
                    .map_or_else(|| "?".to_owned(), |n| n.to_string()),
            )?;
        }
        Ok(())
    }
}

/// Every namespace with transitions or sockets now, in inode order.
fn namespaces(stats: &TeardownStats, now: &CensusNow) -> Vec<NamespaceReport> {
    let empty = OwnerStats::default();
    let inodes: BTreeSet<u64> = stats
        .namespaces
        .keys()
        .chain(now.by_netns.keys())
        .copied()
        .collect();
    inodes
        .into_iter()
        .map(|netns| NamespaceReport {
            netns,
            states: stats
                .namespaces
                .get(&netns)
                .unwrap_or(&empty)
                .states
                .stats_with_now(|state| now.of_netns(netns, state)),
        })
        .filter(|n| !n.states.is_empty())
        .collect()
}

/// Processes (or groups) shown in text; busiest closers first, JSON has
/// them all.
const TEXT_PROCESSES: usize = 20;

fn write_state_header(out: &mut impl Write, prefix: &str) -> io::Result<()> {
    write_cells(out, prefix, &STATE_COLUMNS.map(str::to_owned))
}

fn write_state_row(out: &mut impl Write, prefix: &str, s: &StateStats) -> io::Result<()> {
    write_cells(out, prefix, &s.cells())
}

/// One line of a states table: the state left-aligned, numbers right.
fn write_cells(out: &mut impl Write, prefix: &str, c: &[String; 11]) -> io::Result<()> {
    writeln!(
        out,
        "{prefix}{:<11} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Owner, TcpState, Transition};
    use crate::{ends::ResetsApart, loader::LossReport, session::TimeWaitTally};

    fn report() -> SummaryReport {
        let mut stats = TeardownStats::default();
        for (pid, old, new, ms) in [
            (10, TcpState::Established, TcpState::FinWait1, 1),
            (10, TcpState::FinWait1, TcpState::FinWait2, 2),
            (10, TcpState::TimeWait, TcpState::Close, 60_000),
            (20, TcpState::Established, TcpState::CloseWait, 1),
            (20, TcpState::CloseWait, TcpState::LastAck, 200),
        ] {
            stats.record(&Transition {
                ts_ns: 0,
                sock_id: 0,
                owner: Some(Owner {
                    pid,
                    comm: format!("p{pid}").as_str().into(),
                    cgroup: 0,
                }),
                src: "127.0.0.1:1".parse().unwrap(),
                dst: "127.0.0.1:2".parse().unwrap(),
                old,
                new,
                in_state_ns: Some(ms * 1_000_000),
                end: None,
                netns: 0,
                accepted: false,
                ending: None,
            });
        }
        let end = SessionEnd {
            events: 5,
            duration_ns: 30_000_000_000,
            loss: LossReport::default(),
            time_wait: TimeWaitTally::default(),
            time_wait_tracking: true,
            mini_socket_peak: 0,
            now: CensusNow::default(),
            resets_apart: ResetsApart::default(),
        };
        SummaryReport::new(&stats, &end)
    }

    #[test]
    fn json_has_states_processes_and_losses() {
        let mut buf = Vec::new();
        report().write_json_pretty(&mut buf).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["type"], "summary");
        assert_eq!(v["active_closes"], 1);
        assert_eq!(v["passive_closes"], 1);
        assert_eq!(v["lost"]["events"], 0);
        let states: Vec<&str> = v["states"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["state"].as_str().unwrap())
            .collect();
        assert_eq!(
            states,
            [
                "FIN_WAIT1",
                "FIN_WAIT2",
                "TIME_WAIT",
                "CLOSE_WAIT",
                "LAST_ACK"
            ]
        );
        let tw = &v["states"][2];
        for key in [
            "entered",
            "count",
            "now",
            "oldest_now_ns",
            "min_ns",
            "p50_ns",
            "p90_ns",
            "p99_ns",
            "p999_ns",
            "max_ns",
        ] {
            assert!(tw[key].is_u64(), "{key}");
        }
        // The active closer is listed first.
        assert_eq!(v["processes"][0]["pid"], 10);
        assert_eq!(v["processes"][0]["active_closes"], 1);
        assert_eq!(v["processes"][1]["passive_closes"], 1);
    }

    #[test]
    fn text_has_readable_units() {
        let mut buf = Vec::new();
        report().write_text(&mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let tw_row = text
            .lines()
            .find(|l| l.starts_with("TIME_WAIT"))
            .expect(&text);
        assert!(tw_row.contains("1m00s"), "{tw_row}");
        assert!(text.contains("5 transitions in 30.0s; lost 0"), "{text}");
    }
}
