#!/usr/bin/env python3
"""Plays a hostile or overloaded client against ONE running rerank-server and prints the figures of each
scenario (a measurement script, not a test: nothing is asserted).

    pip install grpcio grpcio-reflection protobuf
    python3 scripts/bench/hostile_scenarios.py --addr 127.0.0.1:50051 --pid <server pid> [--only NAME ...] [--scale S]

The message types come from the server's reflection service (no generated code). The server's memory is read
from /proc/<pid>/status: VmRSS before a scenario and VmHWM after it; the peak is reset before each scenario
by writing "5" to /proc/<pid>/clear_refs (needs root or the server's user). When that fails the peak is
reported as "peak since start". The reset sets the peak to the current RSS, and the allocator keeps memory
that earlier scenarios freed, so a delta only shows growth beyond what the server already held: for clean
peaks run one scenario (--only NAME) per freshly started server. Without --pid no memory is reported. Before each scenario the script waits
(up to --settle-seconds) for the server to be idle (Info stats: no queued or pending pairs). Text is
deterministic pseudo-random English-like words (--seed). Each scenario prints one summary line; some add
indented detail lines.

Scenarios (--only picks some; default all, in this order):
  long_query               one unary Rerank: a 16 KB query and D documents of 60 KB (--long-docs, default 8).
                           D=1000 needs the server's max_documents >= 1000 and max_message_bytes >= 64 MB.
                           Prints status, seconds, RSS before, peak RSS during, delta.
  return_documents_stream  one RerankStream per N in --stream-docs (comma list, default 20000): start{top_n=5,
                           return_documents=true}, then N documents of 8 KB in chunks of 1000, generated
                           lazily (the client holds one chunk), responses read concurrently. Prints status,
                           final results, seconds, peak RSS delta; compare the peaks across N (e.g. 5000,20000).
  cancelled_tokenization   30 concurrent unary requests of 500 documents x 54 KB (27 MB each), each cancelled
                           50 ms after it was sent, then at once one 2-document probe request: its latency and
                           status (next to its latency on an idle server).
  cancelled_large          a 3000-document request (~300 words per document; needs max_documents >= 3000)
                           cancelled after 0.3 s, then at once a 2-document probe: latency and status.
  deadline_large           the same 3000-document request with a 0.3 s gRPC deadline; when it answers, the
                           probe. Prints the first's status and time-to-answer and the probe's latency.
  stalled_reader           a RerankStream that sends start + 3 (--stall-chunks) chunks of 1000 small documents, never reads a
                           response and never half-closes; after --stall-seconds (default 5) the server's
                           status for it, if it ended the call, and the Info stats before, after sending, and
                           after the stall. Run the server with stream_idle_timeout below the stall seconds
                           (e.g. RERANK_STREAM_IDLE_TIMEOUT=3s) to see it release the stream's work. grpcio
                           only shows a call's status once the messages before it were read, so the status is
                           learnt by reading the responses after the stall (for at most 1 s; a call still
                           open then is reported as such and cancelled).

--scale S multiplies every document count that was not given explicitly (D, N, the 500 and 3000 documents per
request, the 1000 documents per stalled chunk); byte sizes and request counts stay. Use it for slow (debug,
CPU) builds, e.g. --scale 0.05.

The probe request goes over its own, already connected channel, so that it measures the server rather than
this client's connection, still busy with the cancelled uploads.
"""
import argparse
import random
import sys
import threading
import time

import grpc
from google.protobuf import text_format

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "lib"))
import rerank_grpc  # noqa: E402
from rerank_grpc import connect  # noqa: E402

MB = 1024 * 1024
KB = 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * MB),
    ("grpc.max_receive_message_length", 256 * MB),
]
SCENARIOS = [
    "long_query",
    "return_documents_stream",
    "cancelled_tokenization",
    "cancelled_large",
    "deadline_large",
    "stalled_reader",
]

# Common English words; nearly all are one WordPiece token in BERT-style vocabularies.
WORDS = """
the of and to in is was for that on with as by at from his her it an are were be this which or had not but
have one all their they has been more time new would two other after first when who its will can into
only year some these over most many also may city such made people state later then between world under
where high part any well through during both three back small large long found known used each before
system work number area group school government house company water life day week night place point home
road river street market family music game team power light money power story paper table window garden
simple early late old young great little good bad right left open close short full free clear strong
""".split()


class Api(rerank_grpc.Api):
    """The shared client (scripts/lib/rerank_grpc.py), with the server's stats from Info."""

    def stats(self):
        return self.info(self.InfoRequest(), timeout=30).stats


# ---------------------------------------------------------------------------------------------------------
# Text


class Text:
    """Deterministic pseudo-random text. Documents are slices of one pre-generated pool at random word
    boundaries, so that millions of bytes of documents cost no Python per-word work."""

    POOL_BYTES = 4 * MB

    def __init__(self, seed):
        self.rng = random.Random(seed)
        parts, size = [], 0
        while size < self.POOL_BYTES:
            sentence = self.rng.choices(WORDS, k=self.rng.randint(6, 18))
            sentence[0] = sentence[0].capitalize()
            piece = " ".join(sentence) + ". "
            parts.append(piece)
            size += len(piece)
        self.pool = "".join(parts)

    def words(self, nbytes):
        """Lowercase words only, exactly nbytes of ASCII (e.g. for a query)."""
        out, size = [], 0
        while size < nbytes:
            word = self.rng.choice(WORDS)
            out.append(word)
            size += len(word) + 1
        return " ".join(out)[:nbytes].rstrip()

    def _start(self, span):
        start = self.rng.randrange(0, len(self.pool) - span - 64)
        return self.pool.index(" ", start) + 1

    def document(self, nbytes):
        """Prose of exactly nbytes (ASCII)."""
        start = self._start(nbytes)
        return self.pool[start:start + nbytes]

    def prose_words(self, nwords):
        """About nwords words of prose (~1 token per word)."""
        start = self._start(nwords * 8)
        end = start
        for _ in range(nwords):
            end = self.pool.index(" ", end) + 1
        return self.pool[start:end - 1]


# ---------------------------------------------------------------------------------------------------------
# Server memory


class Memory:
    def __init__(self, pid):
        self.pid = pid
        self.reset_ok = None

    def _field(self, name):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
        return float("nan")

    def rss(self):
        return self._field("VmRSS") if self.pid else None

    def reset_peak(self):
        if not self.pid:
            return
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False

    def begin(self):
        """Resets the peak; returns RSS before (MiB)."""
        self.reset_peak()
        return self.rss()

    def report(self, before):
        if not self.pid:
            return "rss=n/a(no --pid)"
        peak = self._field("VmHWM")
        label = "peak_rss" if self.reset_ok else "peak_rss_since_start"
        return f"rss_before={before:.1f}MB {label}={peak:.1f}MB delta={peak - before:+.1f}MB"


# ---------------------------------------------------------------------------------------------------------
# Helpers


def code_of(error_or_future):
    try:
        code = error_or_future.code()
    except Exception as e:  # noqa: BLE001 - report whatever went wrong
        return f"?({type(e).__name__})"
    return code.name if code is not None else "?"


def details_of(error):
    try:
        details = error.details() or ""
    except Exception:  # noqa: BLE001
        details = ""
    return (details[:160] + "...") if len(details) > 160 else details


def stats_text(stats):
    """Every field of the stats message, zeros included (text_format would leave them out)."""
    parts = []
    for field in stats.DESCRIPTOR.fields:
        value = getattr(stats, field.name)
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif not isinstance(value, (int, str, bool)):
            value = text_format.MessageToString(value, as_one_line=True) if hasattr(value, "DESCRIPTOR") \
                else list(value)
        parts.append(f"{field.name}={value}")
    return " ".join(parts) or "(empty)"


def stat(stats, name):
    return getattr(stats, name) if name in stats.DESCRIPTOR.fields_by_name else None


def stat_delta(before, after, name):
    a, b = stat(after, name), stat(before, name)
    return "n/a" if a is None or b is None else f"{a - b:+d}"


def wait_idle(api, limit):
    """Waits until the server reports no queued or pending pairs; returns seconds waited (or a note)."""
    t0 = time.monotonic()
    while True:
        s = api.stats()
        busy = (stat(s, "queued_pairs") or 0) + (stat(s, "pending_pairs") or 0)
        if busy == 0:
            return time.monotonic() - t0, None
        if time.monotonic() - t0 > limit:
            return time.monotonic() - t0, f"server still busy after {limit:.0f}s: {stats_text(s)}"
        time.sleep(0.2)


class Probe:
    """A 2-document request over its own, already connected channel."""

    def __init__(self, address, types, timeout):
        self.api = Api(connect(address), types)
        self.timeout = timeout
        self.request = self.api.RerankRequest(
            query="what is the capital of france?",
            documents=["Paris is the capital of France.", "Berlin is the capital of Germany."],
        )

    def run(self):
        t0 = time.monotonic()
        try:
            self.api.rerank(self.request, timeout=self.timeout)
            code = "OK"
        except grpc.RpcError as e:
            code = code_of(e)
        return code, time.monotonic() - t0


def out(line):
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Scenarios


def long_query(ctx):
    api, text, mem = ctx.api, ctx.text, ctx.mem
    n = ctx.count(8, ctx.args.long_docs)
    request = api.RerankRequest(
        query=text.words(16 * KB), documents=[text.document(60 * KB) for _ in range(n)], top_n=5
    )
    size = request.ByteSize()
    before = mem.begin()
    t0 = time.monotonic()
    try:
        api.rerank(request, timeout=ctx.args.timeout)
        code, details = "OK", ""
    except grpc.RpcError as e:
        code, details = code_of(e), details_of(e)
    seconds = time.monotonic() - t0
    out(f"[long_query] docs={n}x60KB query=16KB message={size / MB:.1f}MB status={code} "
        f"seconds={seconds:.2f} {mem.report(before)}" + (f" details={details!r}" if details else ""))


def return_documents_stream(ctx):
    api, text, mem = ctx.api, ctx.text, ctx.mem
    counts = ctx.args.stream_docs or [20000]
    scaled = not ctx.args.stream_docs
    query = text.words(200)
    for total in counts:
        n = max(1, int(total * ctx.args.scale)) if scaled else total
        if total != counts[0]:
            waited, note = wait_idle(api, ctx.args.settle_seconds)
            if note:
                out(f"  (settle: {note})")

        def requests(n=n):
            yield api.StreamRequest(start=api.RerankStart(query=query, top_n=5, return_documents=True))
            sent = 0
            while sent < n:
                size = min(1000, n - sent)
                yield api.StreamRequest(documents=api.DocumentChunk(
                    documents=[text.document(8 * KB) for _ in range(size)]))
                sent += size

        before = mem.begin()
        t0 = time.monotonic()
        scored, final_results, echoed, code, details = 0, None, 0, "OK", ""
        call = api.rerank_stream(requests(), timeout=ctx.args.timeout)
        try:
            for response in call:
                which = response.WhichOneof("item")
                if which == "scores":
                    scored += len(response.scores.results)
                elif which == "final":
                    final_results = len(response.final.results)
                    echoed = sum(1 for r in response.final.results if len(r.document) == 8 * KB)
        except grpc.RpcError as e:
            code, details = code_of(e), details_of(e)
        seconds = time.monotonic() - t0
        out(f"[return_documents_stream] docs={n}x8KB status={code} scores_received={scored} "
            f"final_results={final_results} final_with_document={echoed} seconds={seconds:.2f} "
            f"{mem.report(before)}" + (f" details={details!r}" if details else ""))


def cancelled_tokenization(ctx):
    api, text, mem = ctx.api, ctx.text, ctx.mem
    requests, docs = 30, ctx.count(500)
    payload = api.RerankRequest(
        query="which of these documents is relevant?", documents=[text.document(54 * KB) for _ in range(docs)]
    ).SerializeToString()
    base_code, base_latency = ctx.probe.run()
    stats_before = api.stats()
    before = mem.begin()
    futures, timers = [], []
    t0 = time.monotonic()
    for _ in range(requests):
        future = api.rerank_raw.future(payload, timeout=ctx.args.timeout)
        timer = threading.Timer(0.05, future.cancel)
        timer.start()
        futures.append(future)
        timers.append(timer)
    for timer in timers:
        timer.join()
    sent_and_cancelled = time.monotonic() - t0
    code, latency = ctx.probe.run()
    codes = {}
    for future in futures:
        c = code_of(future)
        codes[c] = codes.get(c, 0) + 1
    stats_after = api.stats()
    cancelled_pairs = stat_delta(stats_before, stats_after, "cancelled_pairs")
    out(f"[cancelled_tokenization] requests={requests}x{docs}docsx54KB ({len(payload) / MB:.2f}MB each) "
        f"send+cancel={sent_and_cancelled:.2f}s big_statuses={codes} probe_status={code} "
        f"probe_latency={latency * 1000:.0f}ms (idle: {base_code} {base_latency * 1000:.0f}ms) "
        f"cancelled_pairs={cancelled_pairs} {mem.report(before)}")


def large_request(ctx):
    n = ctx.count(3000)
    return n, ctx.api.RerankRequest(
        query="how do rivers shape the land around a city?",
        documents=[ctx.text.prose_words(300) for _ in range(n)],
    ).SerializeToString()


def cancelled_large(ctx):
    api, mem = ctx.api, ctx.mem
    n, payload = large_request(ctx)
    base_code, base_latency = ctx.probe.run()
    stats_before = api.stats()
    before = mem.begin()
    t0 = time.monotonic()
    future = api.rerank_raw.future(payload, timeout=ctx.args.timeout)
    time.sleep(max(0.0, 0.3 - (time.monotonic() - t0)))
    cancelled = future.cancel()
    code, latency = ctx.probe.run()
    stats_after = api.stats()
    cancelled_pairs = stat_delta(stats_before, stats_after, "cancelled_pairs")
    out(f"[cancelled_large] docs={n}x~300words ({len(payload) / MB:.2f}MB) cancelled_at=0.3s "
        f"cancel_took_effect={cancelled} big_status={code_of(future)} probe_status={code} "
        f"probe_latency={latency * 1000:.0f}ms (idle: {base_code} {base_latency * 1000:.0f}ms) "
        f"cancelled_pairs={cancelled_pairs} {mem.report(before)}")


def deadline_large(ctx):
    api, mem = ctx.api, ctx.mem
    n, payload = large_request(ctx)
    base_code, base_latency = ctx.probe.run()
    stats_before = api.stats()
    before = mem.begin()
    t0 = time.monotonic()
    try:
        api.rerank_raw(payload, timeout=0.3)
        big_code, details = "OK", ""
    except grpc.RpcError as e:
        big_code, details = code_of(e), details_of(e)
    answered = time.monotonic() - t0
    code, latency = ctx.probe.run()
    stats_after = api.stats()
    cancelled_pairs = stat_delta(stats_before, stats_after, "cancelled_pairs")
    out(f"[deadline_large] docs={n}x~300words ({len(payload) / MB:.2f}MB) deadline=0.3s big_status={big_code} "
        f"big_answered_after={answered:.3f}s probe_status={code} probe_latency={latency * 1000:.0f}ms "
        f"(idle: {base_code} {base_latency * 1000:.0f}ms) cancelled_pairs={cancelled_pairs} "
        f"{mem.report(before)}" + (f" details={details!r}" if details else ""))


def stalled_reader(ctx):
    api, text, mem = ctx.api, ctx.text, ctx.mem
    per_chunk = ctx.count(1000)
    stall = ctx.args.stall_seconds
    release = threading.Event()
    all_sent = threading.Event()

    def requests():
        yield api.StreamRequest(start=api.RerankStart(query="small documents", top_n=5))
        for _ in range(ctx.args.stall_chunks):
            yield api.StreamRequest(documents=api.DocumentChunk(
                documents=[text.prose_words(20) for _ in range(per_chunk)]))
        all_sent.set()  # asked for a 5th message: the 4 above went out
        release.wait()  # never half-close while stalled

    stats_before = api.stats()
    before = mem.begin()
    t0 = time.monotonic()
    call = api.rerank_stream(requests(), timeout=ctx.args.timeout)
    sent = all_sent.wait(timeout=max(stall, 30))
    sent_at = time.monotonic() - t0
    time.sleep(min(1.0, stall / 2))
    stats_sent = api.stats()
    # The stall counts from the moment everything was sent: the call stays open and nothing is read.
    time.sleep(max(0.0, sent_at + stall - (time.monotonic() - t0)))
    stats_after = api.stats()
    # grpcio hands over a call's status only after the messages before it were read, so the server's verdict
    # is learnt by draining now, for at most a second: a call the server ended answers at once; one it still
    # holds open would block (it is then cancelled).
    drained, result = threading.Event(), {}

    def drain():
        try:
            result["messages"] = sum(1 for _ in call)
            result["status"] = "OK"
        except grpc.RpcError as e:
            result["status"], result["details"] = code_of(e), details_of(e)
        drained.set()

    threading.Thread(target=drain, daemon=True).start()
    if drained.wait(1.0):
        status = f"server_ended_it={result['status']} details={result.get('details', '')!r}"
    else:
        status = f"still_open_after={time.monotonic() - t0:.2f}s (the client cancels it now)"
        call.cancel()
        drained.wait(5.0)
    release.set()
    out(f"[stalled_reader] chunks={ctx.args.stall_chunks}x{per_chunk} all_sent={sent} (at {sent_at:.2f}s) stall={stall:.1f}s "
        f"{status} {mem.report(before)}")
    out(f"  stats_before: {stats_text(stats_before)}")
    out(f"  stats_sent:   {stats_text(stats_sent)}")
    out(f"  stats_after:  {stats_text(stats_after)}")


# ---------------------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args):
        self.args = args
        self.channel = connect(args.addr)
        self.api = Api(self.channel)
        self.probe = Probe(args.addr, self.api.types, args.timeout)
        self.text = Text(args.seed)
        self.mem = Memory(args.pid)

    def count(self, default, explicit=None):
        if explicit is not None:
            return explicit
        return max(1, int(round(default * self.args.scale)))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--addr", default="127.0.0.1:50051", help="server address host:port")
    parser.add_argument("--pid", type=int, help="server process id, for its memory (/proc/<pid>/status)")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, metavar="NAME", help="run only these scenarios")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies document counts not given explicitly (default 1)")
    parser.add_argument("--long-docs", type=int,
                        help="long_query: documents of 60 KB (default 8; 1000 needs server max_documents >= "
                             "1000 and max_message_bytes >= 64 MB)")
    parser.add_argument("--stream-docs", type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                        help="return_documents_stream: comma list of document counts, one stream each "
                             "(default 20000), e.g. 5000,20000")
    parser.add_argument("--stall-seconds", type=float, default=5.0,
                        help="stalled_reader: how long to keep the unread stream open (default 5)")
    parser.add_argument("--stall-chunks", type=int, default=3,
                        help="stalled_reader: chunks of 1000 documents to send (default 3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="deadline of each call, s (default 900)")
    parser.add_argument("--settle-seconds", type=float, default=120.0,
                        help="longest wait for an idle server before a scenario (default 120)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    ctx = Context(args)
    info = ctx.api.info(ctx.api.InfoRequest(), timeout=30)
    out(f"server: model={info.model} device={info.device} version={info.version} "
        f"max_documents={info.max_documents} max_message_bytes={info.max_message_bytes} "
        f"max_document_bytes={info.max_document_bytes} max_query_bytes={info.max_query_bytes} "
        + (f"rss={ctx.mem.rss():.1f}MB pid={args.pid}" if args.pid else "rss=n/a(no --pid)"))
    for name in args.only or SCENARIOS:
        waited, note = wait_idle(ctx.api, args.settle_seconds)
        if note:
            out(f"  (settle before {name}: {note})")
        try:
            globals()[name](ctx)
        except Exception as e:  # noqa: BLE001 - one broken scenario should not hide the others
            out(f"[{name}] script error: {type(e).__name__}: {e}")
    if ctx.mem.reset_ok is False:
        out("note: could not reset the peak (clear_refs); peaks are since server start")


if __name__ == "__main__":
    sys.exit(main())
