//! Measurement windows (server CPU and memory, Redis calls) and the output:
//! a human table on stdout and one `RESULT {json}` line.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::procstat::{self, CpuDelta, Snapshot, Watched};
use crate::redisinfo;

/// Readings taken at the start of a measured phase.
pub struct Window {
    start: Instant,
    procs: Snapshot,
    gen: Option<procstat::ProcSample>,
    redis: Option<Result<BTreeMap<String, u64>, String>>,
}

/// What a measured phase cost.
pub struct WindowCost {
    pub seconds: f64,
    pub json: Value,
    pub redis_calls: Option<BTreeMap<String, u64>>,
}

pub async fn open_window(watched: &[Watched], redis: Option<&str>) -> Window {
    let redis = match redis {
        Some(addr) => Some(redisinfo::commandstats(addr).await),
        None => None,
    };
    Window {
        start: Instant::now(),
        procs: procstat::snapshot(watched),
        gen: procstat::sample("self").ok(),
        redis,
    }
}

impl Window {
    pub fn procs(&self) -> &Snapshot {
        &self.procs
    }

    /// Closes the window. `items` is what CPU is divided by (delivered
    /// messages, connections); `per` names it.
    pub async fn close(
        &self,
        watched: &[Watched],
        redis: Option<&str>,
        items: u64,
        per: &str,
    ) -> WindowCost {
        let seconds = self.start.elapsed().as_secs_f64();
        let after = procstat::snapshot(watched);
        let gen_after = procstat::sample("self").ok();
        let tck = procstat::clk_tck();
        let mut total = CpuDelta::default();
        let mut procs = Vec::new();
        for (i, w) in watched.iter().enumerate() {
            let (Some(a), Some(b)) = (self.procs.procs[i], after.procs[i]) else {
                procs.push(json!({"name": w.name, "pid": w.pid, "error": "unreadable (gone?)"}));
                continue;
            };
            let d = CpuDelta::between(&a, &b, tck);
            total.add(d);
            procs.push(json!({
                "name": w.name,
                "pid": w.pid,
                "cpu_user_s": d.user_us as f64 / 1e6,
                "cpu_system_s": d.system_us as f64 / 1e6,
                "cpu_pct": pct(d.total_us() as f64 / 1e6, seconds),
                format!("cpu_us_per_{per}"): d.per(items),
                "rss_before_bytes": a.rss_bytes,
                "rss_after_bytes": b.rss_bytes,
                "cpus_allowed": procstat::cpus_allowed(&w.pid),
            }));
        }
        let generator = match (self.gen, gen_after) {
            (Some(a), Some(b)) => {
                let d = CpuDelta::between(&a, &b, tck);
                json!({
                    "cpu_user_s": d.user_us as f64 / 1e6,
                    "cpu_system_s": d.system_us as f64 / 1e6,
                    "cpu_pct": pct(d.total_us() as f64 / 1e6, seconds),
                    "rss_bytes": b.rss_bytes,
                })
            }
            _ => Value::Null,
        };
        let mut machine = match (self.procs.machine, after.machine) {
            (Some(a), Some(b)) => {
                let mut m = procstat::machine_usage(&a, &b);
                if !m.is_null() {
                    m[format!("cpu_us_per_{per}")] = procstat::machine_per(&a, &b, items, tck);
                }
                m
            }
            _ => Value::Null,
        };
        // CPU the watched processes and this generator do not explain (other
        // work on the machine, kernel threads): a sign of a disturbed run.
        if let Some(busy) = machine["busy_pct"].as_f64() {
            // All of the machine's CPUs, not this process's affinity (taskset).
            let cores = after.machine.map_or(1, |m| m.cpus.max(1)) as f64;
            let ours = procs
                .iter()
                .filter_map(|p| p["cpu_pct"].as_f64())
                .sum::<f64>()
                + generator["cpu_pct"].as_f64().unwrap_or(0.0);
            machine["unexplained_pct"] = json!(((busy - ours / cores) * 10.0).round() / 10.0);
        }
        let netstat: BTreeMap<String, u64> = after
            .netstat
            .iter()
            .filter_map(|(k, v)| {
                let d = v.saturating_sub(self.procs.netstat.get(k).copied().unwrap_or(0));
                (d > 0).then(|| (k.trim_start_matches("TcpExt.").to_string(), d))
            })
            .collect();
        let mut redis_calls = None;
        let redis_json = match (&self.redis, redis) {
            (Some(Ok(before)), Some(addr)) => match redisinfo::commandstats(addr).await {
                Ok(after) => {
                    let d = redisinfo::delta(before, &after);
                    redis_calls = Some(d.clone());
                    json!(d)
                }
                Err(e) => json!({ "error": e }),
            },
            (Some(Err(e)), _) => json!({ "error": e }),
            _ => Value::Null,
        };
        let mut j = json!({
            "seconds": round3(seconds),
            "procs": procs,
            format!("cpu_us_per_{per}"): if watched.is_empty() { Value::Null } else { total.per(items) },
            "generator": generator,
            "machine": machine,
            "tcp_counters": netstat,
        });
        if !redis_json.is_null() {
            j["redis_calls"] = redis_json;
        }
        WindowCost {
            seconds,
            json: j,
            redis_calls,
        }
    }
}

fn pct(cpu_s: f64, wall_s: f64) -> f64 {
    if wall_s <= 0.0 {
        return 0.0;
    }
    (cpu_s / wall_s * 1000.0).round() / 10.0
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Prints the human table, then `RESULT <json>`; appends the JSON line to
/// `json_out` when given.
pub fn emit(result: &Value, json_out: Option<&Path>) {
    let mut out = String::new();
    render(result, &mut out);
    let line = serde_json::to_string(result).expect("JSON");
    println!("{out}RESULT {line}");
    if let Some(path) = json_out {
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            // One write: shards running at once append to the same file.
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = written {
            eprintln!("wsbench: cannot write {}: {e}", path.display());
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k} {}", scalar(v)))
            .collect::<Vec<_>>()
            .join("  "),
        Value::Array(a) => a.iter().map(scalar).collect::<Vec<_>>().join(" | "),
        other => other.to_string(),
    }
}

fn rows(m: &Map<String, Value>, indent: usize, out: &mut String) {
    for (k, v) in m {
        match v {
            Value::Object(inner) if inner.values().any(|x| x.is_object() || x.is_array()) => {
                out.push_str(&format!("{:indent$}{k}\n", ""));
                rows(inner, indent + 2, out);
            }
            Value::Array(items) if items.iter().any(Value::is_object) => {
                out.push_str(&format!("{:indent$}{k}\n", ""));
                for item in items {
                    out.push_str(&format!("{:w$}- {}\n", "", scalar(item), w = indent + 2));
                }
            }
            _ => out.push_str(&format!("{:indent$}{:<24} {}\n", "", k, scalar(v))),
        }
    }
}

/// The result as an indented table: scalars first, then one block per
/// section.
pub fn render(result: &Value, out: &mut String) {
    let Some(m) = result.as_object() else {
        out.push_str(&format!("{result}\n"));
        return;
    };
    let (flat, nested): (Vec<_>, Vec<_>) = m.iter().partition(|(_, v)| !v.is_object());
    for (k, v) in flat {
        out.push_str(&format!("{k:<26} {}\n", scalar(v)));
    }
    for (k, v) in nested {
        out.push_str(&format!("== {k}\n"));
        if let Some(inner) = v.as_object() {
            rows(inner, 2, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sections_and_inline_percentiles() {
        let r = json!({
            "scenario": "fanout",
            "latency_ms": {"p50": 0.5, "p99": 2.0},
            "delivery": {"expected": 10, "lost": 0, "by": {"a": 1}},
        });
        let mut s = String::new();
        render(&r, &mut s);
        assert!(s.starts_with("scenario"), "{s}");
        assert!(s.contains("== latency_ms\n  p50"), "{s}");
        assert!(s.contains("by                       a 1"), "{s}");
    }
}
