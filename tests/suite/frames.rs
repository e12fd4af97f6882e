//! Every frame of protocol v1 on one node, as a client sees it.

use std::time::Duration;

use serde_json::json;

use crate::support::{collect_messages, TestNode, Topology};

#[tokio::test]
async fn welcome_names_the_connection_user_node_and_heartbeat() {
    let node = TestNode::start(&["--node-id", "node-7", "--heartbeat-interval", "3s"]).await;
    let client = node.connect("alice").await;
    let welcome = &client.welcome;
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["node"], "node-7");
    assert_eq!(welcome["heartbeat_ms"], 3000);
    assert!(welcome["conn"].as_str().unwrap().starts_with("c-"));
}

async fn room_members_get_published_messages_with_ids_and_the_sender_an_ack(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut alice = cluster.connect("alice").await;
    let mut bob = cluster.connect("bob").await;
    let joined = alice.join("lobby").await;
    assert_eq!(
        joined,
        json!({"type":"joined","room":"lobby","recovered":true,"replayed":0})
    );
    bob.join("lobby").await;

    bob.send(
        json!({"type":"publish","room":"lobby","data":{"text":"hi"},"ref":7,"from":"mallory"}),
    )
    .await;
    // The ack and the sender's own copy travel separately: either may come first.
    let (mut message, mut ack) = (bob.recv_reply().await, bob.recv_reply().await);
    if message["type"] == "ack" {
        std::mem::swap(&mut message, &mut ack);
    }
    assert_eq!(
        (message["type"].as_str(), ack["type"].as_str()),
        (Some("message"), Some("ack"))
    );
    assert_eq!(ack["ref"], 7);
    assert_eq!(ack["id"], message["id"]);
    assert_eq!(
        message["from"], "bob",
        "identity is the server's, not the client's"
    );
    assert_eq!(message["room"], "lobby");
    assert_eq!(message["data"], json!({"text":"hi"}));

    let seen = alice.expect("message").await;
    assert_eq!(seen, message);
}

async fn ids_increase_and_publishing_without_ref_gets_no_ack(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut alice = cluster.connect("alice").await;
    alice.join("r").await;
    for n in 0..20 {
        alice
            .send(json!({"type":"publish","room":"r","data":n}))
            .await;
    }
    let messages = collect_messages(&mut alice, 20).await;
    let ids: Vec<(u64, u64)> = messages
        .iter()
        .map(|m| {
            let (ms, seq) = m["id"].as_str().unwrap().split_once('-').unwrap();
            (ms.parse().unwrap(), seq.parse().unwrap())
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let data: Vec<_> = messages
        .iter()
        .map(|m| m["data"].as_i64().unwrap())
        .collect();
    assert_eq!(data, (0..20).collect::<Vec<_>>());
    alice.expect_silence(Duration::from_millis(200)).await;
}

async fn publishing_needs_no_membership_and_non_members_get_nothing(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut member = cluster.connect("member").await;
    let mut outsider = cluster.connect("outsider").await;
    let mut other_room = cluster.connect("other").await;
    member.join("a").await;
    other_room.join("b").await;
    let id = outsider.publish("a", json!("from outside")).await;
    let got = member.expect("message").await;
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["from"], "outsider");
    outsider.expect_silence(Duration::from_millis(200)).await;
    other_room.expect_silence(Duration::from_millis(200)).await;
}

async fn leave_stops_delivery_and_leaving_an_unjoined_room_is_not_found(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut alice = cluster.connect("alice").await;
    let mut bob = cluster.connect("bob").await;
    alice.join("r").await;
    alice
        .send(json!({"type":"leave","room":"r","ref":"l"}))
        .await;
    assert_eq!(
        alice.expect("left").await,
        json!({"type":"left","room":"r","ref":"l"})
    );
    bob.publish("r", json!(1)).await;
    alice.expect_silence(Duration::from_millis(200)).await;

    alice.send(json!({"type":"leave","room":"r","ref":2})).await;
    let error = alice.expect("error").await;
    assert_eq!(error["code"], "not_found");
    assert_eq!(error["ref"], 2);
}

async fn direct_messages_reach_every_connection_of_the_user_and_nobody_else(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut phone = cluster.connect("bob").await;
    let mut laptop = cluster.connect("bob").await;
    let mut carol = cluster.connect("carol").await;
    let mut alice = cluster.connect("alice").await;
    alice
        .send(json!({"type":"direct","to":"bob","data":{"q":"lunch?"},"ref":"d1"}))
        .await;
    assert_eq!(alice.expect("ack").await, json!({"type":"ack","ref":"d1"}));
    let expected = json!({"type":"direct","from":"alice","data":{"q":"lunch?"}});
    assert_eq!(phone.recv().await, expected);
    assert_eq!(laptop.recv().await, expected);
    carol.expect_silence(Duration::from_millis(200)).await;

    alice
        .send(json!({"type":"direct","to":"nobody","data":1,"ref":"d2"}))
        .await;
    let error = alice.expect("error").await;
    assert_eq!(error["code"], "not_found");
    assert_eq!(error["ref"], "d2");
}

async fn broadcast_reaches_every_connection(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut clients = Vec::new();
    for user in ["a", "b", "c"] {
        clients.push(cluster.connect(user).await);
    }
    clients[0]
        .send(json!({"type":"broadcast","data":"everyone","ref":1}))
        .await;
    let expected = json!({"type":"broadcast","from":"a","data":"everyone"});
    let mut own = [clients[0].recv().await, clients[0].recv().await];
    own.sort_by_key(|f| f["type"].to_string());
    assert_eq!(own, [json!({"type":"ack","ref":1}), expected.clone()]);
    for client in &mut clients[1..] {
        assert_eq!(client.recv().await, expected);
    }
}

async fn presence_lists_users_and_members_see_join_and_leave_events(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut alice = cluster.connect("alice").await;
    alice.join("r").await;
    assert_eq!(
        alice.recv().await,
        json!({"type":"join","room":"r","user":"alice"})
    );
    let mut bob_phone = cluster.connect("bob").await;
    let mut bob_laptop = cluster.connect("bob").await;
    bob_phone.join("r").await;
    assert_eq!(
        alice.recv().await,
        json!({"type":"join","room":"r","user":"bob"})
    );
    bob_laptop.join("r").await;

    alice
        .send(json!({"type":"presence","room":"r","ref":"p"}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type":"presence","room":"r","users":["alice","bob"],"ref":"p"}),
        "a second connection of bob neither repeats the join event nor the user"
    );

    bob_phone.close().await;
    bob_laptop.send(json!({"type":"leave","room":"r"})).await;
    assert_eq!(
        alice.recv().await,
        json!({"type":"leave","room":"r","user":"bob"})
    );
    alice.send(json!({"type":"presence","room":"r"})).await;
    assert_eq!(alice.recv().await["users"], json!(["alice"]));
}

async fn ping_gets_pong_with_the_ref(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut alice = cluster.connect("alice").await;
    alice.send(json!({"type":"ping","ref":{"n":1}})).await;
    assert_eq!(alice.recv().await, json!({"type":"pong","ref":{"n":1}}));
    alice.send(json!({"type":"ping"})).await;
    assert_eq!(alice.recv().await, json!({"type":"pong"}));
}

async fn a_retried_publish_with_the_same_key_is_stored_once_and_acked_with_the_first_id(
    topology: Topology,
) {
    let cluster = topology.start(&[]).await;
    let mut alice = cluster.connect("alice").await;
    let mut bob = cluster.connect("bob").await;
    bob.join("r").await;
    let publish = json!({"type":"publish","room":"r","data":"once","key":"k-1","ref":1});
    alice.send(publish.clone()).await;
    let first = alice.expect("ack").await;
    alice.send(publish).await;
    let second = alice.expect("ack").await;
    assert_eq!(first["id"], second["id"]);
    assert_eq!(bob.expect("message").await["id"], first["id"]);
    bob.expect_silence(Duration::from_millis(300)).await;
}

async fn another_senders_key_that_spells_the_same_text_is_another_message(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut reader = cluster.connect("reader").await;
    reader.join("k").await;
    // "alice" + "x/k" and "alice/x" + "k" must not meet.
    let mut alice = cluster.connect("alice").await;
    let mut other = cluster.connect("alice/x").await;
    alice
        .send(json!({"type":"publish","room":"k","data":"from alice","key":"x/k","ref":1}))
        .await;
    let first = alice.expect("ack").await;
    other
        .send(json!({"type":"publish","room":"k","data":"from alice/x","key":"k","ref":2}))
        .await;
    let second = other.expect("ack").await;
    assert_ne!(first["id"], second["id"]);
    let got: Vec<_> = collect_messages(&mut reader, 2)
        .await
        .into_iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(got, vec![json!("from alice"), json!("from alice/x")]);
}

async fn with_a_write_delay_a_busy_rooms_messages_wait_for_it_and_arrive_in_order(
    topology: Topology,
) {
    let cluster = topology.start(&["--write-delay", "400ms"]).await;
    let mut alice = cluster.connect("alice").await;
    let mut bob = cluster.connect("bob").await;
    bob.join("r").await;
    alice.publish("r", json!(0)).await;
    assert_eq!(bob.expect("message").await["data"], 0);
    let first_arrived = std::time::Instant::now();
    for n in 1..=3 {
        alice.publish("r", json!(n)).await;
    }
    let rest: Vec<_> = collect_messages(&mut bob, 3)
        .await
        .into_iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(rest, [json!(1), json!(2), json!(3)]);
    // Written 400 ms after the room's previous write, which was just before
    // the first message arrived (margin for a slow machine).
    assert!(
        first_arrived.elapsed() >= Duration::from_millis(300),
        "held for {:?} only",
        first_arrived.elapsed()
    );
}

conformance!(
    with_a_write_delay_a_busy_rooms_messages_wait_for_it_and_arrive_in_order,
    room_members_get_published_messages_with_ids_and_the_sender_an_ack,
    ids_increase_and_publishing_without_ref_gets_no_ack,
    publishing_needs_no_membership_and_non_members_get_nothing,
    leave_stops_delivery_and_leaving_an_unjoined_room_is_not_found,
    direct_messages_reach_every_connection_of_the_user_and_nobody_else,
    broadcast_reaches_every_connection,
    presence_lists_users_and_members_see_join_and_leave_events,
    ping_gets_pong_with_the_ref,
    a_retried_publish_with_the_same_key_is_stored_once_and_acked_with_the_first_id,
    another_senders_key_that_spells_the_same_text_is_another_message,
);
