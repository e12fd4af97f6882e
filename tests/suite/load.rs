//! Many clients at once: every member of a big room gets every message.

use std::time::Duration;

use futures::{stream, StreamExt};
use serde_json::json;

use crate::support::{collect_messages, Client, TestNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_in_one_room_each_receive_every_message_in_order() {
    const CLIENTS: usize = 1000;
    const MESSAGES: usize = 20;
    let node = TestNode::start(&[
        "--max-connections-per-user",
        "2000",
        "--max-connections-per-ip",
        "2000",
        "--upgrade-rate-per-user",
        "100000",
    ])
    .await;
    // One user on a thousand devices: a thousand distinct users would add
    // half a million presence events, which is not what this measures.
    let url = node.ws_url("user=");
    let clients: Vec<Client> = stream::iter(0..CLIENTS)
        .map(|_| {
            let url = format!("{url}fan");
            async move {
                let mut client = Client::connect(&url).await;
                client.join("stadium").await;
                client
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    assert_eq!(node.stats().await["connections"], CLIENTS);

    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let messages = collect_messages(&mut client, MESSAGES).await;
                messages
                    .iter()
                    .map(|m| m["data"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut publisher = node.connect("announcer").await;
    for n in 0..MESSAGES {
        publisher
            .send(json!({"type":"publish","room":"stadium","data":n}))
            .await;
    }
    let expected: Vec<u64> = (0..MESSAGES as u64).collect();
    for reader in readers {
        let got = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("every client finishes in time")
            .unwrap();
        assert_eq!(got, expected);
    }
    let stats = node.stats().await;
    assert_eq!(stats["slow_consumer_closes"], 0, "{stats}");
}
