//! Client protocol v1: the JSON frames clients send and receive, message ids,
//! error codes, close codes and the rules for room and user names.
//!
//! Parsing borrows from the received text (`data` and `ref` stay raw JSON and
//! are copied into outbound frames verbatim); encoding produces the final text
//! of a frame once, so fan-out only clones it.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// WebSocket close codes the server uses, with the reason text it sends.
pub mod close {
    /// The peer broke the WebSocket protocol.
    pub const PROTOCOL: u16 = 1002;
    /// A text frame that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame larger than `MAX_MESSAGE_BYTES`.
    pub const TOO_BIG: u16 = 1009;
    /// The server failed; reconnecting is safe.
    pub const INTERNAL: u16 = 1011;
    /// The node is draining (shutdown or restart): reconnect, possibly elsewhere.
    pub const DRAINING: u16 = 1012;
    /// The peer stopped answering WebSocket pings.
    pub const HEARTBEAT_TIMEOUT: u16 = 1001;
    /// The session's token expired and no valid `refresh` arrived.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The client did not read fast enough and its outbound queue filled up.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The client kept sending far above its rate limit.
    pub const RATE_LIMITED: u16 = 4029;
    /// Stands for a close frame without a code; never sent (RFC 6455 §7.4.1).
    pub const NO_STATUS: u16 = 1005;
}

/// Longest accepted room name, in bytes.
pub const MAX_ROOM_NAME: usize = 128;
/// Longest accepted user name, in bytes.
pub const MAX_USER_NAME: usize = 64;
/// Longest accepted `ref` (its raw JSON text) and idempotency `key`, in bytes.
pub const MAX_REF_BYTES: usize = 256;
pub const MAX_KEY_BYTES: usize = 128;

/// A room message id in the Redis Streams format `<ms>-<seq>`: milliseconds
/// since the epoch, then a sequence within that millisecond. Ids of one room
/// only ever increase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId {
    pub ms: u64,
    pub seq: u64,
}

impl MessageId {
    pub const ZERO: MessageId = MessageId { ms: 0, seq: 0 };

    pub fn new(ms: u64, seq: u64) -> Self {
        MessageId { ms, seq }
    }

    /// The smallest id greater than `self`.
    pub fn successor(self) -> Self {
        match self.seq.checked_add(1) {
            Some(seq) => MessageId { ms: self.ms, seq },
            None => MessageId {
                ms: self.ms + 1,
                seq: 0,
            },
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Milliseconds since the Unix epoch: the clock of message ids and token expiry.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Microseconds since the Unix epoch, for latencies measured against ids.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a message id looks like \"1700000000000-0\" (<ms>-<seq>)")]
pub struct BadMessageId;

impl FromStr for MessageId {
    type Err = BadMessageId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or(BadMessageId)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(BadMessageId);
        }
        Ok(MessageId {
            ms: ms.parse().map_err(|_| BadMessageId)?,
            seq: seq.parse().map_err(|_| BadMessageId)?,
        })
    }
}

/// The `code` of an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    TooLarge,
    RateLimited,
    NotFound,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::NotFound,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Position in [`ErrorCode::ALL`], for counters indexed by code.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A request that cannot be served, answered with an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Rejection::new(ErrorCode::BadRequest, message)
    }
}

/// Every field any client frame may carry; which ones a `type` needs is
/// checked when it becomes a [`Request`]. Unknown fields (a client-sent
/// `from`, say) are ignored.
#[derive(Deserialize)]
struct WireFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow)]
    since: Option<Cow<'a, str>>,
    last: Option<u64>,
    /// Present means `Some`, even for `null`.
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
}

fn present<'de, D>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Just the `ref` of a frame whose other fields do not parse, so the error
/// can still echo it.
#[derive(Deserialize)]
struct RefOnly<'a> {
    #[serde(rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
}

/// Deepest nesting of arrays and objects accepted in `data` and `ref`. Deeper
/// values would break the recipients' JSON parsers (serde_json and others
/// stop at 128).
pub const MAX_JSON_DEPTH: usize = 64;

/// The nesting depth of a JSON text, skipping brackets inside strings.
fn json_depth(raw: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for byte in raw.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

pub fn check_depth(field: &str, raw: &RawValue) -> Result<(), Rejection> {
    if json_depth(raw.get()) > MAX_JSON_DEPTH {
        return Err(Rejection::bad_request(format!(
            "\"{field}\" is nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    Ok(())
}

/// Where a joining client's catch-up starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Only live messages from now on.
    None,
    /// Everything after this id (resume).
    Since(MessageId),
    /// The room's latest N messages (backlog for a new joiner).
    Last(usize),
}

/// A validated client request.
#[derive(Debug)]
pub enum Request<'a> {
    Join {
        room: Cow<'a, str>,
        catch_up: CatchUp,
    },
    Leave {
        room: Cow<'a, str>,
    },
    Publish {
        room: Cow<'a, str>,
        data: &'a RawValue,
        key: Option<Cow<'a, str>>,
    },
    Direct {
        to: Cow<'a, str>,
        data: &'a RawValue,
    },
    Broadcast {
        data: &'a RawValue,
    },
    Presence {
        room: Cow<'a, str>,
    },
    Ping,
    Refresh {
        token: Cow<'a, str>,
    },
}

/// A parsed frame: the request, or why it was refused, plus the client's
/// `ref` to echo either way.
pub struct Parsed<'a> {
    pub reference: Option<&'a RawValue>,
    pub request: Result<Request<'a>, Rejection>,
}

/// Parses one client text frame. Never fails outright: a frame that is not
/// even JSON yields a `bad_request` rejection without a `ref`.
pub fn parse_client_frame(text: &str) -> Parsed<'_> {
    let wire: WireFrame<'_> = match serde_json::from_str(text) {
        Ok(wire) => wire,
        Err(err) => {
            let reference = serde_json::from_str::<RefOnly<'_>>(text)
                .ok()
                .and_then(|r| r.reference)
                .filter(|r| usable_ref(r));
            return Parsed {
                reference,
                request: Err(Rejection::bad_request(format!(
                    "frame is not a JSON object of protocol v1: {err}"
                ))),
            };
        }
    };
    let reference = wire.reference.filter(|r| usable_ref(r));
    let request = if wire.reference.is_some() && reference.is_none() {
        Err(Rejection::bad_request(format!(
            "\"ref\" must be at most {MAX_REF_BYTES} bytes and {MAX_JSON_DEPTH} levels deep"
        )))
    } else {
        into_request(wire)
    };
    Parsed { reference, request }
}

fn usable_ref(reference: &RawValue) -> bool {
    reference.get().len() <= MAX_REF_BYTES && json_depth(reference.get()) <= MAX_JSON_DEPTH
}

fn into_request<'a>(wire: WireFrame<'a>) -> Result<Request<'a>, Rejection> {
    let kind = wire
        .kind
        .ok_or_else(|| Rejection::bad_request("frame has no \"type\""))?;
    let missing = |field: &str| Rejection::bad_request(format!("\"{kind}\" needs \"{field}\""));
    let room = |room: Option<Cow<'a, str>>| -> Result<Cow<'a, str>, Rejection> {
        let room = room.ok_or_else(|| missing("room"))?;
        validate_room(&room)?;
        Ok(room)
    };
    match kind.as_ref() {
        "join" => {
            let catch_up = match (wire.since, wire.last) {
                (Some(_), Some(_)) => {
                    return Err(Rejection::bad_request(
                        "\"join\" takes \"since\" or \"last\", not both",
                    ))
                }
                (Some(since), None) => CatchUp::Since(since.parse().map_err(|e: BadMessageId| {
                    Rejection::bad_request(format!("\"since\" is not a message id: {e}"))
                })?),
                (None, Some(last)) => CatchUp::Last(usize::try_from(last).unwrap_or(usize::MAX)),
                (None, None) => CatchUp::None,
            };
            Ok(Request::Join {
                room: room(wire.room)?,
                catch_up,
            })
        }
        "leave" => Ok(Request::Leave {
            room: room(wire.room)?,
        }),
        "publish" => {
            let room = room(wire.room)?;
            let data = wire.data.ok_or_else(|| missing("data"))?;
            check_depth("data", data)?;
            if let Some(key) = &wire.key {
                if key.is_empty() || key.len() > MAX_KEY_BYTES {
                    return Err(Rejection::bad_request(format!(
                        "\"key\" must be 1 to {MAX_KEY_BYTES} bytes"
                    )));
                }
            }
            Ok(Request::Publish {
                room,
                data,
                key: wire.key,
            })
        }
        "direct" => {
            let to = wire.to.ok_or_else(|| missing("to"))?;
            validate_user(&to)?;
            let data = wire.data.ok_or_else(|| missing("data"))?;
            check_depth("data", data)?;
            Ok(Request::Direct { to, data })
        }
        "broadcast" => {
            let data = wire.data.ok_or_else(|| missing("data"))?;
            check_depth("data", data)?;
            Ok(Request::Broadcast { data })
        }
        "presence" => Ok(Request::Presence {
            room: room(wire.room)?,
        }),
        "ping" => Ok(Request::Ping),
        "refresh" => Ok(Request::Refresh {
            token: wire.token.ok_or_else(|| missing("token"))?,
        }),
        other => Err(Rejection::bad_request(format!(
            "unknown type \"{}\"; known: join, leave, publish, direct, broadcast, presence, ping, refresh",
            truncate(other, 40)
        ))),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

fn name_chars_ok(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/'))
}

/// An idempotency key as stored: the sender's own, so another sender's
/// identical key is another message. A space never occurs in a name, so no
/// two (sender, key) pairs give the same text (`/` would: user `a` with key
/// `b/c` and user `a/b` with key `c`).
pub fn sender_key(sender: &str, key: &str) -> String {
    format!("{sender} {key}")
}

/// Room names: 1 to 128 bytes of ASCII letters, digits and `_ - . : @ /`.
pub fn validate_room(room: &str) -> Result<(), Rejection> {
    if room.is_empty() || room.len() > MAX_ROOM_NAME || !name_chars_ok(room) {
        return Err(Rejection::bad_request(format!(
            "room names are 1 to {MAX_ROOM_NAME} characters of A-Z a-z 0-9 _ - . : @ /"
        )));
    }
    Ok(())
}

/// User names: 1 to 64 bytes, the same characters as room names.
pub fn validate_user(user: &str) -> Result<(), Rejection> {
    if user.is_empty() || user.len() > MAX_USER_NAME || !name_chars_ok(user) {
        return Err(Rejection::bad_request(format!(
            "user names are 1 to {MAX_USER_NAME} characters of A-Z a-z 0-9 _ - . : @ /"
        )));
    }
    Ok(())
}

/// Frames the server sends. Each is encoded once and the text shared by
/// every recipient.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        conn: &'a str,
        user: &'a str,
        node: &'a str,
        heartbeat_ms: u64,
    },
    Joined {
        room: &'a str,
        recovered: bool,
        replayed: usize,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    Left {
        room: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    Ack {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    Direct {
        from: &'a str,
        data: &'a RawValue,
    },
    Broadcast {
        from: &'a str,
        data: &'a RawValue,
    },
    Presence {
        room: &'a str,
        users: &'a [String],
        /// More users than a reply lists; `count` has the total.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        count: Option<usize>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    /// A presence event: `user` came into the room.
    Join {
        room: &'a str,
        user: &'a str,
    },
    /// A presence event: `user`'s last connection left the room.
    Leave {
        room: &'a str,
        user: &'a str,
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    Expiring {
        exp: u64,
    },
    Refreshed {
        exp: u64,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
    Error {
        code: &'static str,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a RawValue>,
    },
}

impl ServerFrame<'_> {
    pub fn encode(&self) -> String {
        // Serializing these plain structs into a String cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"type\":\"error\"}"))
    }
}

/// The text of an `error` frame.
pub fn encode_error(rejection: &Rejection, reference: Option<&RawValue>) -> String {
    ServerFrame::Error {
        code: rejection.code.as_str(),
        message: &rejection.message,
        reference,
    }
    .encode()
}

/// A room `message` frame whose id is not known yet: the text before and after
/// the id. The broker that assigns the id (under its lock, or in a Redis
/// script) concatenates `prefix + id + suffix`, so the frame is encoded once
/// per message and never re-encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTemplate {
    pub prefix: String,
    pub suffix: String,
}

impl MessageTemplate {
    pub fn new(room: &str, from: &str, data: &RawValue) -> Self {
        let json = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""));
        MessageTemplate {
            prefix: format!("{{\"type\":\"message\",\"room\":{},\"id\":\"", json(room)),
            suffix: format!("\",\"from\":{},\"data\":{}}}", json(from), data.get()),
        }
    }

    pub fn with_id(&self, id: MessageId) -> String {
        let id = id.to_string();
        let mut text = String::with_capacity(self.prefix.len() + id.len() + self.suffix.len());
        text.push_str(&self.prefix);
        text.push_str(&id);
        text.push_str(&self.suffix);
        text
    }
}

/// An encoded frame on a room's channel: a `message` (with its id) or a
/// presence event (no id). One per message per node, shared by reference
/// among history, the broker listener and every member's queue.
#[derive(Debug)]
pub struct RoomFrame {
    pub room: Arc<str>,
    pub id: Option<MessageId>,
    pub text: Utf8Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Result<Request<'_>, Rejection> {
        parse_client_frame(text).request
    }

    #[test]
    fn message_ids_parse_print_and_order_like_stream_ids() {
        let id: MessageId = "1700000000000-7".parse().unwrap();
        assert_eq!(id, MessageId::new(1_700_000_000_000, 7));
        assert_eq!(id.to_string(), "1700000000000-7");
        assert!(MessageId::new(5, 0) > MessageId::new(4, 99));
        assert!(MessageId::new(5, 1) > MessageId::new(5, 0));
        assert_eq!(
            MessageId::new(5, u64::MAX).successor(),
            MessageId::new(6, 0)
        );
        for bad in ["", "12", "-1", "1-", "a-1", "1-2-3", "+1-2", "1 -2"] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn join_with_since_or_last_parses_and_both_is_refused() {
        assert!(matches!(
            request(r#"{"type":"join","room":"r","since":"5-1"}"#).unwrap(),
            Request::Join { room, catch_up: CatchUp::Since(id) } if room == "r" && id == MessageId::new(5, 1)
        ));
        assert!(matches!(
            request(r#"{"type":"join","room":"r","last":50}"#).unwrap(),
            Request::Join { room, catch_up: CatchUp::Last(50) } if room == "r"
        ));
        let err = request(r#"{"type":"join","room":"r","last":5,"since":"1-0"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        let err = request(r#"{"type":"join","room":"r","since":"yesterday"}"#).unwrap_err();
        assert!(err.message.contains("since"), "{}", err.message);
    }

    #[test]
    fn publish_keeps_data_and_ref_as_raw_json() {
        let parsed = parse_client_frame(
            r#"{"type":"publish","room":"r","data":{"a":[1, 2]},"ref":17,"from":"mallory"}"#,
        );
        assert_eq!(parsed.reference.unwrap().get(), "17");
        match parsed.request.unwrap() {
            Request::Publish { room, data, key } => {
                assert_eq!(room, "r");
                assert_eq!(data.get(), r#"{"a":[1, 2]}"#);
                assert_eq!(key, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_frames_are_rejected_with_a_message_and_keep_their_ref() {
        let parsed = parse_client_frame(r#"{"type":"publish","ref":"a1","data":1}"#);
        assert_eq!(parsed.reference.unwrap().get(), "\"a1\"");
        let err = parsed.request.unwrap_err();
        assert_eq!(err.message, "\"publish\" needs \"room\"");

        let err = request(r#"{"type":"fly","ref":1}"#).unwrap_err();
        assert!(err.message.starts_with("unknown type \"fly\""));
        assert!(request("not json").is_err());
        assert!(request("[1,2]").is_err());
        assert!(request(r#"{"room":"r"}"#).is_err());
        assert!(request(r#"{"type":"join","room":"has space"}"#).is_err());
        assert!(request(&format!(
            r#"{{"type":"join","room":"{}"}}"#,
            "a".repeat(MAX_ROOM_NAME + 1)
        ))
        .is_err());
        assert!(request(r#"{"type":"direct","to":"","data":1}"#).is_err());
        assert!(request(r#"{"type":"publish","room":"r","data":1,"key":""}"#).is_err());
    }

    #[test]
    fn null_data_is_data_and_a_type_error_still_echoes_the_ref() {
        match request(r#"{"type":"publish","room":"r","data":null}"#).unwrap() {
            Request::Publish { data, .. } => assert_eq!(data.get(), "null"),
            other => panic!("unexpected {other:?}"),
        }
        let parsed = parse_client_frame(r#"{"type":"join","room":"r","last":-1,"ref":"x"}"#);
        assert_eq!(parsed.reference.unwrap().get(), "\"x\"");
        assert!(parsed.request.is_err());
    }

    #[test]
    fn data_nested_too_deep_is_refused_but_brackets_in_strings_do_not_count() {
        let deep = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH + 1),
            "]".repeat(MAX_JSON_DEPTH + 1)
        );
        let frame = format!(r#"{{"type":"publish","room":"r","data":{deep}}}"#);
        let err = request(&frame).unwrap_err();
        assert!(err.message.contains("nested"), "{}", err.message);
        let ok = format!(
            r#"{{"type":"broadcast","data":["{}\"[[["]}}"#,
            "[".repeat(200)
        );
        assert!(request(&ok).is_ok());
        assert_eq!(json_depth(r#"{"a":[1,{"b":[]}]}"#), 4);
        let deep_ref = format!(r#"{{"type":"ping","ref":{deep}}}"#);
        let parsed = parse_client_frame(&deep_ref);
        assert!(parsed.reference.is_none());
        assert!(parsed.request.is_err());
    }

    /// Seeded mutation fuzzing: bounded, repeatable, and on stable Rust
    /// (cargo fuzz needs nightly). Parsing must never panic, whatever arrives.
    #[test]
    fn twenty_thousand_mutated_frames_parse_without_panicking() {
        let seeds = [
            r#"{"type":"join","room":"r","since":"1-2","ref":[1]}"#,
            r#"{"type":"publish","room":"r","data":{"a":"\u00e9\"x"},"key":"k","ref":"q"}"#,
            r#"{"type":"direct","to":"bob","data":[[[]]]}"#,
            r#"{"type":"join","room":"r","last":18446744073709551615}"#,
            r#"{"type":"refresh","token":"a.b.c"}"#,
        ];
        let alphabet = "{}[]\",:\\0-9eE.+tfnul \u{e9}\u{0}";
        let alphabet: Vec<char> = alphabet.chars().collect();
        let mut rng = fastrand::Rng::with_seed(2026);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut chars: Vec<char> = seeds[rng.usize(..seeds.len())].chars().collect();
            for _ in 0..rng.usize(1..8) {
                let at = rng.usize(..=chars.len());
                match rng.u8(..3) {
                    0 if at < chars.len() => chars[at] = alphabet[rng.usize(..alphabet.len())],
                    1 if at < chars.len() => {
                        chars.remove(at);
                    }
                    _ => chars.insert(at, alphabet[rng.usize(..alphabet.len())]),
                }
            }
            let text: String = chars.into_iter().collect();
            if parse_client_frame(&text).request.is_ok() {
                accepted += 1;
            }
        }
        // The mutations are mild enough that some frames stay valid.
        assert!(accepted > 0);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Any JSON value, a few levels deep.
        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                ".{0,12}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(".{0,6}", inner, 0..6)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Frames built from the protocol's own field names, with any values.
        fn frame() -> impl Strategy<Value = serde_json::Value> {
            let kind = prop_oneof![
                Just("join"),
                Just("leave"),
                Just("publish"),
                Just("direct"),
                Just("broadcast"),
                Just("presence"),
                Just("ping"),
                Just("refresh"),
                Just("other"),
            ];
            let fields = prop::collection::btree_map(
                prop_oneof![
                    Just("room"),
                    Just("since"),
                    Just("last"),
                    Just("data"),
                    Just("key"),
                    Just("to"),
                    Just("token"),
                    Just("ref"),
                    Just("from"),
                ],
                json_value(),
                0..6,
            );
            (kind, fields).prop_map(|(kind, fields)| {
                let mut object: serde_json::Map<String, serde_json::Value> = fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                object.insert("type".into(), kind.into());
                serde_json::Value::Object(object)
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any text at all: an answer, never a panic.
            #[test]
            fn any_text_parses_or_is_rejected(text in ".{0,300}") {
                let _ = parse_client_frame(&text);
            }

            /// Frames of the protocol's shape: accepted ones are valid by the
            /// protocol's rules, rejected ones say why, and a `ref` within
            /// limits is always echoed.
            #[test]
            fn protocol_shaped_frames_are_validated(frame in frame()) {
                let text = frame.to_string();
                let parsed = parse_client_frame(&text);
                match &parsed.request {
                    Ok(Request::Join { room, .. } | Request::Leave { room } | Request::Presence { room }) => {
                        prop_assert!(validate_room(room).is_ok());
                    }
                    Ok(Request::Publish { room, data, key }) => {
                        prop_assert!(validate_room(room).is_ok());
                        prop_assert!(json_depth(data.get()) <= MAX_JSON_DEPTH);
                        prop_assert!(key.as_ref().is_none_or(|k| !k.is_empty() && k.len() <= MAX_KEY_BYTES));
                    }
                    Ok(Request::Direct { to, .. }) => prop_assert!(validate_user(to).is_ok()),
                    Ok(_) => {}
                    Err(rejection) => prop_assert!(!rejection.message.is_empty()),
                }
                if let Some(reference) = frame.get("ref") {
                    let raw = reference.to_string();
                    if raw.len() <= MAX_REF_BYTES && !reference.is_null() {
                        prop_assert_eq!(parsed.reference.map(|r| r.get().to_string()), Some(raw));
                    }
                }
            }
        }
    }

    #[test]
    fn escaped_strings_are_accepted() {
        assert!(matches!(
            request(r#"{"type":"leave","room":"a\/b"}"#).unwrap(),
            Request::Leave { room } if room == "a/b"
        ));
    }

    #[test]
    fn message_template_builds_the_frame_around_the_id() {
        let data = RawValue::from_string("{\"t\":\"hi\"}".into()).unwrap();
        let template = MessageTemplate::new("r\"1", "alice", &data);
        let text = template.with_id(MessageId::new(12, 3));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"type":"message","room":"r\"1","id":"12-3","from":"alice","data":{"t":"hi"}})
        );
    }

    #[test]
    fn server_frames_encode_with_raw_values() {
        let reference = RawValue::from_string("\"x\"".into()).unwrap();
        let text = ServerFrame::Ack {
            id: Some("1-0".into()),
            reference: Some(&reference),
        }
        .encode();
        assert_eq!(text, r#"{"type":"ack","id":"1-0","ref":"x"}"#);
        let data = RawValue::from_string("[1,2]".into()).unwrap();
        let text = ServerFrame::Direct {
            from: "a",
            data: &data,
        }
        .encode();
        assert_eq!(text, r#"{"type":"direct","from":"a","data":[1,2]}"#);
    }
}
