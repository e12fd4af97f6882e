//! History: resume after a disconnect with `since`, backlog with `last`, and
//! an honest `recovered:false` when history no longer reaches back.

use serde_json::{json, Value};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::support::{collect_messages, Client, Topology};

async fn a_client_resuming_with_since_gets_exactly_what_it_missed_in_order(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut reader = cluster.connect("reader").await;
    let mut writer = cluster.connect("writer").await;
    reader.join("news").await;
    for n in 0..5 {
        writer.publish("news", json!(n)).await;
    }
    let seen = collect_messages(&mut reader, 5).await;
    let last_id = seen[4]["id"].as_str().unwrap().to_string();
    reader.close().await;

    let mut missed_ids = Vec::new();
    for n in 5..12 {
        missed_ids.push(writer.publish("news", json!(n)).await);
    }

    let mut reader = cluster.connect("reader").await;
    reader
        .send(json!({"type":"join","room":"news","since":last_id,"ref":"j"}))
        .await;
    let replayed = collect_messages(&mut reader, 7).await;
    let ids: Vec<_> = replayed.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, missed_ids);
    let data: Vec<_> = replayed
        .iter()
        .map(|m| m["data"].as_i64().unwrap())
        .collect();
    assert_eq!(data, (5..12).collect::<Vec<_>>());
    let joined = reader.expect("joined").await;
    assert_eq!(
        joined,
        json!({"type":"joined","room":"news","recovered":true,"replayed":7,"ref":"j"})
    );

    // Live delivery continues after the replay, without duplicates.
    let live = writer.publish("news", json!(12)).await;
    let next = collect_messages(&mut reader, 1).await;
    assert_eq!(next[0]["id"], live.as_str());
}

async fn resuming_from_before_trimmed_history_says_recovered_false(topology: Topology) {
    let cluster = topology.start(&["--history-size", "5"]).await;
    let mut writer = cluster.connect("writer").await;
    let first = writer.publish("r", json!(0)).await;
    for n in 1..10 {
        writer.publish("r", json!(n)).await;
    }
    let mut reader = cluster.connect("reader").await;
    reader
        .send(json!({"type":"join","room":"r","since":first}))
        .await;
    let replayed = collect_messages(&mut reader, 5).await;
    let data: Vec<_> = replayed
        .iter()
        .map(|m| m["data"].as_i64().unwrap())
        .collect();
    assert_eq!(data, vec![5, 6, 7, 8, 9], "what is left is still delivered");
    let joined = reader.expect("joined").await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(joined["replayed"], 5);
}

async fn resuming_in_a_room_without_history_is_not_recovered(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut reader = cluster.connect("reader").await;
    reader
        .send(json!({"type":"join","room":"empty","since":"1700000000000-0"}))
        .await;
    let joined = reader.expect("joined").await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(joined["replayed"], 0);
}

async fn a_new_joiner_with_last_gets_the_latest_messages_first(topology: Topology) {
    let cluster = topology.start(&["--history-size", "10"]).await;
    let mut writer = cluster.connect("writer").await;
    for n in 0..15 {
        writer.publish("chat", json!(n)).await;
    }
    let mut newcomer = cluster.connect("newcomer").await;
    newcomer
        .send(json!({"type":"join","room":"chat","last":3}))
        .await;
    let backlog = collect_messages(&mut newcomer, 3).await;
    let data: Vec<_> = backlog
        .iter()
        .map(|m| m["data"].as_i64().unwrap())
        .collect();
    assert_eq!(data, vec![12, 13, 14]);
    let joined = newcomer.expect("joined").await;
    assert_eq!(joined["replayed"], 3);

    let mut greedy = cluster.connect("greedy").await;
    greedy
        .send(json!({"type":"join","room":"chat","last":500}))
        .await;
    let backlog = collect_messages(&mut greedy, 10).await;
    assert_eq!(backlog[0]["data"], 5, "capped at HISTORY_SIZE");
    assert_eq!(greedy.expect("joined").await["replayed"], 10);
}

async fn messages_published_while_a_resume_is_replayed_arrive_once_and_in_order(
    topology: Topology,
) {
    const PUMPED: i64 = 1000;
    let cluster = topology
        .start(&["--rate-limit", "100000", "--rate-burst", "100000"])
        .await;
    let mut writer = cluster.connect("writer").await;
    let start = writer.publish("busy", json!(-1)).await;
    // A second client keeps publishing while the reader resumes.
    let mut pump = cluster.connect("pump").await;
    pump.join("busy").await;
    let sent = Arc::new(AtomicUsize::new(0));
    let pumping = tokio::spawn({
        let sent = sent.clone();
        async move {
            for n in 0..PUMPED {
                pump.send(json!({"type":"publish","room":"busy","data":n}))
                    .await;
                sent.store(n as usize + 1, Ordering::Release);
            }
            // Its own copies show that every message was stored.
            collect_messages(&mut pump, PUMPED as usize).await;
        }
    });
    // Join once the pump is under way.
    while sent.load(Ordering::Acquire) < 100 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let mut reader = cluster.connect("reader").await;
    reader
        .send(json!({"type":"join","room":"busy","since":start}))
        .await;
    let mut data = Vec::new();
    let mut replayed = None;
    while data.len() < PUMPED as usize {
        let frame = reader.recv().await;
        match frame["type"].as_str() {
            Some("message") => data.push(frame["data"].as_i64().unwrap()),
            Some("joined") => replayed = frame["replayed"].as_u64(),
            _ => {}
        }
    }
    assert_eq!(data, (0..PUMPED).collect::<Vec<_>>());
    let replayed = replayed.expect("joined arrived");
    assert!(
        0 < replayed && replayed < PUMPED as u64,
        "the join landed mid-stream: {replayed} replayed"
    );
    pumping.await.unwrap();
}

async fn a_resume_from_past_every_id_is_not_recovered_and_live_messages_still_arrive(
    topology: Topology,
) {
    let cluster = topology.start(&[]).await;
    let mut writer = cluster.connect("writer").await;
    let before = writer.publish("f", json!(0)).await;
    let mut reader = cluster.connect("reader").await;
    // An id from before a restart whose clock stepped back, or made up.
    reader
        .send(json!({"type":"join","room":"f","since":"99999999999999-0"}))
        .await;
    let mut replayed = Vec::new();
    let joined = loop {
        let frame = reader.recv_reply().await;
        match frame["type"].as_str() {
            Some("message") => replayed.push(frame["id"].clone()),
            Some("joined") => break frame,
            _ => panic!("unexpected {frame}"),
        }
    };
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(
        replayed,
        vec![json!(before)],
        "what there is, as a new joiner"
    );
    let live = writer.publish("f", json!(1)).await;
    assert_eq!(reader.expect("message").await["id"], live.as_str());
}

/// Joins "j" again with `last: 3`: `joined`'s `replayed`, and the data of
/// the messages sent before it.
async fn rejoin_last_3(reader: &mut Client) -> (Value, Vec<Value>) {
    reader
        .send(json!({"type":"join","room":"j","last":3,"ref":"again"}))
        .await;
    let mut sent = Vec::new();
    loop {
        let frame = reader.recv_reply().await;
        match frame["type"].as_str() {
            Some("message") => sent.push(frame["data"].clone()),
            Some("joined") => return (frame["replayed"].clone(), sent),
            _ => panic!("unexpected {frame}"),
        }
    }
}

async fn a_rejoin_counts_in_replayed_only_what_it_sends(topology: Topology) {
    let cluster = topology.start(&[]).await;
    let mut writer = cluster.connect("writer").await;
    for n in 0..3 {
        writer.publish("j", json!(n)).await;
    }
    let mut reader = cluster.connect("reader").await;
    reader.join("j").await;
    // The first join asked for no backlog: all three are new to it.
    assert_eq!(
        rejoin_last_3(&mut reader).await,
        (json!(3), vec![json!(0), json!(1), json!(2)])
    );
    // Each message reaches a connection once: nothing is sent again.
    assert_eq!(rejoin_last_3(&mut reader).await, (json!(0), vec![]));
}

conformance!(
    a_resume_from_past_every_id_is_not_recovered_and_live_messages_still_arrive,
    a_rejoin_counts_in_replayed_only_what_it_sends,
    messages_published_while_a_resume_is_replayed_arrive_once_and_in_order,
    a_client_resuming_with_since_gets_exactly_what_it_missed_in_order,
    resuming_from_before_trimmed_history_says_recovered_false,
    resuming_in_a_room_without_history_is_not_recovered,
    a_new_joiner_with_last_gets_the_latest_messages_first,
);
