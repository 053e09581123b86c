//! Sockets that already sit in a teardown state when twtrace starts: a
//! CLOSE_WAIT leak, orphaned FIN_WAIT2 and TIME_WAIT mini-sockets, made in
//! a namespace of the test's own before twtrace runs, then counted against
//! `ss` in that namespace, with owners and ages.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    Test,
    peer::{self, Amount, Netns, Peer},
    record::{read_json, record, workload_with},
    support::{self, command_stdout, scratch_dir, spawn_attached},
};

pub const TESTS: &[Test] = crate::tests![
    sockets_lists_what_predates_twtrace_exactly_as_ss_with_owners_and_ages,
    sockets_older_than_exits_4_only_when_something_is_that_old,
    summary_top_and_doctor_show_a_close_wait_leak_that_predates_them,
    a_short_summary_reports_time_wait_entered_and_now,
    record_fails_on_count_time_wait_within_a_short_job,
    fin_wait2_of_orphans_is_timed_when_the_peer_closes_late,
];

/// Run with nothing beside them (`MACHINE`).
pub const ALONE: &[Test] = crate::tests![sockets_snapshot_of_100k_time_wait_is_exact_and_quick];

/// Sockets per state the leaker leaves.
const LEAKED: usize = 25;
/// A jiffy at HZ=100 (the coarsest), plus the dump's own time.
const TICK_NS: i128 = 20_000_000;

fn twtrace(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .args(args)
        .output()
        .expect("running twtrace");
    let code = out.status.code().expect("twtrace exited by a signal");
    assert!(
        code == 0 || code == 4,
        "twtrace {args:?} exited {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The leaker's namespace, ready, and the moment it was (an upper bound
/// of every socket's age).
struct Leak {
    netns: Netns,
    inode: u64,
    peer: Peer,
    made_by: Instant,
}

fn leak() -> Leak {
    let netns = Netns::new();
    let inode = std::fs::metadata(format!("/run/netns/{}", netns.name))
        .expect("the namespace's file")
        .ino();
    let started = Instant::now();
    let mut peer = Peer::leaker(&netns, LEAKED);
    peer.wait_done();
    let made_by = Instant::now();
    // The sockets were made within this window.
    assert!(made_by - started < Duration::from_secs(10));
    Leak {
        netns,
        inode,
        peer,
        made_by,
    }
}

fn ss_count(netns: &Netns, state: &str) -> usize {
    command_stdout(
        "ip",
        &["netns", "exec", &netns.name, "ss", "-Htan", "state", state],
    )
    .lines()
    .count()
}

fn sockets_lists_what_predates_twtrace_exactly_as_ss_with_owners_and_ages() {
    let leak = leak();
    std::thread::sleep(Duration::from_millis(1500));
    let asked = Instant::now();
    let (code, out) = twtrace(&["sockets", "-o", "json"]);
    let answered = Instant::now();
    assert_eq!(code, 0);
    let v = json(&out);
    assert_eq!(v["schema"], "twtrace-sockets/1");
    let ours: Vec<&serde_json::Value> = v["sockets"]
        .as_array()
        .expect("sockets")
        .iter()
        .filter(|s| s["netns"] == leak.inode)
        .collect();
    let mut per_state: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &ours {
        *per_state.entry(s["state"].as_str().unwrap()).or_default() += 1;
    }
    for (state, ss_name) in [
        ("CLOSE_WAIT", "close-wait"),
        ("FIN_WAIT2", "fin-wait-2"),
        ("TIME_WAIT", "time-wait"),
    ] {
        let kernel = ss_count(&leak.netns, ss_name);
        assert_eq!(kernel, LEAKED, "ss {ss_name}");
        assert_eq!(
            per_state.get(state).copied(),
            Some(kernel),
            "{state}: {per_state:?}"
        );
    }
    // Oldest possible: made just after the leaker started; youngest: made
    // by the time it said done.
    let at_least = i128::try_from((asked - leak.made_by).as_nanos()).unwrap();
    for s in &ours {
        let age = i128::from(s["age_ns"].as_u64().unwrap());
        let state = s["state"].as_str().unwrap();
        assert!(
            age + TICK_NS >= at_least,
            "{state} aged {age} ns, less than {at_least}: {s}"
        );
        match state {
            "CLOSE_WAIT" => {
                assert_eq!(s["pid"], leak.peer.pid, "the leaker owns it: {s}");
                assert_eq!(s["owner_source"], "process");
                assert_eq!(s["age_exact"], false);
            }
            "TIME_WAIT" => {
                // The server end closed first; its listener is the leaker's.
                assert_eq!(s["pid"], leak.peer.pid, "{s}");
                assert_eq!(s["owner_source"], "listener");
                assert_eq!(s["age_exact"], true);
                let at_most = (answered - leak.made_by).as_nanos() + 10 * 1_000_000_000;
                assert!(age < i128::try_from(at_most).unwrap(), "{s}");
                let remaining = s["remaining_ns"].as_u64().unwrap();
                assert!(
                    (i128::from(remaining) + age - 60_000_000_000).abs() <= TICK_NS,
                    "{s}"
                );
            }
            "FIN_WAIT2" => {
                // The clients' ends: orphaned, no listener on their port.
                assert_eq!(s["owner_source"], "unknown", "{s}");
                assert_eq!(s["age_exact"], true);
            }
            other => panic!("unexpected state {other}: {s}"),
        }
    }
    let groups = v["groups"].as_array().expect("groups");
    let leak_group = groups
        .iter()
        .find(|g| g["netns"] == leak.inode && g["state"] == "CLOSE_WAIT")
        .expect("a CLOSE_WAIT group");
    assert_eq!(leak_group["pid"], leak.peer.pid);
    assert_eq!(leak_group["count"], LEAKED);
    drop(leak);
}

fn sockets_older_than_exits_4_only_when_something_is_that_old() {
    let leak = leak();
    std::thread::sleep(Duration::from_millis(1200));
    let pid = leak.peer.pid.to_string();
    let select = [
        "sockets",
        "--pid",
        &pid,
        "--state",
        "close-wait",
        "-o",
        "json",
    ];
    let (code, out) = twtrace(&[&select[..], &["--older-than", "1s"]].concat());
    assert_eq!(code, 4, "{out}");
    let v = json(&out);
    assert_eq!(v["sockets"].as_array().unwrap().len(), LEAKED);
    let (code, out) = twtrace(&[&select[..], &["--older-than", "1h"]].concat());
    assert_eq!(code, 0, "{out}");
    assert_eq!(json(&out)["sockets"].as_array().unwrap().len(), 0);
    // A state that is not a teardown state is a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .args(["sockets", "--state", "established"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    drop(leak);
}

fn summary_top_and_doctor_show_a_close_wait_leak_that_predates_them() {
    let leak = leak();
    std::thread::sleep(Duration::from_millis(1200));
    let pid = leak.peer.pid;
    let (_, out) = twtrace(&["summary", "-d", "1s", "-o", "json"]);
    let v = json(&out);
    let process = v["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("the leaker is not in the summary: {v}"));
    let close_wait = process["states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["state"] == "CLOSE_WAIT")
        .expect("CLOSE_WAIT");
    assert_eq!(close_wait["now"], LEAKED, "{close_wait}");
    assert_eq!(close_wait["entered"], 0, "entered before the summary began");
    assert!(close_wait["oldest_now_ns"].as_u64().unwrap() >= 1_000_000_000);

    // The live view's plain-text table: its row holds the CLOSE_WAIT now.
    let (_, table) = twtrace(&["top", "-b", "-n", "1", "--pid", &pid.to_string()]);
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(pid.to_string().as_str()))
        .unwrap_or_else(|| panic!("no row for {pid}:\n{table}"))
        .split_whitespace()
        .collect();
    // PID COMM ACTIVE/s PASSIVE/s TW NOW CW NOW ...
    assert_eq!(row[5], LEAKED.to_string(), "{row:?}");
    assert!(
        table.contains(&format!("CLOSE_WAIT now: {LEAKED}")),
        "{table}"
    );

    let (code, out) = twtrace(&["doctor", "--leak-after", "1s", "-o", "json"]);
    assert_eq!(code, 4, "a leak is a warning");
    let v = json(&out);
    let leaks = v["host"]["close_wait_leaks"].as_array().expect("leaks");
    let ours = leaks
        .iter()
        .find(|l| l["pid"] == pid)
        .unwrap_or_else(|| panic!("doctor did not name {pid}: {leaks:?}"));
    assert_eq!(ours["count"], LEAKED);
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["id"] == "close_wait_leak"
                && f["title"].as_str().unwrap().contains(&pid.to_string()))
    );
    drop(leak);
}

/// The state `name` in a report's `states` array.
fn state<'a>(states: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    states
        .as_array()
        .expect("states")
        .iter()
        .find(|s| s["state"] == name)
        .unwrap_or_else(|| panic!("no {name} in {states}"))
}

/// Seven connections closed first by the client: a 4 s summary (shorter
/// than TIME_WAIT's 60 s) reports TIME_WAIT entered 7 and now 7, though
/// the kernel did not trace their move out of the orphaned FIN_WAIT2.
fn a_short_summary_reports_time_wait_entered_and_now() {
    let netns = Netns::new();
    let mut maker = Peer::time_wait_maker(&netns, 7);
    let pid = maker.pid.to_string();
    let summary = spawn_attached(
        Command::new(env!("CARGO_BIN_EXE_twtrace"))
            .args(["summary", "-d", "4s", "-o", "json", "--pid", &pid])
            .stdout(std::process::Stdio::piped()),
    );
    maker.go();
    maker.wait_done();
    let out = summary.wait_with_output().expect("summary");
    assert!(out.status.success());
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["lost"]["events"], 0, "{v}");
    let tw = state(&v["states"], "TIME_WAIT");
    assert_eq!(
        (tw["entered"].as_u64(), tw["now"].as_u64()),
        (Some(7), Some(7)),
        "{tw}"
    );
    assert_eq!(tw["oldest_now_exact"], true);
    let fw2 = state(&v["states"], "FIN_WAIT2");
    assert_eq!(
        (fw2["entered"].as_u64(), fw2["count"].as_u64()),
        (Some(7), Some(7)),
        "{fw2}"
    );
    assert_eq!(state(&v["states"], "CLOSE_WAIT")["entered"], 7);
    // The same, for the maker's namespace.
    let inode = std::fs::metadata(format!("/run/netns/{}", netns.name))
        .expect("the namespace's file")
        .ino();
    let ns = v["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["netns"] == inode)
        .unwrap_or_else(|| panic!("no namespace {inode}: {}", v["namespaces"]));
    assert_eq!(state(&ns["states"], "TIME_WAIT")["now"], 7, "{ns}");
    drop(maker);
}

/// `count(TIME_WAIT)` is what entered TIME_WAIT: it can break a CI job
/// shorter than a minute.
fn record_fails_on_count_time_wait_within_a_short_job() {
    let dir = scratch_dir("record-tw");
    let report = dir.join("report.json");
    let out = record(
        &[
            "--json",
            report.to_str().unwrap(),
            "--fail-if",
            "count(TIME_WAIT) > 1",
            "--fail-if",
            "now(TIME_WAIT) != 7",
        ],
        &workload_with(peer::auto_maker_env(7), "true"),
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = read_json(&report);
    let tw = state(&v["states"], "TIME_WAIT");
    assert_eq!(
        (tw["entered"].as_u64(), tw["now"].as_u64()),
        (Some(7), Some(7)),
        "{tw}"
    );
    let thresholds = v["thresholds"].as_array().unwrap();
    assert_eq!(thresholds[0]["broken"], true);
    assert_eq!(thresholds[0]["actual"], 7);
    assert_eq!(
        thresholds[1]["broken"], false,
        "now(TIME_WAIT) is 7: {thresholds:?}"
    );
}

/// The server closes 100 ms after each client: every client end spends
/// ~100 ms in an orphaned FIN_WAIT2 whose move to TIME_WAIT the kernel
/// does not trace; the report still times all seven, to a timer tick.
fn fin_wait2_of_orphans_is_timed_when_the_peer_closes_late() {
    const LATE_MS: u64 = 100;
    let dir = scratch_dir("record-late");
    let report = dir.join("report.json");
    let waits_file = dir.join("waits");
    let out = record(
        &["--json", report.to_str().unwrap()],
        &workload_with(peer::late_maker_env(7, LATE_MS, &waits_file), "true"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = read_json(&report);
    let fw2 = state(&v["states"], "FIN_WAIT2");
    assert_eq!(
        (fw2["entered"].as_u64(), fw2["count"].as_u64()),
        (Some(7), Some(7)),
        "{fw2}"
    );
    // Against how long the peer really waited (a loaded or emulated
    // machine oversleeps 100 ms by as much again): a jiffy (up to 10 ms at
    // HZ=100) either way, plus the server's wake-up.
    let waits: Vec<u64> = std::fs::read_to_string(&waits_file)
        .expect("the peer's waits")
        .lines()
        .map(|l| l.parse().expect("ns"))
        .collect();
    assert_eq!(waits.len(), 7);
    let (shortest, longest) = (*waits.iter().min().unwrap(), *waits.iter().max().unwrap());
    assert!(shortest >= LATE_MS * 1_000_000, "{waits:?}");
    let (min, max) = (
        fw2["min_ns"].as_u64().unwrap(),
        fw2["max_ns"].as_u64().unwrap(),
    );
    assert!(
        min + 10_000_000 >= shortest && max <= longest + 25_000_000,
        "{fw2}; the peer waited {waits:?} ns"
    );
    let tw = state(&v["states"], "TIME_WAIT");
    assert_eq!(
        (tw["entered"].as_u64(), tw["now"].as_u64()),
        (Some(7), Some(7)),
        "{tw}"
    );
}

/// A namespace holding 100 000 TIME_WAIT sockets: the snapshot counts them
/// exactly, in under 2 s.
fn sockets_snapshot_of_100k_time_wait_is_exact_and_quick() {
    // A few connections reuse a port whose TIME_WAIT their SYN takes over.
    const PILE: u64 = 102_000;
    let mut netns = Netns::new();
    command_stdout(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.tcp_max_tw_buckets=200000",
        ],
    );
    let inode = std::fs::metadata(format!("/run/netns/{}", netns.name))
        .expect("the namespace's file")
        .ino();
    let mut flood = Peer::flood(&netns, Amount::Connections(PILE), 2, None);
    let started = std::time::Instant::now();
    flood.go();
    flood.wait_done();
    // The pile must stand still while it is counted: the first TIME_WAIT
    // expires 60 s after its birth, which came after `started`.
    let lifetime = Duration::from_secs(twtrace_common::TIME_WAIT_LEN_SECS);
    let took = started.elapsed();
    if took >= lifetime {
        skip_without_the_pile(
            flood,
            netns,
            PILE,
            format!(
                "making 100 000 TIME_WAIT took {} s here, past their 60 s lifetime: the first are gone",
                took.as_secs()
            ),
        );
    }
    let kernel = ss_count(&netns, "time-wait");
    let (_, out) = twtrace(&["sockets", "-o", "json", "--state", "time-wait"]);
    // Nothing is born meanwhile, and nothing expires before the first
    // birth is 60 s old: the same count after as before says twtrace
    // counted a still pile. Where counting took past that (emulation), a
    // moved pile is the clock's doing, not twtrace's.
    let after = ss_count(&netns, "time-wait");
    let counted_by = started.elapsed();
    if after != kernel && counted_by >= lifetime {
        skip_without_the_pile(
            flood,
            netns,
            PILE,
            format!(
                "making and counting 100 000 TIME_WAIT took {} s here, past their 60 s lifetime",
                counted_by.as_secs()
            ),
        );
    }
    assert_eq!(
        after, kernel,
        "the pile moved, {counted_by:?} after the flood began"
    );
    assert!(kernel >= 100_000, "only {kernel} TIME_WAIT made");
    let v = json(&out);
    let ours = v["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["netns"] == inode)
        .count();
    assert_eq!(ours, kernel, "twtrace's count against ss");
    let took = v["took_ns"].as_u64().unwrap();
    eprintln!(
        "snapshot of {kernel} TIME_WAIT sockets took {} ms",
        took / 1_000_000
    );
    assert!(took < 2_000_000_000, "the snapshot took {took} ns");
    drop(flood);
    netns.delete();
    support::wait_for_time_wait_purge(PILE);
}

/// Skips the test, its pile of TIME_WAIT gone first with its namespace.
fn skip_without_the_pile(flood: Peer, mut netns: Netns, pile: u64, why: String) -> ! {
    drop(flood);
    netns.delete();
    support::wait_for_time_wait_purge(pile);
    support::skip(why)
}
