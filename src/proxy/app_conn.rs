//! The app's connection under the HTTP server: it checks the framing of every HTTP/1 request
//! head before the server parses it, and it closes the connection so that an answer given
//! before the request was fully read still reaches the app.
//!
//! **Framing.** A request whose body length can be read two ways is refused with 400
//! `bad_request`, as nginx and Envoy do: `Content-Length` together with `Transfer-Encoding`,
//! `Content-Length` values that differ or are not a number, a `Transfer-Encoding` other than
//! exactly `chunked`, or `Transfer-Encoding` in an HTTP/1.0 request. The head of such a request
//! reaches the server with its framing headers renamed (so the server reads no body and cannot
//! refuse it in its own words first), the request handler answers it from
//! [`ConnCheck::next_request`], and nothing after that head is ever read: whatever the app
//! meant to follow is never parsed as a request. To know where each head starts, this layer
//! follows the body framing of every request (a length, or the chunked coding, byte for byte
//! with the same rules as the server's decoder). HTTP/2 (prior knowledge) has its own framing
//! and passes through untouched.
//!
//! **Lingering close.** When keyward answers before the body was read (401, 403, 404, 413,
//! 503...) and closes, the app may still be writing; closing a socket with unread bytes resets
//! the connection, and an app that writes its whole body before reading (Python's
//! `http.client`, curl without `Expect`) gets a broken pipe instead of the answer. So a
//! connection that ends before the app closed its side is shut for writing (the app sees the
//! end of the answer), then read and discarded for at most [`LINGER_TIME`] (and
//! [`LINGER_IDLE`] without a byte) and [`LINGER_BYTES`], as nginx's `lingering_close` does.
//! This module must not interpret requests beyond their framing.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Longest time a closed connection is drained of what the app still sends.
pub const LINGER_TIME: Duration = Duration::from_secs(10);
/// A drained connection is dropped after this long without a byte from the app.
pub const LINGER_IDLE: Duration = Duration::from_secs(2);
/// Most bytes read and discarded from one closed connection.
pub const LINGER_BYTES: u64 = 64 << 20;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Headers a request head may have for this layer to parse it; the server allows fewer, so a
/// head this layer cannot parse is one the server refuses anyway.
const MAX_HEADERS: usize = 256;
/// The server's cap on chunk extension bytes per chunk (hyper's `CHUNKED_EXTENSIONS_LIMIT`).
const CHUNK_EXTENSIONS_LIMIT: u64 = 16 * 1024;

/// What the request handler learns from the connection: whether the request it is about to
/// serve was refused for its framing. Shared between one connection and its handler.
#[derive(Default)]
pub struct ConnCheck {
    /// Request heads the handler has been called for.
    served: AtomicU64,
    /// The 1-based index of the refused head and why; there is at most one, and it is the
    /// connection's last.
    refused: std::sync::OnceLock<(u64, String)>,
}

impl ConnCheck {
    /// Counts one more request on this connection and returns why it must be refused, if its
    /// head had ambiguous framing. HTTP/1 requests reach the handler one by one in order, so
    /// the count names the head; HTTP/2 connections never refuse here.
    pub fn next_request(&self) -> Option<String> {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        match self.refused.get() {
            Some((index, reason)) if *index == n => Some(reason.clone()),
            _ => None,
        }
    }
}

/// Where the reader is in the app's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The first bytes: HTTP/2 preface or an HTTP/1 head?
    Preface,
    /// Collecting a request head.
    Head,
    /// `n` more body bytes of a `Content-Length` body.
    Length(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Not inspected any more (HTTP/2, or a head the server will refuse anyway).
    Passthrough,
    /// A head was refused: nothing more is read.
    Refused,
    /// The chunked framing broke: the server sees the end of the stream.
    Broken,
}

/// States of the chunked decoder, as in the server's (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Start of a size line; `digits` seen so far.
    Size { size: u64, digits: bool },
    /// Spaces after the size.
    SizeLws { size: u64 },
    /// A `;` extension, `used` bytes of it.
    Extension { size: u64, used: u64 },
    /// Expecting the LF of the size line.
    SizeLf { size: u64 },
    /// Chunk data left.
    Data(u64),
    /// Expecting the CR after the data.
    DataCr,
    /// Expecting the LF after the data.
    DataLf,
    /// After the last chunk: a trailer line or the final CRLF.
    EndCr,
    /// Expecting the final LF.
    EndLf,
    /// Inside a trailer line.
    Trailer,
    /// Expecting the LF of a trailer line.
    TrailerLf,
}

/// The result of feeding one byte to the chunked decoder.
enum Step {
    Next(Chunk),
    Done,
    Invalid,
}

impl Chunk {
    fn step(self, b: u8) -> Step {
        use Chunk::*;
        let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
        match self {
            Size { size, digits } => match (hex(b), b) {
                (Some(d), _) => match size.checked_mul(16).and_then(|s| s.checked_add(d)) {
                    Some(size) => Step::Next(Size { size, digits: true }),
                    None => Step::Invalid,
                },
                // A size line starts with a digit.
                (None, _) if !digits => Step::Invalid,
                (None, b'\t' | b' ') => Step::Next(SizeLws { size }),
                (None, b';') => Step::Next(Extension { size, used: 0 }),
                (None, b'\r') => Step::Next(SizeLf { size }),
                _ => Step::Invalid,
            },
            SizeLws { size } => match b {
                b'\t' | b' ' => Step::Next(SizeLws { size }),
                b';' => Step::Next(Extension { size, used: 0 }),
                b'\r' => Step::Next(SizeLf { size }),
                _ => Step::Invalid,
            },
            Extension { size, used } => match b {
                b'\r' => Step::Next(SizeLf { size }),
                b'\n' => Step::Invalid,
                _ if used + 1 >= CHUNK_EXTENSIONS_LIMIT => Step::Invalid,
                _ => Step::Next(Extension {
                    size,
                    used: used + 1,
                }),
            },
            SizeLf { size } => match (b, size) {
                (b'\n', 0) => Step::Next(EndCr),
                (b'\n', n) => Step::Next(Data(n)),
                _ => Step::Invalid,
            },
            Data(_) => unreachable!("data is consumed in bulk"),
            DataCr => match b {
                b'\r' => Step::Next(DataLf),
                _ => Step::Invalid,
            },
            DataLf => match b {
                b'\n' => Step::Next(Size {
                    size: 0,
                    digits: false,
                }),
                _ => Step::Invalid,
            },
            EndCr => match b {
                b'\r' => Step::Next(EndLf),
                _ => Step::Next(Trailer),
            },
            EndLf => match b {
                b'\n' => Step::Done,
                _ => Step::Invalid,
            },
            Trailer => match b {
                b'\r' => Step::Next(TrailerLf),
                _ => Step::Next(Trailer),
            },
            TrailerLf => match b {
                b'\n' => Step::Next(EndCr),
                _ => Step::Invalid,
            },
        }
    }
}

/// How a checked request head frames its body.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// `Content-Length: n` (or no body: 0).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Reads the framing of a parsed request head, or why it is ambiguous.
fn framing(req: &httparse::Request<'_, '_>) -> Result<Framing, String> {
    let mut length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).unwrap_or("").trim();
            let n = (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
                .then(|| text.parse::<u64>().ok())
                .flatten()
                .ok_or("its Content-Length is not a number")?;
            if length.is_some_and(|m| m != n) {
                return Err("it has several Content-Length headers that differ".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let text = String::from_utf8_lossy(h.value);
            codings.extend(
                text.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            );
            if codings.is_empty() {
                codings.push(String::new());
            }
        }
    }
    if codings.is_empty() {
        return Ok(Framing::Length(length.unwrap_or(0)));
    }
    if req.version == Some(0) {
        return Err("it is HTTP/1.0 with a Transfer-Encoding header".into());
    }
    if length.is_some() {
        return Err("it has both Content-Length and Transfer-Encoding".into());
    }
    if codings != ["chunked"] {
        return Err(format!(
            "its Transfer-Encoding is `{}`; only `chunked` is accepted",
            codings.join(", ")
        ));
    }
    Ok(Framing::Chunked)
}

/// Renames the framing headers of a refused head in place (same length), so the server parses
/// it as a request without a body and leaves the refusal to the handler.
fn neutralize(head: &mut [u8], parsed_names: &[(usize, usize)]) {
    for &(start, len) in parsed_names {
        head[start..start + len].fill(b'x');
    }
}

/// What an accepted socket must offer to be wrapped.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The app's connection: see the module documentation.
pub struct AppConn<I: Io> {
    /// The socket; taken by the lingering close.
    inner: Option<I>,
    mode: Mode,
    /// A head (or the first bytes) not complete yet, held back from the server.
    held: BytesMut,
    /// Checked bytes the server has not taken yet.
    ready: BytesMut,
    /// Largest head held back before it is handed on unchecked (the server refuses it: 431).
    max_head: usize,
    /// Heads handed to the server.
    heads: u64,
    /// The app closed its side (or the socket failed): nothing to linger for.
    read_closed: bool,
    check: Arc<ConnCheck>,
}

impl<I: Io> AppConn<I> {
    /// Wraps an accepted socket. Heads larger than `max_head` bytes are left to the server's
    /// own limit.
    pub fn new(inner: I, max_head: usize) -> (AppConn<I>, Arc<ConnCheck>) {
        let check = Arc::new(ConnCheck::default());
        let conn = AppConn {
            inner: Some(inner),
            mode: Mode::Preface,
            held: BytesMut::new(),
            ready: BytesMut::new(),
            max_head,
            heads: 0,
            read_closed: false,
            check: check.clone(),
        };
        (conn, check)
    }

    /// Moves the held bytes on, unchecked, and stops inspecting.
    fn pass_through(&mut self) {
        let held = self.held.split();
        self.ready.extend_from_slice(&held);
        self.mode = Mode::Passthrough;
    }

    /// Feeds bytes read from the app through the framing check into `ready`.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.mode {
                Mode::Passthrough => {
                    self.ready.extend_from_slice(data);
                    return;
                }
                Mode::Refused | Mode::Broken => return,
                Mode::Preface => {
                    let take = data.len().min(H2_PREFACE.len() - self.held.len());
                    self.held.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    let n = self.held.len();
                    if self.held[..] != H2_PREFACE[..n] {
                        self.mode = Mode::Head;
                        let held = self.held.split();
                        self.take_head_bytes(&held);
                    } else if n == H2_PREFACE.len() {
                        self.pass_through();
                    }
                }
                Mode::Head => {
                    // Feed a bounded slice so a pipelined body after the head is not copied
                    // into the head buffer only to be moved out again.
                    let take = data.len().min(self.max_head + 1);
                    let (now, rest) = data.split_at(take);
                    self.take_head_bytes(now);
                    data = rest;
                }
                Mode::Length(n) => {
                    let take = (data.len() as u64).min(n) as usize;
                    self.ready.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    self.mode = if n == take as u64 {
                        Mode::Head
                    } else {
                        Mode::Length(n - take as u64)
                    };
                }
                Mode::Chunked(Chunk::Data(n)) => {
                    let take = (data.len() as u64).min(n) as usize;
                    self.ready.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    self.mode = Mode::Chunked(if n == take as u64 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(n - take as u64)
                    });
                }
                Mode::Chunked(state) => {
                    let b = data[0];
                    data = &data[1..];
                    self.ready.extend_from_slice(&[b]);
                    self.mode = match state.step(b) {
                        Step::Next(next) => Mode::Chunked(next),
                        Step::Done => Mode::Head,
                        // The server fails the body at the same byte; it must not read on.
                        Step::Invalid => Mode::Broken,
                    };
                }
            }
        }
    }

    /// Adds bytes to the held head; once it is complete, checks it and moves it on, and feeds
    /// what follows it.
    fn take_head_bytes(&mut self, data: &[u8]) {
        self.held.extend_from_slice(data);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let (len, verdict, names) = match req.parse(&self.held) {
            Ok(httparse::Status::Complete(len)) => {
                let base = self.held.as_ptr() as usize;
                let names: Vec<(usize, usize)> = req
                    .headers
                    .iter()
                    .filter(|h| {
                        h.name.eq_ignore_ascii_case("content-length")
                            || h.name.eq_ignore_ascii_case("transfer-encoding")
                    })
                    .map(|h| (h.name.as_ptr() as usize - base, h.name.len()))
                    .collect();
                (len, framing(&req), names)
            }
            Ok(httparse::Status::Partial) => {
                if self.held.len() > self.max_head {
                    self.pass_through();
                }
                return;
            }
            // The server refuses what it cannot parse, in its own words.
            Err(_) => {
                self.pass_through();
                return;
            }
        };
        let rest = self.held.split_off(len);
        let mut head = self.held.split();
        self.heads += 1;
        match verdict {
            Ok(framing) => {
                self.ready.extend_from_slice(&head);
                self.mode = match framing {
                    Framing::Length(0) => Mode::Head,
                    Framing::Length(n) => Mode::Length(n),
                    Framing::Chunked => Mode::Chunked(Chunk::Size {
                        size: 0,
                        digits: false,
                    }),
                };
                self.feed(&rest);
            }
            Err(reason) => {
                neutralize(&mut head, &names);
                self.ready.extend_from_slice(&head);
                let _ = self.check.refused.set((
                    self.heads,
                    format!(
                        "the request's body framing is ambiguous: {reason}; send either one \
                         Content-Length or Transfer-Encoding: chunked"
                    ),
                ));
                self.mode = Mode::Refused;
            }
        }
    }
}

impl<I: Io> AsyncRead for AppConn<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match this.mode {
                // Nothing after a refused head is read; the handler's answer closes.
                Mode::Refused => return Poll::Pending,
                Mode::Broken => return Poll::Ready(Ok(())),
                Mode::Passthrough => {
                    let before = buf.filled().len();
                    let polled = Pin::new(inner).poll_read(cx, buf);
                    if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() == before
                        || matches!(polled, Poll::Ready(Err(_)))
                    {
                        this.read_closed = true;
                    }
                    return polled;
                }
                _ => {}
            }
            // Uninitialized: zeroing 16 KiB on every poll (most find nothing to read) cost
            // more than the rest of the request's parsing; the socket writes what it fills.
            let mut scratch = [const { MaybeUninit::<u8>::uninit() }; 16 * 1024];
            let mut rb = ReadBuf::uninit(&mut scratch);
            match Pin::new(inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    this.read_closed = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    this.read_closed = true;
                    // An unfinished head goes to the server, which reports it as incomplete.
                    this.pass_through();
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => this.feed(rb.filled()),
            }
        }
    }
}

impl<I: Io> AsyncWrite for AppConn<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<I: Io> Drop for AppConn<I> {
    fn drop(&mut self) {
        // Dropping the socket with unread bytes would reset the connection: linger instead.
        if let Some(inner) = self.inner.take()
            && !self.read_closed
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(linger(inner));
        }
    }
}

/// Shuts `io` for writing, then reads and discards what the app still sends, within
/// [`LINGER_TIME`], [`LINGER_IDLE`] and [`LINGER_BYTES`].
pub async fn linger<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) {
    let _ = io.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    while total < LINGER_BYTES {
        let idle = tokio::time::Instant::now() + LINGER_IDLE;
        match tokio::time::timeout_at(idle.min(deadline), io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => total += n as u64,
            _ => return,
        }
    }
}

/// Feeds `stream` through the framing check in pieces of the sizes in `pieces` (cycled; a 0
/// counts as 1) and returns what the server would read, the number of heads handed on and the
/// index of the refused head. For the fuzz targets and their corpus tests.
#[doc(hidden)]
pub fn check_stream(stream: &[u8], pieces: &[usize]) -> (Vec<u8>, u64, Option<u64>) {
    let (mut conn, check) = AppConn::new(tokio::io::empty(), 8192);
    let mut rest = stream;
    let mut sizes = pieces.iter().copied().cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
        conn.feed(&rest[..n]);
        rest = &rest[n..];
    }
    let out = conn.ready.to_vec();
    let heads = conn.heads;
    drop(conn);
    (out, heads, check.refused.get().map(|r| r.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<Framing, String> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(head.as_bytes()).unwrap().is_complete(), "{head}");
        framing(&req)
    }

    #[test]
    fn framing_is_read_or_refused_like_nginx() {
        let ok = [
            ("", Framing::Length(0)),
            ("Content-Length: 12\r\n", Framing::Length(12)),
            (
                "Content-Length: 12\r\ncontent-length: 12\r\n",
                Framing::Length(12),
            ),
            ("Transfer-Encoding: Chunked\r\n", Framing::Chunked),
        ];
        for (lines, want) in ok {
            let head = format!("POST /x HTTP/1.1\r\n{lines}\r\n");
            assert_eq!(parse(&head), Ok(want), "{lines}");
        }
        let refused = [
            (
                "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n",
                "both",
            ),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 1\r\n",
                "both",
            ),
            ("Content-Length: 1\r\nContent-Length: 2\r\n", "differ"),
            ("Content-Length: -1\r\n", "not a number"),
            ("Content-Length: 1,1\r\n", "not a number"),
            (
                "Content-Length: 99999999999999999999999\r\n",
                "not a number",
            ),
            ("Transfer-Encoding: gzip, chunked\r\n", "`gzip, chunked`"),
            ("Transfer-Encoding: chunked, gzip\r\n", "`chunked, gzip`"),
            ("Transfer-Encoding: \r\n", "only `chunked`"),
        ];
        for (lines, needle) in refused {
            let head = format!("POST /x HTTP/1.1\r\n{lines}\r\n");
            let err = parse(&head).unwrap_err();
            assert!(err.contains(needle), "{lines}: {err}");
        }
        let err = parse("POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert!(err.contains("HTTP/1.0"), "{err}");
    }

    /// Feeds `stream` in pieces of `step` bytes; returns what the server would read.
    fn run(stream: &[u8], step: usize) -> (Vec<u8>, Mode, u64, Option<(u64, String)>) {
        let (mut conn, check) = AppConn::new(tokio::io::empty(), 1024);
        for piece in stream.chunks(step) {
            conn.feed(piece);
        }
        let out = conn.ready.to_vec();
        (out, conn.mode, conn.heads, check.refused.get().cloned())
    }

    #[test]
    fn pipelined_requests_are_followed_whatever_the_read_sizes() {
        let stream = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\n\r\n\
POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\nA  \r\n\
    0123456789\r\n0\r\nt: 1\r\n\r\n\
POST /d HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n\
GET /smuggled HTTP/1.1\r\n\r\n";
        let refused_at = stream.windows(7).position(|w| w == b"POST /d").unwrap();
        let head_len = stream[refused_at..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
            + 4;
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let (out, mode, heads, refused) = run(stream, step);
            assert_eq!(mode, Mode::Refused, "step {step}");
            assert_eq!(heads, 4, "step {step}");
            assert_eq!(refused.as_ref().map(|r| r.0), Some(4), "step {step}");
            // Everything before the refused head passes unchanged; its head passes with the
            // framing names blanked; nothing after it passes.
            assert_eq!(out.len(), refused_at + head_len, "step {step}");
            assert_eq!(&out[..refused_at], &stream[..refused_at], "step {step}");
            let head = String::from_utf8(out[refused_at..].to_vec()).unwrap();
            assert!(
                head.contains("xxxxxxxxxxxxxx: 2\r\nxxxxxxxxxxxxxxxxx: chunked\r\n"),
                "{head}"
            );
        }
    }

    #[test]
    fn http2_prior_knowledge_passes_through() {
        let mut stream = H2_PREFACE.to_vec();
        stream.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00\r\n\r\nbinary");
        for step in [1, 5, stream.len()] {
            let (out, mode, heads, _) = run(&stream, step);
            assert_eq!(out, stream);
            assert_eq!(mode, Mode::Passthrough);
            assert_eq!(heads, 0);
        }
    }

    #[test]
    fn broken_chunked_framing_stops_reading_where_the_server_fails() {
        for body in [
            &b";x\r\n"[..],           // no size digit
            b"g\r\n",                 // not hex
            b"3\nabc\r\n",            // bare LF after the size
            b"3\r\nabcX",             // no CRLF after the data
            b"3;a\nb\r\n",            // LF inside an extension
            b"fffffffffffffffff\r\n", // overflow
        ] {
            let mut stream = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            stream.extend_from_slice(body);
            stream.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
            let (out, mode, heads, _) = run(&stream, 1);
            assert_eq!(mode, Mode::Broken, "{:?}", String::from_utf8_lossy(body));
            assert_eq!(heads, 1);
            assert!(!out.windows(9).any(|w| w == b"GET /next"));
        }
    }

    #[test]
    fn an_oversized_or_unparsable_head_is_left_to_the_server() {
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(2000));
        let (out, mode, ..) = run(big.as_bytes(), 100);
        assert_eq!(mode, Mode::Passthrough);
        assert_eq!(out, big.as_bytes());
        let (out, mode, ..) = run(b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 3);
        assert_eq!(mode, Mode::Passthrough);
        assert_eq!(out, b"GET / HTTP/1.1\r\nbad header\r\n\r\n");
    }

    #[test]
    fn next_request_names_only_the_refused_head() {
        let check = ConnCheck::default();
        check.refused.set((2, "why".into())).unwrap();
        assert_eq!(check.next_request(), None);
        assert_eq!(check.next_request().as_deref(), Some("why"));
        assert_eq!(check.next_request(), None);
    }
}
