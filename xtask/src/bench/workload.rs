//! The connection workloads the bench measures twtrace under: the churn
//! binary (this repository's, closing on either side) and a real server
//! and load generator (Debian's nginx and wrk, the server closing each
//! connection as `Connection: close` asks).

use std::{
    fs,
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// The churn binary, the server closing first (TIME_WAIT on the server).
    ChurnServerCloses,
    /// The churn binary, the client closing first.
    ChurnClientCloses,
    /// nginx serving a fixed reply, wrk asking for `Connection: close`.
    NginxWrk,
}

impl Workload {
    pub const ALL: [Self; 3] = [
        Self::ChurnServerCloses,
        Self::ChurnClientCloses,
        Self::NginxWrk,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ChurnServerCloses => "churn, server closes",
            Self::ChurnClientCloses => "churn, client closes",
            Self::NginxWrk => "nginx + wrk",
        }
    }

    /// The name `--workload` takes.
    pub fn key(self) -> &'static str {
        match self {
            Self::ChurnServerCloses => "churn-server",
            Self::ChurnClientCloses => "churn-client",
            Self::NginxWrk => "nginx",
        }
    }
}

/// How many connections a workload completed, and at what rate.
pub struct Completed {
    pub connections: u64,
    pub rate: f64,
}

/// Runs a workload for `seconds` against what `servers` keeps running.
pub fn run(
    workload: Workload,
    seconds: f64,
    exchange: bool,
    servers: &Servers,
) -> anyhow::Result<Completed> {
    match workload {
        Workload::ChurnServerCloses => churn(&servers.churn, seconds, "server", exchange),
        Workload::ChurnClientCloses => churn(&servers.churn, seconds, "client", exchange),
        Workload::NginxWrk => wrk(servers.nginx_port()?, seconds),
    }
}

fn churn(churn: &Path, seconds: f64, closer: &str, exchange: bool) -> anyhow::Result<Completed> {
    let out = Command::new(churn)
        .args([
            format!("{seconds}"),
            closer.into(),
            "2".into(),
            "0".into(),
            if exchange { "data" } else { "none" }.into(),
        ])
        .output()
        .context("running the churn workload")?;
    let result: Value = serde_json::from_slice(&out.stdout).context("churn output")?;
    Ok(Completed {
        connections: result["connections"].as_u64().unwrap_or(0),
        rate: result["rate"].as_f64().unwrap_or(0.0),
    })
}

/// wrk with one connection per request: two threads (one per CPU here),
/// 16 connections in flight. wrk counts whole seconds.
fn wrk(port: u16, seconds: f64) -> anyhow::Result<Completed> {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a positive duration of seconds"
    )]
    let whole = seconds.ceil().max(1.0) as u64;
    let out = Command::new("wrk")
        .args(["-t2", "-c16", &format!("-d{whole}s")])
        .args(["-H", "Connection: close"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}");
    }
    // "  123456 requests in 5.00s, 12.34MB read"
    let (requests, elapsed) = text
        .lines()
        .find_map(|l| {
            let (count, rest) = l.trim().split_once(" requests in ")?;
            let secs = rest.split_once('s')?.0;
            Some((count.parse::<u64>().ok()?, secs.parse::<f64>().ok()?))
        })
        .with_context(|| format!("no request count in wrk's output: {text}"))?;
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let rate = requests as f64 / elapsed.max(1e-3);
    Ok(Completed {
        connections: requests,
        rate,
    })
}

/// The servers the workloads talk to, kept up for the whole bench.
pub struct Servers {
    churn: PathBuf,
    nginx: Option<Nginx>,
}

impl Servers {
    pub fn start(churn: PathBuf, workloads: &[Workload], scratch: &Path) -> anyhow::Result<Self> {
        let nginx = if workloads.contains(&Workload::NginxWrk) {
            Some(Nginx::start(&scratch.join("nginx"))?)
        } else {
            None
        };
        Ok(Self { churn, nginx })
    }

    fn nginx_port(&self) -> anyhow::Result<u16> {
        self.nginx
            .as_ref()
            .map(|n| n.port)
            .context("nginx was not started")
    }
}

/// An nginx of our own (not the system's), on a free loopback port: two
/// workers, no access log, every response closing its connection.
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let port = free_port()?;
        let d = dir.display();
        let config = format!(
            "worker_processes 2;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20 access_log off;\n\
             \x20 keepalive_timeout 0;\n\
             \x20 client_body_temp_path {d};\n\
             \x20 proxy_temp_path {d};\n\
             \x20 fastcgi_temp_path {d};\n\
             \x20 uwsgi_temp_path {d};\n\
             \x20 scgi_temp_path {d};\n\
             \x20 server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }}\n\
             }}\n"
        );
        let path = dir.join("nginx.conf");
        fs::write(&path, config)?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nginx (apt-get install nginx-light)")?;
        let mut nginx = Self { child, port };
        nginx.wait_ready()?;
        Ok(nginx)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.try_wait()? {
                let mut why = String::new();
                if let Some(err) = self.child.stderr.take() {
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        why.push_str(&line);
                        why.push(' ');
                    }
                }
                bail!("nginx exited ({status}): {why}");
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on 127.0.0.1:{} in 10 s", self.port);
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM, not KILL: the master takes its workers down with it.
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
