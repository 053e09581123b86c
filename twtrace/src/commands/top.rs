//! `twtrace` / `twtrace top`: the live view of who closes first. On a
//! terminal it draws with ratatui; otherwise it prints the same table as
//! text every interval, like `top -b`.

use std::{
    cell::RefCell,
    io::{self, IsTerminal, Write},
    ops::ControlFlow,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::Context;
use ratatui::crossterm::event::{self, Event, KeyEventKind};

use crate::{
    cli::TopArgs,
    commands::session::{self, Announce, Status},
    output::metrics::Metrics,
    ports, sys,
    top::{
        model::{HostFacts, TopModel, TopSnapshot},
        view::{self, Action, ViewState},
    },
};

pub async fn run(args: TopArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    session::check_pids_exist(&args.filter)?;
    let options = session::tracer_options(&args.filter, &args.capacity, false, kernel_log);
    let metrics = Metrics::serve_if(args.metrics_addr).await?;
    if args.batch || !io::stdout().is_terminal() {
        run_batch(&args, &options, metrics.as_ref()).await
    } else {
        run_terminal(&args, &options, metrics.as_ref()).await
    }
}

/// What the header and the detail show besides the model: the host's
/// counts and the port forecast.
fn host_facts(status: &Status, closes: &ports::CloseCounter, elapsed_ns: u64) -> HostFacts {
    let usable = sys::usable_ephemeral_ports().unwrap_or(0);
    #[expect(clippy::cast_precision_loss, reason = "seconds")]
    let seconds = elapsed_ns as f64 / 1e9;
    HostFacts {
        routes: closes.forecasts(&status.held_by_route, usable, seconds),
        kernel_time_wait: sys::time_wait_sockets_now().ok(),
        port_range: sys::local_port_range().ok(),
        events_lost: status.loss.events_lost(),
        tw_evictions: status.tw_evictions,
        time_wait_tracking: status.time_wait_tracking,
        held_by_pid: status.held_by_pid.clone(),
    }
}

/// Plain text every interval; stops after `--count` tables or `--duration`.
async fn run_batch(
    args: &TopArgs,
    options: &crate::loader::TracerOptions,
    metrics: Option<&Metrics>,
) -> anyhow::Result<()> {
    let started_ns = sys::monotonic_ns();
    let model = RefCell::new(TopModel::new(started_ns));
    let closes = RefCell::new(ports::CloseCounter::default());
    let port_range = sys::local_port_range().ok();
    let interval_ns = u64::try_from(args.interval.as_nanos()).unwrap_or(u64::MAX);
    let mut next_ns = sys::monotonic_ns() + interval_ns;
    let mut printed = 0u64;
    let state = ViewState::default();
    let mut out = io::stdout().lock();
    session::run(
        options,
        args.duration,
        Announce::OnStderr,
        |_| Ok(()),
        |t| {
            model.borrow_mut().record(t);
            closes.borrow_mut().record(t, port_range);
            if let Some(m) = metrics {
                m.record(t);
            }
            Ok(())
        },
        |status| {
            if let Some(m) = metrics {
                m.update(status);
            }
            let now = sys::monotonic_ns();
            if now < next_ns {
                return Ok(ControlFlow::Continue(()));
            }
            next_ns = now + interval_ns;
            let facts = host_facts(status, &closes.borrow(), now.saturating_sub(started_ns));
            let snapshot = model.borrow_mut().snapshot(now, facts);
            writeln!(out, "{}", view::render_plain(&snapshot, &state))?;
            out.flush()?;
            printed += 1;
            Ok(if args.count.is_some_and(|count| printed >= count) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        },
    )
    .await?;
    Ok(())
}

/// Restores the terminal however the view ends (ratatui's panic hook
/// covers panics).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

async fn run_terminal(
    args: &TopArgs,
    options: &crate::loader::TracerOptions,
    metrics: Option<&Metrics>,
) -> anyhow::Result<()> {
    // Nothing may write over the view: logs are off while it is up.
    let previous_log_level = log::max_level();
    log::set_max_level(log::LevelFilter::Off);

    let (keys_tx, keys) = mpsc::channel();
    let stop_input = Arc::new(AtomicBool::new(false));
    let input = {
        let stop = stop_input.clone();
        std::thread::spawn(move || read_input(&keys_tx, &stop))
    };

    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let guard = TerminalGuard;
    let started_ns = sys::monotonic_ns();
    let model = RefCell::new(TopModel::new(started_ns));
    let closes = RefCell::new(ports::CloseCounter::default());
    let port_range = sys::local_port_range().ok();
    let interval_ns = u64::try_from(args.interval.as_nanos()).unwrap_or(u64::MAX);
    let mut next_ns = 0;
    let mut snapshot = TopSnapshot::default();
    let mut state = ViewState::default();
    let result = session::run(
        options,
        args.duration,
        Announce::Silently,
        |_| Ok(()),
        |t| {
            model.borrow_mut().record(t);
            closes.borrow_mut().record(t, port_range);
            if let Some(m) = metrics {
                m.record(t);
            }
            Ok(())
        },
        |status| {
            if let Some(m) = metrics {
                m.update(status);
            }
            let mut redraw = false;
            while let Ok(input) = keys.try_recv() {
                redraw = true;
                if let Some(key) = input {
                    let rows = view::visible_rows(&snapshot, &state).len();
                    if state.handle_key(key, rows) == Action::Quit {
                        return Ok(ControlFlow::Break(()));
                    }
                }
            }
            let now = sys::monotonic_ns();
            if now >= next_ns {
                next_ns = now + interval_ns;
                if !state.paused {
                    let facts =
                        host_facts(status, &closes.borrow(), now.saturating_sub(started_ns));
                    snapshot = model.borrow_mut().snapshot(now, facts);
                    redraw = true;
                }
            }
            if redraw {
                terminal.draw(|frame| view::render(frame, &snapshot, &state))?;
            }
            Ok(ControlFlow::Continue(()))
        },
    )
    .await;
    drop(guard);
    stop_input.store(true, Ordering::Relaxed);
    let _ = input.join();
    log::set_max_level(previous_log_level);
    result.map(|_| ())
}

/// Forwards key presses (`Some`) and resizes (`None`, redraw only).
fn read_input(keys: &mpsc::Sender<Option<event::KeyEvent>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match event::poll(Duration::from_millis(100)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => return,
        }
        let sent = match event::read() {
            Ok(Event::Key(key)) if key.kind == KeyEventKind::Press => keys.send(Some(key)),
            Ok(Event::Resize(..)) => keys.send(None),
            Ok(_) => Ok(()),
            Err(_) => return,
        };
        if sent.is_err() {
            return;
        }
    }
}
