//! The listener's connections, driven by our own accept loop over hyper's HTTP/1.1 and HTTP/2: a cap on open
//! connections, per-connection header, idle and age limits, and the two steps of a drain (GOAWAY, then close).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::metrics::Metrics;

/// The address a request's connection came from (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// What every connection of a listener may do.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// Closed gracefully after about this age (±10%); None = never.
    pub max_connection_age: Option<Duration>,
    /// After a graceful close for age, how long its calls may take before the connection is dropped.
    pub age_grace: Duration,
    /// HTTP/1.1: a request head (and a new connection's first request or TLS handshake) must arrive in this.
    pub header_read_timeout: Duration,
    /// A connection with no call in progress is closed gracefully after this long.
    pub idle_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_concurrent_streams: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// Raises the process's open-files limit to its hard limit (as Go's runtime does), so that `max_connections`
/// can be reached; says so when even that is too low.
pub fn raise_open_files_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    // Model files, the listener and log output need descriptors besides the connections.
    let needed = max_connections as u64 + 64;
    if limit.rlim_cur < needed {
        tracing::warn!(
            open_files = limit.rlim_cur,
            max_connections,
            "the open-files limit is below max_connections; connections past it are refused by the system"
        );
    }
}

/// Where a listener is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Accepting and serving.
    Open,
    /// Not accepting; every connection has been asked to close after its calls (HTTP/2 GOAWAY).
    Closing,
    /// Every connection is dropped.
    Closed,
}

/// A listener serving `app` on its own tasks until it is closed (or dropped, which closes it at once).
pub struct Listener {
    phase: Arc<watch::Sender<Phase>>,
}

impl Listener {
    pub fn serve(
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        app: Router,
        limits: ConnectionLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (phase, watching) = watch::channel(Phase::Open);
        let server = Arc::new(Server {
            app,
            tls,
            builder: http_builder(&limits),
            limits,
            metrics,
        });
        tokio::spawn(accept_loop(listener, server, watching));
        Self {
            phase: Arc::new(phase),
        }
    }

    /// Stops accepting and asks every connection to close once its calls are done: HTTP/2 connections get
    /// GOAWAY, HTTP/1.1 connections close after their current response.
    pub fn close_gracefully(&self) {
        self.advance(Phase::Closing);
    }

    /// Drops every connection now.
    pub fn close_now(&self) {
        self.advance(Phase::Closed);
    }

    /// Resolves once the listener has stopped accepting and every connection has ended.
    pub async fn closed(&self) {
        self.phase.closed().await
    }

    fn advance(&self, to: Phase) {
        self.phase.send_if_modified(|phase| {
            let later = *phase < to;
            if later {
                *phase = to;
            }
            later
        });
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.close_now();
    }
}

/// What the accept loop shares with its connections.
struct Server {
    app: Router,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
}

fn http_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own header timer also runs while a keep-alive connection waits for its next request, which
    // would make idle_timeout no longer than header_read_timeout; the connection's watchdog below keeps both.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    builder
}

async fn accept_loop(
    listener: TcpListener,
    server: Arc<Server>,
    mut phase: watch::Receiver<Phase>,
) {
    let slots = Arc::new(Semaphore::new(server.limits.max_connections));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = phase.wait_for(|phase| *phase != Phase::Open) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: give the system a moment instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Closing it at once costs the connections already served nothing.
            server.metrics.connections_refused.inc();
            tracing::debug!(%peer, "max_connections reached: connection closed");
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        let server = Arc::clone(&server);
        tokio::spawn(connection(stream, peer, server, phase.clone(), slot));
    }
}

/// Why a connection ended (the `reason` label of `rerank_connections_closed_total`).
#[derive(Debug, Clone, Copy)]
enum Ended {
    Peer,
    HeaderTimeout,
    Idle,
    Age,
    Drain,
}

impl Ended {
    fn label(self) -> &'static str {
        match self {
            Self::Peer => "peer",
            Self::HeaderTimeout => "header_timeout",
            Self::Idle => "idle",
            Self::Age => "age",
            Self::Drain => "drain",
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    server: Arc<Server>,
    mut phase: watch::Receiver<Phase>,
    _slot: OwnedSemaphorePermit,
) {
    let metrics = Arc::clone(&server.metrics);
    metrics.connections_open.inc();
    let activity = Arc::new(Activity::new());
    let sniff = server.tls.is_none();
    let watched = Watched {
        inner: stream,
        activity: Arc::clone(&activity),
        sniffed: if sniff { 0 } else { SNIFF_DONE },
    };
    let ended = match &server.tls {
        None => serve(watched, peer, &server, activity, &mut phase).await,
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(server.limits.header_read_timeout, acceptor.accept(watched));
            // None: the handshake took too long, or the listener is closing.
            let tls = tokio::select! {
                tls = handshake => tls.ok(),
                _ = phase.wait_for(|phase| *phase != Phase::Open) => None,
            };
            match tls {
                Some(Ok(tls)) => {
                    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                        activity.http2.store(true, Ordering::Release);
                    }
                    serve(tls, peer, &server, activity, &mut phase).await
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    Ended::Peer
                }
                None => Ended::HeaderTimeout,
            }
        }
    };
    metrics
        .connections_closed
        .with_label_values(&[ended.label()])
        .inc();
    metrics.connections_open.dec();
}

/// Serves one connection until it ends, enforcing its limits and following the listener's phase.
async fn serve<I>(
    io: I,
    peer: SocketAddr,
    server: &Server,
    activity: Arc<Activity>,
    phase: &mut watch::Receiver<Phase>,
) -> Ended
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &server.limits;
    let app = server.app.clone();
    let calls = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let call = CallGuard::begin(&calls);
        request.extensions_mut().insert(PeerAddr(peer));
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await?;
            Ok::<_, Infallible>(response.map(|body| Body::new(Guarded { body, _call: call })))
        }
    });
    let connection = server.builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let mut age_due = limits
        .max_connection_age
        .map(|age| tokio::time::Instant::now() + jittered(age));
    let mut force_due: Option<tokio::time::Instant> = None;
    let mut closing: Option<Ended> = None;
    if *phase.borrow_and_update() != Phase::Open {
        connection.as_mut().graceful_shutdown();
        closing = Some(Ended::Drain);
    }
    loop {
        // A connection already closing has nothing left for the watchdog to do (and a deadline in the past
        // would fire on every turn).
        let watchdog = activity.due(limits).filter(|_| closing.is_none());
        // Biased: a drain that has begun is applied before the connection writes its next response, so that
        // response already says the connection ends.
        tokio::select! {
            biased;
            changed = phase.changed() => {
                let now = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Closed };
                match now {
                    Phase::Open => {}
                    Phase::Closing if closing.is_none() => {
                        connection.as_mut().graceful_shutdown();
                        closing = Some(Ended::Drain);
                    }
                    Phase::Closing => {}
                    Phase::Closed => return Ended::Drain,
                }
            }
            _ = tokio::time::sleep_until(age_due.unwrap_or_else(far)), if age_due.is_some() => {
                age_due = None;
                if closing.is_none() {
                    connection.as_mut().graceful_shutdown();
                    closing = Some(Ended::Age);
                    force_due = Some(tokio::time::Instant::now() + limits.age_grace);
                }
            }
            _ = tokio::time::sleep_until(force_due.unwrap_or_else(far)), if force_due.is_some() => {
                return closing.unwrap_or(Ended::Age);
            }
            _ = activity.changed.notified() => {}
            _ = tokio::time::sleep_until(watchdog.map_or_else(far, |(due, _)| due.into())), if watchdog.is_some() => {
                // The state may have moved on while this timer ran: act on what is due now.
                match activity.due(limits) {
                    Some((due, Watchdog::HeaderTimeout)) if due <= Instant::now() => return Ended::HeaderTimeout,
                    Some((due, Watchdog::Idle)) if due <= Instant::now() => {
                        connection.as_mut().graceful_shutdown();
                        closing = Some(Ended::Idle);
                    }
                    _ => {}
                }
            }
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                return closing.unwrap_or(Ended::Peer);
            }
        }
    }
}

/// `age` moved by up to ±10%, so that connections opened together do not all close together.
fn jittered(age: Duration) -> Duration {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let fraction = (random % 10_000) as f64 / 10_000.0;
    age.mul_f64(0.9 + 0.2 * fraction)
}

/// What the watchdog would do at its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watchdog {
    /// An HTTP/1.1 request head (or a new connection's first bytes) took too long: drop the connection.
    HeaderTimeout,
    /// No call for idle_timeout: close gracefully.
    Idle,
}

/// "Not set" for the millisecond stamps of `Activity`.
const NEVER: u64 = u64::MAX;

/// A connection's calls in progress and when it went idle, shared by its IO, its calls and its watchdog.
struct Activity {
    epoch: Instant,
    calls: AtomicUsize,
    /// Milliseconds after `epoch` when the connection last had no call in progress.
    idle_since: AtomicU64,
    /// Milliseconds after `epoch` when an HTTP/1.1 request head began to arrive with no call in progress (a new
    /// connection counts from its start); NEVER while none is arriving.
    head_since: AtomicU64,
    /// HTTP/2 (by preface or ALPN): its requests arrive in frames, which HTTP/2's own limits bound.
    http2: AtomicBool,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            calls: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Bytes arrived: on an idle HTTP/1.1 connection they start a request head, which has a time limit.
    fn bytes_arrived(&self) {
        if self.calls.load(Ordering::Acquire) == 0
            && !self.http2.load(Ordering::Acquire)
            && self.head_since.load(Ordering::Acquire) == NEVER
        {
            self.head_since.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// When the watchdog must act next, and how; None while a call is in progress.
    fn due(&self, limits: &ConnectionLimits) -> Option<(Instant, Watchdog)> {
        if self.calls.load(Ordering::Acquire) > 0 {
            return None;
        }
        let head = self.head_since.load(Ordering::Acquire);
        if head != NEVER && !self.http2.load(Ordering::Acquire) {
            return Some((
                self.at(head) + limits.header_read_timeout,
                Watchdog::HeaderTimeout,
            ));
        }
        let idle = self.idle_since.load(Ordering::Acquire);
        Some((self.at(idle) + limits.idle_timeout, Watchdog::Idle))
    }
}

/// One call in progress on a connection: from its request head until its response body is done or dropped.
struct CallGuard(Arc<Activity>);

impl CallGuard {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.calls.fetch_add(1, Ordering::AcqRel);
        activity.head_since.store(NEVER, Ordering::Release);
        Self(Arc::clone(activity))
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity
                .idle_since
                .store(activity.now_ms(), Ordering::Release);
            activity.changed.notify_one();
        }
    }
}

/// A response body that keeps its call counted as in progress until it is done.
struct Guarded {
    body: Body,
    _call: CallGuard,
}

impl http_body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How many leading bytes of a plaintext connection tell HTTP/2's preface ("PRI * HTTP/2.0") from HTTP/1.1.
const SNIFF: usize = 3;
const SNIFF_DONE: usize = usize::MAX;

/// The connection's socket, reporting arriving bytes to its `Activity` (and, in plaintext, whether the
/// client speaks HTTP/2).
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    /// Leading bytes compared with the HTTP/2 preface so far; SNIFF_DONE once decided (or under TLS).
    sniffed: usize,
}

impl Watched {
    fn sniff(&mut self, bytes: &[u8]) {
        let preface = b"PRI";
        for &byte in bytes {
            if self.sniffed >= SNIFF {
                break;
            }
            if byte != preface[self.sniffed] {
                self.sniffed = SNIFF_DONE;
                return;
            }
            self.sniffed += 1;
        }
        if self.sniffed == SNIFF {
            self.activity.http2.store(true, Ordering::Release);
            self.sniffed = SNIFF_DONE;
            self.activity.changed.notify_one();
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if self.sniffed != SNIFF_DONE {
                let arrived = buf.filled()[before..].to_vec();
                self.sniff(&arrived);
            }
            self.activity.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
