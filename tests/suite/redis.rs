//! Many nodes on one Redis: what only a shared broker can get wrong.
//! Subscription counting, presence of a crashed node, the subscriber
//! connection dropping mid-stream, Redis going away and coming back empty,
//! and a reconnect storm served from the nodes' own tails.

use std::time::Duration;

use futures::{stream, StreamExt};
use serde_json::json;

use crate::support::{
    collect_messages, http_get, Client, Cluster, Ending, NodeProcess, RedisServer, TestNode, WAIT,
};

fn room_channels(redis: &RedisServer) -> usize {
    redis
        .cli(&["PUBSUB", "CHANNELS", "*:room:*"])
        .lines()
        .filter(|l| !l.is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_land_on_different_nodes_and_a_room_costs_each_node_one_channel() {
    let cluster = Cluster::on_redis(2, &[]).await;
    let redis = cluster.redis.as_ref().unwrap();
    let mut first = cluster.nodes[0].connect("amy").await;
    let mut second = cluster.nodes[1].connect("bob").await;
    assert_ne!(first.welcome["node"], second.welcome["node"]);
    assert_eq!(cluster.nodes[0].stats().await["broker"]["kind"], "redis");
    first.join("lobby").await;
    second.join("lobby").await;
    assert_eq!(room_channels(redis), 1);
    let channels_before = redis.cli(&["PUBSUB", "NUMSUB", "roomcast:room:{lobby}"]);
    assert!(
        channels_before.ends_with("\n2"),
        "one subscription per node: {channels_before}"
    );

    let mut extra = Vec::new();
    for n in 0..20 {
        let mut client = cluster.nodes[0].connect(&format!("extra-{n}")).await;
        client.join("lobby").await;
        extra.push(client);
    }
    assert_eq!(
        redis.cli(&["PUBSUB", "NUMSUB", "roomcast:room:{lobby}"]),
        channels_before,
        "20 more members on a subscribed node add no subscription"
    );

    let id = second.publish("lobby", json!("across")).await;
    assert_eq!(first.expect("message").await["id"], id.as_str());
    for client in &mut extra {
        assert_eq!(client.expect("message").await["id"], id.as_str());
    }

    for client in extra {
        client.close().await;
    }
    first.close().await;
    second.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while room_channels(redis) != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last leaver unsubscribes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_drops_out_of_presence_with_a_leave_event() {
    let redis = RedisServer::start();
    let url = redis.url();
    let process = NodeProcess::spawn(&[
        "--redis-url",
        &url,
        "--node-id",
        "doomed",
        "--node-ttl",
        "2s",
    ]);
    let survivor = TestNode::start(&[
        "--redis-url",
        &url,
        "--node-id",
        "survivor",
        "--node-ttl",
        "2s",
    ])
    .await;
    let mut ghost = Client::connect(&format!("ws://{}/ws?user=ghost", process.addr)).await;
    ghost.join("r").await;
    let mut watcher = survivor.connect("watcher").await;
    watcher.join("r").await;
    watcher.send(json!({"type":"presence","room":"r"})).await;
    assert_eq!(
        watcher.expect("presence").await["users"],
        json!(["ghost", "watcher"])
    );

    drop(process); // SIGKILL: no cleanup
    let leave = loop {
        let frame = watcher.recv().await;
        if frame["type"] == "leave" && frame["user"] == "ghost" {
            break frame;
        }
    };
    assert_eq!(leave, json!({"type":"leave","room":"r","user":"ghost"}));
    watcher.send(json!({"type":"presence","room":"r"})).await;
    assert_eq!(
        watcher.expect("presence").await["users"],
        json!(["watcher"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_subscriber_connections_mid_stream_loses_nothing() {
    const MESSAGES: usize = 500;
    let cluster = Cluster::on_redis(2, &["--rate-limit", "100000", "--rate-burst", "100000"]).await;
    let redis = cluster.redis.as_ref().unwrap();
    let mut readers = Vec::new();
    for n in 0..5 {
        let mut reader = cluster.nodes[0].connect(&format!("reader-{n}")).await;
        reader.join("feed").await;
        readers.push(reader);
    }
    let readers: Vec<_> = readers
        .into_iter()
        .map(|mut reader| {
            tokio::spawn(async move {
                let messages = collect_messages(&mut reader, MESSAGES).await;
                let data: Vec<u64> = messages
                    .iter()
                    .map(|m| m["data"].as_u64().unwrap())
                    .collect();
                (data, reader)
            })
        })
        .collect();
    let mut publisher = cluster.nodes[1].connect("publisher").await;
    for n in 0..MESSAGES {
        if n == 100 || n == 300 {
            // Both nodes are subscribed again before each kill.
            for node in &cluster.nodes {
                wait_for_readiness(node, 200).await.unwrap();
            }
            let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
            assert_eq!(
                killed, "2",
                "both nodes' subscriber connections were killed"
            );
        }
        publisher
            .send(json!({"type":"publish","room":"feed","data":n}))
            .await;
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let expected: Vec<u64> = (0..MESSAGES as u64).collect();
    for reader in readers {
        let (data, mut reader) = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("every reader finishes")
            .unwrap();
        assert_eq!(data, expected, "all, in order, once");
        reader.expect_silence(Duration::from_millis(200)).await;
    }
    let broker = &cluster.nodes[0].stats().await["broker"];
    assert!(broker["reconnects"].as_u64().unwrap() >= 1, "{broker}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_and_coming_back_empty_is_survived_without_reconnecting() {
    let mut cluster = Cluster::on_redis(2, &[]).await;
    let mut member = cluster.nodes[0].connect("member").await;
    let mut leaver = cluster.nodes[0].connect("leaver").await;
    let mut publisher = cluster.nodes[1].connect("publisher").await;
    member.join("r").await;
    leaver.join("r").await;
    let before = publisher.publish("r", json!("before")).await;
    assert_eq!(member.expect("message").await["id"], before.as_str());

    cluster.redis.as_mut().unwrap().kill();
    for node in &cluster.nodes {
        wait_for_readiness(node, 503).await.unwrap();
        assert_eq!(node.stats().await["broker"]["state"], "down");
    }
    publisher
        .send(json!({"type":"publish","room":"r","data":"lost?","ref":"p1"}))
        .await;
    let error = publisher.expect("error").await;
    assert_eq!(error["code"], "unavailable");
    assert_eq!(error["ref"], "p1");
    member.send(json!({"type":"ping"})).await;
    member.expect("pong").await;
    // Leaving while Redis is away still counts once it is back.
    leaver.close().await;

    cluster.redis.as_mut().unwrap().restart();
    for node in &cluster.nodes {
        wait_for_readiness(node, 200).await.unwrap();
    }
    let after = publisher.publish("r", json!("after")).await;
    assert_eq!(member.expect("message").await["id"], after.as_str());
    assert_eq!(
        member.welcome["type"], "welcome",
        "same connection all along"
    );

    // The history before the restart is gone, and a resume says so.
    let mut late = cluster.nodes[0].connect("late").await;
    late.send(json!({"type":"join","room":"r","since":before}))
        .await;
    let mut frames = Vec::new();
    let joined = loop {
        let frame = late.recv_reply().await;
        if frame["type"] == "joined" {
            break frame;
        }
        frames.push(frame);
    };
    assert_eq!(joined["recovered"], false, "{frames:?}");
    // Presence came back as the node's connections really are.
    member.send(json!({"type":"presence","room":"r"})).await;
    assert_eq!(
        member.expect("presence").await["users"],
        json!(["late", "member"])
    );
}

/// Polls `/readyz` until it answers `status`; after 20 s, the last answer.
async fn wait_for_readiness(node: &TestNode, status: u16) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (got, body) = http_get(node.addr, "/readyz").await;
        if got == status {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("readyz stayed {got}: {body}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_into_one_room_costs_redis_a_handful_of_stream_reads() {
    const CLIENTS: usize = 5000;
    let cluster = Cluster::on_redis(
        3,
        &[
            "--rate-limit",
            "100000",
            "--rate-burst",
            "100000",
            "--max-connections-per-user",
            "10000",
            "--max-connections-per-ip",
            "10000",
            "--upgrade-rate",
            "100000",
            "--upgrade-rate-per-user",
            "100000",
        ],
    )
    .await;
    let redis = cluster.redis.as_ref().unwrap();
    let mut writer = cluster.nodes[0].connect("writer").await;
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(writer.publish("stadium", json!(n)).await);
    }
    let since = ids[9].clone();
    let reads_before = redis.command_calls("xrevrange");

    // One user on many devices: the storm is about resumes, not presence events.
    let urls: Vec<String> = (0..CLIENTS)
        .map(|n| cluster.nodes[n % cluster.nodes.len()].ws_url("user=fan"))
        .collect();
    let outcomes: Vec<(Vec<u64>, bool)> = stream::iter(urls)
        .map(|url| {
            let since = since.clone();
            async move {
                let mut client = Client::connect(&url).await;
                client
                    .send(json!({"type":"join","room":"stadium","since":since}))
                    .await;
                let replayed = collect_messages(&mut client, 40).await;
                let joined = client.expect("joined").await;
                let data = replayed
                    .iter()
                    .map(|m| m["data"].as_u64().unwrap())
                    .collect();
                // Keep the socket open until the storm is over.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(client);
                });
                (data, joined["recovered"] == true)
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let expected: Vec<u64> = (10..50).collect();
    for (data, recovered) in &outcomes {
        assert_eq!(data, &expected);
        assert!(recovered);
    }
    let reads = redis.command_calls("xrevrange") - reads_before;
    assert!(reads <= 10, "{CLIENTS} resumes cost {reads} stream reads");
    let total: u64 = {
        let mut total = 0;
        for node in &cluster.nodes {
            total += node.stats().await["broker"]["stream_reads"]
                .as_u64()
                .unwrap();
        }
        total
    };
    assert_eq!(total, reads, "the nodes count their stream reads too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_process_with_a_bad_redis_url_refuses_to_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["--redis-url", "not-a-url"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("REDIS_URL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_on_redis_closes_with_1012_and_the_others_carry_on() {
    let cluster = Cluster::on_redis(2, &["--drain-timeout", "1s"]).await;
    let Cluster {
        mut nodes, redis, ..
    } = cluster;
    let _redis = redis;
    let staying = nodes.pop().unwrap();
    let leaving = nodes.pop().unwrap();
    let mut moving = leaving.connect("moving").await;
    let mut staying_client = staying.connect("staying").await;
    moving.join("r").await;
    staying_client.join("r").await;
    let last = staying_client.publish("r", json!(1)).await;
    collect_messages(&mut moving, 1).await;
    leaving.shutdown().await;
    assert_eq!(moving.expect_close().await, Ending::Closed(1012));
    let missed = staying_client.publish("r", json!(2)).await;
    let mut moved = staying.connect("moving").await;
    moved
        .send(json!({"type":"join","room":"r","since":last}))
        .await;
    let replay = collect_messages(&mut moved, 1).await;
    assert_eq!(replay[0]["id"], missed.as_str());
    assert_eq!(moved.expect("joined").await["recovered"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_gets_only_new_messages_after_the_subscriber_reconnects() {
    let cluster = Cluster::on_redis(2, &[]).await;
    let redis = cluster.redis.as_ref().unwrap();
    let mut publisher = cluster.nodes[1].connect("publisher").await;
    for n in 0..20 {
        publisher.publish("old", json!(n)).await;
    }
    let mut member = cluster.nodes[0].connect("member").await;
    member.join("old").await;
    let reconnects = |stats: &serde_json::Value| stats["broker"]["reconnects"].as_u64();
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    cluster.nodes[0]
        .wait_for_stats(|s| reconnects(s) == Some(1) && s["broker"]["state"] == "up")
        .await;
    let id = publisher.publish("old", json!("new")).await;
    let got = member.expect("message").await;
    assert_eq!(got["id"], id.as_str(), "not the history again: {got}");
    member.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_from_one_node_works_once_on_another_and_the_api_reaches_every_node() {
    const SECRET: &str = "cluster-secret-0123456789";
    const KEY: &str = "cluster-api-key-0123456789";
    let cluster = Cluster::on_redis(2, &["--jwt-secret", SECRET, "--api-keys", KEY]).await;
    let token = crate::support::token(
        SECRET,
        json!({"sub":"alice","exp":crate::support::unix_now() + 300}),
    );
    let ticket = crate::support::fetch_ticket(cluster.nodes[0].addr, &token).await;
    let mut alice = Client::connect(&cluster.nodes[1].ws_url(&format!("ticket={ticket}"))).await;
    assert_eq!(alice.welcome["user"], "alice");
    let (status, _) =
        crate::support::refused_upgrade(&cluster.nodes[0].ws_url(&format!("ticket={ticket}")), &[])
            .await;
    assert_eq!(status, 401, "a ticket is single-use across nodes");

    alice.join("news").await;
    let api_key = format!("Bearer {KEY}");
    let (status, body) = crate::support::http_request(
        cluster.nodes[0].addr,
        "POST",
        "/api/publish",
        &[("authorization", &api_key)],
        r#"{"room":"news","data":"from the backend"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(alice.expect("message").await["id"], id["id"]);
    let (status, body) = crate::support::http_request(
        cluster.nodes[0].addr,
        "POST",
        "/api/publish",
        &[("authorization", &api_key)],
        r#"{"to":"alice","data":"psst"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        alice.expect("direct").await,
        json!({"type":"direct","from":"server","data":"psst"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_view_lists_every_live_node_with_its_traffic_from_any_node() {
    let mut cluster = Cluster::on_redis(3, &[]).await;
    let mut clients = Vec::new();
    for (n, node) in cluster.nodes.iter().enumerate() {
        let mut client = node.connect(&format!("viewer-{n}")).await;
        client.join("watched").await;
        clients.push(client);
    }
    // The publisher's own copy may come before its ack, which `publish`
    // reads past: only the others are asked for it.
    clients[0]
        .publish("watched", json!("seen everywhere"))
        .await;
    for client in &mut clients[1..] {
        client.expect("message").await;
    }

    let view = cluster.nodes[2]
        .wait_for_cluster_stats(|view| {
            view["nodes"].as_array().is_some_and(|nodes| {
                nodes.len() == 3
                    && nodes
                        .iter()
                        .all(|n| n["connections"] == 1 && n["messages_out"].as_u64() >= Some(1))
            })
        })
        .await;
    let names: Vec<&str> = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["node-0", "node-1", "node-2"]);
    assert_eq!(view["totals"]["connections"], 3);
    assert!(view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["broker"]["state"] == "up"));

    let gone = cluster.nodes.pop().unwrap();
    drop(clients.pop());
    gone.shutdown().await;
    cluster.nodes[0]
        .wait_for_cluster_stats(|view| view["totals"]["nodes"] == 2)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaped_while_alive_writes_its_presence_again_even_if_reaping_another_node_fails() {
    use roomcast::broker::redis::{RedisBroker, RedisServers, RedisSettings};
    use roomcast::broker::Broker;
    let redis = RedisServer::start();
    let (broker, _incoming) = RedisBroker::start(RedisSettings {
        servers: RedisServers::One(redis.url()),
        prefix: "rv".into(),
        node_id: "rv-a".into(),
        history_size: 100,
        history_ttl: Duration::from_secs(600),
        // Liveness every 200 ms.
        node_ttl: Duration::from_millis(600),
    })
    .await
    .expect("the broker starts");
    broker.presence_add("r", "bob", "{}".into()).await.unwrap();
    assert_eq!(broker.presence("r").await.unwrap(), vec!["bob"]);
    // Another node reaps rv-a as if it were dead (its tick was late), and a
    // silent node "ghost" appears whose reap fails (its room set is not a set).
    redis.cli(&[
        "EVAL",
        "redis.call('DEL', 'rv:members:{r}', 'rv:members:{r}:node:rv-a', 'rv:node-rooms:rv-a') \
         redis.call('ZREM', 'rv:nodes', 'rv-a') \
         redis.call('ZADD', 'rv:nodes', 0, 'ghost') \
         redis.call('SET', 'rv:node-rooms:ghost', 'not a set') return 1",
        "0",
    ]);
    // A tick learns it was forgotten and fails on the ghost; then the ghost
    // can be reaped.
    tokio::time::sleep(Duration::from_millis(450)).await;
    redis.cli(&["DEL", "rv:node-rooms:ghost"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let users = broker.presence("r").await.unwrap();
        if users == vec!["bob"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob is still connected to rv-a but missing from presence: {users:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_stream_could_not_be_read_at_subscribe_is_resumed_not_replayed_live_after_a_reconnect(
) {
    let redis = RedisServer::start();
    let node = TestNode::start(&["--redis-url", &redis.url()]).await;
    let mut amy = node.connect("amy").await;
    for n in 0..5 {
        amy.publish("r", json!(n)).await;
    }
    // Scripts that may write wait while Redis pauses writes: the read of
    // the stream when the node subscribes (for bob's join) times out.
    redis.cli(&["CLIENT", "PAUSE", "3000", "WRITE"]);
    let mut bob = node.connect("bob").await;
    bob.join("r").await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    // The subscriber connection drops; the reconnect's catch-up must not
    // hand bob the five messages from before he joined as if they were new.
    assert_eq!(redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]), "1");
    loop {
        match bob.try_recv(WAIT).await {
            Ok(frame) if frame["type"] == "join" || frame["type"] == "leave" => continue,
            Ok(frame) => panic!("bob got {frame} instead of 1012 (resume)"),
            Err(ending) => break assert_eq!(ending, Ending::Closed(1012)),
        }
    }
    node.shutdown().await;
}
