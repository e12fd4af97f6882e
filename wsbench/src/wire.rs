//! WebSocket framing after the handshake: a [`Decoder`] for either side's
//! frames (read straight from a reused buffer: no allocation, no copy per
//! message), and a lean client connection on it: text frames are written
//! masked with one write each, pings are answered.
//!
//! The generator shares the machine's cores with the server, so what it
//! spends per received message shows up as latency: tokio-tungstenite does
//! the handshake (and reads the `welcome`), this does the rest.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest frame, or message of several frames, accepted from the peer.
const MAX_FRAME: usize = 1 << 20;

/// What a read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Text(&'a str),
    /// A close frame (its code, if any): the server is done with us.
    Close(Option<u16>),
    /// The stream ended without a close frame.
    Eof,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    Io(io::ErrorKind),
    Protocol(&'static str),
}

impl WireError {
    pub fn kind(&self) -> String {
        match self {
            WireError::Io(k) => format!("io:{k:?}"),
            WireError::Protocol(p) => format!("protocol:{p}"),
        }
    }
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        WireError::Io(e.kind())
    }
}

/// A parsed frame header: opcode, FIN, where the payload is, its mask.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: usize,
    mask: Option<[u8; 4]>,
}

/// Parses a frame header at the start of `b`; None if more bytes are needed.
fn parse_header(b: &[u8]) -> Result<Option<Header>, WireError> {
    if b.len() < 2 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    if b[0] & 0x70 != 0 {
        return Err(WireError::Protocol("reserved bits"));
    }
    let opcode = b[0] & 0x0F;
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7F {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([b[2], b[3]]) as usize, 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&b[2..10]);
            let n = u64::from_be_bytes(n);
            if n > MAX_FRAME as u64 {
                return Err(WireError::Protocol("frame too large"));
            }
            (n as usize, 10)
        }
        n => (n as usize, 2),
    };
    if len > MAX_FRAME {
        return Err(WireError::Protocol("frame too large"));
    }
    let mask = if masked {
        if b.len() < at + 4 {
            return Ok(None);
        }
        let m = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        header_len: at,
        payload_len: len,
        mask,
    }))
}

/// Appends a frame to `out`: masked (a client's) with `Some(mask)`, else a
/// server's.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(mask_bit | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    match mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        }
        None => out.extend_from_slice(payload),
    }
}

/// Where a decoded message's bytes are (see [`Decoder::bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Unmasked, in the read buffer.
    Buf(usize, usize),
    /// Assembled from continuation frames.
    Fragments,
}

/// A complete message or control frame out of [`Decoder::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A text or binary message (UTF-8 is checked by [`Decoder::text`]).
    Text(Span),
    Ping(Span),
    Pong,
    /// A close frame: its code, if any, and the span of that code (to echo).
    Close(Option<u16>, Span),
}

/// Frames out of a byte stream, client's or server's (masked payloads are
/// unmasked in place): a reused buffer, no allocation or copy per message.
/// It does no I/O: the owner reads into [`Decoder::spare`].
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// A message in continuation frames, until its final frame.
    fragments: Vec<u8>,
    fragmented: bool,
}

const READ_CHUNK: usize = 4096;

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            fragments: Vec::new(),
            fragmented: false,
        }
    }
}

impl Decoder {
    /// The next complete message or control frame already read; None if
    /// more bytes are needed.
    pub fn next(&mut self) -> Result<Option<Decoded>, WireError> {
        while let Some(h) = parse_header(&self.buf[self.start..self.end])? {
            let total = h.header_len + h.payload_len;
            if self.end - self.start < total {
                if self.buf.len() < total {
                    // A frame larger than the buffer: make room.
                    self.compact();
                    self.buf.resize(total.next_power_of_two(), 0);
                }
                return Ok(None);
            }
            let p0 = self.start + h.header_len;
            let p1 = p0 + h.payload_len;
            self.start += total;
            if let Some(m) = h.mask {
                for (i, b) in self.buf[p0..p1].iter_mut().enumerate() {
                    *b ^= m[i & 3];
                }
            }
            let span = Span::Buf(p0, p1);
            if h.opcode >= OP_CLOSE && (!h.fin || h.payload_len > 125) {
                return Err(WireError::Protocol("fragmented or long control frame"));
            }
            match h.opcode {
                OP_TEXT | OP_BINARY if self.fragmented => {
                    return Err(WireError::Protocol("new message inside a fragmented one"))
                }
                OP_CONT if !self.fragmented => {
                    return Err(WireError::Protocol("continuation without a message"))
                }
                OP_TEXT | OP_BINARY if h.fin => return Ok(Some(Decoded::Text(span))),
                OP_TEXT | OP_BINARY | OP_CONT => {
                    if h.opcode != OP_CONT {
                        self.fragments.clear();
                        self.fragmented = true;
                    }
                    if self.fragments.len() + h.payload_len > MAX_FRAME {
                        return Err(WireError::Protocol("message too large"));
                    }
                    self.fragments.extend_from_slice(&self.buf[p0..p1]);
                    if h.fin {
                        self.fragmented = false;
                        return Ok(Some(Decoded::Text(Span::Fragments)));
                    }
                }
                OP_PING => return Ok(Some(Decoded::Ping(span))),
                OP_PONG => return Ok(Some(Decoded::Pong)),
                OP_CLOSE => {
                    let code = (h.payload_len >= 2)
                        .then(|| u16::from_be_bytes([self.buf[p0], self.buf[p0 + 1]]));
                    let echo = Span::Buf(p0, p0 + h.payload_len.min(2));
                    return Ok(Some(Decoded::Close(code, echo)));
                }
                _ => return Err(WireError::Protocol("unknown opcode")),
            }
        }
        Ok(None)
    }

    pub fn bytes(&self, span: Span) -> &[u8] {
        match span {
            Span::Buf(p0, p1) => &self.buf[p0..p1],
            Span::Fragments => &self.fragments,
        }
    }

    pub fn text(&self, span: Span) -> Result<&str, WireError> {
        std::str::from_utf8(self.bytes(span)).map_err(|_| WireError::Protocol("invalid UTF-8"))
    }

    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }

    /// Room to read into, after what is buffered (call once [`next`] gave
    /// None: spans it handed out are invalid afterwards).
    ///
    /// [`next`]: Decoder::next
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.compact();
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`Decoder::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }
}

pub struct Conn {
    stream: TcpStream,
    decoder: Decoder,
    out: Vec<u8>,
    /// Control frames (pongs) not yet written.
    pending: Vec<u8>,
    mask_state: u32,
    closed: bool,
}

impl Conn {
    pub fn new(stream: TcpStream, seed: u32) -> Conn {
        Conn {
            stream,
            decoder: Decoder::default(),
            out: Vec::new(),
            pending: Vec::new(),
            mask_state: seed | 1,
            closed: false,
        }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift32: masks need not be secret here, only present.
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        x.to_le_bytes()
    }

    /// Sends one text frame (and any pong owed first).
    pub async fn send_text(&mut self, text: &str) -> Result<(), WireError> {
        let mask = self.next_mask();
        self.out.clear();
        if !self.pending.is_empty() {
            self.out.append(&mut self.pending);
        }
        encode_frame(&mut self.out, OP_TEXT, text.as_bytes(), Some(mask));
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    /// Queues a control frame and writes what it can without waiting.
    fn control(&mut self, opcode: u8, span: Span) {
        let mask = self.next_mask();
        encode_frame(
            &mut self.pending,
            opcode,
            self.decoder.bytes(span),
            Some(mask),
        );
        while !self.pending.is_empty() {
            match self.stream.try_write(&self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(_) => break, // WouldBlock or worse: retried with the next send
            }
        }
    }

    /// The next text message or the end of the connection. Cancel-safe:
    /// everything read stays buffered in `self`.
    pub async fn recv(&mut self) -> Result<Event<'_>, WireError> {
        if self.closed {
            return Ok(Event::Eof);
        }
        loop {
            while let Some(decoded) = self.decoder.next()? {
                match decoded {
                    Decoded::Text(span) => return self.decoder.text(span).map(Event::Text),
                    Decoded::Ping(span) => self.control(OP_PONG, span),
                    Decoded::Pong => {}
                    Decoded::Close(code, echo) => {
                        // Echo the close, as the protocol asks; best effort.
                        self.control(OP_CLOSE, echo);
                        self.closed = true;
                        return Ok(Event::Close(code));
                    }
                }
            }
            let n = self.stream.read(self.decoder.spare()).await?;
            if n == 0 {
                self.closed = true;
                return Ok(Event::Eof);
            }
            self.decoder.filled(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_frame(&mut v, opcode, payload, None);
        if !fin {
            v[0] &= 0x7F;
        }
        v
    }

    /// Feeds `bytes` to `d` in pieces of `step`, collecting what it decodes
    /// (texts as strings, others by name).
    fn decode_all(d: &mut Decoder, bytes: &[u8], step: usize) -> Result<Vec<String>, WireError> {
        let mut out = Vec::new();
        for piece in bytes.chunks(step) {
            let spare = d.spare();
            spare[..piece.len()].copy_from_slice(piece);
            d.filled(piece.len());
            while let Some(decoded) = d.next()? {
                out.push(match decoded {
                    Decoded::Text(span) => d.text(span)?.to_string(),
                    Decoded::Ping(span) => format!("ping:{}", d.text(span)?),
                    Decoded::Pong => "pong".into(),
                    Decoded::Close(code, _) => format!("close:{code:?}"),
                });
            }
        }
        Ok(out)
    }

    #[test]
    fn the_decoder_unmasks_client_frames_split_anywhere_and_grows_for_big_ones() {
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, OP_TEXT, b"hello", Some([9, 8, 7, 6]));
        encode_frame(&mut bytes, OP_PING, b"p", Some([1, 2, 3, 4]));
        let big = "b".repeat(10_000);
        encode_frame(&mut bytes, OP_TEXT, big.as_bytes(), Some([5, 5, 5, 5]));
        encode_frame(
            &mut bytes,
            OP_CLOSE,
            &1000u16.to_be_bytes(),
            Some([0, 1, 0, 1]),
        );
        for step in [1, 3, 4096] {
            let got = decode_all(&mut Decoder::default(), &bytes, step).unwrap();
            assert_eq!(
                got,
                [
                    "hello".to_string(),
                    "ping:p".into(),
                    big.clone(),
                    "close:Some(1000)".into()
                ],
                "read {step} bytes at a time"
            );
        }
    }

    #[test]
    fn the_decoder_refuses_broken_fragments_and_control_frames() {
        let decode =
            |frames: &[Vec<u8>]| decode_all(&mut Decoder::default(), &frames.concat(), 4096);
        assert_eq!(
            decode(&[
                server_frame(OP_TEXT, false, b"a"),
                server_frame(OP_CONT, true, b"b")
            ]),
            Ok(vec!["ab".to_string()])
        );
        assert_eq!(
            decode(&[server_frame(OP_CONT, true, b"b")]),
            Err(WireError::Protocol("continuation without a message"))
        );
        assert_eq!(
            decode(&[
                server_frame(OP_TEXT, false, b"a"),
                server_frame(OP_TEXT, true, b"b")
            ]),
            Err(WireError::Protocol("new message inside a fragmented one"))
        );
        assert_eq!(
            decode(&[server_frame(OP_PING, false, b"p")]),
            Err(WireError::Protocol("fragmented or long control frame"))
        );
        assert_eq!(
            decode(&[server_frame(OP_PING, true, &[0; 126])]),
            Err(WireError::Protocol("fragmented or long control frame"))
        );
        let half = vec![b'x'; MAX_FRAME / 2 + 1];
        assert_eq!(
            decode(&[
                server_frame(OP_TEXT, false, &half),
                server_frame(OP_CONT, true, &half)
            ]),
            Err(WireError::Protocol("message too large"))
        );
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header(&[0x81]).unwrap(), None);
        let h = parse_header(&server_frame(OP_TEXT, true, b"hi"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.header_len, h.payload_len),
            (true, OP_TEXT, 2, 2)
        );
        let big = server_frame(OP_TEXT, true, &[b'a'; 300]);
        assert_eq!(parse_header(&big[..3]).unwrap(), None);
        assert_eq!(parse_header(&big).unwrap().unwrap().payload_len, 300);
        let huge = server_frame(OP_BINARY, true, &vec![0; 70_000]);
        assert_eq!(parse_header(&huge).unwrap().unwrap().header_len, 10);
        assert!(parse_header(&[0xC1, 0]).is_err());
    }

    #[test]
    fn client_frames_are_masked() {
        let mut out = Vec::new();
        encode_frame(&mut out, OP_TEXT, b"hello", Some([1, 2, 3, 4]));
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x80 | 5);
        let h = parse_header(&out).unwrap().unwrap();
        assert_eq!(h.mask, Some([1, 2, 3, 4]));
        let unmasked: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i & 3])
            .collect();
        assert_eq!(unmasked, b"hello");
        let mut long = Vec::new();
        encode_frame(&mut long, OP_TEXT, &[b'x'; 200], Some([0; 4]));
        assert_eq!(&long[..4], &[0x81, 0x80 | 126, 0, 200]);
    }

    #[tokio::test]
    async fn reads_split_fragmented_and_control_frames() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut bytes = server_frame(OP_TEXT, true, b"one");
            bytes.extend(server_frame(OP_PING, true, b"p"));
            bytes.extend(server_frame(OP_TEXT, false, b"tw"));
            bytes.extend(server_frame(OP_CONT, true, b"o"));
            bytes.extend(server_frame(OP_TEXT, true, &[b'z'; 5000]));
            bytes.extend(server_frame(OP_CLOSE, true, &1000u16.to_be_bytes()));
            // Byte by byte at first, to split headers.
            for b in &bytes[..5] {
                s.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            s.write_all(&bytes[5..]).await.unwrap();
            // The pong and the close echo, masked.
            let mut got = vec![0u8; 64];
            let mut n = 0;
            while n < 2 + 4 + 1 + 2 + 4 + 2 {
                let k = s.read(&mut got[n..]).await.unwrap();
                if k == 0 {
                    break;
                }
                n += k;
            }
            got.truncate(n);
            got
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut c = Conn::new(stream, 7);
        assert_eq!(c.recv().await.unwrap(), Event::Text("one"));
        assert_eq!(c.recv().await.unwrap(), Event::Text("two"));
        match c.recv().await.unwrap() {
            Event::Text(t) => assert_eq!(t.len(), 5000),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.recv().await.unwrap(), Event::Close(Some(1000)));
        assert_eq!(c.recv().await.unwrap(), Event::Eof);
        let written = server.await.unwrap();
        let pong = parse_header(&written).unwrap().unwrap();
        assert_eq!((pong.opcode, pong.payload_len), (OP_PONG, 1));
        let close = parse_header(&written[7..]).unwrap().unwrap();
        assert_eq!((close.opcode, close.payload_len), (OP_CLOSE, 2));
    }
}
