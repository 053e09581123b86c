//! What a guest's console tells the host: which kernel booted, each test's
//! outcome, which tests were under way when a hung guest's watchdog
//! fired, and the first thing the kernel complained of. A run that breaks is reported with the last two, so a
//! CI log's last lines say what hung or crashed, not only that it did.

use std::collections::BTreeMap;

use crate::vm::{Outcome, parse_test_line};

/// Printed by the guest's `/init` once the kernel is up, with its release.
const BOOTED: &str = "twtrace-vm: kernel ";
/// Printed by `/init` when the test binary returns.
const EXITED: &str = "twtrace-vm: exit ";
/// Printed by `/init` shortly before the host's limit, with the tests
/// under way then.
const UNDER_WAY: &str = "twtrace-vm: under way:";

/// Printed by `/init` then, once for each twtrace and each task in
/// uninterruptible sleep, with the kernel function it waits in.
const WAITING: &str = "twtrace-vm: waiting: ";
/// Enough of those for a report's one line.
const WAITING_SHOWN: usize = 6;

/// The kernel's words for a crash, a stall or a hang (printed at `KERN_ERR`
/// or above, which the guest's console shows).
const ALARMS: &[&str] = &[
    "Oops",
    "BUG:",
    "Kernel panic",
    "soft lockup",
    "hard LOCKUP",
    "rcu_sched detected stall",
    "rcu_preempt detected stall",
    "self-detected stall",
    "blocked for more than",
    "WARNING: CPU",
];

#[derive(Default)]
pub struct GuestConsole {
    /// The guest kernel's release, once it has booted.
    pub release: Option<String>,
    /// Whether the test binary ran to its end.
    pub exited: bool,
    pub outcomes: BTreeMap<String, Outcome>,
    under_way: Vec<String>,
    waiting: Vec<String>,
    alarm: Option<String>,
}

impl GuestConsole {
    /// Takes one line of the console.
    pub fn read(&mut self, line: &str) {
        // The firmware's escape sequences may precede a marker.
        if let Some(at) = line.find(BOOTED) {
            self.release = Some(line[at + BOOTED.len()..].trim().to_string());
        } else if line.contains(EXITED) {
            self.exited = true;
        } else if let Some(at) = line.find(UNDER_WAY) {
            self.under_way = line[at + UNDER_WAY.len()..]
                .split_whitespace()
                .map(str::to_string)
                .collect();
        } else if let Some(at) = line.find(WAITING) {
            self.waiting
                .push(line[at + WAITING.len()..].trim().to_string());
        } else if let Some((test, outcome)) = parse_test_line(line) {
            self.outcomes.insert(test, outcome);
        } else if self.alarm.is_none() && ALARMS.iter().any(|alarm| line.contains(alarm)) {
            self.alarm = Some(kernel_text(line).to_string());
        }
    }

    /// What was going on when the guest stopped short: the tests under
    /// way and the kernel's first complaint, as far as the console told.
    pub fn when_it_stopped(&self) -> String {
        let mut parts = Vec::new();
        if !self.under_way.is_empty() {
            parts.push(format!("under way: {}", self.under_way.join(", ")));
        }
        if !self.waiting.is_empty() {
            let shown = &self.waiting[..self.waiting.len().min(WAITING_SHOWN)];
            let more = self.waiting.len() - shown.len();
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            parts.push(format!("waiting: {}{more}", shown.join(", ")));
        }
        if let Some(alarm) = &self.alarm {
            parts.push(format!("the kernel said: {alarm}"));
        }
        if parts.is_empty() {
            "the kernel said nothing".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// A kernel line without its `[   12.345678] ` timestamp.
fn kernel_text(line: &str) -> &str {
    let line = line.trim();
    match line
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
    {
        Some((stamp, text)) if stamp.trim().parse::<f64>().is_ok() => text,
        _ => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_guest_names_its_tests_under_way_and_the_first_alarm() {
        let mut console = GuestConsole::default();
        for line in [
            "\u{1b}[2Jtwtrace-vm: kernel 5.10.0-46-cloud-amd64",
            "test a ... ok",
            "[  840.123456] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [kworker/1:2:80]",
            "[  900.000001] INFO: task b:99 blocked for more than 120 seconds.",
            "twtrace-vm: under way: b c",
            "twtrace-vm: waiting: twtrace(120) S ep_poll+0x2a2/0x3b0",
        ] {
            console.read(line);
        }
        assert_eq!(console.release.as_deref(), Some("5.10.0-46-cloud-amd64"));
        assert!(!console.exited);
        assert_eq!(console.outcomes.get("a"), Some(&Outcome::Pass));
        assert_eq!(
            console.when_it_stopped(),
            "under way: b, c; waiting: twtrace(120) S ep_poll+0x2a2/0x3b0; the kernel said: watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [kworker/1:2:80]"
        );
        console.read("twtrace-vm: exit 0");
        assert!(console.exited);
    }

    #[test]
    fn a_quiet_stop_says_so() {
        let console = GuestConsole::default();
        assert_eq!(console.when_it_stopped(), "the kernel said nothing");
    }
}
