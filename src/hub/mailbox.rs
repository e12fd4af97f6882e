//! A connection's outbound side, shared by the hub's fan-out, the session's
//! replies and the connection's own task.
//!
//! Whoever queues a frame also writes it, straight to the socket, while the
//! socket takes bytes: a delivery costs one `writev` and no task wake-up.
//! Only when the socket is full does the connection's task take over, waiting for the socket to drain and then
//! writing everything queued meanwhile in one call. The mailbox holds the
//! connection's `TcpStream`; its lock is what orders all writers. A fan-out of many
//! deliveries at once *corks* its mailboxes ([`Mailbox::queue`]) and writes
//! each one once at the end ([`Mailbox::flush`]), so a busy room gets several
//! frames per syscall without any added delay.
//!
//! The queue is bounded: a connection whose frames pile up past it is a slow
//! consumer and is told to close with 4008. Empty, it holds no buffer.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use axum::body::Bytes;
use axum::extract::ws::Utf8Bytes;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::close::{CloseReason, CloseSignal};
use super::cursors::Cursors;
use super::Outbound;
use crate::protocol::{close, MessageId, RoomFrame};
use crate::stats::Stats;

/// Queue entries written per `writev` at most (two slices each).
const MAX_BATCH: usize = 64;
/// Up to this many bytes, queued frames are copied into one buffer and
/// written with one plain write.
const COPY_LIMIT: usize = 4096;
thread_local! {
    /// Where small writes are assembled: reused, so a write zeroes and
    /// allocates nothing.
    static JOINED: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(COPY_LIMIT));
}

/// Runs `write` on `parts` copied into one contiguous buffer.
fn joined<'a, R>(parts: impl IntoIterator<Item = &'a [u8]>, write: impl FnOnce(&[u8]) -> R) -> R {
    JOINED.with_borrow_mut(|buffer| {
        buffer.clear();
        parts
            .into_iter()
            .for_each(|part| buffer.extend_from_slice(part));
        write(buffer)
    })
}

/// The longest WebSocket frame header a server sends (no mask).
const MAX_HEAD: usize = 10;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// The outbound side of one connection; clones share it.
#[derive(Clone)]
pub struct Mailbox {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox").finish_non_exhaustive()
    }
}

/// How a connection's outbound side is set up.
pub struct MailboxSettings {
    /// Frames queued at most before the connection is a slow consumer.
    pub capacity: usize,
    pub stats: Arc<Stats>,
}

struct Shared {
    state: Mutex<State>,
    close: CloseSignal,
    /// None only in unit tests: frames then stay queued.
    socket: Option<TcpStream>,
    capacity: usize,
    stats: Arc<Stats>,
}

struct State {
    cursors: Cursors,
    queue: VecDeque<Entry>,
    /// Bytes of the first entry already written.
    front_written: usize,
    /// Queued entries that are a join's catch-up (its replay, `joined` and
    /// the live frames held meanwhile): queued at once however many, so
    /// they do not count against the bound, which is for live frames piling
    /// up behind a reader that does not keep up.
    catching_up: usize,
    /// Nothing is written before the session starts the mailbox: the
    /// `welcome` frame waits until the connection is reachable.
    started: bool,
    /// The socket refused bytes; the connection's task waits for it to drain.
    blocked: bool,
    /// Corked by a fan-out that will flush it.
    corked: bool,
    /// A close frame is queued, or the socket is gone: nothing more goes out.
    finished: bool,
    /// The connection's task, waiting for work.
    task: Option<Waker>,
}

/// One queued frame: its header and payload, written with one `writev`.
struct Entry {
    head: [u8; MAX_HEAD],
    head_len: u8,
    /// Counted in the `sent` statistics (data frames, not control frames).
    data: bool,
    /// Part of a join's catch-up (see `State::catching_up`).
    catch_up: bool,
    body: Bytes,
}

impl Entry {
    fn frame(opcode: u8, body: Bytes) -> Self {
        let (head, head_len) = frame_head(opcode, body.len());
        Entry {
            head,
            head_len,
            data: opcode == OP_TEXT,
            catch_up: false,
            body,
        }
    }

    /// Bytes that are already framed (the WebSocket library's own replies).
    fn raw(bytes: Bytes) -> Self {
        Entry {
            head: [0; MAX_HEAD],
            head_len: 0,
            data: false,
            catch_up: false,
            body: bytes,
        }
    }

    fn len(&self) -> usize {
        self.head_len as usize + self.body.len()
    }

    /// The unwritten part of this entry, `skip` bytes in, as up to two slices.
    fn slices(&self, skip: usize) -> [&[u8]; 2] {
        let head = &self.head[..self.head_len as usize];
        if skip < head.len() {
            [&head[skip..], &self.body]
        } else {
            [&[], &self.body[skip - head.len()..]]
        }
    }
}

/// A final, unmasked frame header for a payload of `len` bytes.
fn frame_head(opcode: u8, len: usize) -> ([u8; MAX_HEAD], u8) {
    let mut head = [0u8; MAX_HEAD];
    head[0] = 0x80 | opcode;
    let head_len = if len < 126 {
        head[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, head_len)
}

/// Frames and bytes written by [`Mailbox::deliver`], not yet counted.
#[derive(Debug, Default)]
pub struct Sent {
    pub frames: u64,
    pub bytes: u64,
}

impl Sent {
    /// Adds these to the node's `sent` statistics.
    pub fn count(self, stats: &Stats) {
        if self.frames > 0 {
            stats.sent(self.frames, self.bytes);
        }
    }
}

/// The result of a write attempt.
enum Written {
    /// Everything queued is out (or nothing may be written yet).
    Done,
    /// The socket is full.
    WouldBlock,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Mailbox {
    /// A mailbox writing to `socket` (none: frames stay queued, for tests).
    pub fn new(settings: MailboxSettings, socket: Option<TcpStream>) -> Self {
        let MailboxSettings { capacity, stats } = settings;
        Mailbox {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    cursors: Cursors::new(capacity),
                    queue: VecDeque::new(),
                    front_written: 0,
                    catching_up: 0,
                    started: false,
                    blocked: false,
                    corked: false,
                    finished: false,
                    task: None,
                }),
                close: CloseSignal::default(),
                socket,
                capacity,
                stats,
            }),
        }
    }

    pub fn close(&self) -> &CloseSignal {
        &self.shared.close
    }

    /// Queues `item` and writes what the socket takes now. Returns false when
    /// the item was refused (closing, or a slow consumer).
    pub fn offer(&self, item: Outbound) -> bool {
        self.then_write(|state| self.enqueue(state, item))
    }

    /// A live room frame: written straight from the shared frame when nothing
    /// waits ahead of it (no copy of the frame is kept), else queued.
    /// Returns false when it was refused. Frames written here are counted in
    /// `sent`, for the caller to add to the node's statistics once per
    /// fan-out rather than once per connection.
    pub fn deliver(&self, frame: &Arc<RoomFrame>, sent: &mut Sent) -> bool {
        let mut state = self.shared.lock();
        let direct = state.started && !state.blocked && !state.corked && state.queue.is_empty();
        let (Some(socket), true) = (&self.shared.socket, direct) else {
            let queued = self.enqueue(&mut state, Outbound::Room(frame.clone()));
            let wake = self.write_now(&mut state);
            drop(state);
            self.after(wake);
            return queued;
        };
        if !self.accepting(&state) {
            return false;
        }
        if !state.cursors.admit(frame) {
            return !self.overflowed(&mut state);
        }
        let wake = self.write_one(&mut state, socket, &frame.text, sent);
        drop(state);
        self.after(wake);
        true
    }

    /// Writes one text frame from a borrowed payload; what the socket does
    /// not take is queued for the task. True when the task must be woken.
    fn write_one(
        &self,
        state: &mut State,
        socket: &TcpStream,
        text: &Utf8Bytes,
        sent: &mut Sent,
    ) -> bool {
        let body = text.as_bytes();
        let (head, head_len) = frame_head(OP_TEXT, body.len());
        let head = &head[..head_len as usize];
        let total = head.len() + body.len();
        let written = if total <= COPY_LIMIT {
            // A plain `send`: tokio's `try_write` first checks its cached
            // readiness, a cache miss per socket of a fan-out. If the socket
            // is full, the task takes over, and its writes through tokio
            // teach tokio the socket is full.
            joined([head, body], |bytes| SockRef::from(socket).send(bytes))
        } else {
            socket.try_write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
        };
        let front_written = match written {
            Ok(n) if n == total => {
                sent.frames += 1;
                sent.bytes += body.len() as u64;
                return false;
            }
            // Partly written, full, or interrupted: the rest waits for the
            // task, which writes it once the socket is writable.
            Ok(n) if n > 0 => n,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Ok(_) | Err(_) => {
                self.gone(state);
                return false;
            }
        };
        state
            .queue
            .push_back(Entry::frame(OP_TEXT, text.clone().into()));
        state.front_written = front_written;
        state.blocked = true;
        true
    }

    /// Queues `item` without writing: the caller flushes later. Returns true
    /// when this call corked the mailbox, i.e. the caller must [`flush`] it.
    ///
    /// [`flush`]: Mailbox::flush
    pub fn queue(&self, item: Outbound) -> bool {
        let mut state = self.shared.lock();
        self.enqueue(&mut state, item);
        if state.corked || state.queue.is_empty() {
            return false;
        }
        state.corked = true;
        true
    }

    /// Uncorks and writes what the socket takes.
    pub fn flush(&self) {
        self.then_write(|state| state.corked = false);
    }

    /// From now on frames are written; writes the ones queued so far.
    pub fn start(&self) {
        self.then_write(|state| state.started = true);
    }

    /// Queues a heartbeat ping.
    pub fn ping(&self) {
        self.then_write(|state| {
            if !state.finished {
                state.queue.push_back(Entry::frame(OP_PING, Bytes::new()));
            }
        });
    }

    /// Ends the outbound stream with a close frame when `reason` calls for
    /// one. The server's own close goes out after the frame being written, if
    /// any (the rest is dropped); the answer to the peer's close goes out
    /// after everything queued and repeats the peer's code (none for 1005,
    /// "no status", which is never sent).
    pub fn finish(&self, reason: CloseReason) {
        self.then_write(|state| {
            if state.finished {
                return;
            }
            if reason.send_frame {
                let mut body = Vec::with_capacity(2 + reason.text.len());
                if reason.by_peer {
                    if reason.code != close::NO_STATUS {
                        body.extend_from_slice(&reason.code.to_be_bytes());
                    }
                } else {
                    Self::drop_queued(state);
                    body.extend_from_slice(&reason.code.to_be_bytes());
                    body.extend_from_slice(reason.text.as_bytes());
                }
                state.queue.push_back(Entry::frame(OP_CLOSE, body.into()));
            }
            state.finished = true;
        });
    }

    /// True once everything queued is written (or can never be).
    pub fn is_drained(&self) -> bool {
        let state = self.shared.lock();
        state.queue.is_empty() || self.shared.socket.is_none()
    }

    /// For the connection's task: ready when the socket refused bytes, so
    /// the task must wait until it is [`writable`](Self::writable) and then
    /// [`unblock`](Self::unblock) the mailbox.
    pub fn poll_blocked(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.shared.lock();
        if state.blocked {
            return Poll::Ready(());
        }
        match &state.task {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.task = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Resolves once the socket can take bytes (at once without a socket).
    pub async fn writable(&self) {
        if let Some(socket) = &self.shared.socket {
            let _ = socket.writable().await;
        }
    }

    /// For the connection's task, once the socket drained: writes what
    /// waited; true when all of it went out (or the socket is gone).
    pub fn unblock(&self) -> bool {
        let mut state = self.shared.lock();
        state.blocked = false;
        matches!(self.write_queued(&mut state), Written::Done)
    }

    /// The reading half of the socket, for the WebSocket parser. Writes
    /// through it (the parser's replies to pings and to a close) join this
    /// queue, in order with everything else.
    pub fn socket_io(&self) -> SocketIo {
        SocketIo {
            mailbox: self.clone(),
        }
    }

    /// Applies `change` under the lock, then writes what may be written now,
    /// waking the task if it has to take over.
    fn then_write<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.shared.lock();
        let result = change(&mut state);
        let wake = self.write_now(&mut state);
        drop(state);
        self.after(wake);
        result
    }

    /// Applies the room cursors and queues the frames that result.
    fn enqueue(&self, state: &mut State, item: Outbound) -> bool {
        if !self.accepting(state) {
            return false;
        }
        if state.queue.len() >= self.limit(state) {
            self.slow_consumer(state);
            return false;
        }
        let catch_up = matches!(
            item,
            Outbound::JoinCompleted(_) | Outbound::JoinFailed { .. }
        );
        let State {
            cursors,
            queue,
            catching_up,
            ..
        } = state;
        cursors.apply(item, &mut |text| {
            let mut entry = Entry::frame(OP_TEXT, text.into());
            entry.catch_up = catch_up;
            *catching_up += usize::from(catch_up);
            queue.push_back(entry);
        });
        if state.queue.len() > self.limit(state) {
            self.slow_consumer(state);
            return false;
        }
        !self.overflowed(state)
    }

    /// Entries the queue may hold: the bound, plus any catch-up.
    fn limit(&self, state: &State) -> usize {
        self.shared.capacity + state.catching_up
    }

    /// Empties the queue but for a frame half written, which must be
    /// completed.
    fn drop_queued(state: &mut State) {
        let keep = usize::from(state.front_written > 0);
        state.queue.truncate(keep);
        state.catching_up = state.queue.iter().filter(|e| e.catch_up).count();
    }

    /// Once the connection is closing only its close frame follows.
    fn accepting(&self, state: &State) -> bool {
        !state.finished && self.shared.close.reason().is_none()
    }

    /// Closes a connection whose cursors held more than the queue allows.
    fn overflowed(&self, state: &mut State) -> bool {
        if state.cursors.overflowed {
            self.slow_consumer(state);
        }
        state.cursors.overflowed
    }

    /// Drops what waits (but a frame half written, which must be completed)
    /// and closes; the task then queues the close frame.
    fn slow_consumer(&self, state: &mut State) {
        Self::drop_queued(state);
        if self.shared.close.close(CloseReason::SLOW_CONSUMER) {
            self.shared.stats.slow_consumer_closed();
        }
    }

    /// Writes now unless the task owns the socket or a cork holds the
    /// frames back. True when the task must be woken.
    fn write_now(&self, state: &mut State) -> bool {
        if !state.started || state.blocked || state.corked || state.queue.is_empty() {
            return false;
        }
        matches!(self.write_queued(state), Written::WouldBlock)
    }

    /// Writes queued entries until the queue is empty or the socket full.
    fn write_queued(&self, state: &mut State) -> Written {
        let Some(socket) = &self.shared.socket else {
            return Written::Done;
        };
        let mut frames = 0u64;
        let mut bytes = 0u64;
        let outcome = loop {
            if state.queue.is_empty() {
                break Written::Done;
            }
            let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
            let mut used = 0;
            let mut skip = state.front_written;
            for entry in state.queue.iter().take(MAX_BATCH) {
                for part in entry.slices(skip) {
                    if !part.is_empty() {
                        slices[used] = IoSlice::new(part);
                        used += 1;
                    }
                }
                skip = 0;
            }
            let slices = &slices[..used];
            let total: usize = slices.iter().map(|slice| slice.len()).sum();
            let written = if slices.len() > 1 && total <= COPY_LIMIT {
                // Small frames: one contiguous `send` costs the kernel less
                // than a `writev` of their pieces.
                joined(slices.iter().map(|slice| &**slice), |bytes| {
                    socket.try_write(bytes)
                })
            } else {
                socket.try_write_vectored(slices)
            };
            match written {
                Ok(0) => {
                    self.gone(state);
                    break Written::Done;
                }
                Ok(mut n) => {
                    while n > 0 {
                        let Some(front) = state.queue.front() else {
                            break;
                        };
                        let left = front.len() - state.front_written;
                        if n < left {
                            state.front_written += n;
                            break;
                        }
                        n -= left;
                        state.front_written = 0;
                        if front.data {
                            frames += 1;
                            bytes += front.body.len() as u64;
                        }
                        state.catching_up -= usize::from(front.catch_up);
                        state.queue.pop_front();
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    state.blocked = true;
                    break Written::WouldBlock;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.gone(state);
                    break Written::Done;
                }
            }
        };
        if frames > 0 {
            self.shared.stats.sent(frames, bytes);
        }
        // Drained, the queue gives its buffer back: most connections are idle
        // most of the time, and live frames are written without queueing.
        if state.queue.is_empty() && state.queue.capacity() > 0 {
            state.queue = VecDeque::new();
        }
        outcome
    }

    /// The peer is gone: drop everything and close without a frame.
    fn gone(&self, state: &mut State) {
        state.finished = true;
        state.queue = VecDeque::new();
        state.front_written = 0;
        state.catching_up = 0;
        self.shared.close.close(CloseReason::GONE);
    }

    fn after(&self, wake: bool) {
        if !wake {
            return;
        }
        let waker = self.shared.lock().task.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The newest id of `room` written (or queued) to this connection. Steady
    /// while a join of the room is under way: its live frames are held.
    pub fn last_written(&self, room: &Arc<str>) -> Option<MessageId> {
        self.shared.lock().cursors.last_written(room)
    }

    /// Joins `room` as far as the cursors go (tests of the fan-out).
    #[cfg(test)]
    pub fn track_room(&self, room: &str) {
        self.shared.lock().cursors.track(room.into());
    }

    /// The text of every queued data frame, removing them (tests only).
    #[cfg(test)]
    pub fn take_texts(&self) -> Vec<String> {
        let mut state = self.shared.lock();
        let texts = state
            .queue
            .iter()
            .filter(|e| e.data)
            .map(|e| String::from_utf8_lossy(&e.body).into_owned())
            .collect();
        state.queue.clear();
        state.catching_up = 0;
        texts
    }
}

/// The socket as the WebSocket parser sees it: reads come from the socket,
/// writes join the mailbox's queue.
pub struct SocketIo {
    mailbox: Mailbox,
}

impl AsyncRead for SocketIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(socket) = &self.mailbox.shared.socket else {
            return Poll::Ready(Ok(()));
        };
        loop {
            std::task::ready!(socket.poll_read_ready(cx))?;
            match socket.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

impl AsyncWrite for SocketIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mailbox = &self.mailbox;
        let mut state = mailbox.shared.lock();
        // Once finished (our close frame queued) nothing more may follow.
        // The parser's replies count against the queue's bound like any
        // frame: a peer that pings and never reads is a slow consumer.
        if !state.finished {
            if state.queue.len() >= mailbox.limit(&state) {
                mailbox.slow_consumer(&mut state);
            } else {
                state
                    .queue
                    .push_back(Entry::raw(Bytes::copy_from_slice(buf)));
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.mailbox.then_write(|_| ());
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(capacity: usize) -> MailboxSettings {
        MailboxSettings {
            capacity,
            stats: Arc::new(Stats::new()),
        }
    }

    fn frame(text: &str) -> Outbound {
        Outbound::Frame(text.to_string().into())
    }

    #[test]
    fn frame_headers_use_the_shortest_length_form() {
        let short = Entry::frame(OP_TEXT, Bytes::from(vec![b'a'; 125]));
        assert_eq!(&short.head[..short.head_len as usize], &[0x81, 125]);
        let medium = Entry::frame(OP_TEXT, Bytes::from(vec![b'a'; 126]));
        assert_eq!(
            &medium.head[..medium.head_len as usize],
            &[0x81, 126, 0, 126]
        );
        let long = Entry::frame(OP_TEXT, Bytes::from(vec![b'a'; 70_000]));
        assert_eq!(
            &long.head[..long.head_len as usize],
            &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]
        );
        let ping = Entry::frame(OP_PING, Bytes::new());
        assert_eq!(&ping.head[..ping.head_len as usize], &[0x89, 0]);
    }

    #[test]
    fn slices_skip_what_was_already_written() {
        let entry = Entry::frame(OP_TEXT, Bytes::from_static(b"hello"));
        assert_eq!(entry.slices(0), [&[0x81u8, 5][..], b"hello"]);
        assert_eq!(entry.slices(1), [&[5u8][..], b"hello"]);
        assert_eq!(entry.slices(4), [&[][..], b"llo"]);
    }

    #[test]
    fn items_are_queued_in_order() {
        let mailbox = Mailbox::new(settings(4), None);
        assert!(mailbox.offer(frame("a")));
        assert!(mailbox.offer(frame("b")));
        assert_eq!(mailbox.take_texts(), vec!["a", "b"]);
    }

    #[test]
    fn a_full_queue_closes_the_connection_as_a_slow_consumer() {
        let mailbox = Mailbox::new(settings(2), None);
        let stats = mailbox.shared.stats.clone();
        assert!(mailbox.offer(frame("1")));
        assert!(mailbox.offer(frame("2")));
        assert!(!mailbox.offer(frame("3")));
        assert_eq!(mailbox.close().reason(), Some(CloseReason::SLOW_CONSUMER));
        assert_eq!(stats.snapshot_counters().slow_consumer_closes, 1);
        assert!(
            !mailbox.offer(frame("4")),
            "a slow consumer takes nothing more"
        );
        mailbox.finish(CloseReason::SLOW_CONSUMER);
        let state = mailbox.shared.lock();
        assert_eq!(state.queue.len(), 1, "only the close frame is left");
        assert_eq!(&state.queue[0].body[..2], &4008u16.to_be_bytes());
    }

    #[test]
    fn corking_asks_for_one_flush_per_batch() {
        let mailbox = Mailbox::new(settings(8), None);
        assert!(mailbox.queue(frame("a")));
        assert!(!mailbox.queue(frame("b")), "already corked");
        mailbox.flush();
        assert!(mailbox.queue(frame("c")), "corked again after the flush");
        assert_eq!(mailbox.take_texts(), vec!["a", "b", "c"]);
    }

    #[test]
    fn a_server_close_frame_replaces_what_was_still_queued() {
        let mailbox = Mailbox::new(settings(8), None);
        mailbox.offer(frame("dropped"));
        mailbox.finish(CloseReason::DRAINING);
        assert!(!mailbox.offer(frame("after")));
        let state = mailbox.shared.lock();
        assert_eq!(state.queue.len(), 1);
        let close = &state.queue[0];
        assert_eq!(close.head[0], 0x88);
        assert_eq!(&close.body[..2], &1012u16.to_be_bytes());
    }

    /// A mailbox writing to a real loopback socket, and the socket's peer.
    async fn on_a_socket() -> (Mailbox, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Mailbox::new(settings(8), Some(server)), client)
    }

    #[tokio::test]
    async fn frames_reach_the_socket_and_the_peer_reads_them_in_order() {
        use tokio::io::AsyncReadExt;
        let (mailbox, mut client) = on_a_socket().await;
        mailbox.offer(frame("welcome"));
        mailbox.start();
        mailbox.offer(frame("hi"));
        let mut got = vec![0u8; 13];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"\x81\x07welcome\x81\x02hi");
        assert!(mailbox.is_drained());
    }

    #[tokio::test]
    async fn room_frames_are_written_in_order_whether_direct_or_queued() {
        use tokio::io::AsyncReadExt;
        let (mailbox, mut client) = on_a_socket().await;
        let frame = |seq: u64, text: &str| {
            Arc::new(RoomFrame {
                room: "r".into(),
                id: Some(crate::protocol::MessageId::new(1, seq)),
                text: text.into(),
            })
        };
        mailbox.track_room("r");
        // Before the start it is queued; after it, written straight away.
        let mut sent = Sent::default();
        assert!(mailbox.deliver(&frame(1, "a"), &mut sent));
        mailbox.start();
        assert!(mailbox.deliver(&frame(2, "b"), &mut sent));
        assert!(mailbox.queue(Outbound::Room(frame(3, "c"))));
        assert!(
            mailbox.deliver(&frame(4, "d"), &mut sent),
            "corked: queued behind c"
        );
        assert_eq!(sent.frames, 1, "only b went out directly");
        mailbox.flush();
        let mut got = vec![0u8; 12];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"\x81\x01a\x81\x01b\x81\x01c\x81\x01d");
        assert!(mailbox.is_drained());
    }

    #[tokio::test]
    async fn pongs_to_a_peer_that_never_reads_count_against_the_queue_bound() {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(4096).unwrap();
        let mut client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        SockRef::from(&server).set_send_buffer_size(4096).unwrap();
        let mailbox = Mailbox::new(settings(8), Some(server));
        mailbox.start();
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            mailbox.socket_io(),
            tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        // A masked ping with a 125-byte payload, sent 2,000 times by a peer
        // that reads nothing.
        let mut ping = vec![0x89u8, 0x80 | 125, 1, 2, 3, 4];
        ping.extend((0..125).map(|i| b'p' ^ [1u8, 2, 3, 4][i % 4]));
        const PINGS: usize = 2000;
        let flood = tokio::spawn(async move {
            for _ in 0..PINGS {
                client.write_all(&ping).await.unwrap();
            }
            client
        });
        for _ in 0..PINGS {
            match ws.next().await {
                Some(Ok(tungstenite::Message::Ping(_))) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let _client = flood.await.unwrap();
        let queued = mailbox.shared.lock().queue.len();
        assert!(queued <= 8, "{queued} entries queued, the bound is 8");
        assert_eq!(mailbox.close().reason(), Some(CloseReason::SLOW_CONSUMER));
    }
}
