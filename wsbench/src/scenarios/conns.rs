//! `conns`: open N idle connections, hold them H seconds, count the ones the
//! server dropped; server RSS per connection.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::conn::{join, open_many, text_or_end};
use crate::report::{open_window, round3};
use crate::scenarios::{join_all, user_name, Stop};
use crate::{parse_secs, parse_shard, Ctx};

#[derive(Args)]
pub struct ConnsArgs {
    /// Connections to open (over all shards)
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub conns: usize,
    /// Seconds to hold them all open, idle
    #[arg(long, value_parser = parse_secs, default_value = "10")]
    pub hold: f64,
    /// Also join this room on every connection
    #[arg(long)]
    pub join: Option<String>,
    /// Distinct user names, shared round-robin; 0: one per connection
    #[arg(long, default_value_t = 0)]
    pub users: usize,
    /// Open only connections I, I+N, I+2N, ... of --conns (run N processes for more
    /// sockets than one process may hold). The RSS per connection reported then divides
    /// the node's growth, caused by every shard, by this shard's connections only
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
}

pub async fn run(ctx: &Ctx, a: ConnsArgs) -> Value {
    let (shard, shards) = a.shard.unwrap_or((0, 1));
    let indices: Vec<usize> = (shard..a.conns).step_by(shards).collect();
    ctx.check_fd_budget(indices.len());
    if let Some(room) = &a.join {
        if !crate::frame::valid_name(room, 128) {
            return json!({"scenario": "conns", "error": "invalid --join room name"});
        }
    }
    let users = if a.users == 0 { a.conns } else { a.users };
    let parse = ctx.parse();
    let before = open_window(&ctx.watched, None).await;

    // Connect.
    let connector = ctx.connector.clone();
    let room = a.join.clone();
    let (conns, phase) = open_many(
        indices.clone(),
        ctx.common.connect_concurrency,
        ctx.deadline,
        |i| {
            let connector = connector.clone();
            let room = room.clone();
            let user = user_name("idle", i, users);
            async move {
                let mut c = connector.connect(i, &user).await?;
                if let Some(room) = room {
                    join(&mut c.ws, &room, parse, connector.timeout).await?;
                }
                Ok((c.ws, c.elapsed, c.retries))
            }
        },
    )
    .await;
    let connect_cost = before
        .close(&ctx.watched, None, phase.ok, "connection")
        .await;
    let connected = phase.ok;

    // Hold: every connection is read (pings answered) by its own task.
    let stop = Stop::default();
    let holders: Vec<_> = conns
        .into_iter()
        .flatten()
        .map(|mut ws| {
            let mut stopped = stop.subscribe();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        biased;
                        _ = &mut stopped => return (None, Some(ws)),
                        m = ws.recv() => {
                            if let Err(reason) = text_or_end(m) {
                                return (Some(reason), None);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let hold = open_window(&ctx.watched, None).await;
    let hold_until = ctx.until(Duration::from_secs_f64(a.hold));
    tokio::time::sleep_until(hold_until).await;
    let hold_cost = hold
        .close(&ctx.watched, None, connected, "connection")
        .await;
    stop.stop();
    let ended = join_all(
        holders,
        Instant::now() + Duration::from_secs(10),
        &stop,
        Duration::from_secs(2),
    )
    .await;
    let mut dropped = 0u64;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut open_sockets = Vec::new();
    for e in ended {
        match e {
            Some((Some(reason), _)) => {
                dropped += 1;
                *reasons.entry(reason).or_default() += 1;
            }
            Some((None, Some(ws))) => open_sockets.push(ws),
            _ => {
                dropped += 1;
                *reasons.entry("unknown".into()).or_default() += 1;
            }
        }
    }

    // Memory per connection: RSS at the end of the hold over RSS before any
    // connection was opened.
    let mut memory = Vec::new();
    for (i, w) in ctx.watched.iter().enumerate() {
        let (Some(b), Some(h)) = (before.procs().procs[i], hold_cost_rss(&hold_cost.json, i))
        else {
            continue;
        };
        let per = if connected > 0 {
            (h as f64 - b.rss_bytes as f64) / connected as f64
        } else {
            0.0
        };
        memory.push(json!({
            "name": w.name,
            "rss_before_bytes": b.rss_bytes,
            "rss_held_bytes": h,
            "rss_per_conn_bytes": per.round(),
            "rss_per_conn_kib": round3(per / 1024.0),
            "max_open_files": w.max_open_files(),
        }));
    }
    let closed_at = Instant::now();
    drop(open_sockets);
    tokio::time::sleep_until(ctx.until(Duration::from_secs(3))).await;
    let after_close: Vec<Value> = ctx
        .watched
        .iter()
        .map(|w| {
            json!({"name": w.name, "rss_bytes": crate::procstat::sample(&w.pid).ok().map(|s| s.rss_bytes)})
        })
        .collect();

    json!({
        "scenario": "conns",
        "params": {
            "conns": a.conns,
            "this_shard": indices.len(),
            "shard": format!("{shard}/{shards}"),
            "hold_s": a.hold,
            "join": a.join,
            "users": users,
        },
        "connect": phase.to_json(),
        "connect_cost": connect_cost.json,
        "hold": {
            "held": connected,
            "dropped": dropped,
            "drop_reasons": reasons,
            "still_open": connected - dropped,
        },
        "hold_cost": hold_cost.json,
        "memory": memory,
        "after_close": {
            "seconds_after_close": round3(closed_at.elapsed().as_secs_f64()),
            "rss": after_close,
        },
    })
}

fn hold_cost_rss(cost: &Value, i: usize) -> Option<u64> {
    cost["procs"][i]["rss_after_bytes"].as_u64()
}
