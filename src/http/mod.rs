//! The node's HTTP surface: the WebSocket upgrade at `/ws` (origin and
//! identity checked before any socket exists), health and readiness, `/stats`
//! (JSON) and `/metrics` (Prometheus), and the pages a browser opens: the
//! demo chat at `/` (with `/client.js`), `/dashboard` and `/console`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::auth::{AuthError, Credentials, Identity};
use crate::limits;
use crate::node::NodeState;
use crate::session;
use upgrade::WebSocketUpgrade;

mod api;
pub(crate) mod monitoring;
mod upgrade;

pub fn router(state: Arc<NodeState>) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/stats", get(monitoring::stats))
        .route("/metrics", get(monitoring::metrics))
        .route("/", get(|| page(include_str!("../../static/index.html"))))
        .route(
            "/dashboard",
            get(|| page(include_str!("../../static/dashboard.html"))),
        )
        .route(
            "/console",
            get(|| page(include_str!("../../static/console.html"))),
        )
        .route("/client.js", get(client_js))
        .route("/auth/ticket", post(api::ticket))
        // The handler reads the body itself, after the key check, bounded.
        .route("/api/publish", post(api::publish))
        .with_state(state)
}

/// Every X-Forwarded-For line, in order, as one list: a proxy may append a
/// line of its own rather than extend the client's. A line that is not text
/// stays in place as an entry no address parses from.
fn forwarded_for(headers: &HeaderMap) -> Option<String> {
    let lines: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|line| line.to_str().unwrap_or("?"))
        .collect();
    (!lines.is_empty()).then(|| lines.join(","))
}

/// A JSON error body: `{"error": code, "message": text}`.
pub(crate) fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "message": message.into()})),
    )
        .into_response()
}

async fn upgrade(
    State(node): State<Arc<NodeState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let retry_soon = |mut response: Response| {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        response
    };
    if node.is_draining() {
        node.stats.upgrade_refused("draining");
        return retry_soon(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this node is draining; connect to another one",
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        if !origin_allowed(&node.config.allowed_origins, origin.to_str().unwrap_or("")) {
            node.stats.upgrade_refused("origin");
            return refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this Origin is not in ALLOWED_ORIGINS",
            );
        }
    }
    let forwarded_for = forwarded_for(&headers);
    let client_ip = limits::client_ip(peer.ip(), forwarded_for.as_deref(), &node.trusted_proxies);
    let Some(ip_slot) = node
        .connections_per_ip
        .admit(limits::address_key(client_ip))
    else {
        node.stats.upgrade_refused("ip_limit");
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many connections from this address (MAX_CONNECTIONS_PER_IP)",
        );
    };
    let identity = match identify(&node, &query, &headers).await {
        Ok(identity) => identity,
        Err((status, reason, message)) => {
            node.stats.upgrade_refused(reason);
            let code = match status {
                StatusCode::BAD_REQUEST => "bad_request",
                StatusCode::SERVICE_UNAVAILABLE => "unavailable",
                _ => "unauthorized",
            };
            return refuse(status, code, message);
        }
    };
    let Some(user_slot) = node.connections_per_user.admit(identity.user.clone()) else {
        node.stats.upgrade_refused("user_limit");
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many connections for this user (MAX_CONNECTIONS_PER_USER)",
        );
    };
    let now = tokio::time::Instant::now();
    if !node.upgrades_per_user.try_take(&identity.user, now) {
        node.stats.upgrade_refused("user_rate");
        return retry_soon(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many new connections for this user right now; retry shortly",
        ));
    }
    // Paced last, after authentication and the per-address and per-user
    // limits: junk upgrades, and a user or address over its limit, cannot
    // use up the budget that real clients reconnecting after a failure need.
    let admitted = node
        .upgrades
        .lock()
        .map(|mut bucket| bucket.try_take(now))
        .unwrap_or(false);
    if !admitted {
        node.stats.upgrade_refused("upgrade_rate");
        return retry_soon(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "too many new connections right now (UPGRADE_RATE); retry shortly",
        ));
    }
    let (response, on_upgrade) = upgrade.accept();
    tokio::spawn(session::serve(
        on_upgrade,
        node,
        identity,
        client_ip,
        (ip_slot, user_slot),
    ));
    response
}

/// Who is connecting: from a ticket, a token (query or Bearer), or, in dev
/// mode, `?user=`. Errors carry the status, a stats label and the reason.
async fn identify(
    node: &NodeState,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Identity, (StatusCode, &'static str, String)> {
    let ticket_token;
    let token = match query.get("ticket") {
        Some(ticket) => {
            ticket_token = node.broker.take_ticket(ticket).await.map_err(|err| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "broker_down",
                    err.to_string(),
                )
            })?;
            let token = ticket_token.as_deref().ok_or((
                StatusCode::UNAUTHORIZED,
                "bad_ticket",
                "unknown, used or expired ticket".to_string(),
            ))?;
            Some(token)
        }
        None => query
            .get("token")
            .map(String::as_str)
            .or_else(|| bearer(headers)),
    };
    let credentials = Credentials {
        token,
        user: query.get("user").map(String::as_str),
    };
    node.auth.authenticate(credentials).map_err(|err| {
        let (status, reason) = match err {
            AuthError::BadUser(_) if node.auth.is_dev() => (StatusCode::BAD_REQUEST, "bad_user"),
            AuthError::Missing => (StatusCode::UNAUTHORIZED, "missing_token"),
            AuthError::Expired => (StatusCode::UNAUTHORIZED, "expired_token"),
            _ => (StatusCode::UNAUTHORIZED, "invalid_token"),
        };
        (status, reason, err.to_string())
    })
}

/// The token of an `Authorization: Bearer` header (the scheme in any case,
/// as RFC 9110 has it).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    allowed.is_empty()
        || allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(node): State<Arc<NodeState>>) -> Response {
    let ready = node.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "draining": node.is_draining(),
        "broker": node.broker.state(),
    });
    (status, Json(body)).into_response()
}

async fn page(html: &'static str) -> Response {
    Html(html).into_response()
}

async fn client_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../static/client.js"),
    )
        .into_response()
}
