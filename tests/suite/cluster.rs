//! Nodes on a Redis Cluster (three masters, three replicas): sharded
//! pub/sub across nodes on one subscriber connection per shard, presence
//! of a crashed node, and the topology changes a cluster lives through —
//! a master killed mid-traffic (its replica takes over) and the slot of a
//! busy room moved to another master mid-traffic — after which every
//! client still has every message, once, in order. Also the cost of a room
//! message in Redis commands and bytes, printed for docs/SCALING.md.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde_json::{json, Value};

use crate::support::{
    collect_messages, redis_cli, Client, Cluster, LoneMaster, NodeProcess, RedisCluster,
    ResumingClient, TestNode,
};

const UNLIMITED: &[&str] = &["--rate-limit", "100000", "--rate-burst", "100000"];

fn redis_cluster(cluster: &Cluster) -> &RedisCluster {
    cluster
        .redis_cluster
        .as_ref()
        .expect("the nodes share a Redis Cluster")
}

/// Lines of a redis-cli answer, without empty ones.
fn lines(answer: &str) -> Vec<String> {
    answer
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Rooms named so that each of the cluster's masters owns some of them.
fn rooms_on_every_shard(redis: &RedisCluster, count: usize) -> Vec<String> {
    let rooms: Vec<String> = (0..count).map(|n| format!("spread-{n}")).collect();
    let mut owners: Vec<u16> = rooms
        .iter()
        .map(|room| redis.owner(redis.slot(room)))
        .collect();
    owners.sort_unstable();
    owners.dedup();
    assert_eq!(owners.len(), 3, "{count} rooms cover the three shards");
    rooms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_directs_and_broadcasts_cross_nodes_on_one_subscriber_connection_per_shard() {
    let cluster = Cluster::on_redis_cluster(3, &[]).await;
    let redis = redis_cluster(&cluster);
    let rooms = rooms_on_every_shard(redis, 12);
    let mut clients = Vec::new();
    for (n, node) in cluster.nodes.iter().enumerate() {
        let mut client = node.connect(&format!("user-{n}")).await;
        for room in &rooms {
            client.join(room).await;
        }
        clients.push(client);
    }
    assert_eq!(
        cluster.nodes[0].stats().await["broker"]["kind"],
        "redis-cluster"
    );

    for room in &rooms {
        let id = clients[0].publish(room, json!(room)).await;
        for client in &mut clients[1..] {
            let message = client.expect("message").await;
            assert_eq!(
                (&message["room"], &message["id"]),
                (&json!(room), &json!(id))
            );
        }
    }
    clients[0]
        .send(json!({"type":"direct","to":"user-2","data":"psst"}))
        .await;
    assert_eq!(
        clients[2].expect("direct").await,
        json!({"type":"direct","from":"user-0","data":"psst"})
    );
    clients[1]
        .send(json!({"type":"broadcast","data":"all"}))
        .await;
    for client in &mut clients {
        // The publisher's own copies of the room messages may still be ahead.
        let broadcast = client.recv_reply_skipping("message").await;
        assert_eq!(
            broadcast,
            json!({"type":"broadcast","from":"user-1","data":"all"})
        );
    }

    // Each master carries its rooms' channels as shard channels (none on
    // the classic bus), and each node talks to it over one connection,
    // however many of its rooms live there.
    for port in redis.master_ports() {
        let shard_channels = lines(&redis.cli(port, &["PUBSUB", "SHARDCHANNELS", "*:room:*"]));
        assert!(!shard_channels.is_empty(), "master {port} carries rooms");
        for channel in &shard_channels {
            let subscribers = lines(&redis.cli(port, &["PUBSUB", "SHARDNUMSUB", channel]));
            assert_eq!(subscribers[1], "3", "{channel}: one subscription per node");
        }
        assert!(lines(&redis.cli(port, &["PUBSUB", "CHANNELS"])).is_empty());
        let connections = lines(&redis.cli(port, &["CLIENT", "LIST", "TYPE", "pubsub"]));
        assert_eq!(
            connections.len(),
            3,
            "master {port}: one subscriber connection per node: {connections:?}"
        );
    }
    for node in &cluster.nodes {
        let broker = &node.stats().await["broker"];
        assert_eq!(broker["subscriber_connections"], 3, "{broker}");
        assert_eq!(broker["state"], "up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_on_the_cluster_drops_out_of_presence_with_a_leave_event() {
    let redis = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("the Redis Cluster starts");
    let seeds = redis.seeds();
    let common = ["--redis-cluster-urls", &seeds, "--node-ttl", "2s"];
    let process = NodeProcess::spawn(&[&common[..], &["--node-id", "doomed"]].concat());
    let survivor = TestNode::start(&[&common[..], &["--node-id", "survivor"]].concat()).await;
    // Rooms on different shards: the dead node is reaped room by room.
    let rooms = ["r", "s", "t", "u"];
    let mut ghost = Client::connect(&format!("ws://{}/ws?user=ghost", process.addr)).await;
    let mut watcher = survivor.connect("watcher").await;
    for room in rooms {
        ghost.join(room).await;
        watcher.join(room).await;
    }
    watcher.send(json!({"type":"presence","room":"t"})).await;
    assert_eq!(
        watcher.expect("presence").await["users"],
        json!(["ghost", "watcher"])
    );

    drop(process); // SIGKILL: no cleanup
    let mut left = Vec::new();
    while left.len() < rooms.len() {
        let frame = watcher.recv().await;
        if frame["type"] == "leave" && frame["user"] == "ghost" {
            left.push(frame["room"].as_str().unwrap_or_default().to_string());
        }
    }
    left.sort();
    assert_eq!(left, rooms);
    for room in rooms {
        watcher.send(json!({"type":"presence","room":room})).await;
        assert_eq!(
            watcher.expect("presence").await["users"],
            json!(["watcher"])
        );
    }
}

/// Numbered messages published into one room by one client, read by six
/// clients spread over the nodes that resume with `since` whenever their
/// connection ends.
struct Traffic {
    room: &'static str,
    count: usize,
    published: Arc<AtomicUsize>,
    publishing: tokio::task::JoinHandle<()>,
    reading: tokio::task::JoinHandle<Vec<ResumingClient>>,
}

impl Traffic {
    /// Starts it; `keyed`: each publish carries an idempotency key.
    async fn start(cluster: &Cluster, room: &'static str, count: usize, keyed: bool) -> Traffic {
        let mut readers = Vec::new();
        for n in 0..6 {
            let url = cluster.nodes[n % cluster.nodes.len()].ws_url("user=");
            let mut reader = ResumingClient::new(&format!("reader-{n}"), move |user| {
                let url = format!("{url}{user}");
                async move { Ok(Client::connect(&url).await) }.boxed()
            })
            .await;
            reader.join(room).await;
            readers.push(reader);
        }
        // Joined everywhere before the first message.
        for reader in &mut readers {
            while reader.step(Duration::from_millis(100)).await {}
        }
        let reading = tokio::spawn(async move {
            futures::future::join_all(readers.into_iter().map(|mut reader| async move {
                reader
                    .read_until(room, count, Duration::from_secs(10))
                    .await;
                reader
            }))
            .await
        });
        let published = Arc::new(AtomicUsize::new(0));
        let mut publisher = cluster.pick().connect("publisher").await;
        let publishing = tokio::spawn({
            let published = published.clone();
            async move {
                for n in 0..count {
                    let key = keyed.then(|| format!("k-{n}"));
                    publish_until_acked(&mut publisher, room, json!(n), key.as_deref()).await;
                    published.store(n + 1, Ordering::Release);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        });
        Traffic {
            room,
            count,
            published,
            publishing,
            reading,
        }
    }

    fn published(&self) -> usize {
        self.published.load(Ordering::Acquire)
    }

    async fn wait_for(&self, published: usize) {
        while self.published() < published {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the end; every reader must have every message, in order,
    /// once, with increasing ids, and never `recovered:false`. The readers,
    /// still connected.
    async fn finish(self) -> Vec<ResumingClient> {
        tokio::time::timeout(Duration::from_secs(60), self.publishing)
            .await
            .expect("every message is acked")
            .expect("the publisher finishes");
        let readers = tokio::time::timeout(Duration::from_secs(60), self.reading)
            .await
            .expect("every reader finishes")
            .expect("the readers finish");
        let expected: Vec<u64> = (0..self.count as u64).collect();
        for reader in &readers {
            let messages = reader
                .messages
                .get(self.room)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let data: Vec<u64> = messages
                .iter()
                .map(|m| m["data"].as_u64().expect("numbered data"))
                .collect();
            assert_eq!(data, expected, "{}: all, in order, once", reader.user);
            let ids: Vec<(u64, u64)> = messages
                .iter()
                .map(|m| {
                    let id = m["id"].as_str().expect("an id");
                    let (ms, seq) = id.split_once('-').expect("<ms>-<seq>");
                    (ms.parse().expect("ms"), seq.parse().expect("seq"))
                })
                .collect();
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "{}: ids increase",
                reader.user
            );
            assert_eq!(reader.unrecovered, 0, "{}", reader.user);
        }
        readers
    }
}

/// Publishes `data` (with idempotency `key` when given), sending it again
/// while the cluster answers `unavailable`, until acked; its id.
async fn publish_until_acked(
    client: &mut Client,
    room: &str,
    data: Value,
    key: Option<&str>,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut frame = json!({"type":"publish","room":room,"data":data,"ref":"p"});
        if let Some(key) = key {
            frame["key"] = json!(key);
        }
        client.send(frame).await;
        let reply = client.recv_reply().await;
        match reply["type"].as_str() {
            Some("ack") => return reply["id"].as_str().expect("an id").to_string(),
            Some("error") if reply["code"] == "unavailable" => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the cluster stayed unavailable: {reply}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => panic!("unexpected {reply}"),
        }
    }
}

async fn broker_total(cluster: &Cluster, field: &str) -> u64 {
    let mut total = 0;
    for node in &cluster.nodes {
        total += node.stats().await["broker"][field].as_u64().unwrap_or(0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_traffic_fails_over_and_every_client_still_has_every_message_in_order()
{
    let mut cluster = Cluster::on_redis_cluster(3, UNLIMITED).await;
    // With keys: a publish whose ack the failover swallowed is sent again
    // and stored once.
    let traffic = Traffic::start(&cluster, "feed", 300, true).await;
    traffic.wait_for(100).await;
    let redis = cluster.redis_cluster.as_mut().expect("a Redis Cluster");
    let master = redis.owner(redis.slot("feed"));
    redis.kill(master);
    tokio::task::block_in_place(|| redis.wait_until_healthy());
    assert_ne!(
        redis.owner(redis.slot("feed")),
        master,
        "a replica took over"
    );

    traffic.finish().await;
    assert!(
        broker_total(&cluster, "reconnects").await >= 3,
        "every node lost its connection to the killed master and subscribed again"
    );
    for node in &cluster.nodes {
        assert_eq!(node.stats().await["broker"]["state"], "up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_mid_traffic_moves_every_node_to_the_promoted_replica_without_loss() {
    let cluster = Cluster::on_redis_cluster(3, UNLIMITED).await;
    let traffic = Traffic::start(&cluster, "handover", 300, true).await;
    traffic.wait_for(100).await;
    let redis = redis_cluster(&cluster);
    let master = redis.owner(redis.slot("handover"));
    let promoted = tokio::task::block_in_place(|| redis.fail_over(master));
    assert_eq!(redis.owner(redis.slot("handover")), promoted);

    let _members = traffic.finish().await;
    // The demoted master ended the subscriptions and every node followed.
    assert_followed(&cluster, "handover", master, promoted, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_of_a_busy_room_moved_mid_traffic_loses_and_repeats_nothing() {
    let cluster = Cluster::on_redis_cluster(3, UNLIMITED).await;
    // Without keys: a publish into a slot being migrated goes to the new
    // owner (ASK) and its live copy reaches nobody, which is the gap the
    // nodes must fill from the stream. (With a key, the two-key script
    // waits for the migration to end: TRYAGAIN.)
    let traffic = Traffic::start(&cluster, "busy", 600, false).await;
    traffic.wait_for(100).await;
    let redis = redis_cluster(&cluster);
    let slot = redis.slot("busy");
    let from = redis.owner(slot);
    let to = redis
        .master_ports()
        .into_iter()
        .find(|port| *port != from)
        .expect("another master");
    let during = traffic.published();
    tokio::task::block_in_place(|| redis.move_slot(slot, to, Duration::from_millis(400)));
    assert!(
        traffic.published() > during + 20,
        "traffic went on while the slot moved"
    );
    assert_eq!(redis.owner(slot), to);

    let _members = traffic.finish().await;
    // Messages stored on the new owner mid-migration, which reached nobody
    // live, came from the stream.
    assert_followed(&cluster, "busy", from, to, true).await;
}

/// Every node followed `room` from the server on port `from` to the one on
/// `to` after Redis ended its subscription, and the room's channel has one
/// subscriber per node there and none left on `from`. With `recovered`,
/// every node also delivered messages from the stream that it missed live.
async fn assert_followed(cluster: &Cluster, room: &str, from: u16, to: u16, recovered: bool) {
    for node in &cluster.nodes {
        let broker = &node.stats().await["broker"];
        assert!(broker["channels_moved"].as_u64() >= Some(1), "{broker}");
        if recovered {
            assert!(
                broker["gap_messages_recovered"].as_u64() >= Some(1),
                "{broker}"
            );
        }
    }
    let redis = redis_cluster(cluster);
    let channel = format!("roomcast:room:{{{room}}}");
    let subscribers =
        |port| lines(&redis.cli(port, &["PUBSUB", "SHARDNUMSUB", &channel]))[1].clone();
    assert_eq!(subscribers(to), "3");
    assert_eq!(subscribers(from), "0");
}

/// What one room message costs the cluster: one script on the room's
/// master (XADD, PEXPIRE, SPUBLISH inside), nothing on the other shards,
/// and one push per subscribed node. Prints the figures (`--nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_message_costs_one_script_on_its_shard_and_one_push_per_node() {
    const MESSAGES: usize = 500;
    // Liveness scripts (every NODE_TTL / 3) would blur the count.
    let args = [UNLIMITED, &["--node-ttl", "300s"]].concat();
    let cluster = Cluster::on_redis_cluster(3, &args).await;
    let redis = redis_cluster(&cluster);
    let mut members = Vec::new();
    for (n, node) in cluster.nodes.iter().enumerate() {
        let mut member = node.connect(&format!("member-{n}")).await;
        member.join("metered").await;
        members.push(member);
    }
    let mut publisher = cluster.nodes[0].connect("publisher").await;
    let payload = "x".repeat(100);
    publisher.publish("metered", json!(payload)).await;
    for member in &mut members {
        collect_messages(member, 1).await;
    }
    let owner = redis.owner(redis.slot("metered"));
    let masters = redis.master_ports();
    // Not PEXPIRE: the nodes' shared stats are refreshed with it every second.
    let counted = ["evalsha", "xadd", "spublish", "publish"];
    let calls = |port| counted.map(|command| redis.command_calls(port, command));
    let before: Vec<_> = masters.iter().map(|&port| calls(port)).collect();
    let output = |port| {
        (
            redis.info_number(port, "total_net_output_bytes"),
            redis.info_number(port, "total_net_repl_output_bytes"),
        )
    };
    let (out_before, repl_before) = output(owner);

    for n in 0..MESSAGES {
        publisher
            .send(json!({"type":"publish","room":"metered","data":payload,"ref":n}))
            .await;
    }
    let mut acked = 0;
    while acked < MESSAGES {
        if publisher.recv_reply().await["type"] == "ack" {
            acked += 1;
        }
    }
    for member in &mut members {
        collect_messages(member, MESSAGES).await;
    }

    let (out_after, repl_after) = output(owner);
    for (port, before) in masters.iter().zip(&before) {
        let after = calls(*port);
        let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        let expected = if *port == owner {
            [MESSAGES as u64, MESSAGES as u64, MESSAGES as u64, 0]
        } else {
            [0; 4]
        };
        assert_eq!(
            delta, expected,
            "{counted:?} on master {port} (owner {owner})"
        );
    }
    let to_clients = (out_after - out_before) - (repl_after - repl_before);
    let per_message = to_clients as f64 / MESSAGES as f64;
    let frame = format!(
        "{{\"type\":\"message\",\"room\":\"metered\",\"id\":\"1700000000000-0\",\"from\":\"publisher\",\"data\":\"{payload}\"}}"
    );
    println!(
        "room message of {} bytes as a frame: 1 EVALSHA (XADD + PEXPIRE + SPUBLISH) on the room's master, 0 commands elsewhere; \
         {per_message:.0} bytes to clients per message from that master (3 subscribed nodes + the script's reply), \
         {:.0} bytes per message to its replica",
        frame.len(),
        (repl_after - repl_before) as f64 / MESSAGES as f64
    );
    // A push per node carries the frame once (plus its id and RESP framing).
    assert!(
        per_message < 3.0 * (frame.len() as f64 * 2.0) + 200.0,
        "{per_message}"
    );
    assert!(per_message > 3.0 * frame.len() as f64, "{per_message}");
}

#[test]
fn a_node_process_with_a_bad_redis_cluster_url_refuses_to_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["--redis-cluster-urls", "redis://127.0.0.1:7000,not-a-url"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("REDIS_CLUSTER_URLS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_stalled_past_the_command_timeout_stores_a_publish_once_and_counts_a_join_once() {
    use roomcast::broker::redis::{RedisBroker, RedisServers, RedisSettings};
    use roomcast::broker::Broker;
    use roomcast::protocol::MessageTemplate;
    let master = LoneMaster::start();
    let (broker, _incoming) = RedisBroker::start(RedisSettings {
        servers: RedisServers::Cluster(vec![master.url()]),
        prefix: "st".into(),
        node_id: "st-1".into(),
        history_size: 100,
        history_ttl: Duration::from_secs(600),
        node_ttl: Duration::from_secs(15),
    })
    .await
    .expect("the broker starts");
    let data = |n: &str| serde_json::value::RawValue::from_string(n.into()).unwrap();
    broker
        .publish_room("r", MessageTemplate::new("r", "amy", &data("1")), None)
        .await
        .expect("a publish before the stall");
    broker
        .presence_add("r", "amy", "{}".into())
        .await
        .expect("a join before the stall");
    // The master stalls for longer than a command may take (2 s).
    master.pause(true);
    let publishing = {
        let broker = broker.clone();
        tokio::spawn(async move {
            broker
                .publish_room("r", MessageTemplate::new("r", "amy", &data("2")), None)
                .await
        })
    };
    let joining = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.presence_add("r", "bob", "{}".into()).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    master.pause(false);
    let published = publishing.await.unwrap();
    let joined = joining.await.unwrap();
    // Either answer is allowed (a timeout says "maybe"); running twice is not.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored = redis_cli(master.port, &["XLEN", "st:stream:{r}"]);
    assert_eq!(
        stored, "2",
        "one stalled publish stored once ({published:?})"
    );
    let count = redis_cli(master.port, &["HGET", "st:members:{r}", "bob"]);
    assert_eq!(count, "1", "one stalled join counted once ({joined:?})");
    broker
        .presence_remove("r", "bob", "{}".into())
        .await
        .expect("bob leaves");
    assert_eq!(broker.presence("r").await.unwrap(), vec!["amy"]);
}
