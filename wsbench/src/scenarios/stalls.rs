//! `stalls`: how steadily this machine's CPUs run, with no server involved.
//!
//! One thread per CPU (pinned to it) repeats a fixed piece of arithmetic for
//! the whole run and counts how many pieces each window (1 ms) got done. A
//! window that did under a third of the usual (median) window's work is
//! *stalled*: the CPU was taken away (a virtual machine's host running
//! something else) or slowed. Consecutive stalled windows form an episode. A latency target of a
//! few milliseconds cannot hold through episodes of tens of milliseconds,
//! whatever the server does, so `scripts/bench` records this next to the
//! latency figures.
//!
//! With `--burst-ms B`, each thread instead does B ms of that work (at its
//! usual pace, measured first) due every `--every-ms` and times each burst
//! from when it was due: the latency of a server that needs B ms of CPU per
//! message, with no server, network or generator involved.

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use crate::hist::Hist;
use crate::parse_secs;
use crate::report::round3;

/// A window counts as stalled below this share of the usual window's work.
const STALLED_BELOW: f64 = 1.0 / 3.0;
/// Rounds of arithmetic per piece of work: about 1 µs, so a 1 ms window
/// holds hundreds and the clock read after each piece costs little.
const PIECE_ROUNDS: u32 = 256;

#[derive(Args)]
pub struct StallsArgs {
    /// Seconds to measure
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    pub duration: f64,
    /// Window length in milliseconds
    #[arg(long, default_value_t = 1.0)]
    pub window_ms: f64,
    /// Instead of spinning: bursts of this many ms of work (at the usual pace)
    #[arg(long)]
    pub burst_ms: Option<f64>,
    /// With --burst-ms: one burst every this many ms, on each CPU
    #[arg(long, default_value_t = 10.0)]
    pub every_ms: f64,
}

/// How long the pace is measured before bursts, to size them.
const CALIBRATION: Duration = Duration::from_millis(300);

fn fail(e: &str) -> Value {
    json!({"scenario": "stalls", "error": e})
}

pub async fn run(_ctx: &crate::Ctx, a: StallsArgs) -> Value {
    if !(a.window_ms >= 0.1 && a.duration >= a.window_ms / 1000.0 && a.duration <= 600.0) {
        return fail("need --window-ms >= 0.1 and a --duration of one window to 600 s");
    }
    let cpus = allowed_cpus();
    if cpus.is_empty() {
        return fail("sched_getaffinity failed: no CPU to measure");
    }
    let window = Duration::from_secs_f64(a.window_ms / 1000.0);
    if let Some(burst_ms) = a.burst_ms {
        if !(burst_ms > 0.0 && a.every_ms >= burst_ms && a.every_ms <= a.duration * 1000.0) {
            return fail("need --burst-ms > 0 and --burst-ms <= --every-ms <= the --duration");
        }
        let plan = Bursts {
            window,
            burst_ms,
            every: Duration::from_secs_f64(a.every_ms / 1000.0),
            duration: Duration::from_secs_f64(a.duration),
        };
        let Ok(per_cpu) = tokio::task::spawn_blocking(move || plan.run_all(&cpus)).await else {
            return fail("a measuring thread failed");
        };
        return plan.report(&per_cpu, &a);
    }
    let windows = (a.duration / window.as_secs_f64()).floor() as usize;
    let measured = tokio::task::spawn_blocking(move || measure_all(&cpus, window, windows)).await;
    let per_cpu = match measured {
        Ok(per_cpu) if !per_cpu.is_empty() => per_cpu,
        _ => return fail("a measuring thread failed"),
    };
    let cpus: Vec<(&usize, &bool, CpuSteadiness)> = per_cpu
        .iter()
        .map(|(cpu, pinned, work)| (cpu, pinned, summarize(work, a.window_ms)))
        .collect();
    let summaries: Vec<Value> = cpus
        .iter()
        .map(|(cpu, pinned, steadiness)| {
            let mut s = steadiness.to_json();
            s["cpu"] = json!(cpu);
            s["pinned"] = json!(pinned);
            s
        })
        .collect();
    let stalled: Vec<Vec<bool>> = cpus.into_iter().map(|(_, _, s)| s.stalled).collect();
    let machine = MachineStalls::of(&stalled, a.window_ms);
    let at = |q: f64| quantile(&machine.wait_ms, q);
    json!({
        "scenario": "stalls",
        "params": {"duration_s": a.duration, "window_ms": a.window_ms, "stalled_below_pct_of_usual": round3(100.0 * STALLED_BELOW)},
        "cpus": summaries,
        "any_cpu_stalled_pct": machine.any_pct,
        "all_cpus_stalled_pct": machine.all_pct,
        // A moment taken at random while every CPU is busy: how long until
        // the stall of all CPUs it falls in ends (its window counted whole).
        "stall_wait_ms": {"p99": at(0.99), "p99.9": at(0.999), "max": at(1.0)},
    })
}

/// Stalls of the machine as a whole, from each CPU's stalled windows.
#[derive(Debug, PartialEq)]
struct MachineStalls {
    /// Windows stalled on at least one CPU, in percent.
    any_pct: f64,
    /// Windows stalled on every CPU at once, in percent.
    all_pct: f64,
    /// For every window, sorted: ms until the stall of all CPUs it is in ends.
    wait_ms: Vec<f64>,
}

impl MachineStalls {
    fn of(stalled: &[Vec<bool>], window_ms: f64) -> Self {
        let windows = stalled.iter().map(Vec::len).min().unwrap_or(0);
        let all: Vec<bool> = (0..windows).map(|i| stalled.iter().all(|s| s[i])).collect();
        let any = (0..windows)
            .filter(|&i| stalled.iter().any(|s| s[i]))
            .count();
        let pct = |n: usize| round3(100.0 * n as f64 / windows.max(1) as f64);
        MachineStalls {
            any_pct: pct(any),
            all_pct: pct(all.iter().filter(|&&s| s).count()),
            wait_ms: stall_left_at(&all, window_ms),
        }
    }
}

/// The CPUs this process may run on (`taskset` narrows them).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // writes at most size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu`; false if the kernel refused.
fn pin_to(cpu: usize) -> bool {
    // SAFETY: as in allowed_cpus; CPU_SET stays within CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Runs `f` on one thread pinned to each of `cpus`, at once: per CPU,
/// whether the pinning took and what `f` returned.
fn on_each_cpu<T: Send>(cpus: &[usize], f: impl Fn() -> T + Sync) -> Vec<(usize, bool, T)> {
    std::thread::scope(|scope| {
        let threads: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                let f = &f;
                scope.spawn(move || {
                    let pinned = pin_to(cpu);
                    (cpu, pinned, f())
                })
            })
            .collect();
        threads.into_iter().filter_map(|t| t.join().ok()).collect()
    })
}

/// Work per window on each CPU, all threads counting the same windows.
fn measure_all(cpus: &[usize], window: Duration, windows: usize) -> Vec<(usize, bool, Vec<u32>)> {
    // A common start a little ahead, so every thread is running by then.
    let start = Instant::now() + Duration::from_millis(50);
    on_each_cpu(cpus, || work_per_window(start, window, windows))
}

/// Bursts of work on a fixed schedule, timed from their scheduled start.
#[derive(Clone, Copy)]
struct Bursts {
    window: Duration,
    burst_ms: f64,
    every: Duration,
    duration: Duration,
}

/// One CPU's bursts.
struct BurstRun {
    /// Pieces of work per burst, sized from the CPU's measured pace.
    pieces: u64,
    /// How long each burst took from when it was due, µs.
    took: Hist,
    /// Bursts never started: the run fell so far behind that it stopped
    /// at twice its duration.
    not_run: usize,
}

impl Bursts {
    /// Each CPU's bursts; None for a CPU whose pace could not be measured.
    fn run_all(self, cpus: &[usize]) -> Vec<(usize, bool, Option<BurstRun>)> {
        on_each_cpu(cpus, || self.run())
    }

    fn ticks(self) -> usize {
        (self.duration.as_nanos() / self.every.as_nanos().max(1)).max(1) as usize
    }

    /// Every tick gets its burst, however late: one that overran delays
    /// the next, as a message waits for the fan-out before it.
    fn run(self) -> Option<BurstRun> {
        let windows = (CALIBRATION.as_nanos() / self.window.as_nanos().max(1)) as usize;
        let pace = work_per_window(Instant::now(), self.window, windows.max(1));
        let per_ms = typical(&pace) / (self.window.as_secs_f64() * 1000.0);
        let pieces = (per_ms * self.burst_ms).round() as u64;
        if pieces == 0 {
            return None;
        }
        let ticks = self.ticks();
        let start = Instant::now();
        let give_up = start + self.duration * 2;
        let mut took = Hist::default();
        for k in 0..ticks {
            let due = start + self.every * k as u32;
            let now = Instant::now();
            if now >= give_up {
                return Some(BurstRun {
                    pieces,
                    not_run: ticks - k,
                    took,
                });
            }
            if due > now {
                std::thread::sleep(due - now);
            }
            let mut x = k as u64;
            for _ in 0..pieces {
                x = black_box(piece(x));
            }
            took.record(due.elapsed().as_micros() as u64);
        }
        Some(BurstRun {
            pieces,
            took,
            not_run: 0,
        })
    }

    fn report(self, per_cpu: &[(usize, bool, Option<BurstRun>)], a: &StallsArgs) -> Value {
        if per_cpu.is_empty() || per_cpu.iter().any(|(_, _, r)| r.is_none()) {
            return fail("a CPU's pace could not be measured (no work done in its median window)");
        }
        let runs = per_cpu
            .iter()
            .filter_map(|(cpu, pinned, r)| Some((cpu, pinned, r.as_ref()?)));
        let mut took = Hist::default();
        for (_, _, r) in runs.clone() {
            took.merge(&r.took);
        }
        let took = took.summary();
        json!({
            "scenario": "stalls",
            "params": {"duration_s": a.duration, "burst_ms": self.burst_ms, "every_ms": a.every_ms},
            "bursts": {
                "expected": self.ticks() * per_cpu.len(),
                "count": took.count,
                "not_run": runs.clone().map(|(_, _, r)| r.not_run).sum::<usize>(),
                "took_ms": took.to_json_ms(),
                "cpus": runs.map(|(cpu, pinned, r)| json!({"cpu": cpu, "pinned": pinned, "pieces_per_burst": r.pieces})).collect::<Vec<_>>(),
            },
        })
    }
}

/// One piece of work: rounds of xorshift64, cheap and impossible to skip.
fn piece(mut x: u64) -> u64 {
    x |= 1;
    for _ in 0..PIECE_ROUNDS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// Pieces of work done in each of `windows` windows from `start`.
fn work_per_window(start: Instant, window: Duration, windows: usize) -> Vec<u32> {
    let mut work = vec![0u32; windows];
    while Instant::now() < start {
        std::hint::spin_loop();
    }
    let window_ns = window.as_nanos().max(1);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    loop {
        x = black_box(piece(x));
        let i = (start.elapsed().as_nanos() / window_ns) as usize;
        match work.get_mut(i) {
            Some(done) => *done += 1,
            None => return work,
        }
    }
}

/// The median window's work: the machine's usual pace (the fastest window
/// is an outlier on a host whose speed wanders).
fn typical(work: &[u32]) -> f64 {
    let mut sorted = work.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0) as f64
}

/// Which windows did under [`STALLED_BELOW`] of `usual` work.
fn stalled(work: &[u32], usual: f64) -> Vec<bool> {
    work.iter()
        .map(|&w| (w as f64) < usual * STALLED_BELOW)
        .collect()
}

/// The value at quantile `q` of `sorted` (nearest rank), None if empty.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get((last as f64 * q).round() as usize).copied()
}

/// For each window, sorted: how much longer (ms) the stall it is in lasts,
/// counting the window itself; 0 for a window that is not stalled.
fn stall_left_at(stalled: &[bool], window_ms: f64) -> Vec<f64> {
    let mut left = vec![0.0; stalled.len()];
    let mut run = 0usize;
    for (i, &s) in stalled.iter().enumerate().rev() {
        run = if s { run + 1 } else { 0 };
        left[i] = run as f64 * window_ms;
    }
    left.sort_by(f64::total_cmp);
    if left.is_empty() {
        left.push(0.0);
    }
    left
}

/// One CPU's steadiness.
#[derive(Debug, PartialEq)]
struct CpuSteadiness {
    windows: usize,
    /// Which windows were stalled.
    stalled: Vec<bool>,
    /// Work done over the run, in percent of the usual window's pace.
    speed_pct: f64,
    stalled_pct: f64,
    /// Lengths of the runs of consecutive stalled windows, in ms, sorted.
    episodes_ms: Vec<f64>,
    episodes_per_s: f64,
}

impl CpuSteadiness {
    fn to_json(&self) -> Value {
        let pick = |q: f64| quantile(&self.episodes_ms, q);
        json!({
            "windows": self.windows,
            "pace_pct_of_usual": self.speed_pct,
            "stalled_pct": self.stalled_pct,
            "episodes": self.episodes_ms.len(),
            "episodes_per_s": self.episodes_per_s,
            "episode_ms": {"p50": pick(0.5), "p90": pick(0.9), "max": pick(1.0)},
        })
    }
}

fn summarize(work: &[u32], window_ms: f64) -> CpuSteadiness {
    let windows = work.len();
    let usual = typical(work);
    let flags = stalled(work, usual);
    let mut episodes_ms = Vec::new();
    let mut run = 0usize;
    for &s in flags.iter().chain(std::iter::once(&false)) {
        if s {
            run += 1;
        } else if run > 0 {
            episodes_ms.push(run as f64 * window_ms);
            run = 0;
        }
    }
    episodes_ms.sort_by(f64::total_cmp);
    let total: f64 = work.iter().map(|&w| w as f64).sum();
    let pct = |x: f64, of: f64| {
        if of > 0.0 {
            round3(100.0 * x / of)
        } else {
            0.0
        }
    };
    let seconds = windows as f64 * window_ms / 1000.0;
    CpuSteadiness {
        windows,
        speed_pct: pct(total, usual * windows as f64),
        stalled_pct: pct(flags.iter().filter(|&&s| s).count() as f64, windows as f64),
        stalled: flags,
        episodes_per_s: if seconds > 0.0 {
            round3(episodes_ms.len() as f64 / seconds)
        } else {
            0.0
        },
        episodes_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_under_a_third_of_the_usual_are_stalled_and_runs_of_them_are_episodes() {
        // 20 windows of 1 ms, usually 300; a 3-window episode, a 1-window one at the end.
        let mut work = vec![300u32; 20];
        work[5] = 50;
        work[6] = 99;
        work[7] = 0;
        work[8] = 100; // exactly a third: not stalled
        work[19] = 10;
        let s = summarize(&work, 1.0);
        assert_eq!(s.windows, 20);
        assert_eq!(s.stalled_pct, 20.0);
        assert_eq!(s.episodes_ms, vec![1.0, 3.0]);
        assert_eq!(s.episodes_per_s, 100.0);
        let done = 300.0 * 15.0 + 50.0 + 99.0 + 100.0 + 10.0;
        assert_eq!(s.speed_pct, round3(100.0 * done / 6000.0));
        let j = s.to_json();
        assert_eq!(j["episode_ms"]["max"], 3.0);
        assert_eq!(j["episodes"], 2);
    }

    #[test]
    fn the_stall_wait_is_how_long_the_stall_a_moment_falls_in_still_lasts() {
        // 10 windows of 2 ms, one stall of 3 windows: 6, 4 and 2 ms left.
        let mut stalled = vec![false; 10];
        stalled[2..5].fill(true);
        let left = stall_left_at(&stalled, 2.0);
        assert_eq!(left, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 4.0, 6.0]);
        assert_eq!(stall_left_at(&[], 1.0), vec![0.0]);
    }

    #[test]
    fn a_steady_cpu_has_no_episodes() {
        let s = summarize(&[200, 210, 190, 205], 2.0);
        assert_eq!((s.stalled_pct, s.episodes_ms.len()), (0.0, 0));
        assert_eq!(s.to_json()["episode_ms"]["p50"], Value::Null);
    }

    #[test]
    fn every_tick_gets_a_burst_of_about_the_asked_length() {
        let plan = Bursts {
            window: Duration::from_millis(1),
            burst_ms: 2.0,
            every: Duration::from_millis(5),
            duration: Duration::from_millis(50),
        };
        let run = plan.run().expect("pace measured");
        let took = run.took.summary();
        assert_eq!(took.count as usize + run.not_run, 10, "{took:?}");
        // Stalls only lengthen bursts; a quarter allows a pace measured
        // while this test shared its CPU.
        assert!(took.p50 >= 500, "{took:?}");
    }

    #[test]
    fn the_machine_stalls_when_every_cpu_does() {
        let a = vec![true, true, false, false, true];
        let b = vec![true, false, false, true, true];
        let m = MachineStalls::of(&[a, b], 2.0);
        assert_eq!((m.any_pct, m.all_pct), (80.0, 40.0));
        // Windows 0 and 4 are stalled on both CPUs, one window each.
        assert_eq!(m.wait_ms, vec![0.0, 0.0, 0.0, 2.0, 2.0]);
        let none = MachineStalls::of(&[], 1.0);
        assert_eq!(
            (none.any_pct, none.all_pct, none.wait_ms),
            (0.0, 0.0, vec![0.0])
        );
    }

    #[test]
    fn a_thread_pinned_to_a_cpu_counts_its_work_per_window() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let measured = measure_all(&cpus[..1], Duration::from_millis(5), 4);
        let (_, pinned, work) = &measured[0];
        assert!(*pinned);
        assert_eq!(work.len(), 4);
        // A shared test machine may stall a window, not most of them.
        assert!(work.iter().filter(|&&w| w > 0).count() >= 2, "{work:?}");
    }
}
