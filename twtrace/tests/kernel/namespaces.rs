//! Network namespaces: every transition carries its own, and `--netns`
//! keeps one (by name, inode or `pid:N`), in the kernel.

use std::{os::unix::fs::MetadataExt, process::Command};

use crate::{
    Test,
    peer::{Netns, Peer},
    support::spawn_attached,
};

pub const TESTS: &[Test] = crate::tests![netns_filter_keeps_one_namespace_by_name_inode_or_pid,];

fn inode(netns: &Netns) -> u64 {
    std::fs::metadata(format!("/run/netns/{}", netns.name))
        .expect("the namespace's file")
        .ino()
}

fn summary_of(spec: &str, makers: &mut [(Netns, Peer)]) -> serde_json::Value {
    let summary = spawn_attached(
        Command::new(env!("CARGO_BIN_EXE_twtrace"))
            .args(["summary", "-d", "3s", "-o", "json", "--netns", spec])
            .stdout(std::process::Stdio::piped()),
    );
    for (_, maker) in makers.iter_mut() {
        maker.go();
    }
    for (_, maker) in makers.iter_mut() {
        maker.wait_done();
    }
    let out = summary.wait_with_output().expect("summary");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("summary JSON")
}

fn makers() -> Vec<(Netns, Peer)> {
    [5, 7]
        .into_iter()
        .map(|count| {
            let netns = Netns::new();
            let maker = Peer::time_wait_maker(&netns, count);
            (netns, maker)
        })
        .collect()
}

/// Two namespaces make 5 and 7 connections: `--netns` sees only its own,
/// whichever way it is named.
fn netns_filter_keeps_one_namespace_by_name_inode_or_pid() {
    let mut both = makers();
    let name = both[0].0.name.clone();
    let v = summary_of(&name, &mut both);
    assert_eq!(v["active_closes"], 5, "{v}");
    let namespaces = v["namespaces"].as_array().expect("namespaces");
    assert!(
        namespaces.iter().all(|n| n["netns"] == inode(&both[0].0)),
        "{namespaces:?}"
    );

    let mut both = makers();
    let by_inode = inode(&both[1].0).to_string();
    let v = summary_of(&by_inode, &mut both);
    assert_eq!(v["active_closes"], 7, "{v}");

    let mut both = makers();
    let by_pid = format!("pid:{}", both[1].1.pid);
    let v = summary_of(&by_pid, &mut both);
    assert_eq!(v["active_closes"], 7, "{v}");
}
