//! `twtrace` / `twtrace top`: the live view of who closes first. On a
//! terminal it draws with ratatui; otherwise it prints the same table as
//! text every interval, like `top -b`.

use std::{
    io::{self, IsTerminal, StdoutLock, Write},
    ops::ControlFlow,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::Context;
use ratatui::{
    DefaultTerminal,
    crossterm::event::{self, Event, KeyEvent, KeyEventKind},
};

use crate::{
    cgroup::Workloads,
    cli::TopArgs,
    commands,
    event::Transition,
    grouping::GroupBy,
    loader::TracerOptions,
    output::metrics::Metrics,
    ports,
    session::{self, Announce, Consumer, Status},
    sys,
    top::{
        model::{HostFacts, Namer, TopModel, TopSnapshot},
        view::{self, Action, ViewState},
    },
};

pub async fn run(args: TopArgs, kernel_log: Option<log::LevelFilter>) -> anyhow::Result<()> {
    commands::check_pids_exist(&args.filter)?;
    let options = commands::tracer_options(&args.filter, &args.capacity, false, kernel_log)?;
    let metrics = Metrics::serve_if(args.metrics_addr).await?;
    let batch = args.batch || !io::stdout().is_terminal();
    // The terminal draws at once; a printed table waits for its interval.
    let counting = Counting::new(&args, metrics, batch);
    if batch {
        run_batch(&args, &options, counting).await
    } else {
        run_terminal(&args, &options, counting).await
    }
}

/// How long the first table waits for the start-up snapshot.
const SNAPSHOT_PATIENCE_NS: u64 = 10_000_000_000;

/// What both views count, and when the next snapshot is due.
struct Counting {
    model: TopModel,
    metrics: Option<Metrics>,
    /// Names rows' groups (`--by`, the `b` key): cgroups, namespaces.
    workloads: Workloads,
    started_ns: u64,
    interval_ns: u64,
    next_ns: u64,
}

impl Counting {
    fn new(args: &TopArgs, metrics: Option<Metrics>, first_after_interval: bool) -> Self {
        let started_ns = sys::monotonic_ns();
        let interval_ns = u64::try_from(args.interval.as_nanos()).unwrap_or(u64::MAX);
        Self {
            model: TopModel::new(started_ns),
            metrics,
            workloads: Workloads::new(),
            started_ns,
            interval_ns,
            next_ns: if first_after_interval {
                started_ns.saturating_add(interval_ns)
            } else {
                0
            },
        }
    }

    fn record(&mut self, t: &Transition) -> io::Result<()> {
        self.model.record(t);
        self.metrics.transition(t)
    }

    /// A snapshot, when the interval has passed since the last one and
    /// the view wants one (not while paused).
    fn snapshot_if_due(
        &mut self,
        status: &Status,
        wanted: bool,
        by: GroupBy,
    ) -> io::Result<Option<TopSnapshot>> {
        let _ = self.metrics.tick(status)?;
        let now = sys::monotonic_ns();
        // The first table waits for the sockets the host already held (a
        // slow host may take more than an interval to list them), within
        // reason.
        let waiting_for_snapshot =
            !status.snapshot_seeded && now.saturating_sub(self.started_ns) < SNAPSHOT_PATIENCE_NS;
        if now < self.next_ns || waiting_for_snapshot {
            return Ok(None);
        }
        self.next_ns = now.saturating_add(self.interval_ns);
        if !wanted {
            return Ok(None);
        }
        Ok(Some(self.snapshot_now(status, by)))
    }

    /// A snapshot now, grouped `by`.
    fn snapshot_now(&mut self, status: &Status, by: GroupBy) -> TopSnapshot {
        let now = sys::monotonic_ns();
        let facts = Self::host_facts(status, now.saturating_sub(self.started_ns));
        let namespaces = if by == GroupBy::Netns {
            crate::netns::all()
        } else {
            Vec::new()
        };
        let workloads = &mut self.workloads;
        let mut names = Namer {
            workload: &mut |id| workloads.get(id).cloned(),
            netns: &|inode| crate::netns::name_of(inode, &namespaces),
        };
        self.model.snapshot(now, facts, by, &mut names)
    }

    /// What the header and the detail show besides the model: the host's
    /// counts, the port forecast, the warnings.
    fn host_facts(status: &Status, elapsed_ns: u64) -> HostFacts {
        #[expect(clippy::cast_precision_loss, reason = "seconds")]
        let seconds = elapsed_ns as f64 / 1e9;
        HostFacts {
            routes: ports::forecasts(
                &status.route_counts,
                &status.held_by_route,
                &status.port_settings,
                status.host_settings.as_ref(),
                seconds,
            ),
            kernel_time_wait: crate::netns::time_wait_sockets_everywhere(),
            now: status.now.clone(),
            port_range: status.host_settings.map(|s| s.port_range),
            usable_ports: status.host_settings.map(|s| s.usable()),
            warnings: status.warnings.clone(),
            events_lost: status.loss.events_lost(),
            tw_evictions: status.time_wait.evictions,
            time_wait_skipped: status.time_wait.skipped,
            time_wait_tracking: status.time_wait_tracking,
        }
    }
}

/// Plain text every interval; stops after `--count` tables.
struct Batch {
    counting: Counting,
    out: StdoutLock<'static>,
    printed: u64,
    count: Option<u64>,
    by: GroupBy,
}

impl Consumer for Batch {
    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        self.counting.record(t)
    }

    fn tick(&mut self, status: &Status) -> io::Result<ControlFlow<()>> {
        let Some(snapshot) = self.counting.snapshot_if_due(status, true, self.by)? else {
            return Ok(ControlFlow::Continue(()));
        };
        writeln!(
            self.out,
            "{}",
            view::render_plain(&snapshot, &ViewState::grouped(self.by))
        )?;
        self.out.flush()?;
        self.printed += 1;
        Ok(if self.count.is_some_and(|count| self.printed >= count) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    }
}

async fn run_batch(
    args: &TopArgs,
    options: &TracerOptions,
    counting: Counting,
) -> anyhow::Result<()> {
    let mut batch = Batch {
        counting,
        out: io::stdout().lock(),
        printed: 0,
        count: args.count,
        by: args.group.by,
    };
    session::run(options, args.duration, Announce::OnStderr, &mut batch).await?;
    Ok(())
}

/// The ratatui view: redrawn every interval, and at once on a key or a
/// resize.
struct Terminal {
    counting: Counting,
    screen: DefaultTerminal,
    keys: mpsc::Receiver<Option<KeyEvent>>,
    snapshot: TopSnapshot,
    state: ViewState,
}

impl Consumer for Terminal {
    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        self.counting.record(t)
    }

    fn tick(&mut self, status: &Status) -> io::Result<ControlFlow<()>> {
        let mut redraw = false;
        while let Ok(input) = self.keys.try_recv() {
            redraw = true;
            if let Some(key) = input {
                let rows = view::visible_rows(&self.snapshot, &self.state).len();
                if self.state.handle_key(key, rows) == Action::Quit {
                    return Ok(ControlFlow::Break(()));
                }
            }
        }
        let by = self.state.by;
        if by != self.snapshot.by && self.snapshot.header.elapsed_ns > 0 {
            // Regrouped (the `b` key): at once, not at the next interval.
            self.snapshot = self.counting.snapshot_now(status, by);
            redraw = true;
        } else if let Some(snapshot) =
            self.counting
                .snapshot_if_due(status, !self.state.paused, by)?
        {
            self.snapshot = snapshot;
            redraw = true;
        }
        if redraw {
            let (snapshot, state) = (&self.snapshot, &self.state);
            self.screen
                .draw(|frame| view::render(frame, snapshot, state))?;
        }
        Ok(ControlFlow::Continue(()))
    }
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
    options: &TracerOptions,
    counting: Counting,
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
    let screen = ratatui::try_init().context("setting up the terminal")?;
    let guard = TerminalGuard;
    let mut view = Terminal {
        counting,
        screen,
        keys,
        snapshot: TopSnapshot::default(),
        state: ViewState::grouped(args.group.by),
    };
    let result = session::run(options, args.duration, Announce::Silently, &mut view).await;
    drop(guard);
    stop_input.store(true, Ordering::Relaxed);
    let _ = input.join();
    log::set_max_level(previous_log_level);
    result.map(|_| ())
}

/// Forwards key presses (`Some`) and resizes (`None`, redraw only).
fn read_input(keys: &mpsc::Sender<Option<KeyEvent>>, stop: &AtomicBool) {
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
