//! Connection churn on loopback for `cargo xtask bench`: as many short
//! connections as this machine sustains, for a fixed time. Clients spread
//! over 127.0.x.y destination addresses (the server listens on all of
//! them), so TIME_WAIT sockets never exhaust the ephemeral ports: a port
//! is only taken per destination.
//!
//! Each connection carries a 1-byte request and a 64-byte reply before the
//! chosen side closes, as a real server's do: the kernel then runs the
//! send and receive paths twtrace hooks, which an empty connection never
//! reaches. `none` drops the exchange.
//!
//! `churn SECONDS client|server [THREADS [RATE [data|none]]]` prints one
//! JSON object. RATE (connections per second, all threads together; 0 or
//! none for as fast as possible) gives the soak test a steady load.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let client_closes = args.get(2).is_none_or(|s| s == "client");
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let rate: f64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let exchange = args.get(5).is_none_or(|s| s != "none");
    #[expect(clippy::cast_precision_loss, reason = "a thread count")]
    let pace = (rate > 0.0).then(|| Duration::from_secs_f64(threads as f64 / rate));

    let listener = TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    // The server serves until the process ends: a client's last
    // connection may still be queued for accept() when the clock runs
    // out, and it waits for the server's answer.
    thread::spawn(move || serve(&listener, client_closes, exchange));
    let started = Instant::now();
    let clients: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, done) = (stop.clone(), done.clone());
            thread::spawn(move || {
                let plan = Plan {
                    port,
                    thread_index: t,
                    threads,
                    client_closes,
                    exchange,
                    pace,
                };
                connect_loop(&plan, &stop, &done);
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let rate = n as f64 / elapsed;
    println!("{{\"connections\":{n},\"seconds\":{elapsed:.3},\"rate\":{rate:.1}}}");
}

fn serve(listener: &TcpListener, client_closes: bool, exchange: bool) {
    let mut buf = [0u8; 64];
    loop {
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        // One client at a time: a stuck one must not stop the server.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if exchange && stream.read(&mut buf[..1]).is_ok_and(|n| n == 1) {
            let _ = stream.write_all(&REPLY);
        }
        if client_closes {
            // Wait for the client's FIN, then close: the client holds TIME_WAIT.
            while stream.read(&mut buf).is_ok_and(|n| n > 0) {}
        }
        drop(stream);
    }
}

/// The server's answer to every request.
const REPLY: [u8; 64] = [b'r'; 64];

/// What each client thread does.
struct Plan {
    port: u16,
    thread_index: usize,
    threads: usize,
    client_closes: bool,
    exchange: bool,
    pace: Option<Duration>,
}

fn connect_loop(plan: &Plan, stop: &AtomicBool, done: &AtomicU64) {
    let mut buf = [0u8; 64];
    let mut next = Instant::now();
    // Each thread walks its own share of 127.0.1.1 .. 127.0.255.254.
    let mut n = plan.thread_index;
    while !stop.load(Ordering::Relaxed) {
        if let Some(pace) = plan.pace {
            // A fixed schedule, so a slow moment is caught up, not lost.
            next += pace;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        let host = n % (255 * 254);
        n += plan.threads;
        let octet = |v: usize| u8::try_from(v).unwrap_or(1);
        let server = SocketAddrV4::new(
            Ipv4Addr::new(127, 0, 1 + octet(host / 254), 1 + octet(host % 254)),
            plan.port,
        );
        let Ok(mut stream) = TcpStream::connect(server) else {
            continue;
        };
        // Never hang on a peer that went away: a stuck read ends the run.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if plan.exchange
            && (stream.write_all(b"q").is_err() || stream.read_exact(&mut buf).is_err())
        {
            continue;
        }
        if !plan.client_closes {
            // The server's FIN: it closed first.
            let _ = stream.read(&mut buf);
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}
