//! Streaming calls, whatever the transport: `start` first, then document chunks; scores flow back as their
//! batches finish, with a back-pressure window, an idle timeout and the call's deadline.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::{RankedDocument, RerankOptions, RerankOutcome, RerankSession, Reranker};
use crate::error::RerankError;

/// A decoded message of a streaming call.
#[derive(Debug)]
pub enum StreamRequest {
    /// Must come first, and only once.
    Start {
        query: String,
        options: RerankOptions,
    },
    Documents(Vec<String>),
}

/// What a streaming call sends back: partial scores, then exactly one final ranking.
#[derive(Debug)]
pub enum StreamEvent {
    Scores(Vec<RankedDocument>),
    Final(RerankOutcome),
}

/// The events of one streaming call, then its error if it failed.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, RerankError>> + Send>>;

/// Events the server may have in flight towards a slow reader before it stops reading the stream's input.
const OUTBOX: usize = 16;

type Outbox = mpsc::Sender<StreamEvent>;

impl Reranker {
    /// Runs a streaming call on a task of its own. `admit` is called once the `start` message has arrived (it
    /// takes the call's slot); what it returns lives as long as the call's work, not its last messages: a call
    /// that ended frees it even while those wait for a client that does not read.
    pub fn rerank_stream<S, A, H>(
        &self,
        endpoint: &'static str,
        inbound: S,
        deadline: Option<Instant>,
        admit: A,
    ) -> EventStream
    where
        S: Stream<Item = Result<StreamRequest, RerankError>> + Send + Unpin + 'static,
        A: FnOnce() -> Result<H, RerankError> + Send + 'static,
        H: Send + 'static,
    {
        let (outbox, events) = mpsc::channel(OUTBOX);
        // The error goes out after the events already in the outbox, even when it is full.
        let (error_sender, error) = oneshot::channel::<RerankError>();
        let reranker = self.clone();
        let task = async move {
            let started = Instant::now();
            let run = run_stream(&reranker, inbound, deadline, admit, &outbox);
            let result = reranker.bounded(deadline, run).await;
            reranker.record_call(endpoint, &result, started);
            if let Err(error) = result {
                if matches!(error, RerankError::Aborted(_)) {
                    reranker.metrics().stalled_streams.inc();
                }
                let _ = error_sender.send(error);
            }
        };
        tokio::spawn(task.in_current_span());
        let events = tokio_stream::wrappers::ReceiverStream::new(events).map(Ok);
        let error =
            futures::stream::once(error).filter_map(|error| async move { error.ok().map(Err) });
        Box::pin(events.chain(error))
    }
}

/// Reads `start` (within request_read_timeout: until then the stream holds nothing shared), then documents
/// until the client half-closes; partial scores go out as batches finish and the final ranking last.
/// Returning (or the client going away) drops the session, which cancels its pairs still queued.
async fn run_stream<S, A, H>(
    reranker: &Reranker,
    mut inbound: S,
    deadline: Option<Instant>,
    admit: A,
    outbox: &Outbox,
) -> Result<(), RerankError>
where
    S: Stream<Item = Result<StreamRequest, RerankError>> + Unpin,
    A: FnOnce() -> Result<H, RerankError>,
{
    let idle = reranker.limits().stream_idle_timeout;
    let read_timeout = reranker.limits().request_read_timeout;
    let first = tokio::time::timeout(read_timeout, inbound.next())
        .await
        .map_err(|_| {
            RerankError::RequestTimeout(format!(
                "the stream's `start` message did not arrive within {read_timeout:?} (request_read_timeout)"
            ))
        })?;
    let (_hold, mut session) = match first {
        Some(Ok(StreamRequest::Start { query, options })) => {
            let hold = admit()?;
            // Admission judges each chunk against the stream's deadline, as it does a unary call's.
            let session = reranker.start(
                &query,
                RerankOptions {
                    deadline,
                    ..options
                },
            )?;
            (hold, session)
        }
        Some(Ok(StreamRequest::Documents(_))) => {
            return Err(RerankError::invalid(
                "the first stream message must be `start`",
            ))
        }
        Some(Err(error)) => return Err(error),
        None => {
            return Err(RerankError::invalid(
                "the stream ended before its `start` message",
            ))
        }
    };
    // While this many of the stream's pairs wait for scores, the server stops reading the stream; HTTP/2
    // flow control then holds the client back.
    let window = reranker.limits().max_stream_pending_pairs;
    loop {
        tokio::select! {
            message = inbound.next(), if session.outstanding() < window => match message {
                // Without room the push waits for the stream's own scores (a stream with nothing pending is
                // refused); they go out right after.
                Some(Ok(StreamRequest::Documents(documents))) => session.push(documents).await?,
                Some(Ok(StreamRequest::Start { .. })) => {
                    return Err(RerankError::invalid("`start` was sent twice; it must be the first message only"));
                }
                Some(Err(error)) => return Err(error),
                None => break,
            },
            scores = session.next_scores(), if session.awaits_scores() => {
                send_scores(outbox, scores?, idle).await?;
            }
            _ = outbox.closed() => return Err(RerankError::Cancelled("the client went away".into())),
            _ = tokio::time::sleep(idle), if !session.awaits_scores() => return Err(idle_error(idle)),
        }
    }
    finish(session, outbox, idle).await
}

async fn finish(
    mut session: RerankSession,
    outbox: &Outbox,
    idle: Duration,
) -> Result<(), RerankError> {
    while let Some(scores) = session.next_scores().await? {
        send_scores(outbox, Some(scores), idle).await?;
    }
    let outcome = session.finish().await?;
    outbox
        .send_timeout(StreamEvent::Final(outcome), idle)
        .await
        .map_err(|_| RerankError::Cancelled("the client went away or stopped reading".into()))
}

fn idle_error(idle: Duration) -> RerankError {
    RerankError::Aborted(format!(
        "the client sent nothing for {idle:?} (stream_idle_timeout); the stream was ended"
    ))
}

/// Sends partial scores; a client that reads nothing for `idle` while the outbox is full ends the call, so a
/// stalled reader cannot hold its admitted work forever.
async fn send_scores(
    outbox: &Outbox,
    scores: Option<Vec<RankedDocument>>,
    idle: Duration,
) -> Result<(), RerankError> {
    let Some(scores) = scores.filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    outbox
        .send_timeout(StreamEvent::Scores(scores), idle)
        .await
        .map_err(|error| match error {
            mpsc::error::SendTimeoutError::Timeout(_) => RerankError::Aborted(format!(
                "the client read no scores for {idle:?} (stream_idle_timeout); the stream was ended and its \
                 pending work released"
            )),
            mpsc::error::SendTimeoutError::Closed(_) => {
                RerankError::Cancelled("the client went away".into())
            }
        })
}
