//! Kernel tests: load the real eBPF program, drive real loopback
//! connections whose teardown the test controls, and assert what the
//! kernel reports — transitions, owners and durations.
//!
//! Each connection lives in a network namespace the test creates; deleting
//! it ends the TIME_WAIT sockets early, so the whole teardown is seen
//! without waiting 60 s (one test does wait, for a real expiry).
//!
//! One file per subject; each lists its tests with `tests!`, by function:
//! a test's name is its function's, and a test function left out of the
//! list is dead code, which the build refuses.
//!
//! Run as root (`cargo xtask test` does). Without root every test is
//! reported as ignored, with the reason.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use libtest_mimic::{Arguments, Completion, Trial};

/// A test's name and body.
pub type Test = (&'static str, fn());

/// The tests of a module, each named by its function.
#[macro_export]
macro_rules! tests {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), $test as fn())),*]
    };
}

mod at_scale;
mod cli;
mod ends;
mod namespaces;
mod peer;
mod pods;
mod record;
mod reliability;
mod reports;
mod state_now;
mod support;
mod time_wait;
mod transitions;
mod warnings;

/// Tests listed as `ALONE` (every at-scale test) take it whole, the others
/// share it. The at-scale tests drive the machine at its top connection
/// rate and hold twtrace to the kernel's counts there; a pile of 100 000
/// TIME_WAIT sockets beside another test's twtrace kept a CPU in the
/// kernel for 12 minutes in the Debian 12 VM under emulation (soft
/// lockup); a test that counts the hand-overs it cannot see would count
/// other tests' too.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn main() -> ExitCode {
    if let Some(code) = peer::run_if_peer() {
        return code;
    }
    let args = Arguments::from_args();
    let skip = support::skip_reason();
    if let Some(reason) = &skip {
        eprintln!("kernel tests skipped: {reason}");
    }
    support::quiet_skips();
    let alone = [at_scale::TESTS, time_wait::ALONE, state_now::ALONE].concat();
    let shared = [
        transitions::TESTS,
        warnings::TESTS,
        ends::TESTS,
        time_wait::TESTS,
        cli::TESTS,
        record::TESTS,
        reports::TESTS,
        state_now::TESTS,
        namespaces::TESTS,
        pods::TESTS,
        reliability::TESTS,
    ]
    .concat();
    // In a VM (`cargo xtask vm-test`), the tests under way are files in
    // this directory, which the guest lists if it hangs. Not lines on the
    // console: they would land inside the harness's own lines.
    let under_way_dir = std::env::var_os("TWTRACE_TESTS_UNDER_WAY").map(PathBuf::from);
    let trials = alone
        .into_iter()
        .map(|test| (test, true))
        .chain(shared.into_iter().map(|test| (test, false)))
        .map(|((name, test), runs_alone)| {
            let skip = skip.clone();
            let under_way_dir = under_way_dir.clone();
            Trial::ignorable_test(name, move || {
                if let Some(reason) = skip {
                    return Ok(Completion::ignored_with(reason));
                }
                let (_shared, _alone);
                if runs_alone {
                    _alone = MACHINE
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                } else {
                    _shared = MACHINE
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                let _under_way = under_way_dir.as_deref().map(|dir| UnderWay::new(dir, name));
                // A test that finds the running kernel cannot give what it
                // checks says so with `support::skip`, and is reported as
                // ignored with that reason rather than passed or failed.
                match std::panic::catch_unwind(test) {
                    Ok(()) => Ok(Completion::Completed),
                    Err(payload) => match payload.downcast::<support::Skip>() {
                        Ok(skip) => Ok(Completion::ignored_with(skip.0)),
                        Err(payload) => std::panic::resume_unwind(payload),
                    },
                }
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// A test under way, as a file named after it while it runs.
struct UnderWay(PathBuf);

impl UnderWay {
    fn new(dir: &Path, test: &str) -> Self {
        let path = dir.join(test);
        // Best effort: the list only serves a report of a hung guest.
        let _ = std::fs::write(&path, b"");
        Self(path)
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
