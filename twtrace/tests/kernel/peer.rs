//! The two ends of a test connection, each in its own process, so that
//! ownership can be asserted per process. The test binary re-executes
//! itself with `TWTRACE_TEST_PEER` set to play one of these roles.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

const ENV: &str = "TWTRACE_TEST_PEER";

/// How a side ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// `close()` right after the exchange: this side closes first.
    CloseFirst,
    /// `shutdown(SHUT_WR)` first, read until the peer's FIN, then `close()`.
    ShutdownFirst,
    /// `shutdown(SHUT_WR)`, then `close()` at once, before the peer's ACK.
    ShutdownThenClose,
    /// Wait for the peer's FIN, then sleep, then `close()`.
    CloseAfterPeer { wait_ms: u64 },
    /// Sleep without reading (the peer's FIN then waits for a delayed
    /// ACK), then read to EOF and `close()`.
    SleepThenClose { wait_ms: u64 },
    /// `SO_LINGER` on with a zero timeout, then `close()`: a reset.
    Abort,
    /// Sleep (the peer's extra data arrives meanwhile), then `close()`
    /// without reading it: a reset.
    CloseUnread { wait_ms: u64 },
    /// Send a few bytes more, then read until the peer's FIN or reset,
    /// and `close()`.
    SendMoreThenAwaitEnd,
    /// Read until the peer's FIN or reset, then `close()`.
    AwaitEnd,
    /// Print `exchanged`, wait for a line on stdin (the test cuts the
    /// path meanwhile), then, with `TCP_USER_TIMEOUT` of `ms`, send and
    /// read until the kernel gives up; prints the error's errno.
    UserTimeout { ms: u64 },
    /// The same with keepalive probing after 1 s idle, one probe 1 s
    /// apart, and nothing sent.
    Keepalive,
    /// `shutdown(SHUT_RDWR)` without `close()`, then sleep: data the peer
    /// sends meanwhile makes the kernel reset the connection.
    ShutdownBothThenWait { wait_ms: u64 },
    /// Read to the peer's FIN, then send a few bytes, then read until the
    /// peer's reset.
    SendAfterPeerFin,
}

impl Ending {
    fn encode(self) -> String {
        match self {
            Self::CloseFirst => "close".into(),
            Self::ShutdownFirst => "shutdown".into(),
            Self::ShutdownThenClose => "shutdown-close".into(),
            Self::CloseAfterPeer { wait_ms } => format!("after:{wait_ms}"),
            Self::SleepThenClose { wait_ms } => format!("sleep:{wait_ms}"),
            Self::Abort => "abort".into(),
            Self::CloseUnread { wait_ms } => format!("unread:{wait_ms}"),
            Self::SendMoreThenAwaitEnd => "more".into(),
            Self::AwaitEnd => "await".into(),
            Self::UserTimeout { ms } => format!("usertimeout:{ms}"),
            Self::Keepalive => "keepalive".into(),
            Self::ShutdownBothThenWait { wait_ms } => format!("shutdown-both:{wait_ms}"),
            Self::SendAfterPeerFin => "send-after-fin".into(),
        }
    }

    fn decode(text: &str) -> Self {
        match text {
            "close" => Self::CloseFirst,
            "shutdown" => Self::ShutdownFirst,
            "shutdown-close" => Self::ShutdownThenClose,
            "abort" => Self::Abort,
            "more" => Self::SendMoreThenAwaitEnd,
            "await" => Self::AwaitEnd,
            "keepalive" => Self::Keepalive,
            "send-after-fin" => Self::SendAfterPeerFin,
            other => {
                let (kind, ms) = other
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad peer ending {other}"));
                let wait_ms = ms.parse().expect("milliseconds");
                match kind {
                    "after" => Self::CloseAfterPeer { wait_ms },
                    "sleep" => Self::SleepThenClose { wait_ms },
                    "unread" => Self::CloseUnread { wait_ms },
                    "usertimeout" => Self::UserTimeout { ms: wait_ms },
                    "shutdown-both" => Self::ShutdownBothThenWait { wait_ms },
                    _ => panic!("bad peer ending {other}"),
                }
            }
        }
    }
}

/// A running peer process.
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    pub pid: u32,
    /// For a server: the address it listens on.
    pub addr: Option<SocketAddr>,
}

impl Peer {
    /// Starts a server listening on `bind` (port 0 picks one) inside
    /// `netns`; it accepts one connection, answers one request, then ends as
    /// `ending` says.
    pub fn server(netns: &Netns, bind: &str, ending: Ending) -> Self {
        let mut peer = spawn(netns, &format!("server {bind} {}", ending.encode()));
        let stdout = peer.child.stdout.take().expect("peer stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the server's address");
        peer.addr = Some(
            line.trim()
                .parse()
                .unwrap_or_else(|_| panic!("server printed {line:?}")),
        );
        peer
    }

    /// Starts a client that connects to `server` when `go` is called, sends
    /// one request, reads the answer, then ends as `ending` says.
    pub fn client(netns: &Netns, server: SocketAddr, ending: Ending) -> Self {
        spawn(netns, &format!("client {server} {}", ending.encode()))
    }

    /// Starts a process that makes `count` loopback connections inside
    /// `netns` once told to go, the client closing first each time, and
    /// prints `done` when all are in TIME_WAIT.
    pub fn time_wait_maker(netns: &Netns, count: usize) -> Self {
        spawn(netns, &format!("maker {count} close"))
    }

    /// Starts a process that, once told to go, opens and closes loopback
    /// connections as fast as it can for `seconds` (the server closing
    /// first, so client ports never run out), then prints `done`.
    pub fn churner(netns: &Netns, seconds: u64) -> Self {
        spawn(netns, &format!("churn {seconds} close"))
    }

    /// Starts a process that listens on a port of `netns` (printed, read
    /// into `addr`), and once told to go makes connections as fast as it
    /// can — `Amount::Connections(n)` of them, or for `Amount::Seconds(s)`
    /// — from `threads` client threads spread over 127.0.x.y destinations,
    /// the server closing first each time; then prints `done`. With `cpus`
    /// it runs pinned to them (`taskset`), so every TIME_WAIT is born there.
    pub fn flood(netns: &Netns, amount: Amount, threads: usize, cpus: Option<&str>) -> Self {
        let amount = match amount {
            Amount::Connections(n) => format!("n:{n}"),
            Amount::Seconds(s) => format!("s:{s}"),
        };
        let role = format!("flood {amount} {threads}");
        let mut peer = spawn_pinned(netns, &role, cpus);
        let stdout = peer.child.stdout.take().expect("peer stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .expect("reading the flood's port");
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("flood said {line:?}"));
        peer.addr = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        peer.child.stdout = Some(reader.into_inner());
        peer
    }

    /// Starts a process that, inside `netns`, leaves `count` sockets in
    /// each of: CLOSE_WAIT (it accepts, reads the client's request and
    /// FIN, and never closes: a leak), orphaned FIN_WAIT2 (those clients'
    /// ends, their FIN acknowledged, waiting for the server's) and
    /// TIME_WAIT (connections its server end closes first). Prints `done`
    /// when all are there, then holds them until its stdin closes.
    pub fn leaker(netns: &Netns, count: usize) -> Self {
        spawn(netns, &format!("leaker {count} -"))
    }

    /// Starts a process that listens on `bind` inside `netns`, accepts one
    /// connection and holds it without reading or closing until its stdin
    /// closes. Returns once it listens.
    pub fn acceptor(netns: &Netns, bind: &str) -> Self {
        let mut peer = spawn(netns, &format!("acceptor {bind} -"));
        let said = peer.read_line();
        peer.addr = Some(
            said.parse()
                .unwrap_or_else(|_| panic!("acceptor said {said:?}")),
        );
        peer
    }

    /// Starts a process that, once told to go, connects to `server` inside
    /// `netns` and closes at once, before any data moves.
    pub fn knock(netns: &Netns, server: SocketAddr) -> Self {
        spawn(netns, &format!("knock {server} -"))
    }

    /// Starts a process that listens on a port of `netns` (read into
    /// `addr`) and, once told to go, makes `count` connections whose
    /// server end (on CPU 0) is handed to an orphaned FIN_WAIT2
    /// mini-socket by `close()` while the client (on CPU 1) sends its FIN
    /// a little later each time (0–390 µs after the server was told to
    /// close): a FIN that reaches the mini-socket before its hand-over has
    /// run re-arms it from another CPU. With `reset`, the client aborts
    /// (`SO_LINGER` 0) instead, and its RST ends the mini-socket. Prints
    /// `done`.
    pub fn racer(netns: &Netns, count: usize, reset: bool) -> Self {
        let ending = if reset { "reset" } else { "fin" };
        let mut peer = spawn(netns, &format!("racer {count} {ending}"));
        let said = peer.read_line();
        let port: u16 = said
            .parse()
            .unwrap_or_else(|_| panic!("racer said {said:?}"));
        peer.addr = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        peer
    }

    /// Starts a process that, once told to go, connects `rate` times a
    /// second to a listener of its own in `netns`, the client closing
    /// first each time (so its port waits in TIME_WAIT), until `connect()`
    /// fails — then it prints `failed SECONDS` (since go) — or for
    /// `seconds`, then prints `ok`.
    pub fn paced(netns: &Netns, rate: u32, seconds: u32) -> Self {
        spawn(netns, &format!("paced {rate} {seconds}"))
    }

    /// The next line the peer prints.
    pub fn read_line(&mut self) -> String {
        let stdout = self.child.stdout.as_mut().expect("peer stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading from the peer");
        line.trim().to_owned()
    }

    /// Takes the go signal out, to give to whoever starts the peer.
    pub fn go_signal(&mut self) -> impl FnOnce() + Send + 'static {
        let mut stdin = self.stdin.take().expect("client already started");
        move || stdin.write_all(b"go\n").expect("starting the peer")
    }

    /// A channel that receives once the peer prints `done`.
    pub fn done_signal(&mut self) -> std::sync::mpsc::Receiver<()> {
        let (done_tx, done) = std::sync::mpsc::channel();
        let stdout = self.child.stdout.take().expect("peer stdout");
        thread::spawn(move || {
            let mut line = String::new();
            if BufReader::new(stdout).read_line(&mut line).is_ok() && line.trim() == "done" {
                let _ = done_tx.send(());
            }
        });
        done
    }

    /// Waits for the peer to print `done`.
    pub fn wait_done(&mut self) {
        let stdout = self.child.stdout.as_mut().expect("peer stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading from the peer");
        assert_eq!(line.trim(), "done", "peer said {line:?}");
    }

    /// Whether `go` has not been given yet.
    pub fn stdin_open(&self) -> bool {
        self.stdin.is_some()
    }

    /// Writes `line` to the peer, keeping its stdin open for more.
    pub fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("peer stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("telling the peer");
        stdin.flush().expect("flushing to the peer");
    }

    /// Starts a process that, once told to go, connects `count` times to
    /// `port` on its namespace's loopback, where nothing listens: each
    /// SYN is answered with a reset. Prints `done`.
    pub fn refused(netns: &Netns, port: u16, count: usize) -> Self {
        spawn(netns, &format!("refused {port} {count}"))
    }

    /// Starts a process that, once told to go, makes `count` loopback
    /// connections in `netns` whose server end sends a byte and whose
    /// client end aborts: with a zero linger (even ones) or by closing
    /// with that byte unread (odd ones). Prints `done`.
    pub fn aborter(netns: &Netns, count: usize) -> Self {
        spawn(netns, &format!("aborter {count} -"))
    }

    /// Starts a process that, once told to go, makes `count` connections
    /// to a Redis server on `port` of its namespace's loopback, each a
    /// `PING` answered `+PONG`, then aborted (`SO_LINGER` 0). Prints
    /// `done`.
    pub fn redis_aborter(netns: &Netns, port: u16, count: usize) -> Self {
        spawn(netns, &format!("redis-aborter {port} {count}"))
    }

    /// Lets a client connect (it waits so the tracer can attach first).
    pub fn go(&mut self) {
        let mut stdin = self.stdin.take().expect("client already started");
        stdin.write_all(b"go\n").expect("starting the client");
    }

    /// Waits for the peer to finish, asserting it succeeded.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("waiting for peer");
        assert!(status.success(), "peer {} failed: {status}", self.pid);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // A failed assertion must not leave processes or sockets behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(netns: &Netns, role: &str) -> Peer {
    spawn_pinned(netns, role, None)
}

fn spawn_pinned(netns: &Netns, role: &str, cpus: Option<&str>) -> Peer {
    // `ip netns exec` and `taskset` exec the command: the child's pid is
    // the peer's.
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &netns.name]);
    if let Some(cpus) = cpus {
        command.args(["taskset", "-c", cpus]);
    }
    let child = command
        .arg(std::env::current_exe().expect("test binary path"))
        .env(ENV, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning a peer process");
    let mut child = child;
    let pid = child.id();
    let stdin = child.stdin.take();
    Peer {
        child,
        stdin,
        pid,
        addr: None,
    }
}

/// If this process was started as a peer, plays that role and exits.
pub fn run_if_peer() -> Option<ExitCode> {
    let role = std::env::var(ENV).ok()?;
    let parts: Vec<&str> = role.split(' ').collect();
    let [kind, addr, ending_text] = parts[..] else {
        panic!("bad peer role {role}");
    };
    match kind {
        "server" => serve(addr, Ending::decode(ending_text)),
        "client" => connect(
            addr.parse().expect("server address"),
            Ending::decode(ending_text),
        ),
        "maker" => {
            // `auto-late:MS:FILE`: the server closes MS after the client,
            // and writes how long it really waited, each time, to FILE.
            let late = ending_text.strip_prefix("auto-late:").map(|rest| {
                let (ms, file) = rest.split_once(':').expect("auto-late:MS:FILE");
                (ms.parse().expect("milliseconds"), PathBuf::from(file))
            });
            make_time_waits(
                addr.parse().expect("count"),
                ending_text.starts_with("auto"),
                late.as_ref().map(|(ms, file)| (*ms, file.as_path())),
            );
        }
        "churn" => churn(Duration::from_secs(addr.parse().expect("seconds"))),
        "flood" => flood(addr, ending_text.parse().expect("threads")),
        "leaker" => leak(addr.parse().expect("count")),
        "acceptor" => accept_and_hold(addr),
        "knock" => knock(addr.parse().expect("server address")),
        "aborter" => abort_connections(addr.parse().expect("count")),
        "redis-aborter" => abort_redis_pings(
            addr.parse().expect("port"),
            ending_text.parse().expect("count"),
        ),
        "refused" => refused(
            addr.parse().expect("port"),
            ending_text.parse().expect("count"),
        ),
        "racer" => race_hand_overs(addr.parse().expect("count"), ending_text == "reset"),
        "paced" => paced(
            addr.parse().expect("connections per second"),
            ending_text.parse().expect("seconds"),
        ),
        other => panic!("unknown peer kind {other}"),
    }
    Some(ExitCode::SUCCESS)
}

/// `auto`: no waiting on stdin (run by `twtrace record` as a workload);
/// `late`: the server waits that long (ms) after the client's FIN before
/// closing (the client's end waits in an orphaned FIN_WAIT2 meanwhile),
/// and writes each wait as it really was (ns, a line each) to the file:
/// a loaded machine oversleeps.
fn make_time_waits(count: usize, auto: bool, late: Option<(u64, &Path)>) {
    let mut go = String::new();
    if !auto {
        std::io::stdin().read_line(&mut go).expect("waiting for go");
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = listener.local_addr().expect("local addr");
    let mut waits = Vec::new();
    for _ in 0..count {
        let client = TcpStream::connect(server).expect("connect");
        let (mut accepted, _) = listener.accept().expect("accept");
        drop(client);
        let mut rest = Vec::new();
        accepted.read_to_end(&mut rest).expect("read to EOF");
        quickack(&accepted);
        if let Some((late_ms, _)) = late {
            let fin_seen = Instant::now();
            thread::sleep(Duration::from_millis(late_ms));
            waits.push(fin_seen.elapsed().as_nanos().to_string());
        }
        drop(accepted);
    }
    if let Some((_, file)) = late {
        std::fs::write(file, waits.join("\n")).expect("writing the waits");
    }
    // Let the last FINs and ACKs land, then report.
    wait_until_settled(server.port());
    if auto {
        return;
    }
    println!("done");
    std::io::stdout().flush().expect("flush");
    // Stay alive until the test is done with us.
    let _ = std::io::stdin().read_line(&mut go);
}

/// Waits (5 s at most) until no connection to or from `port` is between
/// a FIN and its end — `FIN_WAIT1`, `FIN_WAIT2`, `CLOSE_WAIT`, `CLOSING`,
/// `LAST_ACK` in this namespace's `/proc/net/tcp` — so the last FINs and
/// ACKs have landed. A fixed sleep did not do: a busy machine defers them
/// to ksoftirqd (under emulation, past 100 ms).
fn wait_until_settled(port: u16) {
    const CLOSING: [&str; 5] = ["04", "05", "08", "0B", "09"];
    let suffix = format!(":{port:04X}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        let closing = table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3
                && CLOSING.contains(&fields[3])
                && (fields[1].ends_with(&suffix) || fields[2].ends_with(&suffix))
        });
        if !closing {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn leak(count: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = listener.local_addr().expect("local addr");
    let mut leaked = Vec::with_capacity(count);
    for _ in 0..count {
        let mut client = TcpStream::connect(server).expect("connect");
        let (mut accepted, _) = listener.accept().expect("accept");
        client.write_all(b"x").expect("request");
        drop(client);
        let mut request = Vec::new();
        accepted.read_to_end(&mut request).expect("read to EOF");
        leaked.push(accepted);
    }
    for _ in 0..count {
        let mut client = TcpStream::connect(server).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        drop(accepted);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("read to EOF");
    }
    thread::sleep(Duration::from_millis(100));
    println!("done");
    std::io::stdout().flush().expect("flush");
    let mut end = String::new();
    let _ = std::io::stdin().read_line(&mut end);
    drop(leaked);
}

fn paced(rate: u32, seconds: u32) {
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("waiting for go");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = listener.local_addr().expect("local addr");
    let started = std::time::Instant::now();
    let every = Duration::from_secs(1) / rate;
    let mut outcome = "ok".to_owned();
    for n in 0..rate * seconds {
        let due = started + every * n;
        thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
        let client = match TcpStream::connect(server) {
            Ok(client) => client,
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                outcome = format!("failed {:.3}", started.elapsed().as_secs_f64());
                break;
            }
            Err(e) => panic!("connect: {e}"),
        };
        let (mut accepted, _) = listener.accept().expect("accept");
        drop(client);
        let mut rest = Vec::new();
        accepted.read_to_end(&mut rest).expect("read to EOF");
        quickack(&accepted);
    }
    println!("{outcome}");
    std::io::stdout().flush().expect("flush");
    let _ = std::io::stdin().read_line(&mut go);
}

fn race_hand_overs(count: usize, abort: bool) {
    use std::sync::mpsc;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = listener.local_addr().expect("local addr");
    println!("{}", server.port());
    std::io::stdout().flush().expect("flush");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("waiting for go");
    let (acked_tx, acked_rx) = mpsc::channel::<()>();
    let client = thread::spawn(move || {
        pin_to_cpu(1);
        for n in 0..count {
            let mut stream = TcpStream::connect(server).expect("connect");
            let mut rest = Vec::new();
            stream
                .read_to_end(&mut rest)
                .expect("read the server's FIN");
            // ACK the FIN now (its ACK is otherwise delayed): the server's
            // end is in FIN_WAIT2 when this returns.
            quickack(&stream);
            acked_tx.send(()).expect("server thread");
            let fin_after = std::time::Instant::now()
                + Duration::from_micros(10 * u64::try_from(n % 40).expect("small"));
            if abort {
                abort_on_close(&stream);
            }
            while std::time::Instant::now() < fin_after {
                std::hint::spin_loop();
            }
            drop(stream);
        }
    });
    pin_to_cpu(0);
    for _ in 0..count {
        let (accepted, _) = listener.accept().expect("accept");
        accepted.shutdown(Shutdown::Write).expect("shutdown");
        acked_rx.recv().expect("client thread");
        // Orphaned in FIN_WAIT2: handed to a mini-socket here, on CPU 0.
        drop(accepted);
    }
    client.join().expect("client thread");
    thread::sleep(Duration::from_millis(200));
    println!("done");
    std::io::stdout().flush().expect("flush");
    let _ = std::io::stdin().read_line(&mut go);
}

/// `SO_LINGER` 0: `close()` sends an RST instead of a FIN.
fn abort_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(
        stream,
        (libc::SOL_SOCKET, libc::SO_LINGER, "SO_LINGER"),
        &linger,
    );
}

/// Sets a socket option (`level`, `name`, what to call it) or fails the test.
fn set_option<T>(stream: &TcpStream, (level, name, what): (i32, i32, &str), value: &T) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket fd and a pointer to a `T` of the size given.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            libc::socklen_t::try_from(size_of::<T>()).expect("socklen"),
        )
    };
    assert_eq!(rc, 0, "{what}: {}", std::io::Error::last_os_error());
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // within it, and sched_setaffinity reads the size given.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set)
    };
    assert_eq!(
        rc,
        0,
        "pinning to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

fn churn(length: Duration) {
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("waiting for go");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = listener.local_addr().expect("local addr");
    let deadline = std::time::Instant::now() + length;
    while std::time::Instant::now() < deadline {
        let mut client = TcpStream::connect(server).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        drop(accepted);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("read to EOF");
    }
    println!("done");
    std::io::stdout().flush().expect("flush");
    let _ = std::io::stdin().read_line(&mut go);
}

/// How much a flood makes.
#[derive(Clone, Copy, Debug)]
pub enum Amount {
    Connections(u64),
    Seconds(u64),
}

fn flood(amount: &str, threads: usize) {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let (count, seconds) = match amount.split_once(':') {
        Some(("n", n)) => (n.parse::<u64>().expect("count"), 0),
        Some(("s", s)) => (0, s.parse::<u64>().expect("seconds")),
        _ => panic!("bad flood amount {amount}"),
    };
    // Clients end as the server closes; it must serve until they are done.
    let listener = TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    println!("{port}");
    std::io::stdout().flush().expect("flush");
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("waiting for go");
    let stop = Arc::new(AtomicBool::new(false));
    if count == 0 {
        let stop = stop.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_secs(seconds));
            stop.store(true, Ordering::Relaxed);
        });
    }
    let next = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..threads)
        .map(|_| {
            let (next, stop) = (next.clone(), stop.clone());
            thread::spawn(move || {
                let mut rest = [0u8; 16];
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if count != 0 && n >= count {
                        break;
                    }
                    // 254 x 254 destinations: ports never run out.
                    let host = n % (254 * 254);
                    let octet = |v: u64| u8::try_from(1 + v).expect("under 255");
                    let to =
                        SocketAddr::from(([127, 0, octet(host / 254), octet(host % 254)], port));
                    let mut stream = TcpStream::connect(to).expect("connect");
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("read timeout");
                    // The server closes first: read its FIN, then close.
                    let _ = stream.read(&mut rest);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }
    // Let the last FINs and ACKs land.
    thread::sleep(Duration::from_millis(200));
    println!("done");
    std::io::stdout().flush().expect("flush");
    let _ = std::io::stdin().read_line(&mut go);
}

/// The environment that makes the test binary a workload making `count`
/// loopback connections on its own (for `twtrace record`).
#[must_use]
pub fn auto_maker_env(count: usize) -> (&'static str, String) {
    (ENV, format!("maker {count} auto"))
}

/// The same, with the server closing `late_ms` after each client and
/// writing how long it really waited each time to `waits` (ns per line).
#[must_use]
pub fn late_maker_env(count: usize, late_ms: u64, waits: &Path) -> (&'static str, String) {
    (
        ENV,
        format!("maker {count} auto-late:{late_ms}:{}", waits.display()),
    )
}

fn serve(bind: &str, ending: Ending) {
    let listener = TcpListener::bind(bind).expect("bind");
    println!("{}", listener.local_addr().expect("local addr"));
    std::io::stdout().flush().expect("flush");
    let (mut stream, _) = listener.accept().expect("accept");
    let mut request = [0u8; 5];
    stream.read_exact(&mut request).expect("read request");
    stream.write_all(b"world").expect("write answer");
    end(stream, ending);
}

fn accept_and_hold(bind: &str) {
    let listener = TcpListener::bind(bind).expect("bind");
    println!("{}", listener.local_addr().expect("local addr"));
    std::io::stdout().flush().expect("flush");
    let (stream, _) = listener.accept().expect("accept");
    let mut until_closed = String::new();
    let _ = std::io::stdin().read_line(&mut until_closed);
    drop(stream);
}

fn knock(server: SocketAddr) {
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("waiting for go");
    drop(TcpStream::connect(server).expect("connect"));
    println!("done");
    std::io::stdout().flush().expect("flush");
    let _ = std::io::stdin().read_line(&mut go);
}

fn abort_connections(count: usize) {
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("waiting for go");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = listener.local_addr().expect("local addr");
    for n in 0..count {
        let mut client = TcpStream::connect(server).expect("connect");
        let (mut accepted, _) = listener.accept().expect("accept");
        accepted.write_all(b"x").expect("a byte for the client");
        if n % 2 == 0 {
            let mut byte = [0u8; 1];
            client.read_exact(&mut byte).expect("read the byte");
            abort_on_close(&client);
        } else {
            // Unread: wait until it is in the client's receive queue.
            let mut byte = [0u8; 1];
            while client.peek(&mut byte).expect("peek") == 0 {}
        }
        drop(client);
        read_until_end(&mut accepted);
    }
    println!("done");
    std::io::stdout().flush().expect("flush");
    let _ = std::io::stdin().read_line(&mut go);
}

fn abort_redis_pings(port: u16, count: usize) {
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("waiting for go");
    for _ in 0..count {
        let mut redis = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        redis.write_all(b"PING\r\n").expect("PING");
        let mut answer = [0u8; 7];
        redis.read_exact(&mut answer).expect("redis answers");
        assert_eq!(&answer, b"+PONG\r\n");
        abort_on_close(&redis);
    }
    println!("done");
    std::io::stdout().flush().expect("flush");
    let _ = std::io::stdin().read_line(&mut go);
}

fn refused(port: u16, count: usize) {
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("waiting for go");
    for _ in 0..count {
        let error = TcpStream::connect(("127.0.0.1", port)).expect_err("nothing listens there");
        assert_eq!(error.raw_os_error(), Some(libc::ECONNREFUSED), "{error}");
    }
    println!("done");
    std::io::stdout().flush().expect("flush");
    let _ = std::io::stdin().read_line(&mut go);
}

fn connect(server: SocketAddr, ending: Ending) {
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("waiting for go");
    let mut stream = TcpStream::connect(server).expect("connect");
    stream.write_all(b"hello").expect("write request");
    let mut answer = [0u8; 5];
    stream.read_exact(&mut answer).expect("read answer");
    end(stream, ending);
}

fn quickack(stream: &TcpStream) {
    let on: libc::c_int = 1;
    set_option(
        stream,
        (libc::IPPROTO_TCP, libc::TCP_QUICKACK, "TCP_QUICKACK"),
        &on,
    );
}

fn end(mut stream: TcpStream, ending: Ending) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut rest = Vec::new();
    match ending {
        Ending::CloseFirst => {}
        Ending::ShutdownFirst => {
            stream.shutdown(Shutdown::Write).expect("shutdown");
            stream.read_to_end(&mut rest).expect("read to EOF");
        }
        Ending::ShutdownThenClose => {
            stream.shutdown(Shutdown::Write).expect("shutdown");
        }
        Ending::SleepThenClose { wait_ms } => {
            thread::sleep(Duration::from_millis(wait_ms));
            stream.read_to_end(&mut rest).expect("read to EOF");
        }
        Ending::Abort => abort_on_close(&stream),
        Ending::CloseUnread { wait_ms } => thread::sleep(Duration::from_millis(wait_ms)),
        Ending::SendMoreThenAwaitEnd => {
            stream.write_all(b"extra").expect("write more");
            read_until_end(&mut stream);
        }
        Ending::AwaitEnd => read_until_end(&mut stream),
        Ending::ShutdownBothThenWait { wait_ms } => {
            stream.shutdown(Shutdown::Both).expect("shutdown");
            thread::sleep(Duration::from_millis(wait_ms));
        }
        Ending::SendAfterPeerFin => {
            stream.read_to_end(&mut rest).expect("read to EOF");
            stream
                .write_all(b"late")
                .expect("write after the peer's FIN");
            read_until_end(&mut stream);
        }
        Ending::UserTimeout { ms } => {
            let timeout = libc::c_uint::try_from(ms).expect("milliseconds");
            set_option(
                &stream,
                (
                    libc::IPPROTO_TCP,
                    libc::TCP_USER_TIMEOUT,
                    "TCP_USER_TIMEOUT",
                ),
                &timeout,
            );
            await_cut_then(&stream, || {
                let _ = (&stream).write_all(b"unanswered");
            });
        }
        Ending::Keepalive => {
            let on: libc::c_int = 1;
            set_option(
                &stream,
                (libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE"),
                &on,
            );
            for (name, what) in [
                (libc::TCP_KEEPIDLE, "TCP_KEEPIDLE"),
                (libc::TCP_KEEPINTVL, "TCP_KEEPINTVL"),
                (libc::TCP_KEEPCNT, "TCP_KEEPCNT"),
            ] {
                set_option(&stream, (libc::IPPROTO_TCP, name, what), &on);
            }
            await_cut_then(&stream, || {});
        }
        Ending::CloseAfterPeer { wait_ms } => {
            stream.read_to_end(&mut rest).expect("read to EOF");
            // The kernel delays the ACK of a FIN (tcp_fin enters pingpong
            // mode, hoping to piggyback it on our own FIN) by up to 40 ms.
            // ACK now, so the peer's FIN_WAIT2 is the whole wait below.
            quickack(&stream);
            thread::sleep(Duration::from_millis(wait_ms));
        }
    }
    drop(stream);
}

/// Reads until the peer's FIN (EOF) or reset: either ends it.
fn read_until_end(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    if let Err(error) = stream.read_to_end(&mut rest) {
        // EPIPE: a reset that came in CLOSE_WAIT.
        assert!(
            matches!(error.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)),
            "reading to the end: {error}"
        );
    }
}

/// Says `exchanged`, waits for the test to cut the path (a line on
/// stdin), does `then`, and reads until the kernel gives up on the
/// connection; prints the errno it gave up with.
fn await_cut_then(stream: &TcpStream, then: impl FnOnce()) {
    println!("exchanged");
    std::io::stdout().flush().expect("flush");
    let mut cut = String::new();
    std::io::stdin()
        .read_line(&mut cut)
        .expect("waiting for the cut");
    then();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut buf = [0u8; 16];
    let mut reader = stream;
    let errno = match reader.read(&mut buf) {
        Ok(n) => panic!("read {n} bytes from a peer that cannot answer"),
        Err(error) => error.raw_os_error().unwrap_or(0),
    };
    println!("{errno}");
    std::io::stdout().flush().expect("flush");
}

/// A network namespace of the test's own, with loopback up. Deleting it
/// destroys its TIME_WAIT sockets (an early end twtrace must see).
pub struct Netns {
    pub name: String,
    deleted: bool,
}

impl Netns {
    pub fn new() -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("twtrace-test-{}-{n}", std::process::id());
        run_ip(&["netns", "add", &name]);
        run_ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self {
            name,
            deleted: false,
        }
    }

    pub fn delete(&mut self) {
        if !self.deleted {
            self.deleted = true;
            run_ip(&["netns", "del", &self.name]);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

fn run_ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("running ip (iproute2)");
    assert!(status.success(), "ip {args:?}: {status}");
}
