//! What twtrace says it cannot see is exactly what this kernel lacks:
//! one warning for each optional tracepoint missing here, naming the
//! feature it costs, and none for anything the kernel has. Run on every
//! kernel of the matrix, this is what holds each kernel's differences to
//! the README's table.

use std::{fs, path::Path, process::Command};

use crate::Test;

pub const TESTS: &[Test] = crate::tests![warnings_name_exactly_what_this_kernel_lacks];

/// The tracepoints twtrace does without, and what each warning must say
/// is lost.
const OPTIONAL: [(&str, &str, &str); 4] = [
    (
        "tcp",
        "tcp_sendmsg_locked",
        "accepted sockets count as their listener's owner's until their first receive",
    ),
    (
        "tcp",
        "tcp_rcv_space_adjust",
        "accepted sockets count as their listener's owner's until their first send",
    ),
    (
        "tcp",
        "tcp_receive_reset",
        "a reset received is told from the error it left",
    ),
    (
        "tcp",
        "tcp_send_reset",
        "resets that end no connection are not counted",
    ),
];

fn warnings_name_exactly_what_this_kernel_lacks() {
    let out = Command::new(env!("CARGO_BIN_EXE_twtrace"))
        .args(["trace", "--duration", "1s"])
        .output()
        .expect("running twtrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("twtrace: warning: "))
        .collect();
    // twtrace has mounted tracefs if it was not.
    let events = Path::new("/sys/kernel/tracing/events");
    assert!(events.join("sock/inet_sock_set_state").is_dir());
    let mut expected: Vec<(String, &str)> = OPTIONAL
        .iter()
        .filter(|(category, event, _)| !events.join(category).join(event).is_dir())
        .map(|(category, event, lost)| {
            (
                format!("this kernel has no tracepoint {category}:{event}"),
                *lost,
            )
        })
        .collect();
    // Linux 6.10 gave tcp_send_reset its reason and made it fire for
    // resets sent without a full socket.
    if let Ok(format) = fs::read_to_string(events.join("tcp/tcp_send_reset/format"))
        && !format.contains(" reason;")
    {
        expected.push((
            "this kernel (before 6.10) does not trace resets sent for a TIME_WAIT socket or for no socket".into(),
            "reason `unknown`",
        ));
    }
    for (what, lost) in &expected {
        assert_eq!(
            warnings
                .iter()
                .filter(|w| w.contains(what.as_str()) && w.contains(lost))
                .count(),
            1,
            "one warning must say {what:?}, and that {lost:?}: {stderr}"
        );
    }
    assert_eq!(
        warnings.len(),
        expected.len(),
        "a warning for something this kernel has: {stderr}"
    );
}
