//! Hostile input against a live node with JWT auth: every attack gets its
//! documented answer (an HTTP status before any socket, an `error` frame, or
//! a close code), and after each one a bystander in the same room still gets
//! every message, in order.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};

use crate::support::{
    fetch_ticket, http_get, http_request, refused_upgrade, token, unix_now, Client, Ending,
    RawSocket, TestNode,
};

const SECRET: &str = "hostile-test-secret";
const API_KEY: &str = "api-key-0123456789abcdef";
const ORIGIN: &str = "https://app.example";

/// A node with small limits, and a speaker and a watcher in room `watch`.
struct Arena {
    node: TestNode,
    speaker: Client,
    watcher: Client,
    sent: u64,
}

fn jwt(claims: Value) -> String {
    token(SECRET, claims)
}

fn user_token(user: &str) -> String {
    jwt(json!({"sub": user, "exp": unix_now() + 300}))
}

impl Arena {
    async fn new() -> Arena {
        let node = TestNode::start(&[
            "--jwt-secret",
            SECRET,
            "--jwt-leeway",
            "0s",
            "--allowed-origins",
            ORIGIN,
            "--api-keys",
            API_KEY,
            "--max-message-bytes",
            "4096",
            "--rate-limit",
            "50",
            "--rate-burst",
            "50",
            "--max-rooms-per-connection",
            "5",
            "--max-connections-per-user",
            "5",
        ])
        .await;
        let mut speaker = node.connect_with_token(&user_token("speaker")).await;
        let mut watcher = node.connect_with_token(&user_token("watcher")).await;
        speaker.join("watch").await;
        watcher.join("watch").await;
        Arena {
            node,
            speaker,
            watcher,
            sent: 0,
        }
    }

    /// The bystanders are unharmed: the next message arrives, and it is the
    /// next one.
    async fn bystander_still_served(&mut self, case: &str) {
        self.sent += 1;
        let n = self.sent;
        self.speaker
            .send(json!({"type":"publish","room":"watch","data":n}))
            .await;
        loop {
            let frame = self.watcher.recv().await;
            if frame["type"] == "message" {
                assert_eq!(frame["data"], n, "after {case}: {frame}");
                assert_eq!(frame["from"], "speaker");
                return;
            }
        }
    }

    fn ws(&self, query: &str) -> String {
        self.node.ws_url(query)
    }

    async fn attacker(&self, user: &str) -> Client {
        self.node.connect_with_token(&user_token(user)).await
    }
}

/// (case, URL, headers, expected status)
type UpgradeCase<'a> = (&'a str, String, Vec<(&'a str, String)>, u16);
/// (case, headers, body, expected status)
type ApiCase<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, u16);

async fn expect_error(client: &mut Client, frame: Value, code: &str) -> Value {
    client.send(frame).await;
    let error = client.expect("error").await;
    assert_eq!(error["code"], code, "{error}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_before_any_socket_exists() {
    let mut arena = Arena::new().await;
    let now = unix_now();
    let other_key = token("another-secret", json!({"sub":"eve","exp":now+300}));
    let hs384 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
        &json!({"sub":"eve","exp":now+300}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    // {"alg":"none"} with a valid-looking body and no signature.
    let none = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        jwt(json!({"sub":"eve","exp":now+300}))
            .split('.')
            .nth(1)
            .unwrap()
    );
    let cases: Vec<UpgradeCase> = vec![
        ("no token", arena.ws(""), vec![], 401),
        ("garbage token", arena.ws("token=not.a.jwt"), vec![], 401),
        (
            "expired token",
            arena.ws(&format!("token={}", jwt(json!({"sub":"eve","exp":now-60})))),
            vec![],
            401,
        ),
        (
            "token signed with another key",
            arena.ws(&format!("token={other_key}")),
            vec![],
            401,
        ),
        (
            "token with another algorithm",
            arena.ws(&format!("token={hs384}")),
            vec![],
            401,
        ),
        ("alg none", arena.ws(&format!("token={none}")), vec![], 401),
        (
            "token without sub",
            arena.ws(&format!("token={}", jwt(json!({"exp":now+300})))),
            vec![],
            401,
        ),
        (
            "token without exp",
            arena.ws(&format!("token={}", jwt(json!({"sub":"eve"})))),
            vec![],
            401,
        ),
        (
            "sub with spaces",
            arena.ws(&format!(
                "token={}",
                jwt(json!({"sub":"e v e","exp":now+300}))
            )),
            vec![],
            401,
        ),
        (
            "?user= instead of a token",
            arena.ws("user=admin"),
            vec![],
            401,
        ),
        (
            "Basic instead of Bearer",
            arena.ws(""),
            vec![("authorization", format!("Basic {}", user_token("eve")))],
            401,
        ),
        (
            "foreign Origin",
            arena.ws(&format!("token={}", user_token("eve"))),
            vec![("origin", "https://evil.example".into())],
            403,
        ),
        (
            "Origin null",
            arena.ws(&format!("token={}", user_token("eve"))),
            vec![("origin", "null".into())],
            403,
        ),
        ("unknown ticket", arena.ws("ticket=deadbeef"), vec![], 401),
    ];
    for (case, url, headers, status) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (got, body) = refused_upgrade(&url, &headers).await;
        assert_eq!(got, status, "{case}: {body}");
        let body: Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{case}: JSON body"));
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{case}: {body}"
        );
        arena.bystander_still_served(case).await;
    }
    assert_eq!(arena.node.stats().await["connections_opened"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_works_once_a_user_cannot_hoard_them_and_the_api_refuses_bad_keys_and_bodies() {
    let mut arena = Arena::new().await;
    let addr = arena.node.addr;
    let ticket = fetch_ticket(addr, &user_token("eve")).await;
    let url = arena.ws(&format!("ticket={ticket}"));
    let eve = Client::connect(&url).await;
    assert_eq!(eve.welcome["user"], "eve");
    let (status, _) = refused_upgrade(&url, &[]).await;
    assert_eq!(status, 401, "ticket reuse");
    arena.bystander_still_served("ticket reuse").await;

    let expired = format!("Bearer {}", jwt(json!({"sub":"eve","exp":unix_now()-5})));
    for (case, headers, status) in [
        ("ticket without a token", vec![], 401),
        (
            "ticket for an expired token",
            vec![("authorization", expired.as_str())],
            401,
        ),
    ] {
        let (got, body) = http_request(addr, "POST", "/auth/ticket", &headers, "").await;
        assert_eq!(got, status, "{case}: {body}");
        arena.bystander_still_served(case).await;
    }
    // One user asking for tickets in a loop is limited, alone.
    let hoarder = format!("Bearer {}", user_token("hoarder"));
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let headers = [("authorization", hoarder.as_str())];
        statuses.push(
            http_request(addr, "POST", "/auth/ticket", &headers, "")
                .await
                .0,
        );
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    fetch_ticket(addr, &user_token("eve")).await;

    let good_key = format!("Bearer {API_KEY}");
    let wrong_key = format!("Bearer {API_KEY}x");
    let api_cases: Vec<ApiCase> = vec![
        (
            "API without a key",
            vec![],
            r#"{"room":"watch","data":1}"#,
            401,
        ),
        (
            "API with a wrong key",
            vec![("authorization", &wrong_key)],
            r#"{"room":"watch","data":1}"#,
            401,
        ),
        (
            "API with malformed JSON",
            vec![("authorization", &good_key)],
            r#"{"room":"watch","data":"#,
            400,
        ),
        (
            "API with room and to",
            vec![("authorization", &good_key)],
            r#"{"room":"watch","to":"eve","data":1}"#,
            400,
        ),
        (
            "API with a bad room",
            vec![("authorization", &good_key)],
            r#"{"room":"a b","data":1}"#,
            400,
        ),
        (
            "API with an unknown field",
            vec![("authorization", &good_key)],
            r#"{"room":"watch","data":1,"admin":true}"#,
            400,
        ),
        (
            "API direct to nobody",
            vec![("authorization", &good_key)],
            r#"{"to":"nobody","data":1}"#,
            404,
        ),
    ];
    for (case, headers, body, status) in api_cases {
        let (got, answer) = http_request(addr, "POST", "/api/publish", &headers, body).await;
        assert_eq!(got, status, "{case}: {answer}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert!(answer["error"].is_string(), "{case}: {answer}");
        arena.bystander_still_served(case).await;
    }
    // And the API works with the right key: the watcher sees the message.
    let (status, answer) = http_request(
        addr,
        "POST",
        "/api/publish",
        &[("authorization", &good_key)],
        r#"{"room":"watch","data":"from the backend"}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let id = serde_json::from_str::<Value>(&answer).unwrap()["id"].clone();
    let message = loop {
        let frame = arena.watcher.recv().await;
        if frame["type"] == "message" {
            break frame;
        }
    };
    assert_eq!(
        (message["id"].clone(), message["from"].clone()),
        (id, json!("server"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_their_documented_answer_and_harm_nobody() {
    let mut arena = Arena::new().await;
    let mut eve = arena.attacker("eve").await;
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let frames: Vec<(&str, Value, &str)> = vec![
        (
            "unknown type",
            json!({"type":"admin","ref":1}),
            "bad_request",
        ),
        ("no type", json!({"room":"watch"}), "bad_request"),
        ("type not a string", json!({"type":7}), "bad_request"),
        (
            "room with a control character",
            json!({"type":"join","room":"wa\u{7}tch"}),
            "bad_request",
        ),
        (
            "room name of 2,000 characters",
            json!({"type":"join","room":"r".repeat(2000)}),
            "bad_request",
        ),
        (
            "malformed since",
            json!({"type":"join","room":"watch","since":"yesterday"}),
            "bad_request",
        ),
        (
            "ref of 300 bytes",
            json!({"type":"ping","ref":"r".repeat(300)}),
            "bad_request",
        ),
        (
            "key of 200 bytes",
            json!({"type":"publish","room":"watch","data":1,"key":"k".repeat(200)}),
            "bad_request",
        ),
        (
            "direct to a name with a NUL",
            json!({"type":"direct","to":"a\u{0}b","data":1}),
            "bad_request",
        ),
        (
            "direct to nobody",
            json!({"type":"direct","to":"nobody","data":1}),
            "not_found",
        ),
        (
            "leave a room never joined",
            json!({"type":"leave","room":"elsewhere"}),
            "not_found",
        ),
        (
            "broadcast without permission",
            json!({"type":"broadcast","data":"spam"}),
            "forbidden",
        ),
        (
            "refresh for another user",
            json!({"type":"refresh","token":user_token("speaker")}),
            "forbidden",
        ),
        (
            "refresh with garbage",
            json!({"type":"refresh","token":"garbage"}),
            "unauthorized",
        ),
    ];
    for (case, frame, code) in frames {
        expect_error(&mut eve, frame, code).await;
        arena.bystander_still_served(case).await;
    }
    eve.send_text(&format!(
        r#"{{"type":"publish","room":"watch","data":{deep}}}"#
    ))
    .await;
    assert_eq!(eve.expect("error").await["code"], "bad_request");
    arena.bystander_still_served("deep nesting").await;
    eve.send_text("{not json").await;
    assert_eq!(eve.expect("error").await["code"], "bad_request");
    arena.bystander_still_served("malformed JSON").await;

    // A forged `from` is ignored: the message carries eve's name.
    eve.send(json!({"type":"publish","room":"watch","data":"hi","from":"speaker"}))
        .await;
    let forged = loop {
        let frame = arena.watcher.recv().await;
        if frame["type"] == "message" {
            break frame;
        }
    };
    assert_eq!(forged["from"], "eve");
    arena.bystander_still_served("forged from").await;

    // Idempotency keys are the sender's: eve cannot pre-empt the speaker's key.
    eve.send(json!({"type":"publish","room":"watch","data":"shadow","key":"k-1"}))
        .await;
    arena.sent += 1;
    let speaker_n = arena.sent;
    arena
        .speaker
        .send(json!({"type":"publish","room":"watch","data":speaker_n,"key":"k-1"}))
        .await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let frame = arena.watcher.recv().await;
        if frame["type"] == "message" {
            seen.push((frame["from"].clone(), frame["data"].clone()));
        }
    }
    // Two senders: either may come first; both are delivered.
    seen.sort_by_key(|(from, _)| from.to_string());
    assert_eq!(
        seen,
        vec![
            (json!("eve"), json!("shadow")),
            (json!("speaker"), json!(speaker_n))
        ]
    );
    arena
        .bystander_still_served("a borrowed idempotency key")
        .await;

    // Too many rooms.
    for room in ["a", "b", "c", "d", "e"] {
        eve.join(room).await;
    }
    expect_error(&mut eve, json!({"type":"join","room":"f"}), "bad_request").await;
    arena.bystander_still_served("a sixth room").await;

    // Permissions from the token.
    let limited =
        jwt(json!({"sub":"viewer","exp":unix_now()+300,"rooms":["public:*"],"publish":false}));
    let mut viewer = arena.node.connect_with_token(&limited).await;
    for (case, frame) in [
        ("join outside rooms", json!({"type":"join","room":"watch"})),
        (
            "read-only publish",
            json!({"type":"publish","room":"public:1","data":1}),
        ),
        (
            "read-only direct",
            json!({"type":"direct","to":"speaker","data":1}),
        ),
        (
            "presence outside rooms",
            json!({"type":"presence","room":"watch"}),
        ),
    ] {
        expect_error(&mut viewer, frame, "forbidden").await;
        arena.bystander_still_served(case).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_websocket_framing_closes_only_the_offender() {
    let mut arena = Arena::new().await;
    let addr = arena.node.addr;
    let path = |user: &str| format!("/ws?token={}", user_token(user));

    let mut raw = RawSocket::connect(addr, &path("eve")).await;
    raw.send_frame(true, 0x1, &[0x66, 0xff, 0xfe], true).await;
    assert_eq!(raw.close_code().await, Some(1007), "invalid UTF-8");
    arena.bystander_still_served("invalid UTF-8").await;

    let mut raw = RawSocket::connect(addr, &path("eve")).await;
    raw.send_header(true, 0x1, 10 * 1024 * 1024, true).await;
    assert_eq!(raw.close_code().await, Some(1009), "a 10 MiB frame");
    arena.bystander_still_served("a 10 MiB frame").await;

    let mut raw = RawSocket::connect(addr, &path("eve")).await;
    raw.send_frame(false, 0x1, &[b'x'; 1000], true).await;
    for _ in 0..10 {
        raw.send_frame(false, 0x0, &[b'x'; 1000], true).await;
    }
    assert_eq!(
        raw.close_code().await,
        Some(1009),
        "fragments past the size limit"
    );
    arena
        .bystander_still_served("fragments past the size limit")
        .await;

    let mut raw = RawSocket::connect(addr, &path("eve")).await;
    raw.send_frame(true, 0x1, br#"{"type":"ping"}"#, false)
        .await;
    assert_eq!(
        raw.close_code().await,
        Some(1002),
        "an unmasked client frame"
    );
    arena.bystander_still_served("an unmasked frame").await;

    let mut raw = RawSocket::connect(addr, &path("eve")).await;
    raw.send_frame(true, 0x9, &[0u8; 200], true).await;
    assert_eq!(raw.close_code().await, Some(1002), "a ping of 200 bytes");
    arena.bystander_still_served("an oversized ping").await;

    let mut raw = RawSocket::connect(addr, &path("eve")).await;
    raw.send_frame(true, 0x3, b"?", true).await;
    assert_eq!(raw.close_code().await, Some(1002), "a reserved opcode");
    arena.bystander_still_served("a reserved opcode").await;

    let mut eve = arena.attacker("eve").await;
    eve.send_text(&"x".repeat(5000)).await;
    assert_eq!(eve.expect_close().await, Ending::Closed(1009));
    arena
        .bystander_still_served("a frame over MAX_MESSAGE_BYTES")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_and_connection_hoarding_are_cut_off() {
    let mut arena = Arena::new().await;
    let mut flooder = arena.attacker("flooder").await;
    for n in 0..10_000 {
        let join = json!({"type":"join","room":format!("room-{n}")}).to_string();
        let sent = tokio::time::timeout(Duration::from_secs(1), flooder.try_send_text(&join)).await;
        if !matches!(sent, Ok(true)) {
            break;
        }
        if n % 500 == 0 {
            arena.bystander_still_served("10,000 joins").await;
        }
    }
    // Rate-limited errors queued behind the close may not reach a flooder
    // that is being cut off; the close code always does, and the node counts both.
    assert_eq!(flooder.expect_close().await, Ending::Closed(4029));
    let stats = arena.node.stats().await;
    assert!(
        stats["errors"]["rate_limited"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    arena.bystander_still_served("a join flood").await;

    // 50 connections of one user: 5 are allowed, the rest get 429.
    let url = arena.ws(&format!("token={}", user_token("hoarder")));
    let attempts = (0..50).map(|_| {
        let url = url.clone();
        async move {
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok((socket, _)) => Ok(socket),
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    Err(response.status().as_u16())
                }
                Err(other) => panic!("{other}"),
            }
        }
    });
    let results = join_all(attempts).await;
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<u16> = results
        .iter()
        .filter_map(|r| r.as_ref().err().copied())
        .collect();
    assert_eq!(accepted, 5);
    assert!(refused.iter().all(|s| *s == 429), "{refused:?}");
    arena.bystander_still_served("connection hoarding").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_storm_is_paced_with_503_and_retry_after() {
    let node = TestNode::start(&["--upgrade-rate", "10"]).await;
    let mut watcher = node.connect("watcher").await;
    watcher.join("watch").await;
    let mut speaker = node.connect("speaker").await;
    let attempts = (0..200).map(|n| {
        let url = node.ws_url(&format!("user=storm-{n}"));
        async move {
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok((socket, _)) => (101, Some(socket), true),
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => (
                    response.status().as_u16(),
                    None,
                    response.headers().get("retry-after").is_some(),
                ),
                Err(other) => panic!("{other}"),
            }
        }
    });
    let results = join_all(attempts).await;
    let accepted = results.iter().filter(|(s, _, _)| *s == 101).count();
    let paced = results
        .iter()
        .filter(|(s, _, retry_after)| *s == 503 && *retry_after)
        .count();
    assert_eq!(
        accepted + paced,
        200,
        "every refusal is a 503 with Retry-After"
    );
    assert!(paced >= 150, "a burst of 20 then 10/s: {accepted} accepted");
    let stats = node.stats().await;
    assert!(stats["upgrades_refused"]["upgrade_rate"].as_u64().unwrap() >= 150);
    speaker.publish("watch", json!("still here")).await;
    assert_eq!(watcher.expect("message").await["data"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_counts_only_from_a_trusted_proxy_every_line_and_ipv6_per_64() {
    let node = TestNode::start(&[
        "--trusted-proxies",
        "127.0.0.1",
        "--max-connections-per-ip",
        "2",
    ])
    .await;
    let url = node.ws_url("user=u");
    let behind = |ip: &'static str| [("x-forwarded-for", ip)];
    let _a = Client::connect_with(&url, &behind("198.51.100.1")).await;
    let _b = Client::connect_with(&url, &behind("198.51.100.1")).await;
    let (status, _) = refused_upgrade(&url, &behind("198.51.100.1")).await;
    assert_eq!(status, 429);
    let _c = Client::connect_with(&url, &behind("198.51.100.2")).await;
    // Spoofing one more hop in front does not help: the proxy's own entry counts.
    let (status, _) = refused_upgrade(&url, &behind("10.9.9.9, 198.51.100.1")).await;
    assert_eq!(status, 429);

    // The client wrote the first line; the proxy appended the second.
    let appended = |spoof: &'static str| {
        [
            ("x-forwarded-for", spoof),
            ("x-forwarded-for", "198.51.100.3"),
        ]
    };
    let _a2 = Client::connect_with(&url, &appended("203.0.113.1")).await;
    let _b2 = Client::connect_with(&url, &appended("203.0.113.2")).await;
    let (status, _) = refused_upgrade(&url, &appended("203.0.113.3")).await;
    assert_eq!(status, 429, "the proxy's line names the client");

    // Addresses of one IPv6 /64 are one client; so are both spellings of
    // an IPv4 address.
    let _v6a = Client::connect_with(&url, &behind("2001:db8:1:2::1")).await;
    let _v6b = Client::connect_with(&url, &behind("2001:db8:1:2::2")).await;
    let (status, _) = refused_upgrade(&url, &behind("2001:db8:1:2::3")).await;
    assert_eq!(status, 429, "a third address of the same /64");
    let _v6c = Client::connect_with(&url, &behind("2001:db8:1:3::1")).await;
    let _v4a = Client::connect_with(&url, &behind("198.51.100.9")).await;
    let _v4b = Client::connect_with(&url, &behind("198.51.100.9")).await;
    let (status, _) = refused_upgrade(&url, &behind("::ffff:198.51.100.9")).await;
    assert_eq!(status, 429, "an IPv4-mapped spelling of a full address");

    // Without TRUSTED_PROXIES the header means nothing: the peer address counts.
    let direct = TestNode::start(&["--max-connections-per-ip", "2"]).await;
    let url = direct.ws_url("user=u");
    let _d = Client::connect_with(&url, &behind("203.0.113.1")).await;
    let _e = Client::connect_with(&url, &behind("203.0.113.2")).await;
    let (status, _) = refused_upgrade(&url, &behind("203.0.113.3")).await;
    assert_eq!(
        status, 429,
        "a forged X-Forwarded-For from an untrusted peer is ignored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_its_connection_limit_does_not_spend_the_upgrade_budget() {
    let node = TestNode::start(&[
        "--jwt-secret",
        SECRET,
        "--upgrade-rate",
        "5",
        "--max-connections-per-user",
        "1",
    ])
    .await;
    let token_of = |user: &str| jwt(json!({"sub": user, "exp": unix_now() + 300}));
    let mallory = node.ws_url(&format!("token={}", token_of("mallory")));
    let _held = Client::connect(&mallory).await;
    for _ in 0..30 {
        assert_eq!(refused_upgrade(&mallory, &[]).await.0, 429);
    }
    let alice = node.ws_url(&format!("token={}", token_of("alice")));
    let _alice = Client::connect(&alice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_reconnecting_in_a_loop_is_paced_alone() {
    let node = TestNode::start(&[]).await;
    let looper = node.ws_url("user=looper");
    let mut refused = 0;
    for _ in 0..80 {
        match tokio_tungstenite::connect_async(looper.as_str()).await {
            Ok((socket, _)) => drop(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 429);
                assert!(response.headers().get("retry-after").is_some());
                refused += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(refused >= 20, "a burst of 50, then 5/s: {refused} refused");
    let _alice = node.connect("alice").await;
    let stats = node.stats().await;
    assert_eq!(stats["upgrades_refused"]["user_rate"], refused, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_upgrade_rate_still_admits_an_upgrade() {
    let node = TestNode::start(&["--upgrade-rate", "0.4"]).await;
    let _client = node.connect("u").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_publish_is_refused_unread_and_a_body_that_never_arrives_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start(&["--api-keys", API_KEY, "--http-header-timeout", "1s"]).await;
    let (status, answer) =
        http_request(node.addr, "POST", "/api/publish", &[], &"x".repeat(70_000)).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer.starts_with('{'), "a JSON error: {answer}");

    let mut socket = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Length: 60000\r\n\r\n{{\"room\":"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let ended =
        tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer)).await;
    assert!(ended.is_ok(), "the connection was still open after 10 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_that_never_reads_its_responses_is_closed_after_the_connection_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start(&["--http-connection-timeout", "2s"]).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(node.addr).await.unwrap();
    const REQUESTS: usize = 300; // some 8 MB of client.js
    let requests = "GET /client.js HTTP/1.1\r\nHost: x\r\n\r\n".repeat(REQUESTS);
    stream.write_all(requests.as_bytes()).await.unwrap();
    // Past the connection timeout and its 3 s grace, without reading.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut received = Vec::new();
    let ended =
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut received)).await;
    assert!(ended.is_ok(), "still open after 36 s");
    let answered = received
        .windows(15)
        .filter(|w| *w == b"HTTP/1.1 200 OK")
        .count();
    assert!(
        answered < REQUESTS,
        "all {answered} answers were kept for a client that did not read"
    );
    let (status, _) = http_get(node.addr, "/healthz").await;
    assert_eq!(status, 200, "others are served as usual");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_outlives_the_http_connection_timeout() {
    let node = TestNode::start(&["--http-connection-timeout", "1s"]).await;
    let mut client = node.connect("long").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.send(json!({"type":"ping","ref":1})).await;
    assert_eq!(client.expect("pong").await["ref"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_racing_a_reconnect_leaves_both_sessions_valid() {
    let node = TestNode::start(&["--jwt-secret", SECRET, "--jwt-leeway", "0s"]).await;
    let short = jwt(json!({"sub":"alice","exp":unix_now()+10}));
    let mut old = node.connect_with_token(&short).await;
    old.expect("expiring").await;
    let fresh = jwt(json!({"sub":"alice","exp":unix_now()+300}));
    old.send(json!({"type":"refresh","token":fresh,"ref":1}))
        .await;
    let (mut new, refreshed) =
        tokio::join!(node.connect_with_token(&fresh), old.expect("refreshed"));
    assert_eq!(refreshed["ref"], 1);
    new.join("r").await;
    old.join("r").await;
    let id = new.publish("r", json!("both")).await;
    let got = loop {
        let frame = old.recv().await;
        if frame["type"] == "message" {
            break frame;
        }
    };
    assert_eq!(got["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mutated_frames_never_break_the_node() {
    let node = TestNode::start(&["--rate-limit", "100000", "--rate-burst", "100000"]).await;
    let mut watcher = node.connect("watcher").await;
    watcher.join("fuzz").await;
    let mut fuzzer = node.connect("fuzzer").await;
    let seeds = [
        r#"{"type":"join","room":"fuzz","since":"1-0","ref":1}"#,
        r#"{"type":"publish","room":"fuzz","data":{"a":[1,2,{"b":null}]},"key":"k"}"#,
        r#"{"type":"direct","to":"watcher","data":"x"}"#,
        r#"{"type":"presence","room":"fuzz"}"#,
        r#"{"type":"leave","room":"fuzz"}"#,
        r#"{"type":"refresh","token":"a.b.c"}"#,
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..1000 {
        let mut bytes = seeds[rng.usize(..seeds.len())].as_bytes().to_vec();
        for _ in 0..rng.usize(1..6) {
            match rng.u8(..4) {
                0 if !bytes.is_empty() => {
                    let at = rng.usize(..bytes.len());
                    bytes[at] = rng.u8(32..127);
                }
                1 if !bytes.is_empty() => {
                    bytes.remove(rng.usize(..bytes.len()));
                }
                2 => bytes.insert(
                    rng.usize(..=bytes.len()),
                    b"{}[]\",:\\0123"[rng.usize(..12)],
                ),
                _ => bytes.extend_from_slice(b"\"}"),
            }
        }
        let text = String::from_utf8_lossy(&bytes).to_string();
        fuzzer.send_text(&text).await;
    }
    fuzzer.send(json!({"type":"ping","ref":"done"})).await;
    loop {
        let frame = fuzzer.recv().await;
        if frame["type"] == "pong" && frame["ref"] == "done" {
            break;
        }
    }
    let mut speaker = node.connect("speaker").await;
    let id = speaker.publish("fuzz", json!("after the fuzz")).await;
    loop {
        let frame = watcher.recv().await;
        if frame["type"] == "message" && frame["id"] == id.as_str() {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_a_request_are_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let node = TestNode::start(&["--http-header-timeout", "1s"]).await;
    let started = std::time::Instant::now();
    let silent = TcpStream::connect(node.addr).await.unwrap();
    let mut partial = TcpStream::connect(node.addr).await.unwrap();
    partial
        .write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A whole request, answered, then nothing: an idle keep-alive connection.
    let mut idle = TcpStream::connect(node.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    for mut socket in [silent, partial, idle] {
        let mut chunk = [0u8; 4096];
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a socket was still open after 10 s");
    }
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "the idle connection got its answer first"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before the timeout",
        started.elapsed()
    );
    // Whoever completes a request in time is served as usual.
    let (status, _) = http_get(node.addr, "/healthz").await;
    assert_eq!(status, 200);
}
