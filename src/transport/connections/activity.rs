//! A connection's activity as its watchdog sees it: calls in progress, when it went idle, when a request head
//! began to arrive, and whether it speaks HTTP/2; fed by its socket (`Watched`) and its calls (`CallGuard`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::ConnectionLimits;

/// What the watchdog would do at its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Watchdog {
    /// An HTTP/1.1 request head (or a new connection's first bytes) took too long: drop the connection.
    HeaderTimeout,
    /// No call for idle_timeout: close gracefully.
    Idle,
}

/// "Not set" for the millisecond stamps of `Activity`.
pub(super) const NEVER: u64 = u64::MAX;

/// A connection's calls in progress and when it went idle, shared by its IO, its calls and its watchdog.
pub(super) struct Activity {
    epoch: Instant,
    calls: AtomicUsize,
    /// Milliseconds after `epoch` when the connection last had no call in progress.
    idle_since: AtomicU64,
    /// Milliseconds after `epoch` when an HTTP/1.1 request head began to arrive with no call in progress (a new
    /// connection counts from its start); NEVER while none is arriving.
    head_since: AtomicU64,
    /// HTTP/2 (by preface or ALPN): its requests arrive in frames, which HTTP/2's own limits bound.
    pub(super) http2: AtomicBool,
    pub(super) changed: Notify,
}

impl Activity {
    pub(super) fn new() -> Self {
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
    pub(super) fn due(&self, limits: &ConnectionLimits) -> Option<(Instant, Watchdog)> {
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
pub(super) struct CallGuard(Arc<Activity>);

impl CallGuard {
    pub(super) fn begin(activity: &Arc<Activity>) -> Self {
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
pub(super) struct Guarded {
    pub(super) body: Body,
    pub(super) _call: CallGuard,
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
pub(super) const SNIFF: usize = 3;
pub(super) const SNIFF_DONE: usize = usize::MAX;

/// The connection's socket, reporting arriving bytes to its `Activity` (and, in plaintext, whether the
/// client speaks HTTP/2).
pub(super) struct Watched {
    pub(super) inner: TcpStream,
    pub(super) activity: Arc<Activity>,
    /// Leading bytes compared with the HTTP/2 preface so far; SNIFF_DONE once decided (or under TLS).
    pub(super) sniffed: usize,
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
