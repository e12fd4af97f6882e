//! `resume`: a reconnect storm. N clients join a room and get M messages;
//! all N drop at once; K more messages are published while they are away;
//! all N reconnect at once and resume with `since` = their last id while L
//! more are published live. Every client must end with all M+K+L messages,
//! each once and in order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;

use crate::conn::{open_many, text_or_end, Connector, Ws};
use crate::frame::{self, now_us, Frame, MsgId, ParseMode};
use crate::hist::{Batch, Hist, SharedHist};
use crate::peer::{Peer, PeerResult, PubPlan};
use crate::report::{open_window, round3};
use crate::scenarios::fanout::connect_members;
use crate::scenarios::{join_all, room_name, user_name, Stop};
use crate::seq::{Delivery, SeqTracker};
use crate::{parse_secs, Ctx};

#[derive(Args)]
pub struct ResumeArgs {
    /// Clients in the room
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Messages published before the drop
    #[arg(long, default_value_t = 100)]
    pub before: u64,
    /// Messages published while every client is away
    #[arg(long, default_value_t = 100)]
    pub during: u64,
    /// Messages published live while the clients resume
    #[arg(long, default_value_t = 100)]
    pub live: u64,
    /// Publishing rate, messages per second
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Seconds the clients stay away (at least until the `during` messages are acked)
    #[arg(long, value_parser = parse_secs, default_value = "1")]
    pub down: f64,
    /// Reconnections in flight at once in the storm; 0: all at once
    #[arg(long, default_value_t = 0)]
    pub storm_concurrency: usize,
    /// Seconds allowed for the storm and the last deliveries
    #[arg(long, value_parser = parse_secs, default_value = "60")]
    pub drain: f64,
    /// Room name [default: resume-<unix ms>]
    #[arg(long)]
    pub room: Option<String>,
    /// Distinct user names, shared round-robin (1 avoids presence events to every member)
    #[arg(long, default_value_t = 1)]
    pub users: usize,
}

/// One client between its lives.
struct Client {
    tracker: SeqTracker,
    last_id: Option<MsgId>,
    ended: Option<String>,
}

/// Reads until the client has `target` different messages.
async fn read_until(
    ws: &mut Ws,
    c: &mut Client,
    target: u64,
    parse: ParseMode,
    stopped: &mut oneshot::Receiver<()>,
    batch: &mut Batch,
) {
    while c.tracker.distinct < target {
        tokio::select! {
            biased;
            _ = &mut *stopped => return,
            m = ws.recv() => {
                let frame = match text_or_end(m) {
                    Ok(text) => frame::parse(parse, text),
                    Err(reason) => {
                        c.ended = Some(reason);
                        return;
                    }
                };
                if let Frame::Message { id, data: Some(p) } = frame {
                    if let Some((_, seq, sent_us)) = p.message() {
                        c.tracker.record(seq);
                        batch.record((now_us() - sent_us).max(0) as u64);
                        if id.is_some() {
                            c.last_id = id;
                        }
                    }
                }
            }
        }
    }
}

struct Resumed {
    client: Client,
    connect_us: Option<u64>,
    resume_us: Option<u64>,
    recovered: Option<bool>,
    replayed: u64,
    /// Messages that came before `joined` (the replay as seen).
    replay_frames: u64,
    error: Option<String>,
    ws: Option<Ws>,
}

#[allow(clippy::too_many_arguments)]
async fn resume_one(
    connector: Arc<Connector>,
    index: usize,
    user: String,
    room: Arc<str>,
    mut client: Client,
    target: u64,
    permits: Option<Arc<Semaphore>>,
    mut stopped: oneshot::Receiver<()>,
    live: Arc<SharedHist>,
) -> Resumed {
    let parse = connector.parse;
    let _permit = match &permits {
        Some(p) => p.clone().acquire_owned().await.ok(),
        None => None,
    };
    let start = Instant::now();
    let mut out = Resumed {
        client: Client {
            tracker: SeqTracker::default(),
            last_id: None,
            ended: None,
        },
        connect_us: None,
        resume_us: None,
        recovered: None,
        replayed: 0,
        replay_frames: 0,
        error: None,
        ws: None,
    };
    let mut ws = match connector.connect(index, &user).await {
        Ok(c) => {
            out.connect_us = Some(c.elapsed.as_micros() as u64);
            c.ws
        }
        Err(e) => {
            out.error = Some(e.kind());
            out.client = client;
            return out;
        }
    };
    if let Err(e) = ws
        .send_text(&frame::join_frame(&room, client.last_id, 2))
        .await
    {
        out.error = Some(e.kind());
        out.client = client;
        return out;
    }
    let mut batch = Batch::new(live);
    let mut joined = false;
    while !(joined && client.tracker.distinct >= target) {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            m = ws.recv() => {
                let frame = match text_or_end(m) {
                    Ok(text) => frame::parse(parse, text),
                    Err(reason) => {
                        client.ended = Some(reason);
                        break;
                    }
                };
                match frame {
                    Frame::Message { id, data: Some(p) } => {
                        if let Some((_, seq, sent_us)) = p.message() {
                            client.tracker.record(seq);
                            if joined {
                                batch.record((now_us() - sent_us).max(0) as u64);
                            } else {
                                out.replay_frames += 1;
                            }
                            if id.is_some() {
                                client.last_id = id;
                            }
                        }
                    }
                    Frame::Joined { recovered, replayed } => {
                        joined = true;
                        out.resume_us = Some(start.elapsed().as_micros() as u64);
                        out.recovered = Some(recovered);
                        out.replayed = replayed;
                    }
                    Frame::Error { code, .. } => {
                        out.error = Some(format!("error:{code}"));
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
    out.client = client;
    if out.client.ended.is_none() {
        out.ws = Some(ws);
    }
    out
}

/// Publishes `count` messages numbered from `first_seq`, waits for the acks,
/// gives the connection back.
async fn publish(
    ws: Ws,
    room: &Arc<str>,
    first_seq: u64,
    count: u64,
    rate: f64,
    deadline: Instant,
    parse: ParseMode,
) -> PeerResult {
    let stop = Stop::default();
    let task = tokio::spawn(
        Peer {
            ws,
            room: room.clone(),
            publish: Some(PubPlan {
                id: 0,
                first_seq,
                count,
                start: Instant::now(),
                interval: Duration::from_secs_f64(1.0 / rate),
                pad: "".into(),
                end_marker: false,
            }),
            receive: None,
            stop: stop.subscribe(),
            latency: Arc::new(SharedHist::default()),
            parse,
        }
        .run(),
    );
    join_all(vec![task], deadline, &stop, Duration::from_secs(2))
        .await
        .pop()
        .flatten()
        .unwrap_or_default()
}

fn pub_json(r: &PeerResult) -> Value {
    json!({"sent": r.sent, "acked": r.acked, "failed": r.failed, "errors": r.pub_errors, "ended": r.ended})
}

pub async fn run(ctx: &Ctx, a: ResumeArgs) -> Value {
    let room = match room_name(&a.room, "resume") {
        Ok(r) => r,
        Err(e) => return json!({"scenario": "resume", "error": e}),
    };
    if a.before == 0 || a.rate <= 0.0 {
        return json!({"scenario": "resume", "error": "--before must be at least 1 (clients resume from their last id), --rate positive"});
    }
    ctx.check_fd_budget(a.clients + 1);
    let parse = ctx.parse();
    let users = a.users.max(1);
    let (conns, first_connect) = connect_members(
        ctx,
        (0..a.clients).collect(),
        |_| room.clone(),
        |i| user_name("res", i, users),
    )
    .await;
    let connector = ctx.connector.clone();
    let publisher_index = a.clients;
    let (mut publisher, _) = open_many(vec![publisher_index], 1, ctx.deadline, |i| {
        let connector = connector.clone();
        async move {
            let c = connector.connect(i, "resume-pub").await?;
            Ok((c.ws, c.elapsed, c.retries))
        }
    })
    .await;
    let Some(pub_ws) = publisher.pop().flatten() else {
        return json!({"scenario": "resume", "error": "the publisher could not connect", "connect": first_connect.to_json()});
    };
    let room: Arc<str> = room.into();

    // Phase 1: M messages to everybody.
    let before_lat = Arc::new(SharedHist::default());
    let stop = Stop::default();
    let readers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let mut stopped = stop.subscribe();
            let hist = before_lat.clone();
            let target = a.before;
            tokio::spawn(async move {
                let mut c = Client {
                    tracker: SeqTracker::default(),
                    last_id: None,
                    ended: None,
                };
                let Some(mut ws) = ws else {
                    c.ended = Some("not connected".into());
                    return (i, c, None);
                };
                let mut batch = Batch::new(hist);
                read_until(&mut ws, &mut c, target, parse, &mut stopped, &mut batch).await;
                (i, c, Some(ws))
            })
        })
        .collect();
    let phase1_deadline = ctx.until(Duration::from_secs_f64(a.before as f64 / a.rate + 30.0));
    let mut p1 = publish(pub_ws, &room, 0, a.before, a.rate, phase1_deadline, parse).await;
    let phase1 = join_all(readers, phase1_deadline, &stop, Duration::from_secs(2)).await;
    let mut clients: Vec<Option<Client>> = (0..a.clients).map(|_| None).collect();
    let mut sockets = Vec::with_capacity(a.clients);
    let mut not_ready = 0u64;
    for (i, c, ws) in phase1.into_iter().flatten() {
        if ws.is_none() || c.tracker.distinct < a.before {
            not_ready += 1;
        }
        sockets.extend(ws);
        clients[i] = Some(c);
    }

    // Phase 2: every client drops at once; K messages while they are away.
    let dropped_at = Instant::now();
    drop(sockets);
    let drop_ms = dropped_at.elapsed().as_secs_f64() * 1000.0;
    let Some(pub_ws) = p1.ws.take() else {
        return json!({"scenario": "resume", "error": "the publisher's connection ended", "publish_before": pub_json(&p1)});
    };
    let mut p2 = publish(
        pub_ws,
        &room,
        a.before,
        a.during,
        a.rate,
        ctx.until(Duration::from_secs(60)),
        parse,
    )
    .await;
    tokio::time::sleep_until((dropped_at + Duration::from_secs_f64(a.down)).min(ctx.deadline))
        .await;
    let Some(pub_ws) = p2.ws.take() else {
        return json!({"scenario": "resume", "error": "the publisher's connection ended", "publish_during": pub_json(&p2)});
    };

    // Phase 3: the storm, with L live messages published meanwhile.
    let target = a.before + a.during + a.live;
    let live_lat = Arc::new(SharedHist::default());
    let storm_stop = Stop::default();
    let permits = (a.storm_concurrency > 0).then(|| Arc::new(Semaphore::new(a.storm_concurrency)));
    let window = open_window(&ctx.watched, ctx.redis()).await;
    let storm_start = Instant::now();
    let mut tasks = Vec::with_capacity(a.clients);
    for (i, c) in clients.into_iter().enumerate() {
        let Some(c) = c else { continue };
        tasks.push(tokio::spawn(resume_one(
            ctx.connector.clone(),
            i,
            user_name("res", i, users),
            room.clone(),
            c,
            target,
            permits.clone(),
            storm_stop.subscribe(),
            live_lat.clone(),
        )));
    }
    let spawn_ms = storm_start.elapsed().as_secs_f64() * 1000.0;
    let p3 = publish(
        pub_ws,
        &room,
        a.before + a.during,
        a.live,
        a.rate,
        ctx.until(Duration::from_secs_f64(a.drain)),
        parse,
    )
    .await;
    let results = join_all(
        tasks,
        ctx.until(Duration::from_secs_f64(a.drain)),
        &storm_stop,
        Duration::from_secs(2),
    )
    .await;
    let storm_secs = storm_start.elapsed().as_secs_f64();
    let resumed_count = results
        .iter()
        .flatten()
        .filter(|r| r.resume_us.is_some())
        .count() as u64;
    let cost = window
        .close(&ctx.watched, ctx.redis(), resumed_count, "resume")
        .await;

    let sent = p1.sent + p2.sent + p3.sent;
    let failed = p1.failed + p2.failed + p3.failed;
    let mut delivery = Delivery::default();
    let mut connect = Hist::default();
    let mut resume = Hist::default();
    let mut recovered_true = 0u64;
    let mut recovered_false = 0u64;
    let mut replayed = Hist::default();
    let mut replay_frames = 0u64;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut ended: BTreeMap<String, u64> = BTreeMap::new();
    let mut exact = 0u64;
    for r in results.iter().flatten() {
        let before = delivery.exact_streams;
        delivery.add(&r.client.tracker, sent, failed);
        exact += delivery.exact_streams - before;
        if let Some(us) = r.connect_us {
            connect.record(us);
        }
        if let Some(us) = r.resume_us {
            resume.record(us);
        }
        match r.recovered {
            Some(true) => recovered_true += 1,
            Some(false) => recovered_false += 1,
            None => {}
        }
        if r.recovered.is_some() {
            replayed.record(r.replayed.max(1));
        }
        replay_frames += r.replay_frames;
        if let Some(e) = &r.error {
            *errors.entry(e.clone()).or_default() += 1;
        }
        if let Some(e) = &r.client.ended {
            *ended.entry(e.clone()).or_default() += 1;
        }
    }
    let stream_reads: u64 = cost
        .redis_calls
        .as_ref()
        .map(|c| {
            c.iter()
                .filter(|(k, _)| ["xrange", "xrevrange", "xread"].contains(&k.as_str()))
                .map(|(_, v)| v)
                .sum()
        })
        .unwrap_or(0);
    let replayed_s = replayed.summary();
    drop(results);

    json!({
        "scenario": "resume",
        "params": {
            "clients": a.clients,
            "before": a.before,
            "during": a.during,
            "live": a.live,
            "rate": a.rate,
            "down_s": a.down,
            "storm_concurrency": a.storm_concurrency,
            "room": &*room,
            "users": users,
            "nodes": ctx.common.urls.len(),
        },
        "connect": first_connect.to_json(),
        "before_drop": {
            "publish": pub_json(&p1),
            "clients_not_ready": not_ready,
            "latency_ms": before_lat.snapshot().summary().to_json_ms(),
            "drop_ms": round3(drop_ms),
        },
        "during_drop": {"publish": pub_json(&p2)},
        "storm": {
            "clients": a.clients,
            "resumed": resumed_count,
            "all_resumed": resumed_count == a.clients as u64,
            "recovered_true": recovered_true,
            "recovered_false": recovered_false,
            "replayed_per_client": {"min": replayed_s.min, "p50": replayed_s.p50, "max": replayed_s.max},
            "replayed_messages_seen": replay_frames,
            "failures": errors,
            "ended": ended,
            "spawn_ms": round3(spawn_ms),
            "seconds": round3(storm_secs),
            "connect_ms": connect.summary().to_json_ms(),
            "resume_ms": resume.summary().to_json_ms(),
            "publish_live": pub_json(&p3),
            "live_latency_ms": live_lat.snapshot().summary().to_json_ms(),
        },
        "delivery": delivery.to_json(),
        "exact_clients": exact,
        "redis_stream_reads": if ctx.redis().is_some() { json!(stream_reads) } else { Value::Null },
        "cost": cost.json,
    })
}
