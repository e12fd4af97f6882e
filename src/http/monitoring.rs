//! What monitoring reads: `/stats` (this node, or with `?scope=cluster` every
//! node that shares its snapshot through the broker) and `/metrics`
//! (Prometheus text).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::refuse;
use crate::broker::{BrokerState, BrokerStats};
use crate::node::NodeState;
use crate::protocol::now_ms;
use crate::stats::{Counters, LatencySummary};

/// One node's figures, as `/stats` shows them and as the node shares them.
#[derive(Serialize)]
pub struct NodeStats {
    node: String,
    /// When the snapshot was taken: rates are differences between two.
    at_ms: u64,
    uptime_seconds: f64,
    ready: bool,
    draining: bool,
    connections: usize,
    users: usize,
    rooms: usize,
    broker: BrokerStats,
    #[serde(flatten)]
    counters: Counters,
    /// Publish-to-deliver latency over the last closed window (about 1 s).
    latency_ms: LatencySummary,
}

pub fn snapshot(node: &NodeState) -> NodeStats {
    let counts = node.hub.counts();
    NodeStats {
        node: node.node_id.to_string(),
        at_ms: now_ms(),
        uptime_seconds: node.stats.uptime().as_secs_f64(),
        ready: node.is_ready(),
        draining: node.is_draining(),
        connections: counts.connections,
        users: counts.users,
        rooms: counts.rooms,
        broker: node.broker.stats(),
        counters: node.stats.snapshot_counters(),
        latency_ms: node.stats.last_latency(),
    }
}

/// Figures summed over the nodes in the cluster view.
const TOTALLED: [&str; 6] = [
    "connections",
    "users",
    "rooms",
    "messages_in",
    "messages_out",
    "slow_consumer_closes",
];

pub async fn stats(
    State(node): State<Arc<NodeState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    match query.get("scope").map(String::as_str) {
        None | Some("node") => Json(snapshot(&node)).into_response(),
        Some("cluster") => cluster_stats(&node).await,
        Some(other) => refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("scope is \"node\" or \"cluster\", not {other:?}"),
        ),
    }
}

async fn cluster_stats(node: &NodeState) -> Response {
    let shared = match node.broker.node_stats().await {
        Ok(shared) => shared,
        Err(err) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("the cluster view needs the broker: {err}"),
            )
        }
    };
    // This node's own figures are always fresh, not up to a second old.
    let own = serde_json::to_value(snapshot(node)).unwrap_or(Value::Null);
    let mut nodes: Vec<Value> = shared
        .into_iter()
        .filter(|(id, _)| **id != *node.node_id)
        .filter_map(|(id, text)| match serde_json::from_str::<Value>(&text) {
            Ok(value) if value.is_object() => Some(value),
            _ => {
                tracing::warn!(node = %id, "ignoring a malformed shared stats snapshot");
                None
            }
        })
        .chain(std::iter::once(own))
        .collect();
    nodes.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    Json(cluster_view(nodes, now_ms())).into_response()
}

fn cluster_view(nodes: Vec<Value>, at_ms: u64) -> Value {
    let mut totals = Map::new();
    totals.insert("nodes".into(), nodes.len().into());
    for field in TOTALLED {
        let sum: u64 = nodes.iter().filter_map(|n| n[field].as_u64()).sum();
        totals.insert(field.into(), sum.into());
    }
    json!({ "scope": "cluster", "at_ms": at_ms, "nodes": nodes, "totals": totals })
}

pub async fn metrics(State(node): State<Arc<NodeState>>) -> Response {
    let counts = node.hub.counts();
    let broker = node.broker.stats();
    let up = |ok: bool| if ok { 1.0 } else { 0.0 };
    let text = node.stats.render_prometheus(&[
        (
            "roomcast_connections",
            "Open WebSocket connections",
            counts.connections as f64,
        ),
        (
            "roomcast_users",
            "Distinct users connected",
            counts.users as f64,
        ),
        (
            "roomcast_rooms",
            "Rooms with at least one local member",
            counts.rooms as f64,
        ),
        (
            "roomcast_ready",
            "1 when the node accepts traffic",
            up(node.is_ready()),
        ),
        (
            "roomcast_draining",
            "1 while the node drains",
            up(node.is_draining()),
        ),
        (
            "roomcast_broker_up",
            "1 when the broker is reachable",
            up(broker.state == BrokerState::Up),
        ),
        (
            "roomcast_broker_channels",
            "Broker channels this node is subscribed to",
            broker.channels as f64,
        ),
        (
            "roomcast_broker_subscriber_connections",
            "Connections the node subscribes on (one per Redis server or Cluster shard it needs)",
            broker.subscriber_connections as f64,
        ),
    ], &[
        (
            "roomcast_broker_reconnects_total",
            "Times the broker subscriptions were restored after a subscriber connection failed",
            broker.reconnects,
        ),
        (
            "roomcast_broker_channels_moved_total",
            "Channels subscribed again elsewhere because a Redis Cluster node stopped serving them",
            broker.channels_moved,
        ),
        (
            "roomcast_broker_gap_messages_recovered_total",
            "Messages delivered from history after a broker reconnect",
            broker.gap_messages_recovered,
        ),
        (
            "roomcast_broker_stream_reads_total",
            "History reads that went to the shared store",
            broker.stream_reads,
        ),
    ]);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_view_totals_every_node() {
        let nodes = vec![
            json!({"node": "a", "connections": 3, "users": 2, "rooms": 1, "messages_in": 10, "messages_out": 30, "slow_consumer_closes": 1}),
            json!({"node": "b", "connections": 4, "users": 4, "rooms": 2, "messages_in": 5, "messages_out": 50, "slow_consumer_closes": 0}),
        ];
        let view = cluster_view(nodes, 7);
        assert_eq!(view["scope"], "cluster");
        assert_eq!(view["at_ms"], 7);
        assert_eq!(
            view["totals"],
            json!({"nodes": 2, "connections": 7, "users": 6, "rooms": 3, "messages_in": 15, "messages_out": 80, "slow_consumer_closes": 1})
        );
        assert_eq!(view["nodes"][1]["node"], "b");
    }
}
