//! The real binary's answers to bad input: one line on stderr, a non-zero
//! exit, never a panic. None of these needs root.

use std::process::{Command, Output};

fn twtrace(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .args(args)
        .output()
        .expect("running twtrace")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every subcommand's bad input: (arguments, exit code, words the one
/// line must hold). Exit 2 is a usage error, 1 a run that cannot start.
const BAD_INPUT: &[(&[&str], i32, &str)] = &[
    (
        &["trace", "--duration", "-5s"],
        2,
        "must be a positive duration",
    ),
    (&["trace", "--duration", "abc"], 2, "not a duration"),
    (&["trace", "--duration", "0"], 2, "--duration"),
    (&["trace", "--duration", "0s"], 2, "positive"),
    (&["trace", "--port", "0"], 2, "--port"),
    (&["trace", "--port", "65536"], 2, "--port"),
    (&["trace", "--port", "http"], 2, "--port"),
    (&["trace", "--pid", "0"], 2, "--pid"),
    (&["trace", "--pid", "-1"], 2, "'-1'"),
    (&["trace", "-o", "yaml"], 2, "possible values: text, json"),
    (&["trace", "--ring-kib", "100"], 2, "power of two"),
    (&["trace", "--ring-kib", "0"], 2, "power of two"),
    (&["trace", "--max-sockets", "0"], 2, "--max-sockets"),
    (&["trace", "-4", "-6"], 2, "cannot be used with"),
    (&["trace", "--no-such-flag"], 2, "--no-such-flag"),
    (&["no-such-command"], 2, "no-such-command"),
    (&["summary", "-d", "-5s"], 2, "positive"),
    (&["summary", "-o", "xml"], 2, "possible values"),
    (
        &["summary", "--metrics-addr", "nowhere"],
        2,
        "socket address",
    ),
    (&["top", "-i", "0s"], 2, "positive"),
    (&["top", "-i", "abc"], 2, "not a duration"),
    (&["top", "-n", "0"], 2, "--count"),
    (&["top", "-d", "1x"], 2, "unknown unit"),
    (&["ports", "-d", "0s"], 2, "positive"),
    (&["ports", "-o", "csv"], 2, "possible values"),
    (
        &["serve", "--metrics-addr", "127.0.0.1:99999"],
        2,
        "socket address",
    ),
    (&["doctor", "-o", "yaml"], 2, "possible values"),
    (&["doctor", "--leak-after", "0s"], 2, "positive"),
    (&["sockets", "--state", "listen"], 2, "not a teardown state"),
    (&["sockets", "--older-than", "-1s"], 2, "positive"),
    (&["sockets", "-o", "csv"], 2, "possible values"),
    (&["sockets", "--netns", "no-such-ns"], 1, "ip netns list"),
    (&["summary", "--netns", "pid:abc"], 1, "not a pid"),
    (&["record"], 2, "<CMD>"),
    (
        &["record", "--fail-if", "p99(X) > 1ms", "--", "true"],
        2,
        "column 5",
    ),
    (
        &["record", "--fail-if", "p99(FIN_WAIT2) >", "--", "true"],
        2,
        "--fail-if",
    ),
    (&["record", "--pid", "abc", "--", "true"], 2, "--pid"),
    // Unknown pids and unusable files fail before anything is traced.
    (
        &["trace", "--pid", "4194305"],
        1,
        "no process with pid 4194305",
    ),
    (
        &["top", "--pid", "4194305"],
        1,
        "no process with pid 4194305",
    ),
    (
        &["summary", "--pid", "4194305"],
        1,
        "no process with pid 4194305",
    ),
    (
        &["record", "--json", "/nonexistent/r.json", "--", "true"],
        1,
        "/nonexistent/r.json",
    ),
    (
        &["record", "--hlog", "/nonexistent/r.hlog", "--", "true"],
        1,
        "/nonexistent/r.hlog",
    ),
    (
        &["record", "--bench-json", "/proc/no/b.json", "--", "true"],
        1,
        "/proc/no/b.json",
    ),
    (
        &["record", "--", "/no/such/command"],
        1,
        "cannot run `/no/such/command`",
    ),
    (
        &["record", "--", "no-such-command-on-path"],
        1,
        "cannot run",
    ),
];

#[test]
fn bad_input_is_one_line_and_a_non_zero_exit() {
    let mut failures = Vec::new();
    for (args, code, words) in BAD_INPUT {
        let out = twtrace(args);
        let err = stderr(&out);
        let ok = out.status.code() == Some(*code)
            && err.lines().count() == 1
            && err.contains(words)
            && !err.contains("panicked")
            && out.stdout.is_empty();
        if !ok {
            failures.push(format!(
                "{args:?}: exit {:?}, stderr {err:?}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn negative_duration_says_it_must_be_positive() {
    let err = stderr(&twtrace(&["trace", "--duration", "-5s"]));
    assert!(err.contains("must be a positive duration"), "{err}");
}

#[test]
fn unknown_pid_is_one_clear_line() {
    // Above the kernel's pid_max limit (4194304), so no process has it.
    let out = twtrace(&["trace", "--pid", "4194305"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "twtrace: no process with pid 4194305\n");
}

#[test]
fn help_and_version_succeed() {
    for args in [&["--help"][..], &["--version"], &["trace", "--help"]] {
        let out = twtrace(args);
        assert!(out.status.success(), "{args:?}");
        assert!(!out.stdout.is_empty());
    }
}
