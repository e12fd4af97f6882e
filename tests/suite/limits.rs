//! Bad input and misbehaving clients get a clear answer, and nobody else is
//! harmed: malformed frames, oversize frames, floods, slow readers, silent
//! peers, too many rooms.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::support::{Ending, RawSocket, TestNode};

#[tokio::test]
async fn malformed_and_unknown_frames_get_bad_request_and_the_connection_stays_usable() {
    let node = TestNode::start(&[]).await;
    let mut client = node.connect("alice").await;

    client.send_text("this is not json").await;
    let error = client.expect("error").await;
    assert_eq!(error["code"], "bad_request");
    assert!(error.get("ref").is_none());

    client.send(json!({"type":"teleport","ref":1})).await;
    let error = client.expect("error").await;
    assert_eq!(error["code"], "bad_request");
    assert_eq!(error["ref"], 1);
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("unknown type \"teleport\""));

    client
        .send(json!({"type":"publish","data":1,"ref":2}))
        .await;
    let error = client.expect("error").await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_i64()),
        (Some("bad_request"), Some(2))
    );
    assert!(error["message"].as_str().unwrap().contains("\"room\""));

    client
        .send(json!({"type":"join","room":"no spaces allowed","ref":3}))
        .await;
    assert_eq!(client.expect("error").await["code"], "bad_request");

    client.send(json!({"ref":4})).await;
    assert_eq!(client.expect("error").await["code"], "bad_request");

    client.send(json!({"type":"ping","ref":5})).await;
    assert_eq!(client.expect("pong").await["ref"], 5);
    assert_eq!(client.join("still-works").await["room"], "still-works");
}

#[tokio::test]
async fn binary_frames_get_a_clear_error_not_a_crash() {
    use futures::SinkExt;
    let node = TestNode::start(&[]).await;
    let mut client = node.connect("alice").await;
    client
        .ws
        .send(tokio_tungstenite::tungstenite::Message::binary(vec![
            1u8, 2, 3,
        ]))
        .await
        .unwrap();
    let error = client.expect("error").await;
    assert_eq!(error["code"], "bad_request");
    assert!(error["message"].as_str().unwrap().contains("binary"));
    client.send(json!({"type":"ping"})).await;
    client.expect("pong").await;
}

#[tokio::test]
async fn a_frame_over_max_message_bytes_closes_with_1009_and_others_carry_on() {
    let node = TestNode::start(&["--max-message-bytes", "1024"]).await;
    let mut bystander = node.connect("bystander").await;
    bystander.join("r").await;
    let mut client = node.connect("big").await;
    let fits = json!({"type":"publish","room":"r","data":"x".repeat(900)}).to_string();
    assert!(fits.len() < 1024);
    client.send_text(&fits).await;
    assert_eq!(bystander.expect("message").await["from"], "big");

    let too_big = json!({"type":"publish","room":"r","data":"x".repeat(2000)}).to_string();
    client.send_text(&too_big).await;
    assert_eq!(client.expect_close().await, Ending::Closed(1009));

    bystander.send(json!({"type":"ping"})).await;
    bystander.expect("pong").await;
}

#[tokio::test]
async fn a_flood_gets_rate_limited_errors_then_close_4029() {
    let node = TestNode::start(&["--rate-limit", "2", "--rate-burst", "5"]).await;
    let mut flooder = node.connect("flooder").await;
    let mut calm = node.connect("calm").await;
    // All six go out before any reply is read, so the bucket (2/s) has no
    // time to refill between them.
    for n in 0..5 {
        flooder.send(json!({"type":"ping","ref":n})).await;
    }
    flooder.send(json!({"type":"ping","ref":"over"})).await;
    for n in 0..5 {
        assert_eq!(
            flooder.expect("pong").await["ref"],
            n,
            "the burst is served"
        );
    }
    let error = flooder.expect("error").await;
    assert_eq!(error["code"], "rate_limited");
    assert_eq!(error["ref"], "over");
    for n in 0..50 {
        flooder.send(json!({"type":"ping","ref":n})).await;
    }
    assert_eq!(flooder.expect_close().await, Ending::Closed(4029));

    calm.send(json!({"type":"ping"})).await;
    calm.expect("pong").await;
    let stats = node.wait_for_stats(|s| s["closes"]["4029"] == 1).await;
    assert!(
        stats["errors"]["rate_limited"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}

#[tokio::test]
async fn a_flood_of_websocket_pings_is_closed_4029_without_error_frames() {
    let node = TestNode::start(&["--rate-limit", "2", "--rate-burst", "5"]).await;
    let mut flooder = RawSocket::connect(node.addr, "/ws?user=flooder").await;
    for _ in 0..50 {
        flooder.send_frame(true, 0x9, b"hi", true).await;
    }
    // Pongs (and the welcome) until the close; no `error` frame among them.
    assert_eq!(flooder.close_code().await, Some(4029));
    let mut calm = node.connect("calm").await;
    calm.send(json!({"type":"ping"})).await;
    calm.expect("pong").await;
    let stats = node.wait_for_stats(|s| s["closes"]["4029"] == 1).await;
    assert_eq!(stats["errors"]["rate_limited"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_longer_than_the_client_queue_is_delivered_whole_not_closed_4008() {
    let node = TestNode::start(&["--client-queue", "8", "--history-size", "100"]).await;
    let mut amy = node.connect("amy").await;
    for n in 0..20 {
        amy.publish("r", json!(n)).await;
    }
    let mut bob = node.connect("bob").await;
    bob.send(json!({"type": "join", "room": "r", "last": 20}))
        .await;
    let mut replayed = Vec::new();
    loop {
        let frame = bob.recv_reply().await;
        match frame["type"].as_str() {
            Some("message") => replayed.push(frame["data"].as_u64().unwrap()),
            Some("joined") => break,
            _ => panic!("unexpected {frame}"),
        }
    }
    assert_eq!(replayed, (0..20).collect::<Vec<_>>());
    amy.publish("r", json!(20)).await;
    assert_eq!(bob.expect("message").await["data"], 20);
    assert_eq!(node.stats().await["slow_consumer_closes"], 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_closed_4008_while_a_reading_member_gets_everything() {
    // Bounds the run if the kernel's socket buffers could absorb it all.
    const MAX_MESSAGES: usize = 3000;
    let node = TestNode::start(&[
        "--client-queue",
        "16",
        "--rate-limit",
        "100000",
        "--rate-burst",
        "100000",
    ])
    .await;
    let mut slow = node.connect("slow").await;
    let mut fast = node.connect("fast").await;
    let mut publisher = node.connect("publisher").await;
    slow.join("firehose").await;
    fast.join("firehose").await;

    let progress = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let progress = progress.clone();
        async move {
            let mut seen = Vec::new();
            loop {
                let frame = fast.recv().await;
                if frame["type"] != "message" {
                    continue;
                }
                if frame["data"] == "end" {
                    return seen;
                }
                seen.push(frame["data"]["n"].as_u64().unwrap());
                progress.store(seen.len(), Ordering::Release);
            }
        }
    });
    // The slow client starts reading as soon as the server gives up on it,
    // and must then find the reason in the close frame.
    let stats_url = node.addr;
    let slow_close = tokio::spawn(async move {
        loop {
            let (_, body) = crate::support::http_get(stats_url, "/stats").await;
            if body.contains("\"slow_consumer_closes\":1") {
                return slow.expect_close().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // 30 KB messages fill the slow client's socket buffers, then its queue.
    // The publisher stays within a few messages of the reading client, so
    // only the client that stopped reading can fill its queue of 16.
    let padding = "x".repeat(30_000);
    let mut published = 0;
    while published < MAX_MESSAGES {
        if published % 20 == 0 && node.stats().await["slow_consumer_closes"] == 1 {
            break;
        }
        while progress.load(Ordering::Acquire) + 4 < published {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        publisher
            .send(json!({"type":"publish","room":"firehose","data":{"n":published,"pad":padding}}))
            .await;
        published += 1;
    }
    publisher
        .send(json!({"type":"publish","room":"firehose","data":"end"}))
        .await;
    let received = reader.await.unwrap();
    assert_eq!(received, (0..published as u64).collect::<Vec<_>>());
    assert_eq!(slow_close.await.unwrap(), Ending::Closed(4008));
    let stats = node.stats().await;
    assert_eq!(
        stats["slow_consumer_closes"], 1,
        "only the slow client: {stats}"
    );
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_disconnected_and_a_live_one_is_not() {
    let node = TestNode::start(&["--heartbeat-interval", "200ms"]).await;
    let mut live = node.connect("live").await;
    let _silent = node.connect("silent").await; // never polled: never answers pings
                                                // The live client keeps reading (and so answering pings) while we wait.
    let (_, stats) = tokio::join!(
        live.expect_silence(Duration::from_secs(5)),
        node.wait_for_stats(|s| s["closes"]["1001"] == 1)
    );
    assert_eq!(stats["connections"], 1, "{stats}");
    live.send(json!({"type":"ping"})).await;
    live.expect("pong").await;
}

#[tokio::test]
async fn joining_more_rooms_than_allowed_is_refused() {
    let node = TestNode::start(&["--max-rooms-per-connection", "2"]).await;
    let mut client = node.connect("alice").await;
    client.join("a").await;
    client.join("b").await;
    client.join("a").await;
    client
        .send(json!({"type":"join","room":"c","ref":"c"}))
        .await;
    let error = client.expect("error").await;
    assert_eq!(error["code"], "bad_request");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("MAX_ROOMS_PER_CONNECTION"));
    client.send(json!({"type":"leave","room":"a"})).await;
    client.expect("left").await;
    client.join("c").await;
}

#[tokio::test]
async fn a_client_that_vanishes_without_a_close_frame_is_cleaned_up_as_1006() {
    let node = TestNode::start(&[]).await;
    let mut watcher = node.connect("watcher").await;
    watcher.join("r").await;
    let mut ghost = node.connect("ghost").await;
    ghost.join("r").await;
    drop(ghost);
    let leave = loop {
        let frame = watcher.recv().await;
        if frame["type"] == "leave" {
            break frame;
        }
    };
    assert_eq!(leave, json!({"type":"leave","room":"r","user":"ghost"}));
    let stats = node.wait_for_stats(|s| s["closes"]["1006"] == 1).await;
    assert_eq!(stats["connections"], 1, "{stats}");
}

#[tokio::test]
async fn a_binary_flood_is_rate_limited_like_text() {
    use futures::SinkExt;
    let node = TestNode::start(&["--rate-limit", "1", "--rate-burst", "3"]).await;
    let mut flooder = node.connect("flooder").await;
    for _ in 0..20 {
        let binary = tokio_tungstenite::tungstenite::Message::binary(vec![0u8; 8]);
        if flooder.ws.send(binary).await.is_err() {
            break;
        }
    }
    assert_eq!(flooder.expect_close().await, Ending::Closed(4029));
}

#[tokio::test]
async fn data_nested_deeper_than_recipients_can_parse_is_refused() {
    let node = TestNode::start(&[]).await;
    let mut member = node.connect("member").await;
    member.join("r").await;
    let mut sender = node.connect("sender").await;
    let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
    sender
        .send_text(&format!(
            r#"{{"type":"publish","room":"r","ref":1,"data":{deep}}}"#
        ))
        .await;
    let error = sender.expect("error").await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_i64()),
        (Some("bad_request"), Some(1))
    );
    member.expect_silence(Duration::from_millis(200)).await;
    // null is data like any other value.
    sender
        .send(json!({"type":"publish","room":"r","data":null}))
        .await;
    assert_eq!(
        member.expect("message").await["data"],
        serde_json::Value::Null
    );
}
