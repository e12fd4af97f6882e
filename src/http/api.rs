//! HTTP endpoints for servers and browsers around the WebSocket:
//! `POST /auth/ticket` trades a JWT for a short-lived single-use ticket (so
//! tokens stay out of URLs and proxy logs), and `POST /api/publish` lets a
//! backend publish to a room, a user or everybody with an API key.

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::{bearer, refuse};
use crate::auth::{key_matches, random_ticket, TICKET_TTL};
use crate::broker::Channel;
use crate::node::NodeState;
use crate::protocol::{
    check_depth, sender_key, validate_room, validate_user, MessageTemplate, Rejection, ServerFrame,
    MAX_KEY_BYTES,
};

/// `POST /auth/ticket` with `Authorization: Bearer <JWT>`.
pub async fn ticket(State(node): State<Arc<NodeState>>, headers: HeaderMap) -> Response {
    if node.auth.is_dev() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "this node runs in dev mode without tokens; connect with ?user=",
        );
    }
    let Some(token) = bearer(&headers) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the JWT as Authorization: Bearer <token>",
        );
    };
    let identity = match node.auth.verify(token) {
        Ok(identity) => identity,
        Err(err) => return refuse(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string()),
    };
    if !node
        .tickets_per_user
        .try_take(&identity.user, tokio::time::Instant::now())
    {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many tickets for this user; one per connection is enough",
        );
    }
    let ticket = match random_ticket() {
        Ok(ticket) => ticket,
        Err(err) => {
            tracing::error!(error = %err, "no randomness for a ticket");
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "cannot make a ticket",
            );
        }
    };
    if let Err(err) = node.broker.put_ticket(&ticket, token, TICKET_TTL).await {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            err.to_string(),
        );
    }
    Json(json!({"ticket": ticket, "expires_in": TICKET_TTL.as_secs()})).into_response()
}

/// The body of `POST /api/publish`: exactly one of `room`, `to`, or
/// `broadcast: true`, and `data`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiPublish<'a> {
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(default)]
    broadcast: bool,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    /// Shown as the sender; `server` when absent.
    #[serde(borrow)]
    from: Option<Cow<'a, str>>,
}

fn bad_body(message: impl Into<String>) -> Response {
    refuse(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn from_rejection(rejection: Rejection) -> Response {
    bad_body(rejection.message)
}

/// `POST /api/publish` with `Authorization: Bearer <API key>`. The body is
/// read only once the key is checked, and within `HTTP_HEADER_TIMEOUT`.
pub async fn publish(
    State(node): State<Arc<NodeState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let keys = &node.config.api_keys;
    if keys.is_empty() {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "the publish API is off: set API_KEYS",
        );
    }
    if !bearer(&headers).is_some_and(|given| key_matches(keys, given)) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key (Authorization: Bearer <key>)",
        );
    }
    let limit = node.config.max_message_bytes;
    let read = axum::body::to_bytes(body, limit);
    let timeout = node.config.http_header_timeout;
    let body = if timeout.is_zero() {
        read.await
    } else {
        match tokio::time::timeout(timeout, read).await {
            Ok(read) => read,
            Err(_) => {
                return refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    "the body did not arrive within HTTP_HEADER_TIMEOUT",
                )
            }
        }
    };
    let Ok(body) = body else {
        // Too long, or the connection failed mid-body.
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("bodies are at most {limit} bytes (MAX_MESSAGE_BYTES)"),
        );
    };
    let request: ApiPublish<'_> = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return bad_body(format!(
                "expected {{\"room\"|\"to\"|\"broadcast\":true, \"data\"}}: {err}"
            ))
        }
    };
    if let Err(rejection) = check_depth("data", request.data) {
        return from_rejection(rejection);
    }
    let from = request.from.as_deref().unwrap_or("server");
    if let Err(rejection) = validate_user(from) {
        return from_rejection(rejection);
    }
    let unavailable = |err: crate::broker::BrokerError| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            err.to_string(),
        )
    };
    match (request.room, request.to, request.broadcast) {
        (Some(room), None, false) => {
            if let Err(rejection) = validate_room(&room) {
                return from_rejection(rejection);
            }
            if request
                .key
                .as_ref()
                .is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_BYTES)
            {
                return bad_body(format!("\"key\" must be 1 to {MAX_KEY_BYTES} bytes"));
            }
            let template = MessageTemplate::new(&room, from, request.data);
            // Scoped to the sender, as for clients.
            let key = request.key.map(|key| sender_key(from, &key));
            match node
                .broker
                .publish_room(&room, template, key.as_deref())
                .await
            {
                Ok(stored) => Json(json!({"id": stored.id.to_string()})).into_response(),
                Err(err) => unavailable(err),
            }
        }
        (None, Some(to), false) => {
            if let Err(rejection) = validate_user(&to) {
                return from_rejection(rejection);
            }
            let text = ServerFrame::Direct {
                from,
                data: request.data,
            }
            .encode();
            match node
                .broker
                .publish(&Channel::User(Arc::from(&*to)), text.into())
                .await
            {
                Ok(0) => refuse(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("user \"{to}\" is not connected"),
                ),
                Ok(nodes) => Json(json!({"nodes": nodes})).into_response(),
                Err(err) => unavailable(err),
            }
        }
        (None, None, true) => {
            let text = ServerFrame::Broadcast {
                from,
                data: request.data,
            }
            .encode();
            match node.broker.publish(&Channel::Broadcast, text.into()).await {
                Ok(nodes) => Json(json!({"nodes": nodes})).into_response(),
                Err(err) => unavailable(err),
            }
        }
        _ => bad_body("give exactly one of \"room\", \"to\" or \"broadcast\": true"),
    }
}
