//! Start-up checks and graceful shutdown: draining closes clients with 1012
//! and the process exits.

use std::time::Duration;

use crate::support::{http_get, refused_upgrade, Client, Ending, NodeProcess, RawSocket, TestNode};

#[tokio::test]
async fn sigterm_closes_every_client_with_1012_and_the_process_exits() {
    let mut process = NodeProcess::spawn(&["--drain-timeout", "1s"]);
    let url = format!("ws://{}/ws?user=", process.addr);
    let mut clients = Vec::new();
    for n in 0..5 {
        clients.push(Client::connect(&format!("{url}u{n}")).await);
    }
    process.signal("TERM");
    for client in &mut clients {
        assert_eq!(client.expect_close().await, Ending::Closed(1012));
    }
    assert_eq!(process.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn a_draining_node_is_not_ready_and_refuses_new_upgrades_with_503() {
    let node = TestNode::start(&["--drain-timeout", "3s"]).await;
    let addr = node.addr;
    // Closes are spread over the drain window, so some clients stay open
    // while the checks below run.
    let mut clients = Vec::new();
    for n in 0..20 {
        clients.push(node.connect(&format!("stays-{n}")).await);
    }
    let draining = tokio::spawn(node.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"draining\":true"), "{body}");
    let (status, _) = refused_upgrade(&format!("ws://{addr}/ws?user=late"), &[]).await;
    assert_eq!(status, 503);
    for client in &mut clients {
        assert_eq!(client.expect_close().await, Ending::Closed(1012));
    }
    draining.await.unwrap();
}

#[test]
fn dev_mode_on_a_public_address_refuses_to_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["--bind", "0.0.0.0:0"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--insecure"), "{stderr}");
}

#[tokio::test]
async fn a_clients_close_frame_is_answered_with_its_code_and_a_codeless_one_with_none() {
    let node = TestNode::start(&[]).await;
    let mut with_code = RawSocket::connect(node.addr, "/ws?user=amy").await;
    with_code
        .send_frame(true, 0x8, &1000u16.to_be_bytes(), true)
        .await;
    assert_eq!(
        with_code.close_payload().await,
        Some(1000u16.to_be_bytes().to_vec())
    );

    let mut codeless = RawSocket::connect(node.addr, "/ws?user=bob").await;
    codeless.send_frame(true, 0x8, &[], true).await;
    assert_eq!(
        codeless.close_payload().await,
        Some(Vec::new()),
        "1005 (no status) is answered with an empty close frame, never sent as a code"
    );
    // Counted by the code the client sent.
    node.wait_for_stats(|s| s["closes"]["1000"] == 1 && s["closes"]["1005"] == 1)
        .await;
    node.shutdown().await;
}
