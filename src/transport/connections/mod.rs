//! The listener's connections, driven by our own accept loop over hyper's HTTP/1.1 and HTTP/2: a cap on open
//! connections, per-connection header, idle and age limits, and the two steps of a drain (GOAWAY, then close).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::metrics::Metrics;

mod activity;
mod lifecycle;

use activity::{Activity, CallGuard, Guarded, Watched, SNIFF_DONE};
use lifecycle::{at_or_far, Lifecycle, Step};

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
    let mut life = Lifecycle::new(limits);
    if *phase.borrow_and_update() != Phase::Open {
        connection.as_mut().graceful_shutdown();
        life.closing = Some(Ended::Drain);
    }
    loop {
        // A connection already closing has nothing left for the watchdog to do (and a deadline in the past
        // would fire on every turn).
        let watchdog = activity.due(limits).filter(|_| life.closing.is_none());
        // Biased: a drain that has begun is applied before the connection writes its next response, so that
        // response already says the connection ends.
        let step = tokio::select! {
            biased;
            changed = phase.changed() => {
                life.phase(if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Closed })
            }
            _ = tokio::time::sleep_until(at_or_far(life.age_due)), if life.age_due.is_some() => life.aged(),
            _ = tokio::time::sleep_until(at_or_far(life.force_due)), if life.force_due.is_some() => {
                Step::End(life.closing.unwrap_or(Ended::Age))
            }
            _ = activity.changed.notified() => Step::Continue,
            _ = tokio::time::sleep_until(at_or_far(watchdog.map(|(due, _)| due.into()))), if watchdog.is_some() => {
                life.watchdog(activity.due(limits))
            }
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                Step::End(life.closing.unwrap_or(Ended::Peer))
            }
        };
        match step {
            Step::Continue => {}
            Step::Close => connection.as_mut().graceful_shutdown(),
            Step::End(ended) => return ended,
        }
    }
}
