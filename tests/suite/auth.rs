//! Identity and permissions: JWT on the upgrade (401 before any socket),
//! origins (403), token expiry on a live session (4001) and `refresh`.

use std::time::Duration;

use serde_json::json;

use crate::support::{refused_upgrade, token, unix_now, Client, Ending, TestNode};

const SECRET: &str = "test-secret-0123456789";

async fn jwt_node() -> TestNode {
    TestNode::start(&["--jwt-secret", SECRET, "--jwt-leeway", "0s"]).await
}

#[tokio::test]
async fn missing_forged_and_expired_tokens_get_401_with_a_reason() {
    let node = jwt_node().await;
    let (status, body) = refused_upgrade(&node.ws_url(""), &[]).await;
    assert_eq!(status, 401);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "unauthorized");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("token is required"));

    let forged = token("wrong-secret", json!({"sub":"alice","exp":unix_now()+60}));
    let (status, body) = refused_upgrade(&node.ws_url(&format!("token={forged}")), &[]).await;
    assert_eq!(status, 401);
    assert!(body.contains("signature"), "{body}");

    let expired = token(SECRET, json!({"sub":"alice","exp":unix_now()-10}));
    let (status, body) = refused_upgrade(&node.ws_url(&format!("token={expired}")), &[]).await;
    assert_eq!(status, 401);
    assert!(body.contains("expired"), "{body}");

    let (status, _) = refused_upgrade(&node.ws_url("user=alice"), &[]).await;
    assert_eq!(status, 401, "?user= means nothing once JWT is required");

    let stats = node.stats().await;
    assert_eq!(stats["connections_opened"], 0);
    assert_eq!(stats["upgrades_refused"]["missing_token"], 2, "{stats}");
}

#[tokio::test]
async fn a_valid_token_in_the_query_or_the_authorization_header_names_the_user() {
    let node = jwt_node().await;
    let t = token(SECRET, json!({"sub":"alice","exp":unix_now()+60}));
    let by_query = Client::connect(&node.ws_url(&format!("token={t}"))).await;
    assert_eq!(by_query.welcome["user"], "alice");
    let bearer = format!("Bearer {t}");
    let by_header =
        Client::connect_with(&node.ws_url("user=mallory"), &[("authorization", &bearer)]).await;
    assert_eq!(by_header.welcome["user"], "alice");
    // The scheme is case-insensitive (RFC 9110).
    let lower = format!("bearer {t}");
    let by_lower =
        Client::connect_with(&node.ws_url("user=mallory"), &[("authorization", &lower)]).await;
    assert_eq!(by_lower.welcome["user"], "alice");
}

#[tokio::test]
async fn token_permissions_limit_rooms_publishing_and_broadcast() {
    let node = jwt_node().await;
    let t = token(
        SECRET,
        json!({"sub":"viewer","exp":unix_now()+60,"rooms":["chat:*"],"publish":false}),
    );
    let mut viewer = Client::connect(&node.ws_url(&format!("token={t}"))).await;
    viewer.join("chat:1").await;
    viewer
        .send(json!({"type":"join","room":"admin","ref":1}))
        .await;
    assert_eq!(viewer.expect("error").await["code"], "forbidden");
    viewer
        .send(json!({"type":"publish","room":"chat:1","data":1,"ref":2}))
        .await;
    assert_eq!(viewer.expect("error").await["code"], "forbidden");
    viewer
        .send(json!({"type":"broadcast","data":1,"ref":3}))
        .await;
    let error = viewer.expect("error").await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_i64()),
        (Some("forbidden"), Some(3))
    );

    let admin = token(
        SECRET,
        json!({"sub":"root","exp":unix_now()+60,"broadcast":true}),
    );
    let mut admin = Client::connect(&node.ws_url(&format!("token={admin}"))).await;
    admin
        .send(json!({"type":"broadcast","data":"hello","ref":1}))
        .await;
    assert_eq!(viewer.expect("broadcast").await["from"], "root");
}

#[tokio::test]
async fn an_expiring_session_is_warned_then_closed_with_4001() {
    let node = jwt_node().await;
    let exp = unix_now() + 2;
    let t = token(SECRET, json!({"sub":"alice","exp":exp}));
    let mut client = Client::connect(&node.ws_url(&format!("token={t}"))).await;
    assert_eq!(client.recv().await, json!({"type":"expiring","exp":exp}));
    assert_eq!(client.expect_close().await, Ending::Closed(4001));
}

#[tokio::test]
async fn a_refresh_with_a_valid_token_for_the_same_user_keeps_the_session_open() {
    let node = jwt_node().await;
    // Within 30 s of exp, so `expiring` comes at once; 4 s leaves time for
    // the round trips below, and the wait below outlasts it.
    let short = token(SECRET, json!({"sub":"alice","exp":unix_now()+4}));
    let mut client = Client::connect(&node.ws_url(&format!("token={short}"))).await;
    client.expect("expiring").await;

    let other_user = token(SECRET, json!({"sub":"bob","exp":unix_now()+60}));
    client
        .send(json!({"type":"refresh","token":other_user,"ref":1}))
        .await;
    assert_eq!(client.expect("error").await["code"], "forbidden");
    client
        .send(json!({"type":"refresh","token":"garbage","ref":2}))
        .await;
    assert_eq!(client.expect("error").await["code"], "unauthorized");

    let exp = unix_now() + 60;
    let long = token(SECRET, json!({"sub":"alice","exp":exp}));
    client
        .send(json!({"type":"refresh","token":long,"ref":3}))
        .await;
    assert_eq!(
        client.expect("refreshed").await,
        json!({"type":"refreshed","exp":exp,"ref":3})
    );
    // Past the first token's exp: the refresh is what keeps the session open.
    client.expect_silence(Duration::from_secs(5)).await;
    client.send(json!({"type":"ping"})).await;
    client.expect("pong").await;
}

#[tokio::test]
async fn a_refresh_that_narrows_rooms_leaves_the_rooms_no_longer_allowed() {
    let node = jwt_node().await;
    let wide = token(SECRET, json!({"sub":"alice","exp":unix_now()+60}));
    let mut client = Client::connect(&node.ws_url(&format!("token={wide}"))).await;
    client.join("chat:1").await;
    client.join("secret").await;
    let narrow = token(
        SECRET,
        json!({"sub":"alice","exp":unix_now()+60,"rooms":["chat:*"]}),
    );
    client.send(json!({"type":"refresh","token":narrow})).await;
    let left = client.expect("left").await;
    assert_eq!(left["room"], "secret");
    assert!(left["reason"].as_str().is_some());
    client.expect("refreshed").await;
}

#[tokio::test]
async fn a_foreign_browser_origin_gets_403_and_clients_without_origin_are_accepted() {
    let node = TestNode::start(&["--allowed-origins", "https://app.example"]).await;
    let (status, body) = refused_upgrade(
        &node.ws_url("user=a"),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403);
    assert!(body.contains("ALLOWED_ORIGINS"), "{body}");
    Client::connect_with(&node.ws_url("user=a"), &[("origin", "https://app.example")]).await;
    Client::connect(&node.ws_url("user=a")).await;
}

#[tokio::test]
async fn dev_mode_refuses_an_invalid_user_name_with_400() {
    let node = TestNode::start(&[]).await;
    let (status, body) = refused_upgrade(&node.ws_url("user=has%20space"), &[]).await;
    assert_eq!(status, 400);
    assert!(body.contains("user names"), "{body}");
    let guest = Client::connect(&node.ws_url("")).await;
    assert!(guest.welcome["user"]
        .as_str()
        .unwrap()
        .starts_with("guest-"));
}
