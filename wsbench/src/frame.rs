//! What the generator needs out of a server frame, found cheaply.
//!
//! Benchmark payloads are JSON arrays of integers: `[publisher, seq, sent_us]`
//! for a message, optionally followed by a padding string, and
//! `[publisher, -1, sent, failed]` for a publisher's end marker. The fast
//! parser looks for the few fields it needs with substring searches (room and
//! user names cannot hold quotes, so `"data":[` and `"id":"` cannot occur
//! inside them); the serde parser is the reference it is tested against and
//! can be chosen with `--parse serde`.

use std::borrow::Cow;

use serde::Deserialize;

/// A room message id `<ms>-<seq>`; ordered as a pair of numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgId {
    pub ms: u64,
    pub seq: u64,
}

impl MsgId {
    pub fn parse(s: &str) -> Option<MsgId> {
        let (ms, seq) = s.split_once('-')?;
        Some(MsgId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Up to four leading integers of a benchmark payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Payload {
    pub n: [i64; 4],
    pub len: usize,
}

impl Payload {
    /// `(publisher, seq, sent_us)` of a benchmark message.
    pub fn message(&self) -> Option<(u64, u64, i64)> {
        (self.len >= 3 && self.n[0] >= 0 && self.n[1] >= 0)
            .then(|| (self.n[0] as u64, self.n[1] as u64, self.n[2]))
    }

    /// `(publisher, sent, failed)` of an end marker.
    pub fn end_marker(&self) -> Option<(u64, u64, u64)> {
        (self.len >= 4 && self.n[0] >= 0 && self.n[1] == -1 && self.n[2] >= 0 && self.n[3] >= 0)
            .then(|| (self.n[0] as u64, self.n[2] as u64, self.n[3] as u64))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Message {
        id: Option<MsgId>,
        data: Option<Payload>,
    },
    Joined {
        recovered: bool,
        replayed: u64,
    },
    Ack {
        reference: Option<i64>,
    },
    Error {
        code: String,
        reference: Option<i64>,
    },
    Welcome,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ParseMode {
    /// Substring search for the needed fields
    Fast,
    /// serde_json into a small borrowed struct
    Serde,
}

pub fn parse(mode: ParseMode, text: &str) -> Frame {
    match mode {
        ParseMode::Fast => parse_fast(text),
        ParseMode::Serde => parse_serde(text),
    }
}

/// Position of `needle` in `hay`: a scan for its first byte, then a compare
/// (frames are short; `str::find` spends more setting up its searcher).
fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(i) = hay[from..].iter().position(|&b| b == first) {
        let at = from + i;
        if hay[at + 1..].starts_with(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The text after `key` (which includes the opening quote of a string value).
fn after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    // `key` is ASCII and starts with `"`, so the cut is on a char boundary.
    find_bytes(text.as_bytes(), key.as_bytes()).map(|i| &text[i + key.len()..])
}

fn string_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = after(text, key)?;
    rest.find('"').map(|end| &rest[..end])
}

fn int_field(text: &str, key: &str) -> Option<i64> {
    leading_int(after(text, key)?.trim_start()).map(|(n, _)| n)
}

fn leading_int(s: &str) -> Option<(i64, &str)> {
    let b = s.as_bytes();
    let neg = b.first() == Some(&b'-');
    let start = usize::from(neg);
    let digits = b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 18 {
        return None;
    }
    let v: i64 = s[start..start + digits].parse().ok()?;
    Some((if neg { -v } else { v }, &s[start + digits..]))
}

/// The leading integers of a JSON array (`[1,2,3,"pad"]` gives 1, 2, 3).
fn int_array(s: &str) -> Option<Payload> {
    let mut rest = s.trim_start().strip_prefix('[')?;
    let mut p = Payload::default();
    while p.len < 4 {
        rest = rest.trim_start();
        let Some((v, r)) = leading_int(rest) else {
            break;
        };
        p.n[p.len] = v;
        p.len += 1;
        rest = r.trim_start();
        match rest.strip_prefix(',') {
            Some(r) => rest = r,
            None => break,
        }
    }
    (p.len > 0).then_some(p)
}

pub fn parse_fast(text: &str) -> Frame {
    // The server writes `type` first; anything else is searched for.
    let ty = match text.strip_prefix("{\"type\":\"") {
        Some(rest) => rest.find('"').map(|end| &rest[..end]),
        None => string_field(text, "\"type\":\""),
    };
    let Some(ty) = ty else {
        return Frame::Other;
    };
    match ty {
        "message" => Frame::Message {
            id: string_field(text, "\"id\":\"").and_then(MsgId::parse),
            data: after(text, "\"data\":").and_then(int_array),
        },
        "joined" => Frame::Joined {
            recovered: after(text, "\"recovered\":")
                .is_some_and(|r| r.trim_start().starts_with("true")),
            replayed: int_field(text, "\"replayed\":").unwrap_or(0).max(0) as u64,
        },
        "ack" => Frame::Ack {
            reference: int_field(text, "\"ref\":"),
        },
        "error" => Frame::Error {
            code: string_field(text, "\"code\":\"").unwrap_or("").to_string(),
            reference: int_field(text, "\"ref\":"),
        },
        "welcome" => Frame::Welcome,
        _ => Frame::Other,
    }
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    data: Option<serde_json::Value>,
    #[serde(default)]
    recovered: Option<bool>,
    #[serde(default)]
    replayed: Option<u64>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
    #[serde(rename = "ref", default)]
    reference: Option<serde_json::Value>,
}

pub fn parse_serde(text: &str) -> Frame {
    let Ok(raw) = serde_json::from_str::<RawFrame>(text) else {
        return Frame::Other;
    };
    let reference = raw.reference.as_ref().and_then(|r| r.as_i64());
    match raw.ty.as_ref() {
        "message" => Frame::Message {
            id: raw.id.as_deref().and_then(MsgId::parse),
            data: raw.data.as_ref().and_then(|d| d.as_array()).and_then(|a| {
                let mut p = Payload::default();
                for v in a.iter().take(4) {
                    match v.as_i64() {
                        Some(n) => {
                            p.n[p.len] = n;
                            p.len += 1;
                        }
                        None => break,
                    }
                }
                (p.len > 0).then_some(p)
            }),
        },
        "joined" => Frame::Joined {
            recovered: raw.recovered.unwrap_or(false),
            replayed: raw.replayed.unwrap_or(0),
        },
        "ack" => Frame::Ack { reference },
        "error" => Frame::Error {
            code: raw.code.map(|c| c.into_owned()).unwrap_or_default(),
            reference,
        },
        "welcome" => Frame::Welcome,
        _ => Frame::Other,
    }
}

/// Microseconds since the Unix epoch (the clock payloads carry).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A `publish` frame carrying a benchmark payload.
pub fn publish_frame(room: &str, nums: &[i64], pad: &str, reference: i64) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(64 + room.len() + pad.len());
    let _ = write!(s, "{{\"type\":\"publish\",\"room\":\"{room}\",\"data\":[");
    for (i, n) in nums.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{n}");
    }
    if !pad.is_empty() {
        let _ = write!(s, ",\"{pad}\"");
    }
    let _ = write!(s, "],\"ref\":{reference}}}");
    s
}

/// A `join` frame, resuming after `since` when given.
pub fn join_frame(room: &str, since: Option<MsgId>, reference: i64) -> String {
    match since {
        Some(id) => format!(
            "{{\"type\":\"join\",\"room\":\"{room}\",\"since\":\"{id}\",\"ref\":{reference}}}"
        ),
        None => format!("{{\"type\":\"join\",\"room\":\"{room}\",\"ref\":{reference}}}"),
    }
}

/// Whether `name` is a valid room or user name of protocol v1 (so it can be
/// put in a frame without escaping).
pub fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:@/".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &[&str] = &[
        r#"{"type":"message","room":"bench","id":"1700000000000-3","from":"pub-0","data":[2,41,1700000000123456]}"#,
        r#"{"type":"message","room":"bench","id":"1700000000000-4","from":"pub-0","data":[2,-1,100,3]}"#,
        r#"{"type":"message","room":"bench","id":"1700000000001-0","from":"pub-1","data":[0,7,1700000000123456,"xxxxxxxx"]}"#,
        r#"{"type":"message","room":"lobby","id":"1-0","from":"bob","data":{"text":"hello"}}"#,
        r#"{"type":"message","room":"lobby","id":"1-0","from":"bob","data":"missed 1"}"#,
        r#"{"type":"joined","room":"lobby","recovered":true,"replayed":2,"ref":2}"#,
        r#"{"type":"joined","room":"lobby","recovered":false,"replayed":0}"#,
        r#"{"type":"ack","id":"1700000000400-0","ref":4}"#,
        r#"{"type":"ack","id":"1700000000400-0","ref":-1}"#,
        r#"{"type":"error","code":"rate_limited","message":"slow down","ref":12}"#,
        r#"{"type":"error","code":"bad_request","message":"frame is not a JSON object"}"#,
        r#"{"type":"welcome","conn":"c-17","user":"alice","node":"node-1","heartbeat_ms":25000}"#,
        r#"{"type":"join","room":"lobby","user":"alice"}"#,
        r#"not json"#,
    ];

    #[test]
    fn fast_and_serde_parsers_agree() {
        for s in SAMPLES {
            assert_eq!(parse_fast(s), parse_serde(s), "{s}");
        }
    }

    #[test]
    fn payload_fields() {
        let Frame::Message { id, data } = parse_fast(SAMPLES[0]) else {
            panic!()
        };
        assert_eq!(
            id,
            Some(MsgId {
                ms: 1700000000000,
                seq: 3
            })
        );
        assert_eq!(data.unwrap().message(), Some((2, 41, 1700000000123456)));
        let Frame::Message { data, .. } = parse_fast(SAMPLES[1]) else {
            panic!()
        };
        assert_eq!(data.unwrap().end_marker(), Some((2, 100, 3)));
        assert_eq!(data.unwrap().message(), None);
        let Frame::Message { data, .. } = parse_fast(SAMPLES[2]) else {
            panic!()
        };
        assert_eq!(data.unwrap().message(), Some((0, 7, 1700000000123456)));
        assert_eq!(
            parse_fast(SAMPLES[5]),
            Frame::Joined {
                recovered: true,
                replayed: 2
            }
        );
    }

    #[test]
    fn built_frames_round_trip() {
        let f = publish_frame("bench", &[3, 9, 1234], "", 9);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["data"], serde_json::json!([3, 9, 1234]));
        assert_eq!(v["ref"], 9);
        let f = publish_frame("bench", &[3, -1, 10, 0], "ab", -1);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["data"], serde_json::json!([3, -1, 10, 0, "ab"]));
        let id = MsgId { ms: 17, seq: 2 };
        let v: serde_json::Value = serde_json::from_str(&join_frame("r", Some(id), 1)).unwrap();
        assert_eq!(v["since"], "17-2");
        assert!(MsgId { ms: 2, seq: 0 } > MsgId { ms: 1, seq: 10 });
    }

    #[test]
    fn byte_search() {
        assert_eq!(find_bytes(b"abcabd", b"abd"), Some(3));
        assert_eq!(find_bytes(b"abcab", b"abd"), None);
        assert_eq!(find_bytes(b"", b"a"), None);
        assert_eq!(find_bytes(b"aa", b"a"), Some(0));
        assert_eq!(
            parse_fast(r#"{"room":"x","type":"ack","ref":3}"#),
            Frame::Ack { reference: Some(3) }
        );
    }

    #[test]
    fn names() {
        assert!(valid_name("chat:room-1/a@b_c.d", 128));
        assert!(!valid_name("a\"b", 128));
        assert!(!valid_name("", 128));
    }
}
