//! One tracing run: load and attach, decode what the kernel streams, turn
//! it into transitions (the teardown model), and hand each to a
//! `Consumer` until the duration ends, a signal arrives or the consumer
//! stops; then say what was lost. Every command runs through this loop.

use std::{collections::HashMap, io, ops::ControlFlow, time::Duration};

use anyhow::Context;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior, interval, sleep_until},
};

use crate::{
    census::{Census, CensusNow},
    ends::ResetsApart,
    event::{self, KernelEvent, Transition},
    histogram::TeardownStats,
    loader::{KnownListener, LossReport, Tracer, TracerOptions},
    model::{Route, TeardownModel},
    snapshot::{self, Snapshot, SocketFilter},
    sys,
};

/// Past this age a CLOSE_WAIT socket is a leak: its process has not called
/// `close()` a minute after the peer hung up.
pub const LEAK_AGE_NS: u64 = 60_000_000_000;

/// What a command does with a run. `transition` sees every transition
/// once; `tick` runs after each batch and at least every 25 ms (to flush
/// output or draw) and may stop the run.
pub trait Consumer {
    /// Once attached, before the first event (`record` starts its command
    /// here, so none of its connections is missed).
    fn attached(&mut self, _tracer: &mut Tracer) -> anyhow::Result<()> {
        Ok(())
    }

    /// Each decoded kernel event, before the teardown model turns it into
    /// transitions (the kernel tests assert on these).
    fn kernel_event(&mut self, _event: &KernelEvent) {}

    fn transition(&mut self, t: &Transition) -> io::Result<()>;

    fn tick(&mut self, _status: &Status) -> io::Result<ControlFlow<()>> {
        Ok(ControlFlow::Continue(()))
    }
}

impl<C: Consumer> Consumer for Option<C> {
    fn attached(&mut self, tracer: &mut Tracer) -> anyhow::Result<()> {
        self.as_mut().map_or(Ok(()), |c| c.attached(tracer))
    }

    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        self.as_mut().map_or(Ok(()), |c| c.transition(t))
    }

    fn tick(&mut self, status: &Status) -> io::Result<ControlFlow<()>> {
        self.as_mut()
            .map_or(Ok(ControlFlow::Continue(())), |c| c.tick(status))
    }
}

/// Two consumers fed the same run; either may stop it.
impl<A: Consumer, B: Consumer> Consumer for (A, B) {
    fn attached(&mut self, tracer: &mut Tracer) -> anyhow::Result<()> {
        self.0.attached(tracer)?;
        self.1.attached(tracer)
    }

    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        self.0.transition(t)?;
        self.1.transition(t)
    }

    fn tick(&mut self, status: &Status) -> io::Result<ControlFlow<()>> {
        let first = self.0.tick(status)?;
        let second = self.1.tick(status)?;
        Ok(if first.is_break() || second.is_break() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    }
}

impl Consumer for TeardownStats {
    fn transition(&mut self, t: &Transition) -> io::Result<()> {
        self.record(t);
        Ok(())
    }
}

/// What happened to TIME_WAIT beyond the transitions: what twtrace could
/// not follow, and what the kernel did not put in TIME_WAIT at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeWaitTally {
    /// Of the mini-sockets that ended without a record
    /// (`LossReport::tw_untracked_ends`), those beyond the ones alive when tracing began: records the
    /// kernel map evicted (an estimate; exact when none were evicted).
    pub evictions: u64,
    /// Closes twtrace saw skip TIME_WAIT (`FIN_WAIT2`/`CLOSING` -> CLOSE with
    /// no mini-socket): `tcp_max_tw_buckets` was full.
    pub skipped: u64,
    /// The kernel's `TcpExtTCPTimeWaitOverflow` since start, summed over
    /// every namespace twtrace can enter; read at the end only (entering
    /// every namespace each second would cost a thread per namespace).
    pub kernel_overflows: Option<u64>,
    /// Not a loss: mini-sockets that the peer's FIN re-armed, or a SYN took
    /// over, on another CPU before their hand-over ran there; each reported
    /// born as it was by then.
    pub hand_overs_raced: u64,
}

/// How a run ended.
#[derive(Debug)]
pub struct SessionEnd {
    pub events: u64,
    pub duration_ns: u64,
    pub loss: LossReport,
    pub time_wait: TimeWaitTally,
    pub time_wait_tracking: bool,
    /// Most TIME_WAIT mini-sockets (in either substate) alive at once.
    pub mini_socket_peak: u64,
    /// Sockets in each teardown state at the end (those the host held at
    /// start included).
    pub now: CensusNow,
    /// Resets sent that ended no connection twtrace follows.
    pub resets_apart: ResetsApart,
}

/// What a live consumer shows besides transitions, refreshed every second.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub loss: LossReport,
    pub time_wait: TimeWaitTally,
    pub time_wait_tracking: bool,
    /// Features this kernel cannot give, one line each.
    pub warnings: Vec<String>,
    /// Mini-sockets born while traced and alive now.
    pub mini_sockets: u64,
    /// Ephemeral ports held per route (see `TeardownModel::held_by_route`).
    pub held_by_route: HashMap<Route, u64>,
    /// Active closes and ports held in other teardown states, per route.
    pub route_counts: crate::ports::RouteCounts,
    /// Each namespace's port settings (where routes live), and the host's.
    pub port_settings: HashMap<u64, sys::PortSettings>,
    pub host_settings: Option<sys::PortSettings>,
    /// Sockets in each teardown state now, overall and per owner; ages
    /// past `LEAK_AGE_NS` counted apart.
    pub now: CensusNow,
    /// Whether the start-up snapshot has been taken (until then `now`
    /// covers only what happened since start).
    pub snapshot_seeded: bool,
    /// Resets sent that ended no connection twtrace follows, so far.
    pub resets_apart: ResetsApart,
}

/// Whether to print the start line and warnings on stderr; the live view
/// shows them itself, as nothing may write over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announce {
    OnStderr,
    Silently,
}

/// How often pending mini-socket cancels are checked (so an early end
/// shows within ~50 ms), and how often the consumer's `tick` runs.
const FLUSH_EVERY: Duration = Duration::from_millis(25);
/// How often loss counters are read for `Status`, and orphaned
/// mini-sockets checked for an untraced move to TIME_WAIT.
const STATUS_EVERY_NS: u64 = 1_000_000_000;
/// Orphans asked about per second, at most: each is one request to the
/// kernel (~10 µs), and the asking stops after `ORPHAN_BUDGET` (1 % of a
/// CPU); the rest wait for the next second, or for their end.
const ORPHANS_PER_CHECK: usize = 2048;
const ORPHAN_BUDGET: Duration = Duration::from_millis(10);
/// Orphans younger than this are not asked about yet: most peers close
/// within it, and one request then settles them.
const ORPHAN_MIN_AGE_NS: u64 = 100_000_000;

/// Runs one session to its end (see the module's summary).
pub async fn run(
    options: &TracerOptions,
    duration: Option<Duration>,
    announce: Announce,
    consumer: &mut impl Consumer,
) -> anyhow::Result<SessionEnd> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut session = Session::start(options, announce)?;
    consumer.attached(&mut session.tracer)?;
    let deadline = duration.map(|d| Instant::now() + d);
    let mut flush = interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let fault = fault::Injected::from_env();
    // How far the kernel's events have been read: a cancel is an end only
    // once what could follow it (its re-arm, stamped right after) has been
    // read, however the ring's reading and the flush interleave.
    let mut read_up_to_ns = 0;
    loop {
        let Session {
            tracer, pipeline, ..
        } = &mut session;
        tokio::select! {
            began = tracer.next_batch(|record| pipeline.push(record, consumer)) => {
                read_up_to_ns = began?;
            }
            _ = flush.tick() => {}
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => break,
        }
        session.deliver(sys::monotonic_ns(), read_up_to_ns, consumer)?;
        if consumer.tick(&session.status)?.is_break() {
            break;
        }
        fault.check();
    }
    session.finish(consumer)
}

/// The loader's records on their way to transitions.
struct Pipeline {
    model: TeardownModel,
    transitions: Vec<Transition>,
    decode_errors: u64,
    census: Census,
    /// The start-up snapshot, taken on its own thread (it can take a
    /// second on a host with 100 000 sockets) while events are followed.
    snapshot: Option<std::sync::mpsc::Receiver<Snapshot>>,
    snapshot_filter: SocketFilter,
    /// Each namespace's port settings, read at its first event.
    settings: HashMap<u64, sys::PortSettings>,
    host_settings: Option<sys::PortSettings>,
    routes: crate::ports::CloseCounter,
    /// Whether the cgroup v2 hierarchy is mounted: without it, the id the
    /// kernel records with an owner (its unmounted root's) names nothing,
    /// and the start-up snapshot's owners have none.
    cgroups_mounted: bool,
}

impl Pipeline {
    fn push(&mut self, record: &[u8], consumer: &mut impl Consumer) {
        match event::decode(record) {
            Ok(mut event) => {
                if !self.cgroups_mounted
                    && let Some(owner) = event.transition.owner.as_mut()
                {
                    // One owner, one key: as the snapshot has it.
                    owner.cgroup = 0;
                }
                consumer.kernel_event(&event);
                let netns = u64::from(event.transition.netns);
                if !self.model.knows_namespace(netns) {
                    self.learn_namespace(netns);
                }
                self.model.push(event, &mut self.transitions);
            }
            Err(error) => {
                self.decode_errors += 1;
                log::debug!("rejected a ring-buffer record: {error}");
            }
        }
    }
}

impl Pipeline {
    /// Reads a namespace's port settings at its first event (a thread
    /// enters it once); one that is already gone gets the host's.
    fn learn_namespace(&mut self, netns: u64) {
        let settings = crate::netns::port_settings_of(netns).or(self.host_settings);
        if let Some(settings) = settings {
            self.model.set_port_range(netns, settings.port_range);
            self.settings.insert(netns, settings);
        } else {
            // Unknown range: no routes for it, and no second attempt.
            self.model.set_port_range(netns, (1, 0));
        }
    }

    /// Asks the kernel where orphaned FIN_WAIT2 mini-sockets are: one that
    /// moved to TIME_WAIT without a traced re-arm (the new expiry fell in
    /// the same timer-wheel bucket) is reported now, with the moment from
    /// its timer, instead of when it ends a minute later.
    fn resolve_orphans(&mut self, now_ns: u64, min_age_ns: u64, limit: usize) {
        let orphans = self.model.unresolved_orphans(now_ns, min_age_ns, limit);
        if orphans.is_empty() {
            return;
        }
        let queries: Vec<_> = orphans
            .iter()
            .map(|(_, t)| (t.netns, t.src, t.dst))
            .collect();
        // At the end of a run every orphan is asked about, however long.
        let budget = (limit != usize::MAX).then_some(ORPHAN_BUDGET);
        let answers = snapshot::time_wait_since(&queries, budget);
        for ((id, _), began) in orphans.iter().zip(answers) {
            if let Some(began) = began {
                self.model.resolve_orphan(*id, began, &mut self.transitions);
            }
        }
    }

    /// Seeds the census once the start-up snapshot is there.
    /// Returns the listeners it found, for the tracer to learn.
    fn seed_when_taken(&mut self, status: &mut Status) -> Vec<KnownListener> {
        let taken = match self
            .snapshot
            .as_ref()
            .map(std::sync::mpsc::Receiver::try_recv)
        {
            Some(Ok(taken)) => taken,
            Some(Err(std::sync::mpsc::TryRecvError::Empty)) | None => return Vec::new(),
            Some(Err(std::sync::mpsc::TryRecvError::Disconnected)) => {
                self.snapshot = None;
                return Vec::new();
            }
        };
        self.seed(&taken, status);
        known_listeners(&taken)
    }

    /// A run shorter than the snapshot still reports what the host held.
    fn wait_for_snapshot(&mut self, status: &mut Status) {
        if let Some(Ok(taken)) = self.snapshot.as_ref().map(std::sync::mpsc::Receiver::recv) {
            self.seed(&taken, status);
        }
    }

    fn seed(&mut self, taken: &Snapshot, status: &mut Status) {
        self.snapshot = None;
        for unreadable in &taken.unreadable {
            status.warnings.push(format!(
                "sockets that predate twtrace in {unreadable} are not counted"
            ));
        }
        let filter = &self.snapshot_filter;
        self.census
            .seed(taken.sockets.iter().filter(|s| filter.matches(s)));
        status.snapshot_seeded = true;
        // Shown at once, not a second later.
        status.now = self.census.now(sys::monotonic_ns(), LEAK_AGE_NS);
    }
}

/// The snapshot's listeners as the tracer takes them.
fn known_listeners(taken: &Snapshot) -> Vec<KnownListener> {
    taken
        .listeners
        .iter()
        .map(|l| KnownListener {
            netns: u32::try_from(l.netns).unwrap_or(0),
            addr: l.addr,
            pid: l.owner.pid,
            comm: l.owner.comm.to_raw(),
            cgroup: l.owner.cgroup,
        })
        .collect()
}

/// The tracer's filters, applied to the start-up snapshot.
fn snapshot_filter(options: &TracerOptions) -> SocketFilter {
    SocketFilter {
        pids: options.pids.clone(),
        ports: options.ports.clone(),
        ipv4: options.family.map(|f| f == crate::loader::Family::V4),
        netns: options.netns.map(u64::from),
        ..SocketFilter::default()
    }
}

struct Session {
    tracer: Tracer,
    pipeline: Pipeline,
    status: Status,
    status_read_ns: u64,
    events: u64,
    started_ns: u64,
    /// `TcpExtTCPTimeWaitOverflow` at start, over every namespace.
    overflows_at_start: Option<u64>,
}

impl Session {
    fn start(options: &TracerOptions, announce: Announce) -> anyhow::Result<Self> {
        let tracer = Tracer::start(options)?;
        if announce == Announce::OnStderr {
            for warning in tracer.warnings() {
                eprintln!("twtrace: warning: {warning}");
            }
            eprintln!("twtrace: tracing TCP teardown; Ctrl-C to stop");
        }
        // For scripts and service managers: attached, nothing missed from now.
        sys::notify_ready();
        let status = Status {
            time_wait_tracking: tracer.time_wait_enabled(),
            warnings: tracer.warnings().to_vec(),
            ..Status::default()
        };
        let model = TeardownModel::new(sys::kernel_hz());
        let mut census = Census::new(tracer.namespaces_known());
        // `record` follows a command that starts after this: it holds no
        // socket yet, and its pids are not known to filter a snapshot by.
        let snapshot = (!options.follow_forks).then(|| {
            census.begin_snapshot();
            let (send, receive) = std::sync::mpsc::channel();
            std::thread::spawn(move || send.send(snapshot::take()));
            receive
        });
        Ok(Self {
            tracer,
            pipeline: Pipeline {
                model,
                transitions: Vec::with_capacity(1024),
                decode_errors: 0,
                census,
                snapshot,
                snapshot_filter: snapshot_filter(options),
                settings: HashMap::new(),
                host_settings: sys::PortSettings::read().ok(),
                routes: crate::ports::CloseCounter::default(),
                cgroups_mounted: crate::cgroup::v2_root().is_some(),
            },
            status,
            status_read_ns: 0,
            events: 0,
            started_ns: sys::monotonic_ns(),
            overflows_at_start: overflows_now(),
        })
    }

    /// Hands the tracer the listeners the start-up snapshot found.
    fn add_listeners(&mut self, found: &[KnownListener]) {
        if found.is_empty() {
            return;
        }
        if let Err(e) = self.tracer.add_listeners(found) {
            self.status.warnings.push(format!(
                "connections accepted by listeners older than twtrace have no owner until they close, send or receive: {e:#}"
            ));
        }
    }

    /// Ends the mini-sockets whose cancel nothing followed, hands every
    /// finished transition to the consumer, and refreshes the status once
    /// a second.
    /// Hands the consumer what the model completed; `read_up_to_ns` is how
    /// far the kernel's events have been read (`Tracer::next_batch`).
    fn deliver(
        &mut self,
        now_ns: u64,
        read_up_to_ns: u64,
        consumer: &mut impl Consumer,
    ) -> anyhow::Result<()> {
        let pipeline = &mut self.pipeline;
        pipeline
            .model
            .flush(read_up_to_ns, &mut pipeline.transitions);
        let status_due = now_ns.saturating_sub(self.status_read_ns) >= STATUS_EVERY_NS;
        if status_due {
            pipeline.resolve_orphans(now_ns, ORPHAN_MIN_AGE_NS, ORPHANS_PER_CHECK);
        }
        self.events += pipeline.transitions.len() as u64;
        for t in pipeline.transitions.drain(..) {
            if let Some(route) = pipeline.model.route_of(&t) {
                pipeline.routes.record(&t, route);
            }
            pipeline.census.record(&t);
            consumer.transition(&t)?;
        }
        let listeners = pipeline.seed_when_taken(&mut self.status);
        self.add_listeners(&listeners);
        if status_due {
            self.refresh_status()?;
            self.status_read_ns = now_ns;
        }
        Ok(())
    }

    fn refresh_status(&mut self) -> anyhow::Result<()> {
        self.status.loss = self.loss()?;
        self.status.resets_apart = ResetsApart(self.tracer.resets_apart()?);
        let model = &self.pipeline.model;
        let untracked = self.status.loss.tw_untracked_ends;
        self.status.time_wait.evictions = untracked.saturating_sub(self.tracer.tw_alive_at_start());
        self.status.time_wait.skipped = model.time_wait_skipped();
        self.status.time_wait.hand_overs_raced = self.tracer.hand_overs_raced()?;
        self.status.mini_sockets = model.mini_sockets().0;
        self.status.held_by_route.clone_from(model.held_by_route());
        self.status.route_counts = self.pipeline.routes.counts();
        self.status
            .port_settings
            .clone_from(&self.pipeline.settings);
        self.status.host_settings = self.pipeline.host_settings;
        let census = &mut self.pipeline.census;
        let now_ns = sys::monotonic_ns();
        census.expire(now_ns);
        self.status.now = census.now(now_ns, LEAK_AGE_NS);
        Ok(())
    }

    fn loss(&self) -> anyhow::Result<LossReport> {
        Ok(LossReport {
            decode_errors: self.pipeline.decode_errors,
            ..self.tracer.loss()?
        })
    }

    /// What the kernel streamed before the stop is still reported.
    fn finish(mut self, consumer: &mut impl Consumer) -> anyhow::Result<SessionEnd> {
        let Self {
            tracer,
            pipeline,
            status,
            ..
        } = &mut self;
        tracer.drain(|record| pipeline.push(record, consumer));
        pipeline.model.finish(&mut pipeline.transitions);
        // Every report says where each orphan is now, however short the run.
        pipeline.resolve_orphans(sys::monotonic_ns(), 0, usize::MAX);
        pipeline.wait_for_snapshot(status);
        self.deliver(0, 0, consumer)?;
        self.refresh_status()?;
        self.status.time_wait.kernel_overflows = overflows_now()
            .zip(self.overflows_at_start)
            .map(|(now, start)| now.saturating_sub(start));
        let _ = consumer.tick(&self.status)?;
        Ok(SessionEnd {
            events: self.events,
            duration_ns: sys::monotonic_ns().saturating_sub(self.started_ns),
            loss: self.status.loss,
            time_wait: self.status.time_wait,
            time_wait_tracking: self.tracer.time_wait_enabled(),
            mini_socket_peak: self.pipeline.model.mini_sockets().1,
            now: self.status.now,
            resets_apart: self.status.resets_apart,
        })
    }
}

/// `TcpExtTCPTimeWaitOverflow` now, over every namespace.
fn overflows_now() -> Option<u64> {
    crate::netns::sum_over_all(|| sys::tcp_ext_counter("TCPTimeWaitOverflow"))
}

/// Fault injection for the leak tests, compiled only into test builds
/// (`--features fault-injection`): `TWTRACE_FAULT=panic-after-1s` panics
/// in the middle of tracing, to show that a panic leaves nothing loaded in
/// the kernel and the terminal restored.
#[cfg(feature = "fault-injection")]
mod fault {
    use tokio::time::{Duration, Instant};

    pub struct Injected(Option<Instant>);

    impl Injected {
        pub fn from_env() -> Self {
            Self(
                (std::env::var_os("TWTRACE_FAULT").is_some_and(|f| f == "panic-after-1s"))
                    .then(|| Instant::now() + Duration::from_secs(1)),
            )
        }

        pub fn check(&self) {
            assert!(
                self.0.is_none_or(|at| Instant::now() < at),
                "TWTRACE_FAULT=panic-after-1s: injected panic"
            );
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
mod fault {
    pub struct Injected;

    impl Injected {
        pub fn from_env() -> Self {
            Self
        }

        #[expect(clippy::unused_self, reason = "the same call as the test build's")]
        pub fn check(&self) {}
    }
}
