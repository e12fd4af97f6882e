//! The node's counters, the single source of `/stats` (JSON) and `/metrics`
//! (Prometheus text). Counters are plain atomics; histograms of fan-out time
//! and message size live in this node's own Prometheus recorder (no global
//! recorder, so several nodes can run in one process).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::{Histogram, Key, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use serde::Serialize;

use crate::protocol::ErrorCode;

const FANOUT_SECONDS: &str = "roomcast_fanout_seconds";
const MESSAGE_BYTES: &str = "roomcast_message_bytes";
const PUBLISH_SECONDS: &str = "roomcast_publish_seconds";
const DELIVERY_LATENCY_SECONDS: &str = "roomcast_delivery_latency_seconds";

/// Width of one bucket of the latency window, and how many there are: 100 µs
/// steps up to 100 ms; slower deliveries share the last bucket (and `max`).
const LATENCY_STEP_US: u64 = 100;
const LATENCY_BUCKETS: usize = 1000;

pub struct Stats {
    started: Instant,
    connections_opened: AtomicU64,
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
    slow_consumer_closes: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
    closes: Mutex<BTreeMap<&'static str, u64>>,
    upgrades_refused: Mutex<BTreeMap<&'static str, u64>>,
    recorder: PrometheusRecorder,
    fanout_seconds: Histogram,
    message_bytes: Histogram,
    publish_seconds: Histogram,
    delivery_latency_seconds: Histogram,
    latency_window: LatencyWindow,
    last_latency: Mutex<LatencySummary>,
}

/// Publish-to-deliver latencies since the window was last taken: a
/// dashboard wants "now", which cumulative Prometheus buckets do not give.
struct LatencyWindow {
    buckets: Box<[AtomicU64]>,
    max_us: AtomicU64,
}

/// One window of publish-to-deliver latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencyWindow {
    fn new() -> Self {
        LatencyWindow {
            buckets: (0..LATENCY_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }

    fn record(&self, us: u64) {
        let bucket = ((us / LATENCY_STEP_US) as usize).min(LATENCY_BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.max_us.fetch_max(us, Relaxed);
    }

    /// Empties the window and summarises what it held. Percentiles are the
    /// upper edge of their bucket (never below the truth), capped by `max`.
    fn take(&self) -> LatencySummary {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.swap(0, Relaxed)).collect();
        let max_us = self.max_us.swap(0, Relaxed);
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let percentile = |q: f64| {
            let rank = ((count as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (bucket, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank && bucket < LATENCY_BUCKETS - 1 {
                    return ms(((bucket as u64 + 1) * LATENCY_STEP_US).min(max_us));
                }
            }
            ms(max_us)
        };
        LatencySummary {
            count,
            p50: percentile(0.5),
            p90: percentile(0.9),
            p99: percentile(0.99),
            max: ms(max_us),
        }
    }
}

/// The counters as `/stats` shows them.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Counters {
    pub connections_opened: u64,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub bytes_out: u64,
    pub slow_consumer_closes: u64,
    pub errors: BTreeMap<&'static str, u64>,
    /// By close code; codes a peer made up are counted as `other`.
    pub closes: BTreeMap<&'static str, u64>,
    pub upgrades_refused: BTreeMap<&'static str, u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()))
}

impl Stats {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(FANOUT_SECONDS.into()),
                &[
                    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(PUBLISH_SECONDS.into()),
                    &[0.000_1, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0],
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(DELIVERY_LATENCY_SECONDS.into()),
                    &[0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0],
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(MESSAGE_BYTES.into()),
                    &[
                        64.0,
                        256.0,
                        1024.0,
                        4096.0,
                        16384.0,
                        65536.0,
                        262_144.0,
                        1_048_576.0,
                    ],
                )
            })
            .unwrap_or_default()
            .build_recorder();
        recorder.describe_histogram(
            FANOUT_SECONDS.into(),
            Some(Unit::Seconds),
            "Time to hand a batch of deliveries to every local recipient: written at once, or queued for a WRITE_DELAY flush".into(),
        );
        recorder.describe_histogram(
            MESSAGE_BYTES.into(),
            Some(Unit::Bytes),
            "Size of text frames received from clients".into(),
        );
        let fanout_seconds =
            recorder.register_histogram(&Key::from_name(FANOUT_SECONDS), &metadata());
        recorder.describe_histogram(
            PUBLISH_SECONDS.into(),
            Some(Unit::Seconds),
            "Time for the broker to store and publish one room message".into(),
        );
        let publish_seconds =
            recorder.register_histogram(&Key::from_name(PUBLISH_SECONDS), &metadata());
        let message_bytes =
            recorder.register_histogram(&Key::from_name(MESSAGE_BYTES), &metadata());
        recorder.describe_histogram(
            DELIVERY_LATENCY_SECONDS.into(),
            Some(Unit::Seconds),
            "From a room message's id (its publish time, 1 ms resolution) to its local fan-out"
                .into(),
        );
        let delivery_latency_seconds =
            recorder.register_histogram(&Key::from_name(DELIVERY_LATENCY_SECONDS), &metadata());
        Stats {
            started: Instant::now(),
            connections_opened: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            slow_consumer_closes: AtomicU64::new(0),
            errors: Default::default(),
            closes: Mutex::new(BTreeMap::new()),
            upgrades_refused: Mutex::new(BTreeMap::new()),
            recorder,
            fanout_seconds,
            message_bytes,
            publish_seconds,
            delivery_latency_seconds,
            latency_window: LatencyWindow::new(),
            last_latency: Mutex::new(LatencySummary::default()),
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn connection_opened(&self) {
        self.connections_opened.fetch_add(1, Relaxed);
    }

    pub fn received(&self, bytes: usize) {
        self.messages_in.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
        self.message_bytes.record(bytes as f64);
    }

    pub fn sent(&self, frames: u64, bytes: u64) {
        self.messages_out.fetch_add(frames, Relaxed);
        self.bytes_out.fetch_add(bytes, Relaxed);
    }

    pub fn slow_consumer_closed(&self) {
        self.slow_consumer_closes.fetch_add(1, Relaxed);
    }

    pub fn error_sent(&self, code: ErrorCode) {
        self.errors[code.index()].fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self, code: u16) {
        *lock(&self.closes).entry(close_label(code)).or_insert(0) += 1;
    }

    pub fn upgrade_refused(&self, reason: &'static str) {
        *lock(&self.upgrades_refused).entry(reason).or_insert(0) += 1;
    }

    pub fn record_publish(&self, took: Duration) {
        self.publish_seconds.record(took.as_secs_f64());
    }

    pub fn record_fanout(&self, took: Duration) {
        self.fanout_seconds.record(took.as_secs_f64());
    }

    /// A room message published at `published_ms` (its id) is being handed
    /// to local members now.
    pub fn record_delivery_latency(&self, published_ms: u64) {
        let us = crate::protocol::now_us().saturating_sub(published_ms * 1000);
        self.latency_window.record(us);
        self.delivery_latency_seconds.record(us as f64 / 1e6);
    }

    /// Closes the current latency window; [`Stats::last_latency`] shows it
    /// until the next one closes.
    pub fn roll_latency_window(&self) -> LatencySummary {
        let summary = self.latency_window.take();
        *lock(&self.last_latency) = summary;
        summary
    }

    pub fn last_latency(&self) -> LatencySummary {
        *lock(&self.last_latency)
    }

    pub fn snapshot_counters(&self) -> Counters {
        Counters {
            connections_opened: self.connections_opened.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            slow_consumer_closes: self.slow_consumer_closes.load(Relaxed),
            errors: ErrorCode::ALL
                .iter()
                .map(|code| (code.as_str(), self.errors[code.index()].load(Relaxed)))
                .collect(),
            closes: lock(&self.closes).clone(),
            upgrades_refused: lock(&self.upgrades_refused).clone(),
        }
    }

    /// The Prometheus text exposition: the counters and gauges given, then
    /// the histograms.
    /// The Prometheus text: `gauges` and `counters` from the caller (name,
    /// help, value), then the node's own counters and histograms.
    pub fn render_prometheus(
        &self,
        gauges: &[(&str, &str, f64)],
        counters: &[(&str, &str, u64)],
    ) -> String {
        use std::fmt::Write;
        let c = self.snapshot_counters();
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        for (name, help, value) in gauges {
            metric(name, "gauge", help, &[(String::new(), *value)]);
        }
        metric(
            "roomcast_uptime_seconds",
            "gauge",
            "Seconds since the node started",
            &[(String::new(), self.uptime().as_secs_f64())],
        );
        let own = [
            (
                "roomcast_connections_opened_total",
                "WebSocket sessions accepted",
                c.connections_opened,
            ),
            (
                "roomcast_messages_in_total",
                "Text frames received from clients",
                c.messages_in,
            ),
            (
                "roomcast_bytes_in_total",
                "Bytes of text frames received from clients",
                c.bytes_in,
            ),
            (
                "roomcast_messages_out_total",
                "Frames written to clients",
                c.messages_out,
            ),
            (
                "roomcast_bytes_out_total",
                "Bytes of text frames written to clients",
                c.bytes_out,
            ),
            (
                "roomcast_slow_consumer_closes_total",
                "Connections closed with 4008 because their queue was full",
                c.slow_consumer_closes,
            ),
        ];
        for (name, help, value) in counters.iter().copied().chain(own) {
            metric(name, "counter", help, &[(String::new(), value as f64)]);
        }
        let by_label = [
            (
                "roomcast_errors_total",
                "Error frames sent, by code",
                "code",
                &c.errors,
            ),
            (
                "roomcast_closes_total",
                "Closed connections, by close code",
                "code",
                &c.closes,
            ),
            (
                "roomcast_upgrades_refused_total",
                "WebSocket upgrades refused, by reason",
                "reason",
                &c.upgrades_refused,
            ),
        ];
        for (name, help, label, values) in by_label {
            let samples: Vec<(String, f64)> = values
                .iter()
                .map(|(k, v)| (format!("{{{label}=\"{k}\"}}"), *v as f64))
                .collect();
            metric(name, "counter", help, &samples);
        }
        let handle = self.recorder.handle();
        handle.run_upkeep();
        out.push_str(&handle.render());
        out
    }
}

/// A bounded label for a close code: peers choose theirs, and every distinct
/// label is a Prometheus series.
fn close_label(code: u16) -> &'static str {
    const KNOWN: [(u16, &str); 15] = [
        (1000, "1000"),
        (1001, "1001"),
        (1002, "1002"),
        (1003, "1003"),
        (1005, "1005"),
        (1006, "1006"),
        (1007, "1007"),
        (1008, "1008"),
        (1009, "1009"),
        (1010, "1010"),
        (1011, "1011"),
        (1012, "1012"),
        (4001, "4001"),
        (4008, "4008"),
        (4029, "4029"),
    ];
    KNOWN
        .iter()
        .find(|(known, _)| *known == code)
        .map(|(_, label)| *label)
        .unwrap_or("other")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_counters_gauges_and_histograms() {
        let stats = Stats::new();
        stats.received(100);
        stats.error_sent(ErrorCode::BadRequest);
        stats.connection_closed(4008);
        stats.connection_closed(4321);
        stats.record_fanout(Duration::from_micros(20));
        let text =
            stats.render_prometheus(&[("roomcast_connections", "Open connections", 3.0)], &[]);
        assert!(text.contains("roomcast_connections 3"), "{text}");
        assert!(text.contains("roomcast_messages_in_total 1"), "{text}");
        assert!(
            text.contains("roomcast_errors_total{code=\"bad_request\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("roomcast_closes_total{code=\"4008\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("roomcast_closes_total{code=\"other\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("roomcast_fanout_seconds_bucket{le=\"0.00005\"} 1"),
            "{text}"
        );
        assert!(text.contains("roomcast_message_bytes_count 1"), "{text}");
    }

    #[test]
    fn latency_window_reports_bucket_edges_and_empties_when_taken() {
        let window = LatencyWindow::new();
        for us in [150, 250, 250, 950, 120_000] {
            window.record(us);
        }
        let summary = window.take();
        assert_eq!(summary.count, 5);
        assert_eq!(summary.p50, 0.3);
        assert_eq!(summary.p90, 120.0);
        assert_eq!(summary.max, 120.0);
        assert_eq!(window.take(), LatencySummary::default());
    }

    #[test]
    fn latency_percentiles_never_exceed_the_maximum() {
        let window = LatencyWindow::new();
        window.record(42);
        let summary = window.take();
        assert_eq!(
            (summary.p50, summary.p99, summary.max),
            (0.042, 0.042, 0.042)
        );
    }
}
