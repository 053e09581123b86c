//! The live view's charts: the recent past of the header's numbers
//! (sparklines), and a process's time-in-state shapes (bar charts on a
//! log time axis). They only draw what the model hands over.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    widgets::{Bar, BarChart, BarGroup, Block, Sparkline},
};

use crate::{
    top::{
        model::{ProcessRow, Shape},
        trend::{Ring, Trends},
    },
    units,
};

/// Lines a chart needs: a border above and below, and at least one bar.
pub const CHART_HEIGHT: u16 = 3;

/// One series in a bordered box titled with its name, newest value and
/// peak; the newest sample is at the right edge.
fn sparkline(frame: &mut Frame, area: Rect, name: &str, ring: &Ring, color: Color) {
    let width = usize::from(area.width.saturating_sub(2));
    // A history shorter than the chart: blank on the left, so the newest
    // sample is always at the right edge.
    let mut data = vec![0; width.saturating_sub(ring.len())];
    data.extend(ring.window(width));
    let title = format!(
        " {name} {} (peak {}) ",
        ring.last().unwrap_or(0),
        ring.max()
    );
    frame.render_widget(
        Sparkline::default()
            .block(Block::bordered().title(title))
            .data(&data)
            .style(Style::new().fg(color)),
        area,
    );
}

/// The header's trends, as many as fit: closes by side first, then
/// TIME_WAIT (twtrace's and the kernel's), CLOSE_WAIT and losses. Two
/// columns on a wide screen, one on a narrow one.
pub fn render_trends(frame: &mut Frame, area: Rect, trends: &Trends) {
    let series: [(&str, &Ring, Color); 6] = [
        ("closes/s active", &trends.active_per_s, Color::Green),
        ("closes/s passive", &trends.passive_per_s, Color::Cyan),
        (
            "TIME_WAIT now (twtrace)",
            &trends.time_wait_traced,
            Color::Yellow,
        ),
        (
            "TIME_WAIT now (kernel)",
            &trends.time_wait_kernel,
            Color::Yellow,
        ),
        ("CLOSE_WAIT now", &trends.close_wait_now, Color::Magenta),
        ("events lost", &trends.lost, Color::Red),
    ];
    let columns: u16 = if area.width >= 120 { 2 } else { 1 };
    let rows_fit = (area.height / CHART_HEIGHT).max(1);
    let shown = usize::from((rows_fit * columns).min(6));
    let rows = u16::try_from(shown.div_ceil(usize::from(columns))).unwrap_or(1);
    let row_areas = Layout::vertical(vec![
        Constraint::Ratio(1, u32::from(rows));
        usize::from(rows)
    ])
    .split(area);
    for (i, (name, ring, color)) in series.iter().take(shown).enumerate() {
        let row = row_areas[i / usize::from(columns)];
        let cells = Layout::horizontal(vec![
            Constraint::Ratio(1, u32::from(columns));
            usize::from(columns)
        ])
        .split(row);
        sparkline(frame, cells[i % usize::from(columns)], name, ring, *color);
    }
}

/// A selected process's own trend: closes per interval and sockets held.
pub fn render_process_trend(frame: &mut Frame, area: Rect, row: &ProcessRow) {
    let [closes, held] =
        Layout::horizontal([Constraint::Ratio(1, 2), Constraint::Ratio(1, 2)]).areas(area);
    sparkline(
        frame,
        closes,
        "closes/interval",
        &row.closes_trend,
        Color::Green,
    );
    sparkline(
        frame,
        held,
        "sockets held (TW+FW2+CW)",
        &row.held_trend,
        Color::Yellow,
    );
}

/// Each state's time distribution as bars on a 1-2-5 log time axis; the
/// bars holding the p50 and p99 are marked (and coloured).
pub fn render_shapes(frame: &mut Frame, area: Rect, shapes: &[Shape]) {
    if shapes.is_empty() {
        return;
    }
    let count = u32::try_from(shapes.len()).unwrap_or(1);
    let areas = Layout::horizontal(vec![Constraint::Ratio(1, count); shapes.len()]).split(area);
    for (shape, area) in shapes.iter().zip(areas.iter()) {
        let bars: Vec<Bar> = shape
            .buckets
            .iter()
            .map(|&(upper, count)| bar(shape, upper, count))
            .collect();
        let title = format!(
            " {} p50 {} p99 {} ",
            shape.state,
            units::duration(shape.p50_ns),
            units::duration(shape.p99_ns)
        );
        frame.render_widget(
            BarChart::default()
                .block(Block::bordered().title(title))
                .data(BarGroup::default().bars(&bars))
                .bar_width(3)
                .bar_gap(1),
            *area,
        );
    }
}

/// One bucket: labelled by its upper bound, marked `½` / `99` where the
/// p50 / p99 falls.
fn bar(shape: &Shape, upper: u64, count: u64) -> Bar<'static> {
    let lower = upper_before(shape, upper);
    let holds = |ns: u64| ns > lower && ns <= upper;
    let (text, style) = match (holds(shape.p50_ns), holds(shape.p99_ns)) {
        (true, _) => ("½".to_owned(), Style::new().fg(Color::Green)),
        (_, true) => ("99".to_owned(), Style::new().fg(Color::Red)),
        _ => (count.to_string(), Style::new()),
    };
    Bar::default()
        .value(count)
        .label(short_time(upper))
        .text_value(text)
        .style(style)
        .value_style(style.add_modifier(Modifier::REVERSED))
}

fn upper_before(shape: &Shape, upper: u64) -> u64 {
    shape
        .buckets
        .iter()
        .map(|&(u, _)| u)
        .take_while(|&u| u < upper)
        .last()
        .unwrap_or(0)
}

/// `5µ`, `20m` (ms), `1s`, `10m`… in at most three characters.
fn short_time(ns: u64) -> String {
    match ns {
        0..1_000_000 => format!("{}µ", ns / 1_000),
        1_000_000..1_000_000_000 => format!("{}m", ns / 1_000_000),
        1_000_000_000..60_000_000_000 => format!("{}s", ns / 1_000_000_000),
        _ => format!("{}M", ns / 60_000_000_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_times_fit_a_bar() {
        for (ns, text) in [
            (1_000, "1µ"),
            (500_000, "500µ"),
            (20_000_000, "20m"),
            (5_000_000_000, "5s"),
            (600_000_000_000, "10M"),
        ] {
            assert_eq!(short_time(ns), text);
        }
    }
}
