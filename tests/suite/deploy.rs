//! The deployment, end to end on this machine: real nginx terminating TLS in
//! front of real nodes sharing a real Redis, configured from the repository's
//! own nginx.conf; and the Dockerfile and docker-compose.yml checked against
//! it and against the node's configuration (no Docker engine here).

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use clap::CommandFactory;
use futures::FutureExt;
use serde_json::json;
use yaml_rust2::{Yaml, YamlLoader};

use crate::support::{Client, Cluster, Nginx, NodeProcess, RedisServer, ResumingClient, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_through_wss_on_nginx_land_on_different_nodes_and_talk() {
    let cluster = Cluster::on_redis(3, &[]).await;
    let addrs: Vec<_> = cluster.nodes.iter().map(|n| n.addr).collect();
    let nginx = Nginx::start(&addrs, None);
    let mut clients = Vec::new();
    for n in 0..6 {
        clients.push(nginx.connect(&format!("user-{n}")).await);
    }
    let nodes: HashSet<String> = clients
        .iter()
        .map(|c| c.welcome["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        nodes.len(),
        3,
        "least_conn spreads six clients over three nodes"
    );

    for client in &mut clients {
        client.join("lobby").await;
    }
    let id = clients[0].publish("lobby", json!("hello over TLS")).await;
    for client in &mut clients[1..] {
        assert_eq!(client.expect("message").await["id"], id.as_str());
    }
    clients[1]
        .send(json!({"type":"direct","to":"user-2","data":"psst"}))
        .await;
    assert_eq!(clients[2].expect("direct").await["from"], "user-1");
    clients[3]
        .send(json!({"type":"broadcast","data":"all"}))
        .await;
    for client in &mut clients {
        // The publisher's own copy of the room message may still be ahead.
        let broadcast = loop {
            let frame = client.recv_reply().await;
            if frame["type"] != "message" {
                break frame;
            }
        };
        assert_eq!(broadcast["type"], "broadcast");
        assert_eq!(broadcast["data"], "all");
    }

    // Query strings (tokens, tickets) never reach nginx's access log.
    let url = nginx.wss_url("user=logged&token=SECRET-IN-QUERY");
    Client::connect_tls(&url, nginx.https, nginx.tls())
        .await
        .close()
        .await;
    // nginx logs a WebSocket request when it ends, a moment after the close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read_to_string(nginx.dir.join("access.log")).unwrap_or_default();
        if log.contains("GET /ws") || tokio::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(log.contains("GET /ws"), "{log}");
    assert!(!log.contains("SECRET-IN-QUERY"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_traffic_loses_nobody_a_message() {
    const MESSAGES: usize = 300;
    let redis = RedisServer::start();
    let url = redis.url();
    let mut processes: Vec<NodeProcess> = (1..=3)
        .map(|n| {
            NodeProcess::spawn(&[
                "--redis-url",
                &url,
                "--node-id",
                &format!("node{n}"),
                "--rate-limit",
                "100000",
                "--rate-burst",
                "100000",
            ])
        })
        .collect();
    let addrs: Vec<_> = processes.iter().map(|p| p.addr).collect();
    let nginx = Nginx::start(&addrs, None);
    let (https, tls) = (nginx.https, nginx.tls());
    let mut readers = Vec::new();
    for n in 0..9 {
        let base = nginx.wss_url("user=");
        let tls = tls.clone();
        let mut reader = ResumingClient::new(&format!("reader-{n}"), move |user| {
            let url = format!("{base}{user}");
            let tls = tls.clone();
            async move { Client::try_connect_tls(&url, https, tls).await }.boxed()
        })
        .await;
        reader.join("feed").await;
        readers.push(reader);
    }
    // The publisher talks to a node that survives, and waits for each ack.
    let mut publisher = Client::connect(&format!("ws://{}/ws?user=publisher", addrs[2])).await;
    let readers = tokio::spawn(async move {
        let mut done = Vec::new();
        for mut reader in readers {
            reader
                .read_until("feed", MESSAGES, Duration::from_secs(20))
                .await;
            done.push(reader);
        }
        done
    });
    for n in 0..MESSAGES {
        if n == 100 {
            processes[0].child.kill().expect("SIGKILL node1");
        }
        publisher.publish("feed", json!(n)).await;
    }
    let readers = readers.await.unwrap();
    let expected: Vec<u64> = (0..MESSAGES as u64).collect();
    let mut resumed = 0;
    for reader in &readers {
        let data: Vec<u64> = reader.messages["feed"]
            .iter()
            .map(|m| m["data"].as_u64().unwrap())
            .collect();
        assert_eq!(data, expected, "{}: all, in order, once", reader.user);
        assert_eq!(reader.unrecovered, 0);
        resumed += reader.reconnects;
    }
    assert!(
        resumed >= 1,
        "some readers were on the killed node and resumed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_an_idle_socket_open_past_nginx_read_timeout() {
    let node = TestNode::start(&["--heartbeat-interval", "500ms"]).await;
    let nginx = Nginx::start(&[node.addr], Some("2s"));
    let mut idle = nginx.connect("idle").await;
    idle.join("quiet").await;
    // Reading (and so answering pings) but sending nothing for 2.5x the timeout.
    idle.expect_silence(Duration::from_secs(5)).await;
    let mut speaker = node.connect("speaker").await;
    let id = speaker.publish("quiet", json!("still there?")).await;
    assert_eq!(idle.expect("message").await["id"], id.as_str());
}

fn yaml_str<'a>(yaml: &'a Yaml, key: &str) -> Option<&'a str> {
    yaml[key].as_str()
}

#[test]
fn compose_dockerfile_and_nginx_agree_with_each_other_and_with_the_config() {
    let root = env!("CARGO_MANIFEST_DIR");
    let compose = std::fs::read_to_string(format!("{root}/docker-compose.yml")).unwrap();
    let nginx = std::fs::read_to_string(format!("{root}/nginx.conf")).unwrap();
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    let compose = &YamlLoader::load_from_str(&compose).expect("valid YAML")[0];
    let services = &compose["services"];

    let known_env: HashSet<String> = roomcast::Config::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().to_string()))
        .collect();
    let mut node_ids = BTreeSet::new();
    let mut upstreams = BTreeSet::new();
    for n in 1..=3 {
        let name = format!("node{n}");
        let node = &services[name.as_str()];
        assert!(!node.is_badvalue(), "service {name}");
        let env = node["environment"].as_hash().expect("environment map");
        for key in env.keys() {
            let key = key.as_str().unwrap();
            assert!(
                known_env.contains(key),
                "{name}: {key} is not a roomcast setting"
            );
        }
        node_ids.insert(
            yaml_str(&node["environment"], "NODE_ID")
                .unwrap()
                .to_string(),
        );
        let bind = yaml_str(&node["environment"], "BIND").unwrap();
        let port = bind.rsplit(':').next().unwrap();
        assert!(
            yaml_str(&node["environment"], "REDIS_URL")
                .unwrap()
                .contains("//redis:"),
            "{name} uses the redis service"
        );
        assert!(
            dockerfile.contains(&format!("EXPOSE {port}")),
            "the image exposes {port}"
        );
        upstreams.insert(format!("server {name}:{port}"));
        assert_eq!(
            yaml_str(&node["depends_on"]["redis"], "condition"),
            Some("service_healthy")
        );
        assert!(nginx.contains(&format!("proxy_pass http://{name}:{port}/;")));
    }
    assert_eq!(node_ids.len(), 3, "distinct NODE_IDs");
    for upstream in &upstreams {
        assert!(
            nginx.contains(upstream.as_str()),
            "nginx upstream {upstream}"
        );
    }
    assert!(!services["redis"]["healthcheck"].is_badvalue());
    let proxy = &services["nginx"];
    let volumes: Vec<&str> = proxy["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(volumes.contains(&"./nginx.conf:/etc/nginx/nginx.conf:ro"));
    assert!(volumes.iter().any(|v| v.ends_with(":/etc/nginx/certs:ro")));
    assert!(nginx.contains("ssl_certificate     /etc/nginx/certs/tls.crt;"));

    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(stages >= 2, "multi-stage build");
    assert!(dockerfile.contains("--locked"));
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert_ne!(user.trim(), "root");
    assert!(dockerfile.contains(r#"CMD ["roomcast", "healthcheck"]"#));
    let subcommands: Vec<String> = roomcast::Config::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    assert!(subcommands.contains(&"healthcheck".to_string()));
    // The proxy's idle timeout outlasts two heartbeats.
    let heartbeat = roomcast::Config::command()
        .get_arguments()
        .find(|a| a.get_id() == "heartbeat_interval")
        .and_then(|a| {
            a.get_default_values()
                .first()
                .map(|v| v.to_string_lossy().to_string())
        })
        .unwrap();
    let heartbeat = roomcast::config::parse_duration(&heartbeat).unwrap();
    assert!(nginx.contains("proxy_read_timeout 75s;"));
    assert!(Duration::from_secs(75) > heartbeat * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_loses_and_repeats_nothing() {
    const CLIENTS: usize = 200;
    const ROOMS: usize = 20;
    let redis = RedisServer::start();
    let url = redis.url();
    let args = |n: usize| -> Vec<String> {
        [
            "--redis-url",
            &url,
            "--node-id",
            &format!("node{n}"),
            "--drain-timeout",
            "1s",
            "--rate-limit",
            "1000",
            "--rate-burst",
            "1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let start = |bind: &str, n: usize| {
        let args = args(n);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProcess::spawn_at(bind, &args)
    };
    let mut processes: Vec<NodeProcess> = (1..=3).map(|n| start("127.0.0.1:0", n)).collect();
    let addrs: Vec<_> = processes.iter().map(|p| p.addr).collect();
    let nginx = Nginx::start(&addrs, None);
    let (https, tls) = (nginx.https, nginx.tls());

    let publishing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Clients whose publishes are all acked: reading stops only once all are.
    let settled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let base = nginx.wss_url("user=");
        let tls = tls.clone();
        let publishing = publishing.clone();
        let settled = settled.clone();
        tasks.push(tokio::spawn(async move {
            let room = format!("room-{}", i % ROOMS);
            let mut client = ResumingClient::new(&format!("client-{i}"), move |user| {
                let url = format!("{base}{user}");
                let tls = tls.clone();
                async move { Client::try_connect_tls(&url, https, tls).await }.boxed()
            })
            .await;
            client.join(&room).await;
            let mut seq = 0u64;
            let every = Duration::from_millis(400);
            let mut next = tokio::time::Instant::now() + every.mul_f64(fastrand::f64());
            while publishing.load(std::sync::atomic::Ordering::Acquire) {
                if tokio::time::Instant::now() >= next {
                    seq += 1;
                    client
                        .publish(&room, json!({"by": i, "seq": seq}), &format!("{i}-{seq}"))
                        .await;
                    next += every;
                }
                client.step(Duration::from_millis(50)).await;
            }
            // Settle: every publish acked, everybody's, then nothing more to read.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while client.unacked() > 0 && tokio::time::Instant::now() < deadline {
                client.step(Duration::from_millis(200)).await;
            }
            settled.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            while settled.load(std::sync::atomic::Ordering::Acquire) < CLIENTS
                && tokio::time::Instant::now() < deadline
            {
                client.step(Duration::from_millis(200)).await;
            }
            while client.step(Duration::from_secs(2)).await {}
            (room, client)
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    for (n, process) in processes.iter_mut().enumerate() {
        let bind = process.addr.to_string();
        process.signal("TERM");
        assert_eq!(process.wait_exit(Duration::from_secs(15)), Some(0));
        *process = start(&bind, n + 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for process in &mut processes {
        assert!(
            process.child.try_wait().unwrap().is_none(),
            "restarted node runs"
        );
        let (status, body) = crate::support::http_get(process.addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
    }
    publishing.store(false, std::sync::atomic::Ordering::Release);

    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    let resumed: usize = clients.iter().map(|(_, c)| c.reconnects).sum();
    assert!(
        resumed >= CLIENTS / 2,
        "the restarts moved clients: {resumed}"
    );
    for r in 0..ROOMS {
        let room = format!("room-{r}");
        let members: Vec<&ResumingClient> = clients
            .iter()
            .filter(|(name, _)| *name == room)
            .map(|(_, c)| c)
            .collect();
        for member in &members {
            assert_eq!(member.unacked(), 0, "{} has unacked publishes", member.user);
            assert_eq!(member.unrecovered, 0, "{} missed history", member.user);
        }
        for member in &members {
            let messages = &member.messages[&room];
            let ids: Vec<(u64, u64)> = messages.iter().map(id_of).collect();
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "{}: in order, no duplicates",
                member.user
            );
            let seen: BTreeSet<String> = messages.iter().map(key_of).collect();
            assert_eq!(
                seen.len(),
                messages.len(),
                "{}: each message once",
                member.user
            );
            // Its own publishes all came back to it (it joined before publishing).
            for key in &member.acked {
                assert!(seen.contains(key), "{} lost its own {key}", member.user);
            }
            // And everything anybody published after its first message reached it.
            let first = ids.first().copied().unwrap_or((u64::MAX, 0));
            for other in &members {
                for message in &other.messages[&room] {
                    if id_of(message) > first && !seen.contains(&key_of(message)) {
                        let missing = id_of(message);
                        let around: Vec<_> = messages
                            .iter()
                            .map(|m| (id_of(m), key_of(m)))
                            .filter(|(id, _)| id.0 + 3000 > missing.0 && id.0 < missing.0 + 3000)
                            .collect();
                        panic!(
                            "{} lost {} {:?} (reconnects {}, first {:?}); around: {:?}",
                            member.user,
                            key_of(message),
                            missing,
                            member.reconnects,
                            first,
                            around
                        );
                    }
                }
            }
        }
    }
}

fn id_of(message: &serde_json::Value) -> (u64, u64) {
    let (ms, seq) = message["id"].as_str().unwrap().split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

fn key_of(message: &serde_json::Value) -> String {
    format!("{}-{}", message["data"]["by"], message["data"]["seq"])
}
