//! `twtrace trace`: one line per transition, as text or JSON Lines.

use std::io::{self, Write};

use serde::Serialize;

use crate::{event::Transition, loader::LossReport, units};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// What `trace` reports when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSummary {
    pub events: u64,
    pub duration_ns: u64,
    pub loss: LossReport,
}

#[derive(Serialize)]
struct TransitionLine<'a> {
    r#type: &'static str,
    ts_ns: i128,
    pid: u32,
    comm: &'a str,
    family: &'static str,
    src: String,
    dst: String,
    old_state: &'static str,
    new_state: &'static str,
    in_state_ns: Option<u64>,
    sock: String,
}

#[derive(Serialize)]
struct SummaryLine {
    r#type: &'static str,
    events: u64,
    duration_ns: u64,
    lost: u64,
    lost_ringbuf_full: u64,
    lost_recursion_misses: u64,
    lost_unreadable: u64,
    lost_undecodable: u64,
    sock_records_not_stored: u64,
}

/// Writes transitions to `out` (buffered by the caller's choice of writer).
pub struct StreamWriter<W: Write> {
    out: W,
    format: Format,
    /// `CLOCK_REALTIME` − `CLOCK_MONOTONIC`, to print kernel stamps as wall time.
    wall_offset_ns: i128,
}

const TEXT_HEADER: &str = "TIME            PID     COMM             SRC                    DST                    TRANSITION                   IN_STATE";

impl<W: Write> StreamWriter<W> {
    pub fn new(out: W, format: Format, wall_offset_ns: i128) -> Self {
        Self {
            out,
            format,
            wall_offset_ns,
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
            .map_or((0, "-"), |owner| (owner.pid, owner.comm.as_str()));
        match self.format {
            Format::Text => writeln!(
                self.out,
                "{} {pid:<7} {comm:<16} {:<22} {:<22} {:<28} {}",
                units::time_of_day(wall_ns),
                t.src.to_string(),
                t.dst.to_string(),
                format!("{} -> {}", t.old, t.new),
                t.in_state_ns
                    .map_or_else(|| "?".to_owned(), units::duration),
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
                    sock: format!("{:#x}", t.sock_id),
                };
                serde_json::to_writer(&mut self.out, &line)?;
                self.out.write_all(b"\n")
            }
        }
    }

    pub fn summary(&mut self, s: &StreamSummary) -> io::Result<()> {
        let loss = &s.loss;
        match self.format {
            Format::Text => writeln!(
                self.out,
                "# {} transitions in {}, {} lost (ring buffer full {}, recursion misses {}, unreadable {}, undecodable {}); {} socket records not stored",
                s.events,
                units::duration(s.duration_ns),
                loss.events_lost(),
                loss.ringbuf_full,
                loss.recursion_misses,
                loss.read_failed,
                loss.decode_errors,
                loss.sock_update_failed,
            ),
            Format::Json => {
                let line = SummaryLine {
                    r#type: "summary",
                    events: s.events,
                    duration_ns: s.duration_ns,
                    lost: loss.events_lost(),
                    lost_ringbuf_full: loss.ringbuf_full,
                    lost_recursion_misses: loss.recursion_misses,
                    lost_unreadable: loss.read_failed,
                    lost_undecodable: loss.decode_errors,
                    sock_records_not_stored: loss.sock_update_failed,
                };
                serde_json::to_writer(&mut self.out, &line)?;
                self.out.write_all(b"\n")
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
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
            }),
            src: "[::1]:8080".parse().unwrap(),
            dst: "[::1]:50000".parse().unwrap(),
            old: TcpState::CloseWait,
            new: TcpState::LastAck,
            in_state_ns: Some(200_000_000),
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
    fn summary_counts_every_kind_of_loss() {
        let s = StreamSummary {
            events: 10,
            duration_ns: 5_000_000_000,
            loss: LossReport {
                ringbuf_full: 1,
                read_failed: 2,
                sock_update_failed: 3,
                recursion_misses: 4,
                decode_errors: 5,
            },
        };
        let json = written(Format::Json, |w| w.summary(&s).unwrap());
        let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        assert_eq!(v["type"], "summary");
        assert_eq!(v["events"], 10);
        assert_eq!(v["lost"], 12);
        assert_eq!(v["lost_ringbuf_full"], 1);
        assert_eq!(v["lost_recursion_misses"], 4);
        let text = written(Format::Text, |w| w.summary(&s).unwrap());
        assert!(
            text.starts_with("# 10 transitions in 5.00s, 12 lost"),
            "{text}"
        );
    }
}
