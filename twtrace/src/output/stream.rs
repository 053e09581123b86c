//! `twtrace trace`: one line per transition, as text or JSON Lines.

use std::io::{self, Write};

use serde::Serialize;

use super::Format;
use crate::{
    cgroup::{Workload, Workloads},
    event::{Comm, ConnectionEnd, ResetReason, Transition},
    units,
};

#[derive(Serialize)]
struct TransitionLine<'a> {
    r#type: &'static str,
    ts_ns: i128,
    pid: u32,
    comm: Comm,
    family: &'static str,
    src: String,
    dst: String,
    old_state: &'static str,
    new_state: &'static str,
    in_state_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<&'static str>,
    /// With `end`: why this host reset the connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    reset_reason: Option<&'static str>,
    /// With `end` `error`: the socket's errno.
    #[serde(skip_serializing_if = "Option::is_none")]
    errno: Option<u8>,
    sock: String,
    /// The socket's network namespace inode; `null` when unknown.
    netns: Option<u32>,
    /// The owner's cgroup path, and the unit, container and pod it names
    /// (each only where known).
    #[serde(flatten)]
    workload: Option<&'a Workload>,
}

/// ` (reset_sent: unread_data)`, ` (error: errno 113)`, ` (expired)`, or
/// nothing when the transition ends nothing.
fn end_text(t: &Transition) -> String {
    let Some(end) = t.end_name() else {
        return String::new();
    };
    let ending = t.ending;
    match (
        ending.and_then(ConnectionEnd::reset_reason),
        ending.and_then(ConnectionEnd::errno),
    ) {
        (Some(reason), _) => format!(" ({end}: {})", reason.name()),
        (None, Some(errno)) => format!(" ({end}: errno {errno})"),
        (None, None) => format!(" ({end})"),
    }
}

/// Writes transitions to `out` (buffered by the caller's choice of writer).
pub struct StreamWriter<W: Write> {
    out: W,
    format: Format,
    /// `CLOCK_REALTIME` − `CLOCK_MONOTONIC`, to print kernel stamps as wall time.
    wall_offset_ns: i128,
    workloads: Workloads,
}

const TEXT_HEADER: &str = "TIME            PID     COMM             SRC                    DST                    TRANSITION                   IN_STATE";

impl<W: Write> StreamWriter<W> {
    pub fn new(out: W, format: Format, wall_offset_ns: i128) -> Self {
        Self {
            out,
            format,
            wall_offset_ns,
            workloads: Workloads::new(),
        }
    }

    pub fn header(&mut self) -> io::Result<()> {
        match self.format {
            Format::Text => writeln!(self.out, "{TEXT_HEADER}"),
            Format::Json => Ok(()),
        }
    }

    pub fn transition(&mut self, t: &Transition) -> io::Result<()> {
        let wall_ns = i128::from(t.ts_ns) + self.wall_offset_ns;
        let (pid, comm) = t
            .owner
            .as_ref()
            .map_or((0, Comm::UNKNOWN), |owner| (owner.pid, owner.comm));
        match self.format {
            Format::Text => writeln!(
                self.out,
                "{} {pid:<7} {comm:<16} {:<22} {:<22} {:<28} {}{}",
                units::time_of_day(wall_ns),
                t.src.to_string(),
                t.dst.to_string(),
                format!("{} -> {}", t.old, t.new),
                t.in_state_ns
                    .map_or_else(|| "?".to_owned(), units::duration),
                end_text(t),
            ),
            Format::Json => {
                let line = TransitionLine {
                    r#type: "transition",
                    ts_ns: wall_ns,
                    pid,
                    comm,
                    family: t.family(),
                    src: t.src.to_string(),
                    dst: t.dst.to_string(),
                    old_state: t.old.name(),
                    new_state: t.new.name(),
                    in_state_ns: t.in_state_ns,
                    end: t.end_name(),
                    reset_reason: t
                        .ending
                        .and_then(ConnectionEnd::reset_reason)
                        .map(ResetReason::name),
                    errno: t.ending.and_then(ConnectionEnd::errno),
                    sock: format!("{:#x}", t.sock_id),
                    netns: (t.netns != 0).then_some(t.netns),
                    workload: self.workloads.get(t.owner.map_or(0, |o| o.cgroup)),
                };
                serde_json::to_writer(&mut self.out, &line)?;
                self.out.write_all(b"\n")
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The underlying writer, for what follows the stream (the summary).
    pub fn inner(&mut self) -> &mut W {
        &mut self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Owner, TcpState};

    fn transition() -> Transition {
        Transition {
            ts_ns: 1_000,
            sock_id: 0xabc,
            owner: Some(Owner {
                pid: 77,
                comm: "nginx".into(),
                cgroup: 0,
            }),
            src: "[::1]:8080".parse().unwrap(),
            dst: "[::1]:50000".parse().unwrap(),
            old: TcpState::CloseWait,
            new: TcpState::LastAck,
            in_state_ns: Some(200_000_000),
            end: None,
            netns: 0,
            accepted: false,
            ending: None,
        }
    }

    fn written(format: Format, f: impl FnOnce(&mut StreamWriter<&mut Vec<u8>>)) -> String {
        let mut buf = Vec::new();
        let mut writer = StreamWriter::new(&mut buf, format, 1_700_000_000_000_000_000);
        f(&mut writer);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn json_line_has_the_documented_fields() {
        let out = written(Format::Json, |w| w.transition(&transition()).unwrap());
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["type"], "transition");
        assert_eq!(v["ts_ns"], 1_700_000_000_000_001_000_i64);
        assert_eq!(v["pid"], 77);
        assert_eq!(v["comm"], "nginx");
        assert_eq!(v["family"], "ipv6");
        assert_eq!(v["src"], "[::1]:8080");
        assert_eq!(v["dst"], "[::1]:50000");
        assert_eq!(v["old_state"], "CLOSE_WAIT");
        assert_eq!(v["new_state"], "LAST_ACK");
        assert_eq!(v["in_state_ns"], 200_000_000);
        assert_eq!(v["sock"], "0xabc");
        assert_eq!(out.lines().count(), 1);
    }

    #[test]
    fn unknown_owner_and_duration_are_explicit() {
        let mut t = transition();
        t.owner = None;
        t.in_state_ns = None;
        let json = written(Format::Json, |w| w.transition(&t).unwrap());
        let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        assert_eq!(
            (v["pid"].as_u64(), v["comm"].as_str()),
            (Some(0), Some("-"))
        );
        assert!(v["in_state_ns"].is_null());
        let text = written(Format::Text, |w| w.transition(&t).unwrap());
        let cols: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(&cols[1..3], ["0", "-"]);
        assert_eq!(cols.last(), Some(&"?"));
    }

    #[test]
    fn text_line_reads_left_to_right() {
        let text = written(Format::Text, |w| w.transition(&transition()).unwrap());
        let cols: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(
            &cols[1..],
            [
                "77",
                "nginx",
                "[::1]:8080",
                "[::1]:50000",
                "CLOSE_WAIT",
                "->",
                "LAST_ACK",
                "200ms"
            ]
        );
    }

    #[test]
    fn time_wait_end_is_named() {
        let mut t = transition();
        t.old = TcpState::TimeWait;
        t.new = TcpState::Close;
        t.end = Some(crate::event::TwEnd::Cancelled);
        let json = written(Format::Json, |w| w.transition(&t).unwrap());
        let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        assert_eq!(v["end"], "cancelled");
        let text = written(Format::Text, |w| w.transition(&t).unwrap());
        assert!(text.trim_end().ends_with("200ms (cancelled)"), "{text}");
        let plain = written(Format::Json, |w| w.transition(&transition()).unwrap());
        assert!(!plain.contains("\"end\""), "{plain}");
    }

    #[test]
    fn a_connection_end_is_named_with_its_reason() {
        let mut t = transition();
        t.old = TcpState::Established;
        t.new = TcpState::Close;
        t.ending = Some(ConnectionEnd::ResetSent(
            ResetReason::from_code(twtrace_common::reset_reason::LINGER_ZERO).unwrap(),
        ));
        let json = written(Format::Json, |w| w.transition(&t).unwrap());
        let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        assert_eq!(
            (v["end"].as_str(), v["reset_reason"].as_str()),
            (Some("reset_sent"), Some("linger_zero"))
        );
        assert!(v.get("errno").is_none(), "{json}");
        let text = written(Format::Text, |w| w.transition(&t).unwrap());
        assert!(
            text.trim_end().ends_with("(reset_sent: linger_zero)"),
            "{text}"
        );
        t.ending = Some(ConnectionEnd::Error(113));
        let json = written(Format::Json, |w| w.transition(&t).unwrap());
        let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        assert_eq!(
            (v["end"].as_str(), v["errno"].as_u64()),
            (Some("error"), Some(113))
        );
        let text = written(Format::Text, |w| w.transition(&t).unwrap());
        assert!(text.trim_end().ends_with("(error: errno 113)"), "{text}");
    }
}
