//! One client connection that publishes on a schedule, receives and checks
//! room messages, or both, in a single task.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::conn::{text_or_end, Ws};
use crate::frame::{self, now_us, Frame, MsgId, ParseMode};
use crate::hist::{Batch, SharedHist};
use crate::seq::SeqTracker;

/// The `ref` of an end marker's publish.
const END_REF: i64 = -1;
/// How long a publisher waits for its outstanding acks before sending its
/// end marker anyway.
const REPLY_WAIT: Duration = Duration::from_secs(10);

/// A publishing schedule: `count` messages, one every `interval` from `start`.
#[derive(Clone)]
pub struct PubPlan {
    pub id: u64,
    /// Sequence number of the first message.
    pub first_seq: u64,
    pub count: u64,
    pub start: Instant,
    pub interval: Duration,
    /// Padding appended to every payload.
    pub pad: Arc<str>,
    /// Publish `[id, -1, sent, failed]` once every reply is in.
    pub end_marker: bool,
}

/// What to expect: messages from publishers 0..publishers.
#[derive(Clone, Copy)]
pub struct RecvPlan {
    pub publishers: usize,
    /// Done once every publisher's end marker and every message announced by
    /// it arrived (else the peer reads until stopped).
    pub until_end_markers: bool,
}

pub struct Peer {
    pub ws: Ws,
    pub room: Arc<str>,
    pub publish: Option<PubPlan>,
    pub receive: Option<RecvPlan>,
    pub stop: oneshot::Receiver<()>,
    pub latency: Arc<SharedHist>,
    pub parse: ParseMode,
}

#[derive(Default)]
pub struct PeerResult {
    /// The connection, still open, unless it ended (see `ended`).
    pub ws: Option<Ws>,
    pub ended: Option<String>,
    // Publishing side.
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub pub_errors: BTreeMap<String, u64>,
    /// Most a send was behind its schedule, µs.
    pub max_lag_us: u64,
    pub end_marker_acked: bool,
    // Receiving side.
    pub trackers: Vec<SeqTracker>,
    pub ends: Vec<Option<(u64, u64)>>,
    pub received: u64,
    pub last_id: Option<MsgId>,
    pub other_frames: u64,
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum PubState {
    Sending,
    AwaitReplies,
    SendEnd,
    AwaitEnd,
    Done,
}

impl Peer {
    pub async fn run(self) -> PeerResult {
        let Peer {
            mut ws,
            room,
            publish,
            receive,
            stop: mut stopped,
            latency,
            parse,
        } = self;
        let mut r = PeerResult::default();
        let mut batch = Batch::new(latency);
        let npubs = receive.map_or(0, |p| p.publishers);
        r.trackers = vec![SeqTracker::default(); npubs];
        r.ends = vec![None; npubs];
        let mut ends_seen = 0usize;
        let mut expected_known = 0u64;
        let mut distinct = 0u64;
        let mut state = if publish.is_some() {
            PubState::Sending
        } else {
            PubState::Done
        };
        let mut next = publish.as_ref().map_or_else(Instant::now, |p| p.start);
        let mut replies_due = Instant::now();
        let mut end_retries = 0u32;
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        // Created once: a new `sleep` per frame costs a timer registration,
        // for every received frame.
        let sleep = tokio::time::sleep_until(far);
        tokio::pin!(sleep);
        let mut armed = far;

        loop {
            let recv_done = match receive {
                None => true,
                Some(p) => p.until_end_markers && ends_seen == npubs && distinct >= expected_known,
            };
            if state == PubState::Done && recv_done {
                break;
            }
            let timer = match state {
                PubState::Sending | PubState::SendEnd => next,
                PubState::AwaitReplies | PubState::AwaitEnd => replies_due,
                PubState::Done => far,
            };
            if timer != armed {
                sleep.as_mut().reset(timer);
                armed = timer;
            }
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                m = ws.recv() => {
                    let frame = match text_or_end(m) {
                        Ok(text) => frame::parse(parse, text),
                        Err(reason) => {
                            r.ended = Some(reason);
                            break;
                        }
                    };
                    match frame {
                        Frame::Message { id, data: Some(p) } if npubs > 0 => {
                            if let Some((publisher, seq, sent_us)) = p.message() {
                                r.received += 1;
                                if let Some(t) = r.trackers.get_mut(publisher as usize) {
                                    let before = t.distinct;
                                    t.record(seq);
                                    distinct += t.distinct - before;
                                }
                                batch.record((now_us() - sent_us).max(0) as u64);
                                if id.is_some() {
                                    r.last_id = id;
                                }
                            } else if let Some((publisher, sent, failed)) = p.end_marker() {
                                if let Some(slot) = r.ends.get_mut(publisher as usize) {
                                    if slot.is_none() {
                                        ends_seen += 1;
                                        expected_known += sent.saturating_sub(failed);
                                    }
                                    *slot = Some((sent, failed));
                                }
                            } else {
                                r.other_frames += 1;
                            }
                        }
                        Frame::Ack { reference: Some(END_REF) } => {
                            r.end_marker_acked = true;
                            state = PubState::Done;
                        }
                        Frame::Ack { .. } => r.acked += 1,
                        Frame::Error { code, reference } => {
                            if reference == Some(END_REF) {
                                // Retry the end marker a little later.
                                end_retries += 1;
                                state = if end_retries > 50 { PubState::Done } else { PubState::SendEnd };
                                next = Instant::now() + Duration::from_millis(200);
                            } else {
                                r.failed += 1;
                                *r.pub_errors.entry(code).or_default() += 1;
                            }
                        }
                        _ => r.other_frames += 1,
                    }
                    if state == PubState::AwaitReplies && r.acked + r.failed >= r.sent {
                        state = PubState::SendEnd;
                        next = Instant::now();
                    }
                }
                _ = &mut sleep, if state != PubState::Done => {
                    armed = far;
                    let plan = publish.as_ref().expect("publishing");
                    match state {
                        PubState::Sending => {
                            let lag = Instant::now().saturating_duration_since(next);
                            r.max_lag_us = r.max_lag_us.max(lag.as_micros() as u64);
                            let seq = plan.first_seq + r.sent;
                            let f = frame::publish_frame(&room, &[plan.id as i64, seq as i64, now_us()], &plan.pad, seq as i64);
                            if let Err(e) = ws.send_text(&f).await {
                                r.ended = Some(e.kind());
                                break;
                            }
                            r.sent += 1;
                            next += plan.interval;
                            if r.sent >= plan.count {
                                state = if plan.end_marker { PubState::AwaitReplies } else { PubState::AwaitEnd };
                                replies_due = Instant::now() + REPLY_WAIT;
                                if r.acked + r.failed >= r.sent {
                                    state = if plan.end_marker { PubState::SendEnd } else { PubState::Done };
                                    next = Instant::now();
                                }
                            }
                        }
                        PubState::AwaitReplies => {
                            // Replies overdue: announce what was sent anyway.
                            state = PubState::SendEnd;
                        }
                        PubState::SendEnd => {
                            let nums = [plan.id as i64, -1, r.sent as i64, r.failed as i64];
                            let f = frame::publish_frame(&room, &nums, "", END_REF);
                            if let Err(e) = ws.send_text(&f).await {
                                r.ended = Some(e.kind());
                                break;
                            }
                            state = PubState::AwaitEnd;
                            replies_due = Instant::now() + REPLY_WAIT;
                        }
                        PubState::AwaitEnd => {
                            // No end marker: waiting for plain acks, overdue.
                            state = PubState::Done;
                        }
                        PubState::Done => {}
                    }
                }
            }
            if !plan_has_end(&publish)
                && state == PubState::AwaitEnd
                && r.acked + r.failed >= r.sent
            {
                state = PubState::Done;
            }
        }
        batch.flush();
        if r.ended.is_none() {
            r.ws = Some(ws);
        }
        r
    }
}

fn plan_has_end(p: &Option<PubPlan>) -> bool {
    p.as_ref().is_some_and(|p| p.end_marker)
}
