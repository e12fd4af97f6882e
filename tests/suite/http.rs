//! The HTTP endpoints ops rely on: health, readiness, /stats and /metrics.

use serde_json::json;

use crate::support::{http_exchange, http_get, TestNode};

#[tokio::test]
async fn healthz_and_readyz_answer_200_on_a_running_node() {
    let node = TestNode::start(&[]).await;
    assert_eq!(
        http_get(node.addr, "/healthz").await,
        (200, "ok\n".to_string())
    );
    let (status, body) = http_get(node.addr, "/readyz").await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        json!({"ready": true, "draining": false, "broker": "up"})
    );
}

#[tokio::test]
async fn stats_count_connections_users_rooms_traffic_and_errors() {
    let node = TestNode::start(&["--node-id", "stats-node"]).await;
    let mut alice = node.connect("alice").await;
    let mut alice_too = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    alice.join("a").await;
    alice_too.join("b").await;
    bob.publish("a", json!("hello")).await;
    alice.expect("message").await;
    bob.send_text("garbage").await;
    bob.expect("error").await;

    let stats = node.stats().await;
    assert_eq!(stats["node"], "stats-node");
    assert_eq!(stats["connections"], 3);
    assert_eq!(stats["users"], 2);
    assert_eq!(stats["rooms"], 2);
    assert_eq!(stats["broker"]["kind"], "memory");
    assert_eq!(stats["broker"]["state"], "up");
    // The broadcast channel, two rooms and two users.
    assert_eq!(stats["broker"]["channels"], 5);
    assert_eq!(stats["messages_in"], 4);
    assert!(stats["bytes_in"].as_u64().unwrap() > 50);
    assert!(stats["messages_out"].as_u64().unwrap() >= 8, "{stats}");
    assert_eq!(stats["errors"]["bad_request"], 1);
    assert_eq!(stats["slow_consumer_closes"], 0);
    assert!(stats["uptime_seconds"].as_f64().unwrap() >= 0.0);
}

#[tokio::test]
async fn metrics_expose_prometheus_text_with_histograms() {
    let node = TestNode::start(&[]).await;
    let mut alice = node.connect("alice").await;
    alice.join("r").await;
    alice.publish("r", json!(1)).await;
    let (status, text) = http_get(node.addr, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "# TYPE roomcast_connections gauge",
        "roomcast_connections 1",
        "roomcast_rooms 1",
        "roomcast_broker_up 1",
        "roomcast_messages_in_total 2",
        "roomcast_errors_total{code=\"bad_request\"} 0",
        "roomcast_fanout_seconds_bucket",
        "roomcast_message_bytes_count 2",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[tokio::test]
async fn the_demo_the_dashboard_the_console_and_the_client_library_are_served_by_the_node() {
    let node = TestNode::start(&[]).await;
    for (path, needle) in [
        ("/", "/client.js"),
        ("/dashboard", "/stats?scope=cluster"),
        ("/console", "new WebSocket("),
        ("/client.js", "export class RoomcastClient"),
    ] {
        let (status, body) = http_get(node.addr, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(body.contains(needle), "{path} lacks {needle:?}");
        assert!(
            !body.contains("https://"),
            "{path} loads nothing from elsewhere"
        );
    }
    let (_, headers, _) = http_exchange(node.addr, "GET", "/client.js", &[], "").await;
    assert!(
        headers.contains("content-type: text/javascript"),
        "{headers}"
    );
}

#[tokio::test]
async fn cluster_stats_of_a_single_node_list_it_with_totals_and_a_latency_window() {
    let node = TestNode::start(&["--node-id", "solo"]).await;
    let mut alice = node.connect("alice").await;
    alice.join("r").await;
    alice.publish("r", json!("x")).await;
    let view = node
        .wait_for_cluster_stats(|view| view["nodes"][0]["latency_ms"]["count"].as_u64() >= Some(1))
        .await;
    assert_eq!(view["scope"], "cluster");
    assert_eq!(view["totals"]["nodes"], 1);
    assert_eq!(view["totals"]["connections"], 1);
    assert_eq!(view["nodes"][0]["node"], "solo");
    assert!(view["nodes"][0]["at_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let latency = &view["nodes"][0]["latency_ms"];
    assert!(latency["p99"].as_f64().unwrap() <= latency["max"].as_f64().unwrap());

    let (status, body) = http_get(node.addr, "/stats?scope=galaxy").await;
    assert_eq!(status, 400);
    assert!(body.contains("\"bad_request\""), "{body}");
}
