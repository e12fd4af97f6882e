//! The browser side in real headless Chromium: people chatting through the
//! demo page on different nodes, a page riding out the crash of its node,
//! and the dashboard showing the cluster live. Screenshots are written to
//! `target/test-artifacts/`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::support::browser::{artifacts_dir, ChromeDriver, Page};
use crate::support::{Cluster, NodeProcess, RedisServer, WAIT};

fn artifact(name: &str) -> PathBuf {
    artifacts_dir().join(name)
}

/// Opens the demo on `node`, signs in as `name` and joins `room`, all
/// through the page's own fields and buttons.
async fn sign_in(page: &Page, node: std::net::SocketAddr, name: &str, room: &str) {
    page.goto(&format!("http://{node}/")).await;
    page.type_into("#name", name).await;
    page.click("#connect").await;
    page.wait_for_text("#status", "open").await;
    page.type_into("#room", room).await;
    page.click("#join").await;
    page.find(&format!("#rooms li[data-room=\"{room}\"]")).await;
}

async fn say(page: &Page, text: &str) {
    page.type_into("#text", text).await;
    page.click("#send").await;
}

/// Waits until `page` lists exactly `count` messages; returns their ids.
async fn wait_for_messages(page: &Page, count: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let ids = page.attributes("#messages li.message", "data-id").await;
        if ids.len() >= count {
            assert_eq!(ids.len(), count, "no message shown twice: {ids:?}");
            return ids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {count} messages shown: {ids:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_on_different_nodes_chat_through_the_demo_page() {
    let cluster = Cluster::on_redis(2, &[]).await;
    let driver = ChromeDriver::start().await;
    let (amy, bob) = (driver.page().await, driver.page().await);
    sign_in(&amy, cluster.nodes[0].addr, "amy", "lobby").await;
    sign_in(&bob, cluster.nodes[1].addr, "bob", "lobby").await;
    assert_eq!(amy.text("#node").await, "node-0");
    assert_eq!(bob.text("#node").await, "node-1");

    say(&amy, "hello from node 0").await;
    say(&bob, "hi amy, node 1 here").await;
    let seen_by_amy = wait_for_messages(&amy, 2).await;
    let seen_by_bob = wait_for_messages(&bob, 2).await;
    assert_eq!(
        seen_by_amy, seen_by_bob,
        "both see one conversation, in order"
    );
    let texts = amy.attributes("#messages li.message", "data-from").await;
    assert_eq!(texts.len(), 2);
    assert!(amy.text("#messages").await.contains("hi amy, node 1 here"));
    assert!(bob.text("#messages").await.contains("hello from node 0"));

    // Presence: each sees both people in the room.
    let deadline = tokio::time::Instant::now() + WAIT;
    while amy.find_all("#presence li").await.len() != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "amy sees bob arrive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A direct message from bob reaches amy on the other node.
    bob.type_into("#direct-to", "amy").await;
    bob.type_into("#direct-text", "psst").await;
    bob.click("#direct-send").await;
    let direct = amy.find("#directs li.direct").await;
    assert_eq!(
        amy.attribute(&direct, "data-from").await.as_deref(),
        Some("bob")
    );
    assert!(amy.element_text(&direct).await.contains("psst"));
    amy.screenshot(&artifact("demo.png")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_node_is_killed_reconnects_and_shows_every_message_once_in_order() {
    let redis = RedisServer::start();
    let url = redis.url();
    let steady = NodeProcess::spawn(&["--redis-url", &url, "--node-id", "steady"]);
    let port = crate::support::free_port();
    let bind = format!("127.0.0.1:{port}");
    let args = ["--redis-url", url.as_str(), "--node-id", "doomed"];
    let mut doomed = NodeProcess::spawn_at(&bind, &args);

    let driver = ChromeDriver::start().await;
    let (writer, reader) = (driver.page().await, driver.page().await);
    sign_in(&writer, steady.addr, "writer", "news").await;
    sign_in(&reader, doomed.addr, "reader", "news").await;
    say(&writer, "before the crash").await;
    wait_for_messages(&reader, 1).await;

    doomed.signal("KILL");
    doomed.wait_exit(WAIT);
    reader.wait_for_text("#status", "reconnecting").await;
    for n in 1..=5 {
        say(&writer, &format!("while away {n}")).await;
    }
    let expected = wait_for_messages(&writer, 6).await;

    let _restarted = NodeProcess::spawn_at(&bind, &args);
    reader.wait_for_text("#status", "open").await;
    let shown = wait_for_messages(&reader, 6).await;
    assert_eq!(shown, expected, "every message once, in order");
    say(&writer, "after the restart").await;
    assert_eq!(wait_for_messages(&reader, 7).await.len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_node_with_live_figures() {
    let cluster = Cluster::on_redis(2, &[]).await;
    let mut talkers = Vec::new();
    for (n, node) in cluster.nodes.iter().enumerate() {
        for k in 0..3 {
            let mut client = node.connect(&format!("talker-{n}-{k}")).await;
            client.join("busy").await;
            talkers.push(client);
        }
    }
    // Traffic for the dashboard to show, bounded in count and time.
    let mut speaker = talkers.pop().expect("a talker");
    let traffic = tokio::spawn(async move {
        for n in 0..300 {
            speaker
                .send(json!({"type": "publish", "room": "busy", "data": n}))
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        speaker
    });

    let driver = ChromeDriver::start().await;
    let page = driver.page().await;
    page.resize(1280, 1500).await;
    page.goto(&format!("http://{}/dashboard", cluster.nodes[0].addr))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    loop {
        let rows = page.attributes("#nodes tr.node", "data-node").await;
        let mut live = 0;
        for node in &rows {
            let cell = |name: &str| format!("#nodes tr.node[data-node=\"{node}\"] td.{name}");
            let number = |text: String| text.trim().parse::<f64>().unwrap_or(0.0);
            let connections = number(page.text(&cell("connections")).await);
            let out_rate = number(page.text(&cell("out-rate")).await);
            if connections > 0.0 && out_rate > 0.0 {
                live += 1;
            }
        }
        if rows == ["node-0", "node-1"] && live == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dashboard rows {rows:?}, {live} with live figures"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Let the charts gather a few points before the picture is taken.
    tokio::time::sleep(Duration::from_secs(6)).await;
    page.screenshot(&artifact("dashboard.png")).await;
    traffic.abort();
}
