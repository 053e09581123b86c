//! The live view: renders a model snapshot, and turns keys into view
//! state changes. No counting happens here.

use std::fmt::Write as _;

use ratatui::{
    Frame,
    crossterm::event::{KeyCode, KeyEvent, KeyModifiers},
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Cell, Clear, Paragraph, Row, Table, TableState},
};

use crate::{
    grouping::GroupBy,
    top::{
        charts,
        model::{ProcessRow, TopSnapshot},
    },
    units,
};

/// Table columns, in order; also the sort keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    Pid,
    Comm,
    ActivePerS,
    PassivePerS,
    ResetsPerS,
    TimeWaitNow,
    CloseWaitNow,
    CloseWaitOldest,
    FinWait2P50,
    FinWait2P99,
    CloseWaitP50,
    CloseWaitP99,
    Total,
    Marks,
}

// TIME_WAIT's own length is fixed (60 s, unless cut short): its
// percentiles are in the detail view; the table gives the room to what
// varies, CLOSE_WAIT held now and its age.
const COLUMNS: [(Column, &str, u16); 14] = [
    (Column::Pid, "PID", 8),
    (Column::Comm, "COMM", 16),
    (Column::ActivePerS, "ACTIVE/s", 9),
    (Column::PassivePerS, "PASSIVE/s", 9),
    (Column::ResetsPerS, "RST/s", 6),
    (Column::TimeWaitNow, "TW NOW", 7),
    (Column::CloseWaitNow, "CW NOW", 7),
    (Column::CloseWaitOldest, "CW OLDEST", 10),
    (Column::FinWait2P50, "FW2 p50", 8),
    (Column::FinWait2P99, "FW2 p99", 8),
    (Column::CloseWaitP50, "CW p50", 8),
    (Column::CloseWaitP99, "CW p99", 8),
    (Column::Total, "CLOSES", 8),
    (Column::Marks, "!", 3),
];

pub const FOOTER: &str =
    "q quit  ↑↓/jk move  s sort  r reverse  / filter  b group  Enter detail  p pause  ? help";

/// What the user has chosen to see.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent toggles, each bound to its own key"
)]
pub struct ViewState {
    pub sort: Column,
    /// Descending by default (biggest first), except for PID and COMM.
    pub reversed: bool,
    pub selected: usize,
    /// Applied filter: substring of comm, or prefix of pid.
    pub filter: String,
    /// Filter being typed, if the prompt is open.
    pub editing: Option<String>,
    pub paused: bool,
    pub detail: bool,
    pub help: bool,
    /// What a row is: a process, or a group of them (`b` cycles).
    pub by: GroupBy,
}

impl Default for ViewState {
    fn default() -> Self {
        Self {
            sort: Column::ActivePerS,
            reversed: false,
            selected: 0,
            filter: String::new(),
            editing: None,
            paused: false,
            detail: false,
            help: false,
            by: GroupBy::Pid,
        }
    }
}

impl ViewState {
    /// The default view, its rows grouped `by`.
    #[must_use]
    pub fn grouped(by: GroupBy) -> Self {
        Self {
            by,
            ..Self::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Quit,
}

impl ViewState {
    /// Applies one key. `rows` is how many rows are visible now.
    pub fn handle_key(&mut self, key: KeyEvent, rows: usize) -> Action {
        if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
            return Action::Quit;
        }
        if let Some(text) = self.editing.as_mut() {
            match key.code {
                KeyCode::Enter => {
                    self.filter = self.editing.take().unwrap_or_default();
                    self.selected = 0;
                }
                KeyCode::Esc => self.editing = None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => {}
            }
            return Action::Continue;
        }
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Esc => {
                if self.help {
                    self.help = false;
                } else if self.detail {
                    self.detail = false;
                } else if !self.filter.is_empty() {
                    self.filter.clear();
                } else {
                    return Action::Quit;
                }
            }
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(rows.saturating_sub(1));
            }
            KeyCode::Home | KeyCode::Char('g') => self.selected = 0,
            KeyCode::End | KeyCode::Char('G') => self.selected = rows.saturating_sub(1),
            KeyCode::Char('s' | '>') => self.sort = next_column(self.sort, 1),
            KeyCode::Char('S' | '<') => self.sort = next_column(self.sort, COLUMNS.len() - 1),
            KeyCode::Char('r') => self.reversed = !self.reversed,
            KeyCode::Char('/') => self.editing = Some(self.filter.clone()),
            KeyCode::Enter => self.detail = !self.detail && rows > 0,
            KeyCode::Char('p' | ' ') => self.paused = !self.paused,
            KeyCode::Char('b') => {
                self.by = self.by.next();
                self.selected = 0;
            }
            KeyCode::Char('?' | 'h') => self.help = !self.help,
            _ => {}
        }
        Action::Continue
    }
}

fn next_column(current: Column, step: usize) -> Column {
    let at = COLUMNS
        .iter()
        .position(|(c, _, _)| *c == current)
        .unwrap_or(0);
    COLUMNS[(at + step) % COLUMNS.len()].0
}

fn matches(row: &ProcessRow, filter: &str) -> bool {
    filter.is_empty() || row.comm.contains(filter) || row.pid.to_string().starts_with(filter)
}

/// The rows to show, filtered and sorted as `state` says.
#[must_use]
pub fn visible_rows<'a>(snapshot: &'a TopSnapshot, state: &ViewState) -> Vec<&'a ProcessRow> {
    let mut rows: Vec<&ProcessRow> = snapshot
        .rows
        .iter()
        .filter(|r| matches(r, &state.filter))
        .collect();
    let p = |v: Option<(u64, u64)>, i: usize| v.map(|(a, b)| if i == 0 { a } else { b });
    rows.sort_by(|a, b| {
        use std::cmp::Ordering;
        let natural_ascending = matches!(state.sort, Column::Pid | Column::Comm);
        let by = |x: &ProcessRow, y: &ProcessRow| -> Ordering {
            match state.sort {
                Column::Pid => x.pid.cmp(&y.pid),
                Column::Comm => x.comm.cmp(&y.comm),
                Column::ActivePerS => x.active_per_s.total_cmp(&y.active_per_s),
                Column::PassivePerS => x.passive_per_s.total_cmp(&y.passive_per_s),
                Column::ResetsPerS => x.resets_per_s.total_cmp(&y.resets_per_s),
                Column::TimeWaitNow => x.time_wait_now.cmp(&y.time_wait_now),
                Column::CloseWaitNow => x.close_wait_now.cmp(&y.close_wait_now),
                Column::CloseWaitOldest => x.close_wait_oldest_ns.cmp(&y.close_wait_oldest_ns),
                Column::FinWait2P50 => p(x.fin_wait2, 0).cmp(&p(y.fin_wait2, 0)),
                Column::FinWait2P99 => p(x.fin_wait2, 1).cmp(&p(y.fin_wait2, 1)),
                Column::CloseWaitP50 => p(x.close_wait, 0).cmp(&p(y.close_wait, 0)),
                Column::CloseWaitP99 => p(x.close_wait, 1).cmp(&p(y.close_wait, 1)),
                Column::Total => x.total_closes.cmp(&y.total_closes),
                Column::Marks => marks(x).cmp(marks(y)),
            }
        };
        let primary = if natural_ascending {
            by(a, b)
        } else {
            by(b, a)
        };
        let primary = if state.reversed {
            primary.reverse()
        } else {
            primary
        };
        // Ties: most closes first, then pid, so the order is stable.
        primary
            .then_with(|| b.total_closes.cmp(&a.total_closes))
            .then_with(|| a.pid.cmp(&b.pid))
    });
    rows
}

/// What needs attention, readable without colour: `L` a CLOSE_WAIT leak
/// (its oldest past 60 s), `P` closing first toward a route forecast to
/// run out of ports within 5 minutes.
fn marks(row: &ProcessRow) -> &'static str {
    match (row.leaking, row.ports_at_risk) {
        (true, true) => "LP",
        (true, false) => "L",
        (false, true) => "P",
        (false, false) => "",
    }
}

fn cells(row: &ProcessRow) -> [String; 14] {
    let q = |v: Option<(u64, u64)>, i: usize| {
        v.map_or_else(
            || "-".to_owned(),
            |(p50, p99)| units::duration(if i == 0 { p50 } else { p99 }),
        )
    };
    [
        row.processes
            .map_or_else(|| row.pid.to_string(), |n| n.to_string()),
        row.comm.clone(),
        format!("{:.1}", row.active_per_s),
        format!("{:.1}", row.passive_per_s),
        format!("{:.1}", row.resets_per_s),
        row.time_wait_now.to_string(),
        row.close_wait_now.to_string(),
        close_wait_oldest(row),
        q(row.fin_wait2, 0),
        q(row.fin_wait2, 1),
        q(row.close_wait, 0),
        q(row.close_wait, 1),
        row.total_closes.to_string(),
        marks(row).to_owned(),
    ]
}

/// The oldest CLOSE_WAIT's age; `!` marks a leak (past the threshold), so
/// it reads without colour too.
fn close_wait_oldest(row: &ProcessRow) -> String {
    match row.close_wait_oldest_ns {
        None => "-".to_owned(),
        Some(ns) if row.leaking => format!("!{}", units::duration(ns)),
        Some(ns) => units::duration(ns),
    }
}

/// A column's title: the first two name the group when rows are groups.
fn title(column: Column, by: GroupBy) -> &'static str {
    match (column, by) {
        (Column::Pid | Column::Comm, GroupBy::Pid) => {}
        (Column::Pid, _) => return "PROCS",
        (Column::Comm, by) => return by.column(),
        _ => {}
    }
    COLUMNS
        .iter()
        .find(|(c, _, _)| *c == column)
        .map_or("", |(_, t, _)| t)
}

/// The header lines, shared by the live view and the plain-text mode.
#[must_use]
pub fn header_lines(snapshot: &TopSnapshot, state: &ViewState) -> [String; 2] {
    let h = &snapshot.header;
    let kernel_tw = h
        .host
        .kernel_time_wait
        .map_or_else(|| "?".to_owned(), |n| n.to_string());
    let ports = match (h.host.port_range, h.host.usable_ports) {
        (Some((low, high)), Some(size)) => format!("{size} ({low}-{high})"),
        _ => "?".to_owned(),
    };
    let mut first = format!(
        "closes/s {:.1} (active {:.1}, passive {:.1})   TIME_WAIT now: {} traced, {kernel_tw} in kernel   ephemeral ports {ports}",
        h.closes_per_s, h.active_per_s, h.passive_per_s, h.time_wait_traced,
    );
    if !h.host.time_wait_tracking {
        first.push_str("   (TIME_WAIT not tracked on this kernel)");
    }
    let mut second = format!(
        "CLOSE_WAIT now: {}{}   events lost {}   map evictions {}   up {}",
        h.close_wait_now.count,
        if h.close_wait_now.count > 0 {
            format!(
                " (oldest {})",
                units::duration(h.close_wait_now.oldest_age_ns)
            )
        } else {
            String::new()
        },
        h.host.events_lost,
        h.host.tw_evictions,
        units::duration(h.elapsed_ns - h.elapsed_ns % 1_000_000_000),
    );
    if h.host.time_wait_skipped > 0 {
        let _ = write!(
            second,
            "   skipped TIME_WAIT (tcp_max_tw_buckets full) {}",
            h.host.time_wait_skipped
        );
    }
    if !state.filter.is_empty() {
        let _ = write!(second, "   filter: {}", state.filter);
    }
    if state.paused {
        second.push_str("   PAUSED (counting goes on)");
    }
    [first, second]
}

/// Plain text for non-terminals, like `top -b`: header, then the table.
#[must_use]
pub fn render_plain(snapshot: &TopSnapshot, state: &ViewState) -> String {
    let mut out = String::new();
    for line in header_lines(snapshot, state) {
        out.push_str(&line);
        out.push('\n');
    }
    let widths: Vec<usize> = COLUMNS.iter().map(|(_, _, w)| usize::from(*w)).collect();
    let row_text = |cells: &[String]| {
        let mut line = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 1 {
                let _ = write!(line, "{cell:<w$} ");
            } else {
                let _ = write!(line, "{cell:>w$} ");
            }
        }
        line.trim_end().to_owned()
    };
    let titles: Vec<String> = COLUMNS
        .iter()
        .map(|&(column, _, _)| title(column, snapshot.by).to_owned())
        .collect();
    out.push_str(&row_text(&titles));
    out.push('\n');
    for row in visible_rows(snapshot, state) {
        out.push_str(&row_text(&cells(row)));
        out.push('\n');
    }
    out
}

/// Draws the whole screen.
pub fn render(frame: &mut Frame, snapshot: &TopSnapshot, state: &ViewState) {
    let mut lines: Vec<Line> = header_lines(snapshot, state)
        .into_iter()
        .map(Line::from)
        .collect();
    // What this kernel cannot give: nothing else may write over the view.
    lines.extend(snapshot.header.host.warnings.iter().map(|w| {
        Line::from(format!("warning: {w}")).style(Style::new().add_modifier(Modifier::BOLD))
    }));
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(u16::try_from(lines.len()).unwrap_or(u16::MAX)),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(lines), header);

    let rows = visible_rows(snapshot, state);
    let selected = state.selected.min(rows.len().saturating_sub(1));
    if state.detail && !rows.is_empty() {
        render_detail(frame, body, rows[selected], &snapshot.header.host.routes);
    } else {
        let (table, trends) = split_for_trends(body, rows.len());
        render_table(frame, table, (&rows, snapshot.by), selected, state);
        if let Some(trends) = trends {
            charts::render_trends(frame, trends, &snapshot.trends);
        }
    }

    let footer_text = match &state.editing {
        Some(text) => format!("filter (comm or pid, Enter apply, Esc cancel): {text}_"),
        None => FOOTER.to_owned(),
    };
    frame.render_widget(
        Paragraph::new(footer_text).style(Style::new().add_modifier(Modifier::REVERSED)),
        footer,
    );
    if state.help {
        render_help(frame, body);
    }
}

/// The table keeps priority: it gets every row it has (up to the whole
/// body); the charts get what is left, if at least two charts fit.
fn split_for_trends(body: Rect, rows: usize) -> (Rect, Option<Rect>) {
    // Borders and the column titles: three lines besides the rows.
    let table_needs = u16::try_from(rows)
        .unwrap_or(u16::MAX)
        .saturating_add(3)
        .max(4);
    let left = body.height.saturating_sub(table_needs);
    if left < 2 * charts::CHART_HEIGHT {
        return (body, None);
    }
    let [table, trends] =
        Layout::vertical([Constraint::Length(table_needs), Constraint::Min(0)]).areas(body);
    (table, Some(trends))
}

/// On a narrow terminal the percentiles (in the detail view too) give way
/// to what says who closes and what is stuck, each column a little
/// narrower: (column index, width).
const NARROW: [(usize, u16); 9] = [
    (0, 7),
    (1, 15),
    (2, 9),
    (3, 9),
    (5, 6),
    (6, 6),
    (7, 9),
    (12, 7),
    (13, 2),
];

/// The columns that fit `width` (inside the border), with their widths.
fn fitting_columns(width: u16) -> Vec<(usize, u16)> {
    let all: u16 = COLUMNS.iter().map(|(_, _, w)| w + 1).sum();
    if width >= all {
        COLUMNS
            .iter()
            .enumerate()
            .map(|(i, (_, _, w))| (i, *w))
            .collect()
    } else {
        NARROW.to_vec()
    }
}

fn render_table(
    frame: &mut Frame,
    area: Rect,
    (rows, by): (&[&ProcessRow], GroupBy),
    selected: usize,
    state: &ViewState,
) {
    let shown = fitting_columns(area.width.saturating_sub(2));
    let header = Row::new(shown.iter().map(|&(i, _)| {
        let column = COLUMNS[i].0;
        let marker = if column == state.sort {
            if state.reversed { "▲" } else { "▼" }
        } else {
            ""
        };
        Cell::from(format!("{}{marker}", title(column, by)))
    }))
    .style(Style::new().add_modifier(Modifier::BOLD));
    let body = rows.iter().map(|row| {
        let row_style = if row.leaking {
            Style::new().fg(ratatui::style::Color::Red)
        } else if row.ports_at_risk {
            Style::new().fg(ratatui::style::Color::Yellow)
        } else {
            Style::new()
        };
        let cells = cells(row);
        Row::new(shown.iter().map(|&(i, _)| Cell::from(cells[i].clone()))).style(row_style)
    });
    let widths = shown.iter().map(|&(_, w)| Constraint::Length(w));
    let table = Table::new(body, widths)
        .header(header)
        .block(Block::bordered().title(" who closes first "))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut table_state =
        TableState::default().with_selected((!rows.is_empty()).then_some(selected));
    frame.render_stateful_widget(table, area, &mut table_state);
}

fn render_detail(
    frame: &mut Frame,
    area: Rect,
    row: &ProcessRow,
    routes: &[crate::ports::Forecast],
) {
    // Shapes and the process's trend only where there is room for them
    // besides the numbers.
    let charts = if area.height >= 9 + 3 + 3 + 5 + 10 + 2 * charts::CHART_HEIGHT {
        10 + 2 * charts::CHART_HEIGHT
    } else {
        0
    };
    let [
        states_area,
        ends_area,
        charts_area,
        remotes_area,
        ports_area,
    ] = Layout::vertical([
        Constraint::Length(9),
        Constraint::Length(3),
        Constraint::Length(charts),
        Constraint::Min(3),
        Constraint::Length(5),
    ])
    .areas(area);
    if charts > 0 {
        let [shapes, trend] =
            Layout::vertical([Constraint::Length(10), Constraint::Min(0)]).areas(charts_area);
        charts::render_shapes(frame, shapes, &row.shapes);
        charts::render_process_trend(frame, trend, row);
    }
    let forecasts: Vec<Line> = if routes.is_empty() {
        vec![Line::from("no ephemeral port held in TIME_WAIT yet")]
    } else {
        routes
            .iter()
            .take(3)
            .map(|f| Line::from(crate::ports::describe(f)))
            .collect()
    };
    frame.render_widget(
        Paragraph::new(forecasts).block(Block::bordered().title(" ports at risk (all processes) ")),
        ports_area,
    );
    frame.render_widget(
        Paragraph::new(row.ends.as_str())
            .block(Block::bordered().title(" how its connections ended (reset reasons) ")),
        ends_area,
    );
    let header =
        Row::new(crate::histogram::STATE_COLUMNS).style(Style::new().add_modifier(Modifier::BOLD));
    let body = row.states.iter().map(|s| Row::new(s.cells()));
    let widths = [Constraint::Length(11)]
        .into_iter()
        .chain(std::iter::repeat_n(Constraint::Length(9), 10));
    frame.render_widget(
        Table::new(body, widths)
            .header(header)
            .block(Block::bordered().title(format!(
                " {} ({}): time in state — Esc back ",
                row.comm,
                row.processes
                    .map_or_else(|| row.pid.to_string(), |n| format!("{n} processes"))
            ))),
        states_area,
    );
    let remotes = row
        .remotes
        .iter()
        .map(|(remote, n)| Row::new([remote.clone(), n.to_string()]));
    frame.render_widget(
        Table::new(remotes, [Constraint::Length(48), Constraint::Length(10)])
            .header(Row::new(["REMOTE", "CLOSES"]).style(Style::new().add_modifier(Modifier::BOLD)))
            .block(Block::bordered().title(" top remote endpoints ")),
        remotes_area,
    );
}

const HELP: [&str; 13] = [
    "q, Esc, Ctrl-C   quit (Esc first closes help, detail, filter)",
    "↑ ↓  k j         move the selection",
    "g G  Home End    first, last row",
    "s >  S <         sort by the next / previous column (all, shown or not)",
    "r                reverse the sort",
    "/                filter by comm (substring) or pid (prefix)",
    "Enter            details of the selected process",
    "b                group rows by pid, comm, unit, container, pod, netns, cgroup",
    "p  Space         pause the display (counting goes on)",
    "? h              this help",
    "",
    "ACTIVE: closed first (FIN_WAIT1)  PASSIVE: peer closed first (CLOSE_WAIT)  RST/s: resets",
    "! L: CLOSE_WAIT leak (over 60 s)  P: its route runs out of ports within 5 min",
];

fn render_help(frame: &mut Frame, area: Rect) {
    let width = 78.min(area.width);
    let height = u16::try_from(HELP.len() + 2)
        .unwrap_or(u16::MAX)
        .min(area.height);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(HELP.map(Line::from).to_vec()).block(Block::bordered().title(" keys ")),
        popup,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend, crossterm::event::KeyEvent};

    use super::*;
    use crate::{
        histogram::StateStats,
        top::model::{Header, HostFacts},
    };

    const MS: u64 = 1_000_000;

    fn row(pid: u32, comm: &str, active: f64, passive: f64, total: u64) -> ProcessRow {
        ProcessRow {
            pid,
            comm: comm.into(),
            processes: None,
            active_per_s: active,
            passive_per_s: passive,
            resets_per_s: if pid == 100 { 1.5 } else { 0.0 },
            ends: if pid == 100 {
                "expired 70, reset_sent 10 (linger_zero 10)".into()
            } else {
                "fin 30".into()
            },
            time_wait_now: total / 2,
            close_wait_now: if pid == 200 { 3 } else { 0 },
            close_wait_oldest_ns: (pid == 200).then_some(90_000 * MS),
            leaking: pid == 200,
            ports_at_risk: pid == 100,
            closes_trend: ring((0..60).map(|i| (i * total / 60) % 17)),
            held_trend: ring((0..60).map(|i| i / 4)),
            shapes: vec![crate::top::model::Shape {
                state: "FIN_WAIT2",
                buckets: vec![(10_000, 3), (20_000, total), (50_000, total / 3)],
                p50_ns: 10_000,
                p99_ns: 40_000,
            }],
            fin_wait2: Some((10_000, 40_000)),
            time_wait: (pid == 100).then_some((60_000 * MS, 60_100 * MS)),
            close_wait: (passive > 0.0).then_some((2 * MS, 200 * MS)),
            total_closes: total,
            states: vec![StateStats {
                state: "FIN_WAIT2",
                entered: total,
                count: total,
                now: 0,
                oldest_now_ns: 0,
                oldest_now_exact: true,
                min_ns: 9_000,
                p50_ns: 10_000,
                p90_ns: 20_000,
                p99_ns: 40_000,
                p999_ns: 40_000,
                max_ns: 41_000,
            }],
            remotes: vec![("127.0.0.2:6379".into(), total)],
        }
    }

    fn ring(values: impl IntoIterator<Item = u64>) -> crate::top::trend::Ring {
        let mut r = crate::top::trend::Ring::default();
        for v in values {
            r.push(v);
        }
        r
    }

    /// Five minutes of a churn that builds up and falls back, with one
    /// burst of losses.
    fn trends() -> crate::top::trend::Trends {
        let wave = |i: u64| (i % 60) * 10;
        crate::top::trend::Trends {
            active_per_s: ring((0..300).map(wave)),
            passive_per_s: ring((0..300).map(|i| wave(i) / 2)),
            time_wait_traced: ring((0..300).map(|i| wave(i) * 60)),
            time_wait_kernel: ring((0..300).map(|i| wave(i) * 60 + 5)),
            close_wait_now: ring((0..300).map(|i| i / 10)),
            lost: ring((0..300).map(|i| u64::from(i == 200) * 40)),
        }
    }

    fn snapshot() -> TopSnapshot {
        TopSnapshot {
            by: GroupBy::Pid,
            trends: trends(),
            header: Header {
                closes_per_s: 12.5,
                active_per_s: 10.0,
                passive_per_s: 2.5,
                time_wait_traced: 40,
                close_wait_now: crate::census::InStateNow {
                    count: 3,
                    oldest_age_ns: 90 * 1_000_000_000,
                    oldest_exact: false,
                },
                host: HostFacts {
                    kernel_time_wait: Some(45),
                    port_range: Some((32768, 60999)),
                    usable_ports: Some(28232),
                    warnings: Vec::new(),
                    events_lost: 0,
                    tw_evictions: 0,
                    time_wait_skipped: 0,
                    time_wait_tracking: true,
                    now: crate::census::CensusNow::default(),
                    routes: vec![crate::ports::forecast(
                        crate::model::Route {
                            netns: 0,
                            local: "127.0.0.1".parse().unwrap(),
                            remote: "127.0.0.2:6379".parse().unwrap(),
                        },
                        (21_400, 0),
                        28_232,
                        500.0,
                        60.0,
                    )],
                },
                elapsed_ns: 5_300 * MS,
            },
            rows: vec![
                row(200, "nginx", 0.5, 2.5, 30),
                row(100, "loadgen", 9.5, 0.0, 80),
            ],
        }
    }

    fn screen(state: &ViewState, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|frame| render(frame, &snapshot(), state))
            .unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
                    .trim_end()
                    .to_owned()
            })
            .collect()
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    /// The golden screens live in `top/screens/`; `TWTRACE_BLESS=1` rewrites
    /// them from the current rendering (then review the diff).
    fn golden(name: &str, lines: &[String]) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/top/screens")
            .join(name);
        let got = lines.join("\n") + "\n";
        if std::env::var_os("TWTRACE_BLESS").is_some() {
            std::fs::write(&path, &got).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(got, want, "{name} differs:\n{got}");
    }

    #[test]
    fn at_80x24_the_table_comes_first_and_charts_take_what_is_left() {
        let lines = screen(&ViewState::default(), 80, 24);
        golden("table-80x24.txt", &lines);
        // The table, both rows, right under the header.
        assert!(lines[3].contains("PID"), "{}", lines.join("\n"));
        assert!(lines[4].contains("loadgen") && lines[5].contains("nginx"));
        assert!(
            lines
                .iter()
                .any(|l| l.contains("closes/s active 590 (peak 590)"))
        );
    }

    #[test]
    fn at_200x50_the_charts_use_two_columns() {
        let lines = screen(&ViewState::default(), 200, 50);
        let both = lines
            .iter()
            .find(|l| l.contains("closes/s active"))
            .expect("the closes chart");
        assert!(both.contains("closes/s passive"), "{both}");
        assert!(lines.iter().any(|l| l.contains("events lost 0 (peak 40)")));
        assert!(
            lines
                .iter()
                .any(|l| l.chars().any(|c| "▁▂▃▄▅▆▇█".contains(c)))
        );
        golden("table-200x50.txt", &lines);
    }

    #[test]
    fn the_detail_at_200x50_draws_each_state_shape_and_the_process_trend() {
        let state = ViewState {
            detail: true,
            ..ViewState::default()
        };
        let lines = screen(&state, 200, 50);
        let text = lines.join("\n");
        assert!(text.contains("FIN_WAIT2 p50 10.0µs p99 40.0µs"), "{text}");
        assert!(text.contains("closes/interval"), "{text}");
        assert!(text.contains("½") && text.contains("99"), "{text}");
        golden("detail-200x50.txt", &lines);
    }

    #[test]
    fn table_view_snapshot() {
        let lines = screen(&ViewState::default(), 132, 8);
        let expected = [
            "closes/s 12.5 (active 10.0, passive 2.5)   TIME_WAIT now: 40 traced, 45 in kernel   ephemeral ports 28232 (32768-60999)",
            "CLOSE_WAIT now: 3 (oldest 1m30s)   events lost 0   map evictions 0   up 5.00s",
            "┌ who closes first ────────────────────────────────────────────────────────────────────────────────────────────────────────────────┐",
            "│PID      COMM             ACTIVE/s▼ PASSIVE/s RST/s  TW NOW  CW NOW  CW OLDEST  FW2 p50  FW2 p99  CW p50   CW p99   CLOSES   !    │",
            "│100      loadgen          9.5       0.0       1.5    40      0       -          10.0µs   40.0µs   -        -        80       P    │",
            "│200      nginx            0.5       2.5       0.0    15      3       !1m30s     10.0µs   40.0µs   2.00ms   200ms    30       L    │",
            "└──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            "q quit  ↑↓/jk move  s sort  r reverse  / filter  b group  Enter detail  p pause  ? help",
        ];
        assert_eq!(lines, expected, "\n{}", lines.join("\n"));
    }

    #[test]
    fn busiest_closer_is_on_top_and_sort_keys_cycle_and_reverse() {
        let snap = snapshot();
        let mut state = ViewState::default();
        let pids = |state: &ViewState| -> Vec<u32> {
            visible_rows(&snap, state).iter().map(|r| r.pid).collect()
        };
        assert_eq!(pids(&state), [100, 200]);
        state.handle_key(key(KeyCode::Char('s')), 2);
        assert_eq!(state.sort, Column::PassivePerS);
        assert_eq!(pids(&state), [200, 100]);
        state.handle_key(key(KeyCode::Char('r')), 2);
        assert_eq!(pids(&state), [100, 200]);
        state.handle_key(key(KeyCode::Char('S')), 2);
        assert_eq!(state.sort, Column::ActivePerS);
        // PID sorts ascending by default.
        state.sort = Column::Pid;
        state.reversed = false;
        assert_eq!(pids(&state), [100, 200]);
    }

    #[test]
    fn b_cycles_the_grouping_and_the_titles_follow() {
        let mut state = ViewState::default();
        state.handle_key(key(KeyCode::Char('b')), 2);
        assert_eq!(state.by, GroupBy::Comm);
        let mut snap = snapshot();
        snap.by = GroupBy::Pod;
        let text = render_plain(&snap, &state);
        let titles = text.lines().nth(2).unwrap();
        assert!(titles.trim_start().starts_with("PROCS"), "{titles}");
        assert!(titles.contains("POD"), "{titles}");
    }

    #[test]
    fn filter_prompt_matches_comm_or_pid() {
        let snap = snapshot();
        let mut state = ViewState::default();
        state.handle_key(key(KeyCode::Char('/')), 2);
        for c in "ngi".chars() {
            state.handle_key(key(KeyCode::Char(c)), 2);
        }
        assert_eq!(state.editing.as_deref(), Some("ngi"));
        let footer = screen(&state, 124, 8).pop().unwrap();
        assert!(footer.starts_with("filter (comm or pid"), "{footer}");
        state.handle_key(key(KeyCode::Enter), 2);
        assert_eq!(visible_rows(&snap, &state).len(), 1);
        state.filter = "10".into();
        assert_eq!(visible_rows(&snap, &state)[0].pid, 100);
        // Esc clears the filter before it quits.
        assert_eq!(state.handle_key(key(KeyCode::Esc), 1), Action::Continue);
        assert!(state.filter.is_empty());
        assert_eq!(state.handle_key(key(KeyCode::Esc), 2), Action::Quit);
    }

    #[test]
    fn quit_keys() {
        for k in [
            key(KeyCode::Char('q')),
            key(KeyCode::Esc),
            KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL),
        ] {
            assert_eq!(ViewState::default().handle_key(k, 0), Action::Quit, "{k:?}");
        }
    }

    #[test]
    fn moving_stays_within_the_rows() {
        let mut state = ViewState::default();
        state.handle_key(key(KeyCode::Up), 2);
        assert_eq!(state.selected, 0);
        for _ in 0..5 {
            state.handle_key(key(KeyCode::Char('j')), 2);
        }
        assert_eq!(state.selected, 1);
        state.handle_key(key(KeyCode::Char('k')), 2);
        assert_eq!(state.selected, 0);
    }

    #[test]
    fn detail_shows_histograms_and_remotes_of_the_selected_process() {
        let mut state = ViewState::default();
        state.handle_key(key(KeyCode::Down), 2);
        state.handle_key(key(KeyCode::Enter), 2);
        assert!(state.detail);
        let text = screen(&state, 110, 24).join("\n");
        assert!(text.contains("nginx (200): time in state"), "{text}");
        assert!(text.contains("FIN_WAIT2 30        30"), "{text}");
        assert!(text.contains("127.0.0.2:6379"), "{text}");
        assert!(
            text.contains("21400 / 28232 ports in TIME_WAIT, 500 closes/s, full in 14 s"),
            "{text}"
        );
        state.handle_key(key(KeyCode::Esc), 2);
        assert!(!state.detail);
    }

    #[test]
    fn pause_and_help_are_shown() {
        let mut state = ViewState::default();
        state.handle_key(key(KeyCode::Char('p')), 2);
        assert!(state.paused);
        assert!(screen(&state, 124, 8)[1].contains("PAUSED"));
        state.handle_key(key(KeyCode::Char('?')), 2);
        let text = screen(&state, 124, 20).join("\n");
        assert!(
            text.contains("pause the display (counting goes on)"),
            "{text}"
        );
        state.handle_key(key(KeyCode::Esc), 2);
        assert!(!state.help);
    }

    #[test]
    fn plain_text_matches_the_table() {
        let text = render_plain(&snapshot(), &ViewState::default());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[2].starts_with("     PID COMM"), "{}", lines[2]);
        assert_eq!(
            lines[3],
            "     100 loadgen                9.5       0.0    1.5      40       0          -   10.0µs   40.0µs        -        -       80   P"
        );
    }
}
