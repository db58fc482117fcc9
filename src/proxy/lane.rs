//! One upstream authority under one trust set: shared HTTP/2 connections driven on the `h2`
//! crate directly or, when the upstream does not offer h2 (or the target is plain `http://`),
//! HTTP/1.1 through hyper's pooled client.
//!
//! Why not hyper's client for HTTP/2: it hands every request to a connection task over a
//! channel, and because a new stream has no send capacity until that task opens it, it moves
//! the request body in a task of its own. HEADERS and DATA then leave in separate writes, with
//! two tasks spawned per request. Here the request task itself queues HEADERS together with the
//! body it already has, so a small request leaves in one write and spawns nothing.
//!
//! A lane connects once at a time: a burst of first requests waits for one handshake instead of
//! opening a connection each. When every connection carries as many streams as the upstream
//! allows (long SSE streams reach 100 soon), the lane opens another rather than queueing calls
//! behind streams that may last minutes, up to [`MAX_H2_CONNECTIONS`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use super::upstream::{BoxError, UpstreamBody, UpstreamError, classify, connect_error};
use crate::lock;

/// The TLS (or plain) connector every connection of a trust set is made with.
pub(super) type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;
/// A connection as the connector returns it.
type Stream = hyper_rustls::MaybeHttpsStream<TokioIo<TcpStream>>;
/// hyper's pooled client, used for HTTP/1.1.
pub(super) type Http1Client = Client<StashConnector, UpstreamBody>;

/// How long an idle HTTP/2 connection is kept before it is closed.
pub(super) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Request body bytes queued on a new stream before it has send capacity: enough for a typical
/// API call to leave with its HEADERS, small enough to bound what one stream buffers.
const EAGER_BODY_BYTES: usize = 64 << 10;
/// Streams opened on a new connection before the upstream's SETTINGS say how many it allows;
/// the protocol's recommended minimum, as hyper assumes.
const INITIAL_MAX_STREAMS: usize = 100;
/// How long a new connection may take to answer the first PING, which proves its SETTINGS
/// arrived.
const SETTINGS_WAIT: Duration = Duration::from_secs(10);
/// After a failed connect, how long calls that find every connection full queue on an open
/// one instead of trying to connect again.
const CONNECT_BACKOFF: Duration = Duration::from_secs(1);
/// HTTP/2 connections one lane may hold; past this, calls queue for a stream on the least
/// busy one. Bounds what a flood of calls can make keyward open toward one provider.
pub(super) const MAX_H2_CONNECTIONS: usize = 64;

// === StashConnector ===

/// Wraps the connector so that a connection a lane opened to probe for h2, and which
/// negotiated HTTP/1.1, is handed to the HTTP/1.1 client instead of thrown away.
#[derive(Clone)]
pub(super) struct StashConnector {
    inner: HttpsConnector,
    /// Probe connections by `https` authority, with when they were stashed.
    stash: Arc<Mutex<Vec<(Authority, Instant, Stream)>>>,
}

/// How long a stashed probe connection stays usable: the call that made it takes it at once,
/// so an older one belongs to a call that went away, and may have been closed since.
const STASH_FRESH: Duration = Duration::from_secs(5);

impl StashConnector {
    pub(super) fn new(inner: HttpsConnector) -> StashConnector {
        StashConnector {
            inner,
            stash: Arc::default(),
        }
    }

    fn put(&self, authority: Authority, stream: Stream) {
        lock(&self.stash).push((authority, Instant::now(), stream));
    }

    fn take(&self, uri: &Uri) -> Option<Stream> {
        if uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
            return None;
        }
        let mut stash = lock(&self.stash);
        stash.retain(|(_, at, _)| at.elapsed() < STASH_FRESH);
        let at = stash
            .iter()
            .position(|(a, ..)| Some(a) == uri.authority())?;
        Some(stash.swap_remove(at).2)
    }
}

impl Service<Uri> for StashConnector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self.take(&uri) {
            Some(stream) => Box::pin(std::future::ready(Ok(stream))),
            None => self.inner.call(uri),
        }
    }
}

// === Lane ===

/// The connections to one authority under one trust set.
pub(super) struct Lane {
    /// `scheme://authority/`, what the connector is called with.
    origin: Uri,
    /// The authority, for errors.
    host: String,
    connector: StashConnector,
    http1: Http1Client,
    h2: h2::client::Builder,
    /// Set once the upstream answered ALPN without h2 (or is plain http): HTTP/1.1 from then on.
    http1_only: AtomicBool,
    /// The open HTTP/2 connections, oldest first.
    pool: Mutex<Vec<Pooled>>,
    /// How long an HTTP/2 connection may go unused before it is closed.
    idle: Duration,
    /// Held while connecting, so one handshake serves a burst.
    connecting: tokio::sync::Mutex<()>,
    /// When the last connect failed, and why: calls that were already waiting for that
    /// connect get its failure instead of each trying again in turn.
    last_failure: Mutex<Option<(Instant, String)>>,
    /// Handed to connection drivers, which retire their connection when idle.
    this: Weak<Lane>,
}

/// A live HTTP/2 connection in a lane.
struct Pooled {
    conn: H2Conn,
    last_used: Instant,
}

#[derive(Clone)]
struct H2Conn {
    sender: h2::client::SendRequest<Bytes>,
    state: Arc<ConnState>,
}

/// What the lane knows of one connection, shared with its driver and its streams.
#[derive(Default)]
struct ConnState {
    /// Set when the connection ended or refused a new stream; it is then replaced.
    closed: AtomicBool,
    /// Streams handed out and not yet finished (see [`StreamSlot`]).
    in_flight: AtomicUsize,
    /// The upstream's limit on concurrent streams, as last read from its SETTINGS.
    limit: AtomicUsize,
}

impl H2Conn {
    fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.state.closed.store(true, Ordering::Release);
    }

    /// True when h2 already knows the connection takes no new stream (it got GOAWAY or
    /// failed); asks without waiting, and marks it closed if so.
    fn refuses_streams(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let refuses = matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Err(_)));
        if refuses {
            self.close();
        }
        refuses
    }

    fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::Acquire)
    }

    /// True when one more stream fits under the upstream's limit as last read; cheap, so a
    /// checkout can pass over full connections without taking h2's lock.
    fn has_room_cached(&self) -> bool {
        self.in_flight() < self.state.limit.load(Ordering::Acquire)
    }

    /// Re-reads the upstream's limit (it may change it at any time; this takes h2's lock)
    /// and says whether one more stream fits under it.
    fn has_room_now(&self) -> bool {
        let limit = self.sender.current_max_send_streams();
        self.state.limit.store(limit, Ordering::Release);
        self.in_flight() < limit
    }

    /// Counts one more stream on this connection until the slot is dropped.
    fn slot(&self) -> StreamSlot {
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        StreamSlot(self.state.clone())
    }
}

/// A connection handed to one call, with its stream counted; `fresh` when it was opened for
/// this call rather than taken from the pool.
struct Taken {
    conn: H2Conn,
    slot: StreamSlot,
    fresh: bool,
}

/// One stream counted against its connection's limit, from checkout until the response body
/// is dropped (or the call fails).
struct StreamSlot(Arc<ConnState>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Lane {
    pub(super) fn new(
        origin: Uri,
        connector: StashConnector,
        http1: Http1Client,
        max_header_bytes: u32,
        idle: Duration,
    ) -> Arc<Lane> {
        let host = origin
            .authority()
            .map(ToString::to_string)
            .unwrap_or_default();
        let plain = origin.scheme() != Some(&http::uri::Scheme::HTTPS);
        Arc::new_cyclic(|this| Lane {
            origin,
            host,
            connector,
            http1,
            h2: h2_builder(max_header_bytes),
            http1_only: AtomicBool::new(plain),
            pool: Mutex::new(Vec::new()),
            idle,
            connecting: tokio::sync::Mutex::new(()),
            last_failure: Mutex::new(None),
            this: this.clone(),
        })
    }

    /// Sends `req` (its URI already absolute) and waits for response headers.
    pub(super) async fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let (head, body) = req.into_parts();
        // A pooled connection that went away (an upstream restart sends GOAWAY on all of
        // them) is found out at `ready`, before anything is sent: it is dropped and the call
        // tries the next, until one works or a connection opened for it fails too.
        for _ in 0..=MAX_H2_CONNECTIONS {
            let Some(taken) = self.h2_conn().await? else {
                break;
            };
            match taken.conn.sender.clone().ready().await {
                Ok(sender) => {
                    return self
                        .send_h2(&taken.conn, taken.slot, sender, head, body)
                        .await;
                }
                Err(e) => {
                    taken.conn.close();
                    if taken.fresh {
                        return Err(self.failed(&e));
                    }
                }
            }
        }
        if !self.http1_only.load(Ordering::Acquire) {
            return Err(UpstreamError::Failed {
                host: self.host.clone(),
                reason: "every HTTP/2 connection closed before the request could be sent".into(),
            });
        }
        match self.http1.request(Request::from_parts(head, body)).await {
            Ok(response) => Ok(response.map(ResponseBody::http1)),
            Err(err) => Err(classify(&err, &self.host)),
        }
    }

    async fn send_h2(
        &self,
        conn: &H2Conn,
        slot: StreamSlot,
        mut sender: h2::client::SendRequest<Bytes>,
        head: http::request::Parts,
        body: UpstreamBody,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let end_stream = body.is_end_stream();
        let (mut response, stream) = sender
            .send_request(Request::from_parts(head, ()), end_stream)
            .map_err(|e| {
                // Ready a moment ago, refused now: the connection is going away.
                conn.close();
                self.failed(&e)
            })?;
        let mut pump = (!end_stream).then(|| BodyPump {
            body,
            stream,
            eager: EAGER_BODY_BYTES,
            held: None,
        });
        let response = std::future::poll_fn(|cx| {
            if pump.as_mut().is_some_and(|p| p.poll_pump(cx).is_ready()) {
                pump = None;
            }
            Pin::new(&mut response).poll(cx)
        })
        .await
        .map_err(|e| self.failed(&e))?;
        let pump = pump.map(|mut pump| {
            // The upstream answered before the whole body was sent (an early error, or a
            // streaming API): keep sending it alongside the response, as HTTP/2 allows, until
            // the response is dropped.
            tokio::spawn(std::future::poll_fn(move |cx| pump.poll_pump(cx))).abort_handle()
        });
        Ok(response.map(|recv| ResponseBody::h2(recv, pump, slot)))
    }

    /// An HTTP/2 connection with room for one more stream, opened if there is none; `None`
    /// when the lane speaks HTTP/1.1. When no connection may or can be opened (the lane
    /// holds [`MAX_H2_CONNECTIONS`], or connecting fails while others are open), the call
    /// queues on the least busy one instead.
    async fn h2_conn(&self) -> Result<Option<Taken>, UpstreamError> {
        if self.http1_only.load(Ordering::Acquire) {
            return Ok(None);
        }
        if let Some(taken) = self.checkout(false) {
            return Ok(Some(taken));
        }
        let asked = Instant::now();
        let _connecting = self.connecting.lock().await;
        if self.http1_only.load(Ordering::Acquire) {
            return Ok(None);
        }
        // The upstream may have raised a limit since: re-read them all before connecting.
        if let Some(taken) = self.checkout(true) {
            return Ok(Some(taken));
        }
        let (shared_failure, backing_off) = match lock(&self.last_failure).as_ref() {
            // Calls that waited for a connect that failed take its failure.
            Some((at, reason)) if *at >= asked => (Some(reason.clone()), false),
            Some((at, _)) => (None, at.elapsed() < CONNECT_BACKOFF),
            None => (None, false),
        };
        if shared_failure.is_none() {
            // At the limit, or shortly after a failed connect while others are open: queue
            // on an open connection rather than connect (again).
            let full = lock(&self.pool).len() >= MAX_H2_CONNECTIONS;
            if (full || backing_off)
                && let Some(taken) = self.least_busy()
            {
                return Ok(Some(taken));
            }
        }
        let reason = match shared_failure {
            Some(reason) => reason,
            None => match self.connect().await {
                Err(UpstreamError::Unreachable { reason, .. }) => {
                    *lock(&self.last_failure) = Some((Instant::now(), reason.clone()));
                    reason
                }
                other => return other,
            },
        };
        // Connecting failed: wait for a stream on an open connection if there is one.
        match self.least_busy() {
            Some(taken) => {
                tracing::warn!(
                    upstream = %self.host,
                    %reason,
                    "could not open another HTTP/2 connection; the call waits for a stream on an \
                     open one",
                );
                Ok(Some(taken))
            }
            None => Err(UpstreamError::Unreachable {
                host: self.host.clone(),
                reason,
            }),
        }
    }

    /// Opens a connection (the caller holds the connect gate): HTTP/2 if ALPN says so,
    /// otherwise the stream goes to the HTTP/1.1 client and `None` is returned.
    async fn connect(&self) -> Result<Option<Taken>, UpstreamError> {
        let unreachable = |reason: String| UpstreamError::Unreachable {
            host: self.host.clone(),
            reason,
        };
        let stream = self
            .connector
            .inner
            .clone()
            .call(self.origin.clone())
            .await
            .map_err(|e| connect_error(&*e, &self.host))?;
        if !stream.connected().is_negotiated_h2() {
            if let Some(authority) = self.origin.authority() {
                self.connector.put(authority.clone(), stream);
            }
            self.http1_only.store(true, Ordering::Release);
            return Ok(None);
        }
        let (sender, mut connection) = self
            .h2
            .handshake::<_, Bytes>(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(h2_reason(&e)))?;
        let mut ping = connection.ping_pong();
        let conn = H2Conn {
            sender,
            state: Arc::default(),
        };
        tokio::spawn(drive(
            connection,
            conn.state.clone(),
            self.this.clone(),
            self.idle,
        ));
        // The upstream's SETTINGS precede its answer to a PING. Until they arrive, the calls
        // waiting at the gate could open more streams than it allows and be refused.
        if let Some(ping) = ping.as_mut() {
            match tokio::time::timeout(SETTINGS_WAIT, ping.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(unreachable(h2_reason(&e))),
                Err(_) => {
                    return Err(unreachable(format!(
                        "the HTTP/2 handshake did not complete within {}",
                        humantime::format_duration(SETTINGS_WAIT)
                    )));
                }
            }
        }
        conn.state
            .limit
            .store(conn.sender.current_max_send_streams(), Ordering::Release);
        let slot = conn.slot();
        lock(&self.pool).push(Pooled {
            conn: conn.clone(),
            last_used: Instant::now(),
        });
        Ok(Some(Taken {
            conn,
            slot,
            fresh: true,
        }))
    }

    /// An open connection with room for one more stream, counted against it. Unless
    /// `refresh_all`, connections full by their cached limit are passed over without touching
    /// h2; the chosen one's limit is re-read either way, in case the upstream lowered it.
    /// Forgets closed connections.
    fn checkout(&self, refresh_all: bool) -> Option<Taken> {
        let mut pool = lock(&self.pool);
        pool.retain(|p| !p.conn.is_closed());
        let pooled = pool
            .iter_mut()
            .find(|p| (refresh_all || p.conn.has_room_cached()) && p.conn.has_room_now())?;
        Some(Self::take(pooled))
    }

    /// The open connection with the fewest streams, to queue on when no other may be opened.
    /// Connections h2 already knows take no new stream (GOAWAY) are dropped first, so a call
    /// is not handed one after another of them.
    fn least_busy(&self) -> Option<Taken> {
        let mut pool = lock(&self.pool);
        pool.retain_mut(|p| !p.conn.is_closed() && !p.conn.refuses_streams());
        let pooled = pool.iter_mut().min_by_key(|p| p.conn.in_flight())?;
        Some(Self::take(pooled))
    }

    fn take(pooled: &mut Pooled) -> Taken {
        pooled.last_used = Instant::now();
        Taken {
            conn: pooled.conn.clone(),
            slot: pooled.conn.slot(),
            fresh: false,
        }
    }

    /// Drops the lane's handle on `state`'s connection if it carries no stream and no request
    /// took it for the idle timeout. Streams still open keep the connection alive: h2 closes it
    /// once the last one ends.
    fn retire_if_idle(&self, state: &Arc<ConnState>) {
        let mut pool = lock(&self.pool);
        // A connection full of long streams is passed over by checkouts, so `last_used` says
        // nothing while it carries streams: only an empty one is idle.
        let idle = pool.iter().position(|p| {
            Arc::ptr_eq(&p.conn.state, state)
                && p.conn.in_flight() == 0
                && p.last_used.elapsed() >= self.idle
        });
        if let Some(at) = idle {
            pool.remove(at).conn.close();
        }
    }

    fn failed(&self, err: &h2::Error) -> UpstreamError {
        UpstreamError::Failed {
            host: self.host.clone(),
            reason: h2_reason(err),
        }
    }
}

/// Runs one HTTP/2 connection until it ends, retiring it when idle.
async fn drive<T>(
    connection: h2::client::Connection<T, Bytes>,
    state: Arc<ConnState>,
    lane: Weak<Lane>,
    idle: Duration,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut connection = std::pin::pin!(connection);
    // Checking six times per idle period closes a connection at most a sixth late.
    let mut check = tokio::time::interval((idle / 6).max(Duration::from_millis(1)));
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(reason = %h2_reason(&e), "upstream HTTP/2 connection ended");
                }
                break;
            }
            _ = check.tick() => {
                if let Some(lane) = lane.upgrade() {
                    lane.retire_if_idle(&state);
                }
            }
        }
    }
    state.closed.store(true, Ordering::Release);
}

fn h2_builder(max_header_bytes: u32) -> h2::client::Builder {
    // The windows hyper's client uses: the protocol's 64 KiB would throttle large responses.
    let mut builder = h2::client::Builder::new();
    builder
        .initial_max_send_streams(INITIAL_MAX_STREAMS)
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .max_frame_size(16 << 10)
        .max_send_buffer_size(1 << 20)
        // A hostile upstream must not make keyward buffer unbounded response headers.
        .max_header_list_size(max_header_bytes)
        .enable_push(false);
    builder
}

/// What failed in an HTTP/2 exchange, without anything from the messages themselves.
fn h2_reason(err: &h2::Error) -> String {
    if let Some(io) = err.get_io() {
        return format!("HTTP/2 connection failed: {io}");
    }
    match err.reason() {
        Some(reason) if err.is_go_away() => {
            format!("HTTP/2: the upstream closed the connection ({reason})")
        }
        Some(reason) if err.is_reset() => {
            format!("HTTP/2: the upstream reset the stream ({reason})")
        }
        _ => format!("HTTP/2: {err}"),
    }
}

// === request body ===

/// Moves a request body into its HTTP/2 stream. Chunks within the first [`EAGER_BODY_BYTES`]
/// are queued without waiting for send capacity, which a new stream only gets once the
/// connection opens it, so they leave with the HEADERS. Every later chunk is polled first and
/// then waits for capacity (reserving none while the body has nothing to send, which could
/// starve other streams of the connection window), so h2 buffers at most one chunk.
struct BodyPump {
    body: UpstreamBody,
    stream: h2::SendStream<Bytes>,
    /// What may still be queued without waiting for capacity.
    eager: usize,
    /// A chunk waiting for capacity, and whether it ends the body.
    held: Option<(Bytes, bool)>,
}

impl BodyPump {
    /// Ready when the body is sent, or cannot be (the stream is then reset or already gone).
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            // Also registers for the upstream's RST_STREAM, so a pump parked on the body
            // ends when the upstream no longer wants it.
            if self.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if let Some((data, end)) = self.held.take() {
                while self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            self.held = Some((data, end));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                    }
                }
                if self.stream.send_data(data, end).is_err() || end {
                    return Poll::Ready(());
                }
                continue;
            }
            let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    let _ = self.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Some(Err(_)) => {
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    let end = self.body.is_end_stream();
                    if data.len() <= self.eager {
                        self.eager -= data.len();
                        if self.stream.send_data(data, end).is_err() || end {
                            return Poll::Ready(());
                        }
                    } else {
                        self.eager = 0;
                        self.stream.reserve_capacity(1);
                        self.held = Some((data, end));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        self.stream.reserve_capacity(0);
                        let _ = self.stream.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            }
        }
    }
}

// === response body ===

/// An upstream response body, from either protocol.
pub struct ResponseBody(Inner);

enum Inner {
    Http1(Incoming),
    H2 {
        recv: h2::RecvStream,
        data_done: bool,
        /// The request body still being sent after the answer came; stopped with the response.
        pump: Option<tokio::task::AbortHandle>,
        /// Counts the stream against its connection until the response is dropped.
        _slot: StreamSlot,
    },
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Inner::H2 {
            pump: Some(pump), ..
        } = &self.0
        {
            pump.abort();
        }
    }
}

impl ResponseBody {
    fn http1(body: Incoming) -> ResponseBody {
        ResponseBody(Inner::Http1(body))
    }

    fn h2(
        recv: h2::RecvStream,
        pump: Option<tokio::task::AbortHandle>,
        slot: StreamSlot,
    ) -> ResponseBody {
        ResponseBody(Inner::H2 {
            recv,
            data_done: false,
            pump,
            _slot: slot,
        })
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = match self.0 {
            Inner::Http1(_) => "HTTP/1.1",
            Inner::H2 { .. } => "HTTP/2",
        };
        f.debug_tuple("ResponseBody").field(&protocol).finish()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let (recv, data_done) = match &mut self.get_mut().0 {
            Inner::Http1(body) => return Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::H2 {
                recv, data_done, ..
            } => (recv, data_done),
        };
        if !*data_done {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Reopens the window for what was read, so the upstream may send more.
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(h2_reason(&e).into()))),
                None => *data_done = true,
            }
        }
        match ready!(recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(h2_reason(&e).into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Http1(body) => body.is_end_stream(),
            Inner::H2 { recv, .. } => recv.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Http1(body) => body.size_hint(),
            Inner::H2 { recv, .. } if recv.is_end_stream() => SizeHint::with_exact(0),
            Inner::H2 { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector() -> StashConnector {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        StashConnector::new(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .build(),
        )
    }

    async fn some_stream() -> Stream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        hyper_rustls::MaybeHttpsStream::Http(TokioIo::new(tcp))
    }

    /// Whether the stash hands out a stream for `uri`.
    fn takes(stash: &StashConnector, uri: &str) -> bool {
        stash.take(&uri.parse().unwrap()).is_some()
    }

    #[tokio::test]
    async fn a_stashed_probe_goes_only_to_the_same_https_authority_and_only_once() {
        let stash = connector();
        stash.put("api.example:443".parse().unwrap(), some_stream().await);
        assert!(!takes(&stash, "http://api.example:443/"));
        assert!(!takes(&stash, "https://other.example:443/"));
        assert!(takes(&stash, "https://api.example:443/"));
        assert!(!takes(&stash, "https://api.example:443/"), "only once");
    }

    #[tokio::test]
    async fn a_stale_probe_is_not_handed_out() {
        let stash = connector();
        stash.put("api.example:443".parse().unwrap(), some_stream().await);
        tokio::time::pause();
        tokio::time::advance(STASH_FRESH).await;
        assert!(!takes(&stash, "https://api.example:443/"));
        assert!(lock(&stash.stash).is_empty(), "stale probes are dropped");
    }
}
