//! `fanout`: N subscribers of one room (spread over the nodes), P publishers
//! at R messages per second in total for T seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::conn::{join, open_many, ConnectPhase, Ws};
use crate::hist::SharedHist;
use crate::peer::{Peer, PeerResult, PubPlan, RecvPlan};
use crate::report::{open_window, round3};
use crate::scenarios::{join_all, room_name, user_name, Stop};
use crate::seq::Delivery;
use crate::{parse_secs, Ctx};

#[derive(Args)]
pub struct FanoutArgs {
    /// Subscribers of the room
    #[arg(long, default_value_t = 1000)]
    pub subs: usize,
    /// Publishers (not members of the room)
    #[arg(long, default_value_t = 1)]
    pub pubs: usize,
    /// Messages per second, all publishers together
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of publishing
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    pub duration: f64,
    /// Seconds subscribers may take to get the last messages after publishing ends
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    pub drain: f64,
    /// Room name [default: fanout-<unix ms>]
    #[arg(long)]
    pub room: Option<String>,
    /// Bytes of padding added to each payload (the base payload is ~30 bytes)
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Distinct subscriber user names, shared round-robin (1 avoids a presence
    /// event per subscriber to every subscriber)
    #[arg(long, default_value_t = 1)]
    pub users: usize,
}

/// Connections `indices`, each joined to its room.
pub async fn connect_members(
    ctx: &Ctx,
    indices: Vec<usize>,
    room: impl Fn(usize) -> String,
    user: impl Fn(usize) -> String,
) -> (Vec<Option<Ws>>, ConnectPhase) {
    let connector = ctx.connector.clone();
    let parse = ctx.parse();
    open_many(indices, ctx.common.connect_concurrency, ctx.deadline, |i| {
        let connector = connector.clone();
        let room = room(i);
        let user = user(i);
        async move {
            let mut c = connector.connect(i, &user).await?;
            join(&mut c.ws, &room, parse, connector.timeout).await?;
            Ok((c.ws, c.elapsed, c.retries))
        }
    })
    .await
}

/// Publishing totals over publisher results.
pub fn publish_summary(results: &[Option<PeerResult>], rate: f64, seconds: f64) -> Value {
    let mut sent = 0;
    let mut acked = 0;
    let mut failed = 0;
    let mut end_markers = 0;
    let mut max_lag = 0;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut ended: BTreeMap<String, u64> = BTreeMap::new();
    for r in results.iter().flatten() {
        sent += r.sent;
        acked += r.acked;
        failed += r.failed;
        end_markers += u64::from(r.end_marker_acked);
        max_lag = max_lag.max(r.max_lag_us);
        for (k, v) in &r.pub_errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        if let Some(e) = &r.ended {
            *ended.entry(e.clone()).or_default() += 1;
        }
    }
    json!({
        "sent": sent,
        "acked": acked,
        "failed": failed,
        "errors": errors,
        "end_markers_acked": end_markers,
        "offered_per_s": rate,
        "sent_per_s": if seconds > 0.0 { (sent as f64 / seconds).round() } else { 0.0 },
        "max_send_lag_ms": max_lag as f64 / 1000.0,
        "connections_ended": ended,
    })
}

/// Delivery counts and early endings of receivers; `expected_of(receiver,
/// publisher)` is what that publisher sent and how much of it was refused.
pub fn receiver_summary(
    receivers: &[Option<PeerResult>],
    expected_of: impl Fn(usize, usize) -> (u64, u64),
) -> (Delivery, u64, Value) {
    let mut d = Delivery::default();
    let mut received = 0;
    let mut ended: BTreeMap<String, u64> = BTreeMap::new();
    let mut missing = 0u64;
    for (s, r) in receivers.iter().enumerate() {
        let Some(r) = r else {
            missing += 1;
            continue;
        };
        received += r.received;
        for (p, t) in r.trackers.iter().enumerate() {
            let (sent, failed) = expected_of(s, p);
            d.add(t, sent, failed);
        }
        if let Some(e) = &r.ended {
            *ended.entry(e.clone()).or_default() += 1;
        }
    }
    (
        d,
        received,
        json!({"ended_early": ended, "tasks_lost": missing}),
    )
}

pub async fn run(ctx: &Ctx, a: FanoutArgs) -> Value {
    let room = match room_name(&a.room, "fanout") {
        Ok(r) => r,
        Err(e) => return json!({"scenario": "fanout", "error": e}),
    };
    if a.pubs == 0 || a.rate <= 0.0 {
        return json!({"scenario": "fanout", "error": "--pubs and --rate must be positive"});
    }
    ctx.check_fd_budget(a.subs + a.pubs);
    let users = a.users.max(1);
    let (subs, sub_phase) = connect_members(
        ctx,
        (0..a.subs).collect(),
        |_| room.clone(),
        |i| user_name("sub", i, users),
    )
    .await;
    let connector = ctx.connector.clone();
    let (pubs, pub_phase) = open_many(
        (a.subs..a.subs + a.pubs).collect(),
        ctx.common.connect_concurrency,
        ctx.deadline,
        |i| {
            let connector = connector.clone();
            let user = format!("pub-{}", i - a.subs);
            async move {
                let c = connector.connect(i, &user).await?;
                Ok((c.ws, c.elapsed, c.retries))
            }
        },
    )
    .await;

    let per_pub_rate = a.rate / a.pubs as f64;
    let count = (per_pub_rate * a.duration).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / per_pub_rate);
    let latency = Arc::new(SharedHist::default());
    let pad: Arc<str> = "x".repeat(a.size).into();
    let room: Arc<str> = room.into();
    let sub_stop = Stop::default();
    let pub_stop = Stop::default();

    let window = open_window(&ctx.watched, ctx.redis()).await;
    let start = Instant::now() + Duration::from_millis(100);
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .flatten()
        .map(|ws| {
            tokio::spawn(
                Peer {
                    ws,
                    room: room.clone(),
                    publish: None,
                    receive: Some(RecvPlan {
                        publishers: a.pubs,
                        until_end_markers: true,
                    }),
                    stop: sub_stop.subscribe(),
                    latency: latency.clone(),
                    parse: ctx.parse(),
                }
                .run(),
            )
        })
        .collect();
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .filter_map(|(p, ws)| ws.map(|ws| (p, ws)))
        .map(|(p, ws)| {
            tokio::spawn(
                Peer {
                    ws,
                    room: room.clone(),
                    publish: Some(PubPlan {
                        id: p as u64,
                        first_seq: 0,
                        count,
                        start: start + interval.mul_f64(p as f64 / a.pubs as f64),
                        interval,
                        pad: pad.clone(),
                        end_marker: true,
                    }),
                    receive: None,
                    stop: pub_stop.subscribe(),
                    latency: latency.clone(),
                    parse: ctx.parse(),
                }
                .run(),
            )
        })
        .collect();
    let pub_deadline =
        ctx.until(Duration::from_secs_f64(a.duration + 0.1) + Duration::from_secs(30));
    let pub_results = join_all(pub_tasks, pub_deadline, &pub_stop, Duration::from_secs(2)).await;
    let published_secs = start
        .elapsed()
        .as_secs_f64()
        .min(a.duration.max(0.001) + 0.1);
    let sub_results = join_all(
        sub_tasks,
        ctx.until(Duration::from_secs_f64(a.drain)),
        &sub_stop,
        Duration::from_secs(2),
    )
    .await;
    let expected: Vec<(u64, u64)> = pub_results
        .iter()
        .map(|r| r.as_ref().map_or((0, 0), |r| (r.sent, r.failed)))
        .collect();
    let (delivery, received, receivers) = receiver_summary(&sub_results, |_, p| {
        expected.get(p).copied().unwrap_or((0, 0))
    });
    let cost = window
        .close(&ctx.watched, ctx.redis(), received, "delivery")
        .await;
    let lat = latency.snapshot().summary();
    let mut connect = sub_phase;
    connect.merge(&pub_phase);

    json!({
        "scenario": "fanout",
        "params": {
            "subs": a.subs,
            "pubs": a.pubs,
            "rate": a.rate,
            "duration_s": a.duration,
            "payload_pad": a.size,
            "room": &*room,
            "users": users,
            "nodes": ctx.common.urls.len(),
        },
        "connect": connect.to_json(),
        "publish": publish_summary(&pub_results, a.rate, published_secs),
        "delivery": delivery.to_json(),
        "receivers": receivers,
        "latency_ms": lat.to_json_ms(),
        "deliveries_per_s": round3(received as f64 / cost.seconds.max(0.001)),
        "cost": cost.json,
    })
}
