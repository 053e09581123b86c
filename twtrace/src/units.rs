//! Human-readable units for durations and times, and names cut to fit.

use std::fmt::Write as _;

/// `1.50µs`, `12.3ms`, `1.20s`, `1m05s`: three significant digits, the
/// largest unit that keeps the number at least 1.
#[must_use]
pub fn duration(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let scaled = |unit: u64| ns as f64 / unit as f64;
    let three_digits = |value: f64, unit: &str| {
        if value >= 100.0 {
            format!("{value:.0}{unit}")
        } else if value >= 10.0 {
            format!("{value:.1}{unit}")
        } else {
            format!("{value:.2}{unit}")
        }
    };
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => three_digits(scaled(1_000), "µs"),
        1_000_000..1_000_000_000 => three_digits(scaled(1_000_000), "ms"),
        1_000_000_000..60_000_000_000 => three_digits(scaled(1_000_000_000), "s"),
        _ => {
            let secs = ns / 1_000_000_000;
            format!("{}m{:02}s", secs / 60, secs % 60)
        }
    }
}

/// `text` cut to `width` characters, its end marked `…` where cut.
#[must_use]
pub fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Local wall-clock time of day with microseconds, `HH:MM:SS.uuuuuu`.
#[must_use]
pub fn time_of_day(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let micros = unix_ns.rem_euclid(1_000_000_000) / 1_000;
    let t = libc::time_t::try_from(secs).unwrap_or_default();
    // SAFETY: an all-zero `tm` is a valid value for localtime_r to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call;
    // localtime_r is the thread-safe variant.
    unsafe { libc::localtime_r(&raw const t, &raw mut tm) };
    let mut out = String::with_capacity(15);
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}.{micros:06}",
        tm.tm_hour, tm.tm_min, tm.tm_sec
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_pick_a_unit_and_three_digits() {
        assert_eq!(duration(0), "0ns");
        assert_eq!(duration(999), "999ns");
        assert_eq!(duration(1_500), "1.50µs");
        assert_eq!(duration(12_345_678), "12.3ms");
        assert_eq!(duration(200_000_000), "200ms");
        assert_eq!(duration(1_203_000_000), "1.20s");
        assert_eq!(duration(60_000_000_000), "1m00s");
        assert_eq!(duration(65_900_000_000), "1m05s");
    }

    #[test]
    fn time_of_day_has_microseconds() {
        let t = time_of_day(1_700_000_000_123_456_789);
        assert_eq!(t.len(), 15, "{t}");
        assert!(t.ends_with(".123456"), "{t}");
    }
}
