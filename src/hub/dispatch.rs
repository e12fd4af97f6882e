//! The broker listener: hands deliveries to the hub as they arrive and, with
//! a `WRITE_DELAY`, holds a busy room's frames so that each connection gets
//! several of them in one write.
//!
//! A room whose frames were written less than the delay ago is *busy*: its
//! next frames are queued in the members' mailboxes, corked, and written
//! together when the delay since that write has passed. So a room gets at
//! most one write per connection per delay, every frame waits at most the
//! delay, and a quiet room (or one message now and then) is written at once.
//! One timer serves the whole node: no connection's task is woken for it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use super::{Hub, Mailbox};
use crate::broker::Delivery;

/// Deliveries fanned out together at most (when that many are waiting).
const DISPATCH_BATCH: usize = 256;

pub struct Dispatcher {
    hub: Arc<Hub>,
    delay: Duration,
    /// When each room's frames were last written (rooms written within the
    /// last `delay`, and a few older ones until the next prune).
    written: HashMap<Arc<str>, Instant>,
    next_prune: Instant,
    /// Rooms with frames held, and the mailboxes those frames corked.
    held_rooms: HashSet<Arc<str>>,
    held: Vec<Mailbox>,
    /// The delivery being held, passed to the hub in a reused buffer.
    holding: Vec<Delivery>,
    /// When the held frames are written.
    due: Option<Instant>,
}

impl Dispatcher {
    pub fn new(hub: Arc<Hub>, delay: Duration) -> Self {
        Dispatcher {
            hub,
            delay,
            written: HashMap::new(),
            next_prune: Instant::now(),
            held_rooms: HashSet::new(),
            held: Vec::new(),
            holding: Vec::with_capacity(1),
            due: None,
        }
    }

    /// Fans out everything `incoming` carries until it closes.
    pub async fn run(mut self, mut incoming: UnboundedReceiver<Delivery>) {
        // Whatever arrived meanwhile is fanned out as one batch.
        let mut batch = Vec::with_capacity(DISPATCH_BATCH);
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                () = &mut timer, if self.due.is_some() => self.write_held(Instant::now()),
                received = incoming.recv_many(&mut batch, DISPATCH_BATCH) => {
                    if received == 0 {
                        break;
                    }
                    let due = self.due;
                    self.dispatch(&mut batch, Instant::now()).await;
                    if let (Some(at), None) = (self.due, due) {
                        timer.as_mut().reset(at);
                    }
                }
            }
        }
        self.write_held(Instant::now());
    }

    /// Fans out `batch` (emptying it) at `now`: frames of busy rooms are
    /// held, the rest is written at once, each connection's in arrival order.
    pub async fn dispatch(&mut self, batch: &mut Vec<Delivery>, now: Instant) {
        if self.delay.is_zero() {
            return self.hub.dispatch_all(batch).await;
        }
        let mut at_once = Vec::new();
        for delivery in batch.drain(..) {
            let busy = match &delivery {
                Delivery::Room(frame) => Some(frame.room.clone()).filter(|room| {
                    self.held_rooms.contains(room)
                        || self
                            .written
                            .get(room)
                            .is_some_and(|at| now < *at + self.delay)
                }),
                _ => None,
            };
            let Some(room) = busy else {
                at_once.push(delivery);
                continue;
            };
            // Held frames queue behind what came before them: write that first.
            self.write_at_once(&mut at_once, now).await;
            if self.due.is_none() {
                let written = self.written.get(&room).copied().unwrap_or(now);
                self.due = Some(written + self.delay);
            }
            self.holding.push(delivery);
            self.hub.queue_corked(&mut self.holding, &mut self.held);
            self.held_rooms.insert(room);
        }
        self.write_at_once(&mut at_once, now).await;
        if now >= self.next_prune {
            let delay = self.delay;
            self.written.retain(|_, at| now < *at + delay);
            self.next_prune = now + delay;
        }
    }

    async fn write_at_once(&mut self, deliveries: &mut Vec<Delivery>, now: Instant) {
        if deliveries.is_empty() {
            return;
        }
        for delivery in deliveries.iter() {
            if let Delivery::Room(frame) = delivery {
                self.written.insert(frame.room.clone(), now);
            }
        }
        self.hub.dispatch_all(deliveries).await;
    }

    /// Writes the held frames: each corked connection once.
    pub fn write_held(&mut self, now: Instant) {
        self.due = None;
        for room in self.held_rooms.drain() {
            self.written.insert(room, now);
        }
        self.hub.flush(std::mem::take(&mut self.held));
    }

    /// When the held frames are due, if any are held.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::hub::MailboxSettings;
    use crate::protocol::{MessageId, RoomFrame};
    use crate::stats::Stats;

    /// A node's hub with one started connection in rooms `r` and `q`, and
    /// the peer end of its socket (non-blocking, to see what was written).
    async fn member() -> (Arc<Hub>, std::net::TcpStream) {
        let (broker, _incoming) = MemoryBroker::start(10, Duration::from_secs(60), usize::MAX);
        let stats = Arc::new(Stats::new());
        let hub = Arc::new(Hub::new(broker, stats.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        peer.set_nonblocking(true).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let settings = MailboxSettings {
            capacity: 64,
            stats,
        };
        let mailbox = Mailbox::new(settings, Some(server));
        hub.connect(1, "amy".into(), mailbox.clone()).await.unwrap();
        hub.join_tracked(1, &"r".into()).await.unwrap();
        hub.join_tracked(1, &"q".into()).await.unwrap();
        mailbox.start();
        let _ = written(&mut &peer); // the presence events of the joins
        (hub, peer)
    }

    fn frame(room: &str, seq: u64) -> Delivery {
        Delivery::Room(Arc::new(RoomFrame {
            room: room.into(),
            id: Some(MessageId::new(1, seq)),
            text: format!("{room}{seq}").into(),
        }))
    }

    /// The payloads the peer has received so far.
    fn written(peer: &mut &std::net::TcpStream) -> Vec<String> {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match peer.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            }
        }
        // Server frames of under 126 bytes: opcode byte, length byte, payload.
        let mut texts = Vec::new();
        let mut rest = &bytes[..];
        while let [_, len, tail @ ..] = rest {
            let (text, tail) = tail.split_at(usize::from(*len));
            texts.push(String::from_utf8_lossy(text).into_owned());
            rest = tail;
        }
        texts
    }

    async fn dispatch(dispatcher: &mut Dispatcher, delivery: Delivery, now: Instant) {
        dispatcher.dispatch(&mut vec![delivery], now).await;
    }

    #[tokio::test]
    async fn a_busy_rooms_frames_wait_for_the_delay_since_its_last_write() {
        let (hub, peer) = member().await;
        let delay = Duration::from_millis(10);
        let mut dispatcher = Dispatcher::new(hub, delay);
        let start = Instant::now();
        let ms = |n: u64| start + Duration::from_millis(n);

        dispatch(&mut dispatcher, frame("r", 1), ms(0)).await;
        assert_eq!(
            written(&mut &peer),
            ["r1"],
            "a quiet room is written at once"
        );
        assert_eq!(dispatcher.due(), None);

        dispatch(&mut dispatcher, frame("r", 2), ms(1)).await;
        dispatch(&mut dispatcher, frame("r", 3), ms(2)).await;
        assert_eq!(dispatcher.due(), Some(ms(10)), "held until 10 ms after r1");
        dispatch(&mut dispatcher, frame("q", 1), ms(3)).await;
        assert!(
            written(&mut &peer).is_empty(),
            "held, and q1 queues behind them on the same connection"
        );

        dispatcher.write_held(ms(10));
        assert_eq!(written(&mut &peer), ["r2", "r3", "q1"]);
        assert_eq!(dispatcher.due(), None);

        dispatch(&mut dispatcher, frame("r", 4), ms(11)).await;
        assert_eq!(
            dispatcher.due(),
            Some(ms(20)),
            "the flush counts as r's write"
        );
        dispatcher.write_held(ms(20));
        assert_eq!(written(&mut &peer), ["r4"]);

        dispatch(&mut dispatcher, frame("r", 5), ms(30)).await;
        assert_eq!(written(&mut &peer), ["r5"], "quiet again after a delay");
    }

    #[tokio::test]
    async fn a_batch_keeps_its_order_when_only_some_rooms_are_busy() {
        let (hub, peer) = member().await;
        let mut dispatcher = Dispatcher::new(hub, Duration::from_millis(10));
        let start = Instant::now();
        dispatch(&mut dispatcher, frame("r", 1), start).await;
        assert_eq!(written(&mut &peer), ["r1"]);
        let mut batch = vec![frame("q", 1), frame("r", 2), frame("q", 2)];
        dispatcher.dispatch(&mut batch, start).await;
        assert_eq!(written(&mut &peer), ["q1"], "q1 came before the held r2");
        dispatcher.write_held(start + Duration::from_millis(10));
        assert_eq!(written(&mut &peer), ["r2", "q2"]);
    }

    #[tokio::test]
    async fn held_frames_are_timed_as_fan_outs_when_queued() {
        let (hub, _peer) = member().await;
        let stats = hub.stats.clone();
        let fan_outs = || {
            let text = stats.render_prometheus(&[], &[]);
            text.lines()
                .find_map(|line| line.strip_prefix("roomcast_fanout_seconds_count "))
                .map(|count| count.trim().to_string())
        };
        let mut dispatcher = Dispatcher::new(hub, Duration::from_millis(10));
        let start = Instant::now();
        dispatch(&mut dispatcher, frame("r", 1), start).await;
        assert_eq!(fan_outs().as_deref(), Some("1"), "written at once");
        dispatch(
            &mut dispatcher,
            frame("r", 2),
            start + Duration::from_millis(1),
        )
        .await;
        assert!(dispatcher.due().is_some(), "r2 is held");
        assert_eq!(fan_outs().as_deref(), Some("2"), "r2 queued, and timed");
    }

    #[tokio::test]
    async fn without_a_delay_every_frame_is_written_at_once() {
        let (hub, peer) = member().await;
        let mut dispatcher = Dispatcher::new(hub, Duration::ZERO);
        let now = Instant::now();
        for seq in 1..=3 {
            dispatch(&mut dispatcher, frame("r", seq), now).await;
        }
        assert_eq!(written(&mut &peer), ["r1", "r2", "r3"]);
        assert_eq!(dispatcher.due(), None);
    }

    #[tokio::test]
    async fn the_listener_writes_held_frames_when_they_are_due() {
        let (hub, peer) = member().await;
        let (deliveries, incoming) = tokio::sync::mpsc::unbounded_channel();
        let listener = tokio::spawn(Dispatcher::new(hub, Duration::from_millis(50)).run(incoming));
        let started = std::time::Instant::now();
        deliveries.send(frame("r", 1)).unwrap();
        let mut got = Vec::new();
        while got.is_empty() && started.elapsed() < Duration::from_secs(10) {
            got.extend(written(&mut &peer));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        deliveries.send(frame("r", 2)).unwrap();
        deliveries.send(frame("r", 3)).unwrap();
        while got.len() < 3 && started.elapsed() < Duration::from_secs(10) {
            got.extend(written(&mut &peer));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(got, ["r1", "r2", "r3"]);
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "r2 and r3 waited 50 ms after r1"
        );
        drop(deliveries);
        listener.await.unwrap();
    }
}
