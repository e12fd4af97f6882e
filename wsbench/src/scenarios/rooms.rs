//! `rooms`: a busy chat. Clients are spread over many rooms (client i in
//! room i mod R); every client publishes at its own rate and receives every
//! message of its room, its own included.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::hist::SharedHist;
use crate::peer::{Peer, PeerResult, PubPlan, RecvPlan};
use crate::report::{open_window, round3};
use crate::scenarios::fanout::{connect_members, publish_summary, receiver_summary};
use crate::scenarios::{join_all, room_name, user_name, Stop};
use crate::{parse_secs, Ctx};

#[derive(Args)]
pub struct RoomsArgs {
    /// Clients, each publishing and receiving
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Rooms; client i is in room i mod ROOMS
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Messages per second per client
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Seconds of publishing
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    pub duration: f64,
    /// Seconds clients may take to get the last messages after publishing ends
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    pub drain: f64,
    /// Prefix of the room names [default: rooms-<unix ms>]
    #[arg(long)]
    pub room_prefix: Option<String>,
    /// Bytes of padding added to each payload
    #[arg(long, default_value_t = 0)]
    pub size: usize,
    /// Distinct user names, shared round-robin; 0: one per client
    #[arg(long, default_value_t = 0)]
    pub users: usize,
}

pub async fn run(ctx: &Ctx, a: RoomsArgs) -> Value {
    let prefix = match room_name(&a.room_prefix, "rooms") {
        Ok(r) => r,
        Err(e) => return json!({"scenario": "rooms", "error": e}),
    };
    if a.rooms == 0 || a.clients < a.rooms || a.rate <= 0.0 {
        return json!({"scenario": "rooms", "error": "need --rooms >= 1, --clients >= --rooms, --rate > 0"});
    }
    ctx.check_fd_budget(a.clients);
    let rooms = a.rooms;
    let room_of = |i: usize| format!("{prefix}-{}", i % rooms);
    let members = |r: usize| a.clients / rooms + usize::from(r < a.clients % rooms);
    let users = if a.users == 0 { a.clients } else { a.users };

    let (conns, connect) = connect_members(ctx, (0..a.clients).collect(), room_of, |i| {
        user_name("chat", i, users)
    })
    .await;

    let count = (a.rate * a.duration).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / a.rate);
    let latency = Arc::new(SharedHist::default());
    let pad: Arc<str> = "x".repeat(a.size).into();
    let stop = Stop::default();
    let window = open_window(&ctx.watched, ctx.redis()).await;
    let start = Instant::now() + Duration::from_millis(100);
    let mut slots = Vec::new();
    let mut tasks = Vec::new();
    for (i, ws) in conns.into_iter().enumerate() {
        let Some(ws) = ws else { continue };
        slots.push(i);
        tasks.push(tokio::spawn(
            Peer {
                ws,
                room: room_of(i).into(),
                publish: Some(PubPlan {
                    id: (i / rooms) as u64,
                    first_seq: 0,
                    count,
                    start: start + interval.mul_f64(i as f64 / a.clients as f64),
                    interval,
                    pad: pad.clone(),
                    end_marker: true,
                }),
                receive: Some(RecvPlan {
                    publishers: members(i % rooms),
                    until_end_markers: true,
                }),
                stop: stop.subscribe(),
                latency: latency.clone(),
                parse: ctx.parse(),
            }
            .run(),
        ));
    }
    let done_by =
        ctx.until(Duration::from_secs_f64(a.duration + 0.1 + a.drain) + Duration::from_secs(10));
    let results = join_all(tasks, done_by, &stop, Duration::from_secs(2)).await;
    let published_secs = start.elapsed().as_secs_f64().min(a.duration + 0.1);
    let mut by_client: Vec<Option<PeerResult>> = (0..a.clients).map(|_| None).collect();
    for (i, r) in slots.into_iter().zip(results) {
        by_client[i] = r;
    }
    let expected = |client: usize| {
        by_client[client]
            .as_ref()
            .map_or((0, 0), |r| (r.sent, r.failed))
    };
    let (delivery, received, receivers) = receiver_summary(&by_client, |s, p| {
        let publisher = p * rooms + s % rooms;
        if publisher < a.clients {
            expected(publisher)
        } else {
            (0, 0)
        }
    });
    let cost = window
        .close(&ctx.watched, ctx.redis(), received, "delivery")
        .await;
    let lat = latency.snapshot().summary();

    json!({
        "scenario": "rooms",
        "params": {
            "clients": a.clients,
            "rooms": rooms,
            "rate_per_client": a.rate,
            "offered_per_s": a.rate * a.clients as f64,
            "duration_s": a.duration,
            "payload_pad": a.size,
            "users": users,
            "nodes": ctx.common.urls.len(),
        },
        "connect": connect.to_json(),
        "publish": publish_summary(&by_client, a.rate * a.clients as f64, published_secs),
        "delivery": delivery.to_json(),
        "receivers": receivers,
        "latency_ms": lat.to_json_ms(),
        "deliveries_per_s": round3(received as f64 / cost.seconds.max(0.001)),
        "cost": cost.json,
    })
}
