//! The data-plane server: accepts connections on the data socket (and the optional TCP
//! listener) within the connection caps, serves HTTP/1.1 and HTTP/2 on them, and hands each
//! request to [`super::call`], which runs it through its phases. It also closes idle
//! connections and drains open ones on shutdown.
//!
//! This module knows connections, not calls: it reads no header and chooses nothing.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::watch;

use super::app_conn::{AppConn, ConnCheck};
use super::call::{Caller, handle};
use super::conn::{Activity, ConnectionGuard, Full, Throttle};
use crate::auth::PeerCred;
use crate::state::State;

/// A listener the data plane accepts from: the data socket (with peer credentials) or the
/// optional TCP listener (client tokens only, no peer credentials).
pub trait DataListener: Send + 'static {
    /// The accepted stream.
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next connection and says who is on the other end, where knowable.
    fn accept_peer(
        &self,
    ) -> impl Future<Output = std::io::Result<(Self::Io, Option<PeerCred>)>> + Send;
}

impl DataListener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_peer(&self) -> std::io::Result<(Self::Io, Option<PeerCred>)> {
        let (stream, _) = self.accept().await?;
        let peer = stream.peer_cred().ok().map(|c| PeerCred {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid().unwrap_or(0),
        });
        Ok((stream, peer))
    }
}

impl DataListener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_peer(&self) -> std::io::Result<(Self::Io, Option<PeerCred>)> {
        let (stream, _) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, None))
    }
}

/// Serves `listener` until `stop` turns true, then closes it and waits for open connections to
/// finish their in-flight requests (the caller bounds that wait). A connection over
/// `limits.max_connections` or `limits.max_connections_per_uid` is closed as soon as it is
/// accepted; one with no request open for `limits.idle_connection_timeout` is closed.
pub async fn serve(
    listener: impl DataListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    // Every connection task holds a sender; when the last one is gone, all have finished.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept_peer() => match accepted {
                Ok((stream, peer)) => match state.connections.admit(peer.map(|p| p.uid)) {
                    Ok(guard) => {
                        let max_head = state.config.load().limits.max_header_bytes.max(8192);
                        let (conn, check) = AppConn::new(stream, max_head);
                        serve_connection(
                            TokioIo::new(conn),
                            peer,
                            check,
                            &state,
                            stop.clone(),
                            (guard, open_tx.clone()),
                        )
                    }
                    Err(full) => refuse_connection(stream, full),
                },
                Err(e) => accept_failed(e).await,
            },
        }
    }
    drop(listener);
    drop(open_tx);
    let _ = open_rx.recv().await;
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn accept_failed(e: std::io::Error) {
    // EMFILE and friends: back off instead of spinning, and say so at most every 10 s, or the
    // log grows as fast as the loop can fail.
    static THROTTLE: Throttle = Throttle::new(Duration::from_secs(10));
    if let Some(suppressed) = THROTTLE.tick(std::time::Instant::now()) {
        tracing::warn!(error = %e, suppressed, "data socket accept failed");
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Closes a connection over a cap at once: the peer sees it end instead of hanging in the
/// listen backlog, and the descriptor is free again.
fn refuse_connection<S>(stream: S, full: Full) {
    static THROTTLE: Throttle = Throttle::new(Duration::from_secs(10));
    if let Some(suppressed) = THROTTLE.tick(std::time::Instant::now()) {
        tracing::warn!(reason = %full, suppressed, "data connection closed at once");
    }
    drop(stream);
}

fn serve_connection<I>(
    io: I,
    peer: Option<PeerCred>,
    check: Arc<ConnCheck>,
    state: &Arc<State>,
    mut stop: watch::Receiver<bool>,
    guards: (ConnectionGuard, tokio::sync::mpsc::Sender<()>),
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let config = state.config.load();
    let limits = &config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(limits.max_header_bytes.max(8192))
        .timer(hyper_util::rt::TokioTimer::new());
    builder
        .http2()
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .timer(hyper_util::rt::TokioTimer::new());
    let st = state.clone();
    let activity = Activity::new();
    let requests = activity.clone();
    let service = service_fn(move |req| {
        let st = st.clone();
        let refused = check.next_request();
        // Counted from the request's headers until its response body is gone.
        let busy = requests.enter();
        async move {
            let response = handle(st, req, Caller::App(peer), refused).await;
            Ok::<_, Infallible>(response.map(|inner| Held::new(inner, busy).boxed()))
        }
    });
    let idle = limits.idle_connection_timeout;
    let conn = builder.serve_connection(io, service).into_owned();
    tokio::spawn(async move {
        let _guards = guards;
        tokio::pin!(conn);
        let idled = tokio::select! {
            _ = conn.as_mut() => return,
            _ = activity.idle_for(idle) => true,
            _ = stopped(&mut stop) => false,
        };
        // HTTP/1 closes between requests, HTTP/2 sends GOAWAY and closes once its open streams
        // are done, a connection that never sent a byte closes at once. On shutdown the caller
        // bounds this wait; an idle connection has nothing open, and a peer that does not even
        // read the GOAWAY is dropped after another idle period.
        conn.as_mut().graceful_shutdown();
        if idled {
            let _ = tokio::time::timeout(idle, conn).await;
        } else {
            let _ = conn.await;
        }
    });
}

// === response body ===

/// A response body that keeps request-scoped guards alive until it is dropped.
pub(super) struct Held<B, G> {
    inner: B,
    _guards: G,
}

impl<B, G> Held<B, G> {
    /// `inner`, holding `guards` until the body is dropped.
    pub fn new(inner: B, guards: G) -> Held<B, G> {
        Held {
            inner,
            _guards: guards,
        }
    }
}

impl<B, G> Body for Held<B, G>
where
    B: Body<Data = Bytes> + Unpin,
    G: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
