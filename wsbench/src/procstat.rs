//! CPU time and resident memory of processes (the server nodes, Redis, this
//! generator) and of the whole machine, from /proc.

use std::fs;
use std::io;

use serde_json::{json, Value};

/// Clock ticks per second of /proc's utime and stime.
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// `utime` and `stime` (fields 14 and 15, in clock ticks) of /proc/PID/stat.
/// The command name (field 2) may hold spaces and parentheses: fields are
/// counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After ")": state is field 3, so utime (14) is the 12th.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// `VmRSS` of /proc/PID/status, in bytes.
pub fn parse_status_rss(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_ascii_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(n * 1024),
        Some(_) => None,
    }
}

/// `Cpus_allowed_list` of /proc/PID/status: the CPUs a process may run on
/// (`taskset`), e.g. "0" or "0-1".
pub fn parse_status_cpus_allowed(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("Cpus_allowed_list:"))?;
    Some(line["Cpus_allowed_list:".len()..].trim().to_string())
}

/// The CPUs process `pid` may run on, or None when /proc does not say.
pub fn cpus_allowed(pid: &str) -> Option<String> {
    parse_status_cpus_allowed(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The soft `Max open files` of /proc/PID/limits.
pub fn parse_limits_nofile(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcSample {
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    pub rss_bytes: u64,
}

pub fn sample(pid: &str) -> io::Result<ProcSample> {
    let bad =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/{what}"));
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (utime_ticks, stime_ticks) = parse_stat(&stat).ok_or_else(|| bad("stat"))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_bytes = parse_status_rss(&status).ok_or_else(|| bad("status"))?;
    Ok(ProcSample {
        utime_ticks,
        stime_ticks,
        rss_bytes,
    })
}

/// A process to watch, given as `PID` or `NAME=PID` (or `self`).
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: String,
}

impl Watched {
    pub fn parse(spec: &str) -> Result<Watched, String> {
        let (name, pid) = match spec.split_once('=') {
            Some((n, p)) => (Some(n.to_string()), p.trim().to_string()),
            None => (None, spec.trim().to_string()),
        };
        if pid != "self" && pid.parse::<u32>().is_err() {
            return Err(format!("--pid {spec:?}: expected PID or NAME=PID"));
        }
        let name = match name {
            Some(n) => n,
            None => fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| format!("{}:{pid}", c.trim()))
                .map_err(|e| format!("--pid {spec}: {e}"))?,
        };
        Ok(Watched { name, pid })
    }

    pub fn max_open_files(&self) -> Option<u64> {
        parse_limits_nofile(&fs::read_to_string(format!("/proc/{}/limits", self.pid)).ok()?)
    }
}

/// Readings of every watched process at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub procs: Vec<Option<ProcSample>>,
    pub machine: Option<MachineSample>,
    pub netstat: std::collections::BTreeMap<String, u64>,
}

pub fn snapshot(watched: &[Watched]) -> Snapshot {
    Snapshot {
        procs: watched.iter().map(|w| sample(&w.pid).ok()).collect(),
        machine: machine_sample().ok(),
        netstat: netstat_sample(),
    }
}

/// CPU time used between two readings, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuDelta {
    pub user_us: u64,
    pub system_us: u64,
}

impl CpuDelta {
    pub fn between(a: &ProcSample, b: &ProcSample, tck: u64) -> CpuDelta {
        let us = |ticks: u64| ticks * 1_000_000 / tck;
        CpuDelta {
            user_us: us(b.utime_ticks.saturating_sub(a.utime_ticks)),
            system_us: us(b.stime_ticks.saturating_sub(a.stime_ticks)),
        }
    }

    pub fn total_us(&self) -> u64 {
        self.user_us + self.system_us
    }

    /// µs per item (e.g. per delivered message): user, system, total.
    pub fn per(&self, n: u64) -> Value {
        if n == 0 {
            return Value::Null;
        }
        let r = |us: u64| (us as f64 / n as f64 * 1000.0).round() / 1000.0;
        json!({"user": r(self.user_us), "system": r(self.system_us), "total": r(self.total_us())})
    }

    pub fn add(&mut self, other: CpuDelta) {
        self.user_us += other.user_us;
        self.system_us += other.system_us;
    }
}

/// The first line of /proc/stat, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineSample {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
    /// CPUs the machine has (the `cpuN` lines), whatever this process's
    /// affinity: the machine figures are about all of them.
    pub cpus: u64,
}

pub fn parse_proc_stat(text: &str) -> Option<MachineSample> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    if v.len() < 4 {
        return None;
    }
    Some(MachineSample {
        user: get(0),
        nice: get(1),
        system: get(2),
        idle: get(3),
        iowait: get(4),
        irq: get(5),
        softirq: get(6),
        steal: get(7),
        cpus: text
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count() as u64,
    })
}

pub fn machine_sample() -> io::Result<MachineSample> {
    parse_proc_stat(&fs::read_to_string("/proc/stat")?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/stat"))
}

impl MachineSample {
    /// Ticks spent on work of any kind (not idle, not stolen by the host).
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }
}

/// Machine-wide CPU per item: everything the CPUs did (server, generator,
/// Redis, and the kernel's softirq work that no process is charged for).
pub fn machine_per(a: &MachineSample, b: &MachineSample, items: u64, tck: u64) -> Value {
    if items == 0 {
        return Value::Null;
    }
    let us = |t: u64| t as f64 * 1e6 / tck as f64 / items as f64;
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({
        "all": r(us(b.busy().saturating_sub(a.busy()))),
        "irq_softirq": r(us((b.irq + b.softirq).saturating_sub(a.irq + a.softirq))),
    })
}

/// How busy all CPUs were between two readings, in percent of their time.
pub fn machine_usage(a: &MachineSample, b: &MachineSample) -> Value {
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64;
    let user = d(a.user + a.nice, b.user + b.nice);
    let system = d(a.system, b.system);
    let irq = d(a.irq + a.softirq, b.irq + b.softirq);
    let steal = d(a.steal, b.steal);
    let idle = d(a.idle + a.iowait, b.idle + b.iowait);
    let all = user + system + irq + steal + idle;
    if all <= 0.0 {
        return Value::Null;
    }
    let pct = |x: f64| (x / all * 1000.0).round() / 10.0;
    json!({
        "busy_pct": pct(all - idle),
        "user_pct": pct(user),
        "system_pct": pct(system),
        "irq_softirq_pct": pct(irq),
        "steal_pct": pct(steal),
    })
}

/// Counters of /proc/net/netstat ("TcpExt: names" then "TcpExt: values").
pub fn parse_netstat(text: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((p1, names)), Some((p2, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        if p1 != p2 {
            continue;
        }
        for (n, v) in names
            .split_ascii_whitespace()
            .zip(values.split_ascii_whitespace())
        {
            if let Ok(v) = v.parse() {
                out.insert(format!("{p1}.{n}"), v);
            }
        }
    }
    out
}

/// TCP counters that explain slow or refused connects (accept queue full).
pub const NETSTAT_WATCHED: &[&str] = &[
    "TcpExt.ListenOverflows",
    "TcpExt.ListenDrops",
    "TcpExt.SyncookiesSent",
    "TcpExt.TCPReqQFullDrop",
    "TcpExt.TCPAbortOnData",
];

pub fn netstat_sample() -> std::collections::BTreeMap<String, u64> {
    let mut m = fs::read_to_string("/proc/net/netstat")
        .map(|t| parse_netstat(&t))
        .unwrap_or_default();
    m.retain(|k, _| NETSTAT_WATCHED.contains(&k.as_str()));
    m
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit.
/// Returns the soft limit in force afterwards.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        {
            lim.rlim_cur as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_command_name() {
        let stat = "4242 (ro (om) cast) S 1 4242 4242 0 -1 4194560 5523 0 0 0 1234 567 0 0 20 0 3 0 98765 123456789 2100 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(stat), Some((1234, 567)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_rss_in_bytes() {
        let status =
            "Name:\troomcast\nVmPeak:\t  999 kB\nVmRSS:\t   75320 kB\nRssAnon:\t 70000 kB\n";
        assert_eq!(parse_status_rss(status), Some(75320 * 1024));
        assert_eq!(parse_status_rss("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn limits_soft_nofile() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            20000                20000                files     \n";
        assert_eq!(parse_limits_nofile(limits), Some(20000));
    }

    #[test]
    fn cpu_deltas_in_microseconds() {
        let a = ProcSample {
            utime_ticks: 100,
            stime_ticks: 50,
            rss_bytes: 0,
        };
        let b = ProcSample {
            utime_ticks: 150,
            stime_ticks: 250,
            rss_bytes: 0,
        };
        let d = CpuDelta::between(&a, &b, 100);
        assert_eq!(
            (d.user_us, d.system_us, d.total_us()),
            (500_000, 2_000_000, 2_500_000)
        );
        let per = d.per(1_000_000);
        assert_eq!(per["user"], 0.5);
        assert_eq!(per["system"], 2.0);
        assert_eq!(per["total"], 2.5);
        assert_eq!(d.per(0), Value::Null);
    }

    #[test]
    fn machine_usage_from_proc_stat() {
        let a = parse_proc_stat(
            "cpu  100 0 100 700 0 0 0 100 0 0\ncpu0 1 2 3 4\ncpu1 1 2 3 4\nintr 5\n",
        )
        .unwrap();
        let b = parse_proc_stat("cpu  200 0 150 800 0 0 50 100 0 0\n").unwrap();
        assert_eq!((a.cpus, b.cpus), (2, 0));
        let u = machine_usage(&a, &b);
        assert_eq!(u["busy_pct"], 66.7);
        assert_eq!(u["user_pct"], 33.3);
        assert_eq!(u["irq_softirq_pct"], 16.7);
        let per = machine_per(&a, &b, 1000, 100);
        assert_eq!(per["all"], 2000.0);
        assert_eq!(per["irq_softirq"], 500.0);
    }

    #[test]
    fn cpus_allowed_from_status() {
        let status = "Name:\troomcast\nCpus_allowed:\t1\nCpus_allowed_list:\t0\nVmRSS:\t 10 kB\n";
        assert_eq!(parse_status_cpus_allowed(status).as_deref(), Some("0"));
        assert_eq!(parse_status_cpus_allowed("Name:\tx\n"), None);
        assert!(cpus_allowed("self").is_some());
    }

    #[test]
    fn netstat_pairs() {
        let t = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 21 22\nIpExt: InNoRoutes\nIpExt: 5\n";
        let m = parse_netstat(t);
        assert_eq!(m["TcpExt.ListenOverflows"], 21);
        assert_eq!(m["TcpExt.ListenDrops"], 22);
        assert_eq!(m["IpExt.InNoRoutes"], 5);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample("self").unwrap();
        assert!(s.rss_bytes > 0);
        assert!(clk_tck() >= 100);
    }
}
