//! wsbench: a load generator for roomcast.
//!
//! Scenarios: `conns` (idle connections held open), `fanout` (one room, many
//! subscribers, a few publishers), `rooms` (many rooms, every client
//! publishes and receives) and `resume` (a reconnect storm resuming from the
//! last id), plus `stalls`, which measures the machine itself (how steadily
//! its CPUs run), and `bare`, a naive reference server (one encode per
//! message, one send per member). Each prints a table and one `RESULT
//! {json}` line.

mod bare;
mod conn;
mod frame;
mod hist;
mod peer;
mod procstat;
mod redisinfo;
mod report;
mod scenarios;
mod seq;
mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::conn::{Connector, Target};
use crate::frame::ParseMode;
use crate::procstat::Watched;

/// Load generator for roomcast (protocol v1). Clients are spread round-robin
/// over the `--url`s and over source addresses 127.0.0.2, 127.0.0.3, ... A
/// process holds at most its RLIMIT_NOFILE hard limit of sockets (raised to
/// it at start); for more, run several processes (`--shard i/n` for conns).
#[derive(Parser)]
#[command(name = "wsbench", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
pub struct Common {
    /// WebSocket URL of a node; repeat for several nodes (clients are spread round-robin)
    #[arg(long = "url", global = true, default_value = "ws://127.0.0.1:8080/ws")]
    pub urls: Vec<String>,
    /// Process to measure (CPU user/system, RSS): PID or NAME=PID; repeat (nodes, redis)
    #[arg(long = "pid", global = true)]
    pub pids: Vec<String>,
    /// Redis HOST:PORT: count its commands (INFO commandstats) during the measured phase
    #[arg(long, global = true)]
    pub redis_info: Option<String>,
    /// Hard deadline for the whole run, in seconds: the tool reports what it has and exits
    #[arg(long, global = true, default_value_t = 600.0)]
    pub timeout: f64,
    /// Tokio worker threads; 0: a current-thread runtime (2 gave equal or lower
    /// latency than 0 or 1 on 2 cores shared with the server: docs/BENCHMARKS.md)
    #[arg(long, global = true, default_value_t = 2)]
    pub workers: usize,
    /// Connections opened at once
    #[arg(long, global = true, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Seconds one connection attempt (TCP, upgrade, welcome) may take
    #[arg(long, global = true, default_value_t = 15.0)]
    pub connect_timeout: f64,
    /// Retries of an upgrade refused with 503 (Retry-After)
    #[arg(long, global = true, default_value_t = 3)]
    pub retries: u32,
    /// Loopback source addresses to spread sockets over (127.0.0.2 ...); 0: the kernel's choice
    #[arg(long, global = true, default_value_t = 32, value_parser = clap::value_parser!(u32).range(0..=250))]
    pub source_ips: u32,
    /// How to read server frames
    #[arg(long, global = true, value_enum, default_value_t = ParseMode::Fast)]
    pub parse: ParseMode,
    /// A name for this run, copied into the result
    #[arg(long, global = true)]
    pub label: Option<String>,
    /// Append the RESULT JSON line to this file
    #[arg(long, global = true)]
    pub json_out: Option<PathBuf>,
    /// Before starting, wait up to this many seconds for the machine to be quiet
    /// (under 20% busy over one second): other work on it distorts every figure
    #[arg(long, global = true, default_value_t = 0.0)]
    pub wait_quiet: f64,
}

/// Locks `m`, whatever a panicking holder left behind (counters and lists,
/// valid at every step).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits (up to `max`) for a second in which all CPUs were under 20% busy.
/// Returns the busy percentage of the last second measured.
fn wait_quiet(max: Duration) -> Option<f64> {
    let until = std::time::Instant::now() + max;
    loop {
        let a = procstat::machine_sample().ok()?;
        std::thread::sleep(Duration::from_secs(1));
        let b = procstat::machine_sample().ok()?;
        let busy = procstat::machine_usage(&a, &b)["busy_pct"].as_f64()?;
        if busy < 20.0 || std::time::Instant::now() >= until {
            return Some(busy);
        }
    }
}

#[derive(Subcommand)]
enum Scenario {
    /// Open N idle connections, hold them, count drops; server RSS per connection
    Conns(scenarios::conns::ConnsArgs),
    /// N subscribers of one room, P publishers at R msg/s in total
    Fanout(scenarios::fanout::FanoutArgs),
    /// Many rooms; every client publishes and receives (a busy chat)
    Rooms(scenarios::rooms::RoomsArgs),
    /// Reconnect storm: N clients drop at once and resume with `since`
    Resume(scenarios::resume::ResumeArgs),
    /// No server: how steadily this machine's CPUs run (stalls of 1 ms windows)
    Stalls(scenarios::stalls::StallsArgs),
    /// A naive reference server, not a scenario: enough of the protocol for
    /// `fanout` and `rooms`, one encode per message and one send per member,
    /// to measure beside roomcast in the same run. Serves until SIGTERM or
    /// --timeout
    Bare(bare::BareArgs),
}

/// What every scenario gets.
pub struct Ctx {
    pub common: Common,
    pub connector: Arc<Connector>,
    pub watched: Vec<Watched>,
    pub deadline: Instant,
    pub nofile: u64,
}

impl Ctx {
    pub fn parse(&self) -> ParseMode {
        self.common.parse
    }

    pub fn redis(&self) -> Option<&str> {
        self.common.redis_info.as_deref()
    }

    /// Now plus `d`, but never past the run's deadline.
    pub fn until(&self, d: Duration) -> Instant {
        (Instant::now() + d).min(self.deadline)
    }

    pub fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Fields common to every result.
    pub fn header(&self, scenario: &str, runtime: &str) -> Value {
        json!({
            "scenario": scenario,
            "label": self.common.label,
            "urls": self.common.urls,
            "wsbench": {
                "runtime": runtime,
                "parse": format!("{:?}", self.common.parse).to_lowercase(),
                "source_ips": self.common.source_ips,
                "nofile_limit": self.nofile,
                "connect_concurrency": self.common.connect_concurrency,
                "cpus_allowed": procstat::cpus_allowed("self"),
            },
            "unix_ms": frame::now_us() / 1000,
        })
    }

    /// Warns when `n` sockets will not fit in this process's file limit.
    pub fn check_fd_budget(&self, n: usize) {
        let need = n as u64 + 64;
        if need > self.nofile {
            eprintln!(
                "wsbench: {n} sockets need ~{need} file descriptors but RLIMIT_NOFILE is {}: \
                 the excess will fail (run several processes, e.g. --shard i/n)",
                self.nofile
            );
        }
    }
}

/// Parses `I/N` (shard I of N, from 0).
pub fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/2")?;
    let i: usize = i.parse().map_err(|_| "bad shard index")?;
    let n: usize = n.parse().map_err(|_| "bad shard count")?;
    if n == 0 || i >= n {
        return Err("shard index must be below the shard count".into());
    }
    Ok((i, n))
}

/// Parses seconds, optionally with a unit: `20`, `2.5s`, `500ms`, `1m`.
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(v * mult)
}

fn main() {
    let cli = Cli::parse();
    let common = cli.common.clone();
    let nofile = procstat::raise_nofile();
    let targets: Vec<Target> = match common.urls.iter().map(|u| Target::parse(u)).collect() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wsbench: {e}");
            std::process::exit(2);
        }
    };
    let watched: Vec<Watched> = match common.pids.iter().map(|p| Watched::parse(p)).collect() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("wsbench: {e}");
            std::process::exit(2);
        }
    };
    let busy_before = if common.wait_quiet > 0.0 {
        wait_quiet(Duration::from_secs_f64(common.wait_quiet))
    } else {
        None
    };
    let timeout = Duration::from_secs_f64(common.timeout.max(1.0));
    // The hard stop: whatever happens, the process ends.
    std::thread::spawn(move || {
        std::thread::sleep(timeout + Duration::from_secs(20));
        eprintln!("wsbench: still running 20 s past --timeout: exiting");
        std::process::exit(3);
    });
    let (runtime, runtime_name) = if common.workers == 0 {
        (
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            "current_thread".to_string(),
        )
    } else {
        (
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(common.workers)
                .enable_all()
                .build(),
            format!("multi_thread:{}", common.workers),
        )
    };
    let runtime = runtime.expect("tokio runtime");
    let result = runtime.block_on(async move {
        let ctx = Ctx {
            connector: Arc::new(Connector {
                targets,
                source_ips: common.source_ips,
                source_offset: 0,
                timeout: Duration::from_secs_f64(common.connect_timeout),
                retries: common.retries,
                parse: common.parse,
            }),
            watched,
            deadline: Instant::now() + timeout,
            nofile,
            common,
        };
        let mut result = match cli.scenario {
            Scenario::Conns(a) => scenarios::conns::run(&ctx, a).await,
            Scenario::Fanout(a) => scenarios::fanout::run(&ctx, a).await,
            Scenario::Rooms(a) => scenarios::rooms::run(&ctx, a).await,
            Scenario::Resume(a) => scenarios::resume::run(&ctx, a).await,
            Scenario::Stalls(a) => scenarios::stalls::run(&ctx, a).await,
            Scenario::Bare(a) => bare::run(&ctx, a).await,
        };
        let header = ctx.header(result["scenario"].as_str().unwrap_or("?"), &runtime_name);
        if let (Some(r), Some(h)) = (result.as_object_mut(), header.as_object()) {
            for (k, v) in h {
                r.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        if ctx.past_deadline() {
            result["timed_out"] = json!(true);
        }
        if let Some(busy) = busy_before {
            result["machine_busy_before_pct"] = json!(busy);
        }
        (result, ctx.common.json_out.clone())
    });
    let (result, json_out) = result;
    report::emit(&result, json_out.as_deref());
    // Sockets still held are closed by the exit.
    runtime.shutdown_timeout(Duration::from_secs(2));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_shards() {
        assert_eq!(parse_secs("20"), Ok(20.0));
        assert_eq!(parse_secs("500ms"), Ok(0.5));
        assert_eq!(parse_secs("2m"), Ok(120.0));
        assert!(parse_secs("-1").is_err());
        assert_eq!(parse_shard("1/4"), Ok((1, 4)));
        assert!(parse_shard("4/4").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
