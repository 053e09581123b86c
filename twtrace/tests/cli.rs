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

#[test]
fn bad_flag_values_are_usage_errors() {
    let cases: &[&[&str]] = &[
        &["trace", "--duration", "-5s"],
        &["trace", "--duration", "abc"],
        &["trace", "--duration", "5"],
        &["trace", "--duration", "0s"],
        &["trace", "--port", "0"],
        &["trace", "--port", "65536"],
        &["trace", "--port", "http"],
        &["trace", "--pid", "0"],
        &["trace", "--pid", "-1"],
        &["trace", "-o", "yaml"],
        &["trace", "--ring-kib", "100"],
        &["trace", "--max-sockets", "0"],
        &["trace", "-4", "-6"],
        &["trace", "--no-such-flag"],
        &["no-such-command"],
    ];
    for args in cases {
        let out = twtrace(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
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
