//! Running the real tracer around a test connection and collecting what
//! the kernel reports.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    ops::ControlFlow,
    time::{Duration, Instant},
};

use crate::peer::{Ending, Netns, Peer};
use twtrace::{
    event::{KernelEvent, TcpState, Transition, TwEnd},
    loader::{LossReport, Tracer, TracerOptions},
    session::{self, Announce, Consumer, Status},
};

pub type Step = (TcpState, TcpState);

/// Why a kernel test cannot run here, if it cannot.
/// The payload of `skip`: why the running kernel cannot give what a test
/// checks.
pub struct Skip(pub String);

/// Ends the calling test as skipped, with the reason (the harness catches
/// this). Only for what the kernel truly cannot provide.
pub fn skip(reason: impl Into<String>) -> ! {
    std::panic::panic_any(Skip(reason.into()))
}

/// Keeps the panic hook from printing a skip as if it were a failure.
pub fn quiet_skips() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.payload().is::<Skip>() {
            default(info);
        }
    }));
}

/// TIME_WAIT mini-sockets are seen through their timer, whose handler
/// twtrace finds by name; a kernel without it cannot show them.
pub fn require_time_wait() {
    if !matches!(
        twtrace::sys::kallsyms_lookup("tw_timer_handler"),
        Ok(Some(_))
    ) {
        skip("no symbol tw_timer_handler in /proc/kallsyms: TIME_WAIT cannot be followed");
    }
}

pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("kernel tests load eBPF programs: run them as root".into());
    }
    None
}

/// What one traced run produced.
pub struct Traced {
    /// The kernel's own events, before the teardown model.
    pub raw: Vec<KernelEvent>,
    pub transitions: Vec<Transition>,
    /// Resets sent that ended no connection, by reason.
    pub resets_apart: twtrace::ends::ResetsApart,
}

/// Collects what a test traces through the same session loop as the
/// CLI: runs `drive` once attached, and stops a little after `done`.
struct Collect<D, F> {
    drive: Option<D>,
    done: F,
    traced: Traced,
    done_at: Option<Instant>,
}

impl<D: FnOnce(), F: Fn(&[Transition]) -> bool> Consumer for Collect<D, F> {
    fn attached(&mut self, _tracer: &mut Tracer) -> anyhow::Result<()> {
        if let Some(drive) = self.drive.take() {
            drive();
        }
        Ok(())
    }

    fn kernel_event(&mut self, event: &KernelEvent) {
        self.traced.raw.push(event.clone());
    }

    fn transition(&mut self, t: &Transition) -> std::io::Result<()> {
        self.traced.transitions.push(t.clone());
        Ok(())
    }

    fn tick(&mut self, _status: &Status) -> std::io::Result<ControlFlow<()>> {
        // Anything late (e.g. a stray duplicate) must show up in assertions.
        const LINGER: Duration = Duration::from_millis(100);
        if self.done_at.is_none() && (self.done)(&self.traced.transitions) {
            self.done_at = Some(Instant::now());
        }
        Ok(match self.done_at {
            Some(at) if at.elapsed() >= LINGER => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        })
    }
}

/// Starts the tracer, runs `drive` (which makes the traffic), then collects
/// transitions until `done` says the picture is complete or `limit` passes.
pub fn trace_until(
    options: &TracerOptions,
    limit: Duration,
    drive: impl FnOnce(),
    done: impl Fn(&[Transition]) -> bool,
) -> Traced {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut collect = Collect {
        drive: Some(drive),
        done,
        traced: Traced {
            raw: Vec::new(),
            transitions: Vec::new(),
            resets_apart: twtrace::ends::ResetsApart::default(),
        },
        done_at: None,
    };
    let end = runtime
        .block_on(session::run(
            options,
            Some(limit),
            Announce::Silently,
            &mut collect,
        ))
        .expect("loading and attaching twtrace");
    // Recursion misses are not asserted: with several tracers loaded at
    // once (tests run in parallel), the kernel skips a tracing program
    // whenever a tracepoint fires in an interrupt while any classic
    // tracepoint program runs on that CPU, mostly for unrelated timers.
    // A miss that mattered fails the content assertions instead.
    let unexplained = LossReport {
        recursion_misses: 0,
        ..end.loss
    };
    assert_eq!(unexplained.events_lost(), 0, "events lost: {:?}", end.loss);
    collect.traced.resets_apart = end.resets_apart;
    collect.traced
}

pub fn trace_while(
    options: &TracerOptions,
    drive: impl FnOnce(),
    done: impl Fn(&[Transition]) -> bool,
) -> Vec<Transition> {
    trace_until(options, Duration::from_secs(10), drive, done).transitions
}

/// True once `n` TIME_WAIT (or FIN_WAIT2) mini-sockets have ended.
pub fn mini_sockets_ended(seen: &[Transition], n: usize) -> bool {
    seen.iter().filter(|t| t.end.is_some()).count() >= n
}

pub fn ended(t: &Transition) -> Option<TwEnd> {
    t.end
}

/// Transitions of the socket whose local address is `local`, in order.
pub fn of_socket(seen: &[Transition], local: SocketAddr) -> Vec<&Transition> {
    seen.iter().filter(|t| t.src == local).collect()
}

pub fn steps(transitions: &[&Transition]) -> Vec<Step> {
    transitions.iter().map(|t| (t.old, t.new)).collect()
}

/// Every socket seen, keyed by local address, for failure messages.
pub fn by_socket(seen: &[Transition]) -> BTreeMap<SocketAddr, Vec<Step>> {
    let mut map: BTreeMap<SocketAddr, Vec<Step>> = BTreeMap::new();
    for t in seen {
        map.entry(t.src).or_default().push((t.old, t.new));
    }
    map
}

/// The active closer, seen whole: the full socket's FIN_WAIT2 -> CLOSE is
/// only its hand-over to the TIME_WAIT mini-socket, which ends at CLOSE.
pub const ACTIVE_CLOSE: [Step; 4] = [
    (TcpState::Established, TcpState::FinWait1),
    (TcpState::FinWait1, TcpState::FinWait2),
    (TcpState::FinWait2, TcpState::TimeWait),
    (TcpState::TimeWait, TcpState::Close),
];

pub const PASSIVE_CLOSE: [Step; 3] = [
    (TcpState::Established, TcpState::CloseWait),
    (TcpState::CloseWait, TcpState::LastAck),
    (TcpState::LastAck, TcpState::Close),
];

/// A client and a server process in a namespace of their own.
pub struct Exchange {
    pub netns: Netns,
    pub client: Option<Peer>,
    pub server: Option<Peer>,
    pub client_pid: u32,
    pub server_pid: u32,
    pub server_addr: SocketAddr,
}

impl Exchange {
    pub fn new(bind: &str, client_ending: Ending, server_ending: Ending) -> Self {
        let netns = Netns::new();
        let server = Peer::server(&netns, bind, server_ending);
        let server_addr = server.addr.expect("server address");
        let client = Peer::client(&netns, server_addr, client_ending);
        Self {
            client_pid: client.pid,
            server_pid: server.pid,
            client: Some(client),
            server: Some(server),
            netns,
            server_addr,
        }
    }

    /// Ports repeat across namespaces and pids do not: filter on both, so
    /// tests running in parallel never see each other's sockets.
    pub fn options(&self) -> TracerOptions {
        TracerOptions {
            ports: vec![self.server_addr.port()],
            pids: vec![self.client_pid, self.server_pid],
            ..TracerOptions::default()
        }
    }

    /// Lets the client connect, waits for both ends to finish, then deletes
    /// the namespace, which ends the TIME_WAIT socket early.
    pub fn run_then_end(&mut self) {
        self.client.as_mut().expect("client").go();
        self.client.take().expect("client").finish();
        self.server.take().expect("server").finish();
        std::thread::sleep(Duration::from_millis(50));
        self.netns.delete();
    }
}

/// True once the client's mini-socket and the server's socket have ended.
pub fn whole_teardown(seen: &[Transition]) -> bool {
    seen.iter().any(|t| t.end.is_some())
        && seen
            .iter()
            .any(|t| t.old == TcpState::LastAck && t.new == TcpState::Close)
}

/// The client's local address: the one socket that talks to the server
/// port from elsewhere.
pub fn client_local(seen: &[Transition], server: SocketAddr) -> SocketAddr {
    match seen.iter().find(|t| t.dst == server) {
        Some(t) => t.src,
        None => panic!("no client socket seen: {:?}", by_socket(seen)),
    }
}

/// Starts the real binary with `args`, filtered to the exchange's
/// sockets, and waits until it is attached.
pub fn spawn_twtrace(args: &[&str], ex: &Exchange) -> std::process::Child {
    spawn_attached(
        std::process::Command::new(env!("CARGO_BIN_EXE_twtrace"))
            .args(args)
            .args(["--port", &ex.server_addr.port().to_string()])
            .args(["--pid", &ex.client_pid.to_string()])
            .args(["--pid", &ex.server_pid.to_string()])
            .stdout(std::process::Stdio::piped()),
    )
}

/// Spawns twtrace and waits until it says it is attached the way a
/// service manager hears it (`READY=1` on `NOTIFY_SOCKET`), failing with
/// its stderr if it exits first. Its stderr is drained from then on.
pub fn spawn_attached(command: &mut std::process::Command) -> std::process::Child {
    use std::{io::Read, os::unix::net::UnixDatagram};
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("twtrace-ready-{}-{n}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).expect("binding the readiness socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("socket timeout");
    let mut child = command
        .env("NOTIFY_SOCKET", &path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting twtrace");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut message = [0u8; 64];
    loop {
        if let Ok(n) = socket.recv(&mut message) {
            assert_eq!(&message[..n], b"READY=1");
            break;
        }
        if let Some(status) = child.try_wait().expect("waiting on twtrace") {
            let mut stderr = String::new();
            let _ = child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut stderr);
            panic!("twtrace exited ({status}) before attaching: {stderr}");
        }
        assert!(
            Instant::now() < deadline,
            "twtrace did not attach within 30 s"
        );
    }
    let _ = std::fs::remove_file(&path);
    // Keep draining so the child never blocks on a full pipe.
    let mut stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    child
}

pub fn interrupt(child: &std::process::Child) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
}

pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("twtrace-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

pub fn command_stdout(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits (at most two minutes) until the kernel has freed the `pile`
/// TIME_WAIT sockets of a namespace just deleted: it purges them in the
/// background, and the next test must not start beside that.
pub fn wait_for_time_wait_purge(pile: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(2);
    while time_wait_allocated().is_some_and(|n| n > pile / 10) {
        assert!(
            std::time::Instant::now() < deadline,
            "the kernel still holds {pile} TIME_WAIT sockets two minutes after their namespace was deleted"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The IPv4 TIME_WAIT sockets allocated in every namespace (the slab's
/// objects in use), if the kernel shows its slab caches.
fn time_wait_allocated() -> Option<u64> {
    let slabs = std::fs::read_to_string("/proc/slabinfo").ok()?;
    slabs.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("tw_sock_TCP")).then(|| words.next()?.parse().ok())?
    })
}

pub fn nstat_value(name: &str) -> u64 {
    // -a: absolute values since boot; -z: print zeros too.
    command_stdout("nstat", &["-az", name])
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("nstat has no {name}"))
}
