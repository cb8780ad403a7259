//! One client connection and, while a request is forwarded, its backend connection.
//!
//! The connection is a state machine ([`Phase`]): handshaking, reading a request head, proxying
//! an exchange with the backend, closing (flushing the last answer and close_notify), lingering
//! (discarding what the client still sends so the answer is not lost to a reset), closed.
//! [`Conn::pump`] is called for every readiness event on either socket and moves as many bytes as
//! the buffers allow until nothing more can move: sockets are edge-triggered, so every read and
//! write goes on until `WouldBlock`, and a full buffer stops the reading side (back-pressure).
//!
//! Every error a peer can cause ends here as an answer or a closed connection, never as a panic
//! or an error returned to the loop.

use std::io::{self, Read, Write};
use std::mem;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::Registry;
use rustls::ServerConnection;

use crate::buf::ReadBuf;
use crate::http::{self, Body, Forwarding, Framing, Problem, RequestHead, ResponseHead};
use crate::policy::{self, ClientCert, Decision, Standing};
use crate::pool::Pool;
use crate::route::ResourceMatch;
use crate::snapshot::Snapshot;
use crate::throttle::{self, Buckets, CountKey, Counters, Key, Kind, Outcome, RateHeaders};

/// How much of a body each direction holds at most, per buffer.
const BUFFER: usize = 64 * 1024;
/// The largest backend response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Rounds of [`Conn::pump`] before it yields to other connections.
const ROUNDS: usize = 32;
/// Interim (1xx) answers a backend may send before its final one.
const MAX_INTERIM: u8 = 16;
/// How long a closing connection may take to flush and to let the client finish sending.
const LINGER: Duration = Duration::from_secs(2);

/// Limits and timeouts of SPEC 6, per connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest request head, in bytes (431 above it).
    pub max_head: usize,
    /// The largest request body, in bytes (413 above it).
    pub max_body: u64,
    pub handshake_timeout: Duration,
    /// For the whole request head, and between two arrivals of request body bytes (408).
    pub request_timeout: Duration,
    /// For the next request on a kept-alive connection; also how long a client may take no
    /// answer bytes, and how long a backend connection waits in the pool.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// For the backend's answer, and between two of its reads or writes (504).
    pub backend_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head: 16 * 1024,
            max_body: 10 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            backend_timeout: Duration::from_secs(30),
        }
    }
}

/// What the loop lends a connection for one pump.
pub struct Context<'a> {
    pub registry: &'a Registry,
    pub snapshot: &'a Snapshot,
    pub limits: &'a Limits,
    pub now: Instant,
    /// Unix seconds, for certificate validity.
    pub unix_now: i64,
    /// SIGTERM arrived: finish what is in flight, take no new request.
    pub draining: bool,
    pub request_ids: &'a mut RequestIds,
    pub pool: &'a mut Pool,
    /// The throttling buckets, and the clock they run on (nanoseconds since the Unix epoch,
    /// never going backwards).
    pub buckets: &'a mut Buckets,
    pub bucket_now: u64,
    /// Requests allowed and throttled per API and caller, for `certgate status`.
    pub counters: &'a mut Counters,
}

/// Fresh request ids: a random prefix chosen at start, and a counter.
pub struct RequestIds {
    prefix: u64,
    next: u64,
}

impl RequestIds {
    pub fn new(prefix: u64) -> Self {
        Self { prefix, next: 0 }
    }

    fn next(&mut self) -> RequestId {
        self.next += 1;
        RequestId::new(self.prefix, self.next)
    }
}

/// A request id: 24 lowercase hex digits, kept inline so that making one allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestId([u8; 24]);

impl RequestId {
    fn new(prefix: u64, counter: u64) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 24];
        let value = u128::from(prefix) << 32 | u128::from(counter as u32);
        for (i, digit) in digits.iter_mut().enumerate() {
            *digit = HEX[(value >> (4 * (23 - i)) & 0xf) as usize];
        }
        Self(digits)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

// The exchange lives inline: a connection is already large (rustls' state), and boxing it
// would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Phase {
    Handshaking,
    ReadingHead,
    Proxying(Exchange),
    /// Flushing the last answer; close_notify follows it.
    Closing,
    /// close_notify queued after the answer; flushing the records.
    Notified,
    /// Write side shut; discarding what the client still sends.
    Lingering,
    Closed,
}

/// One request on its way to the backend and its answer on the way back.
struct Exchange {
    /// The backend connection (the connection's lease from the pool) has finished connecting.
    connected: bool,
    /// The tightest bucket's state, for the answer's `RateLimit-*` headers.
    rate: Option<RateHeaders>,
    addrs: Rc<[SocketAddr]>,
    /// Index in `addrs` of the address being tried.
    addr: usize,
    /// Bytes for the backend: the request head, then the body as it arrives; `sent` of them
    /// have been written.
    to_backend: Vec<u8>,
    sent: usize,
    /// An idempotent request whose whole self is in `to_backend`, on a reused backend
    /// connection: if that connection turns out dead before any response byte, the request
    /// goes again on a fresh one.
    retryable: bool,
    /// The backend's answer allows another request on its connection.
    backend_keep_alive: bool,
    /// Interim (1xx) answers relayed so far.
    interim: u8,
    from_backend: ReadBuf,
    backend_eof: bool,
    /// Readiness of the backend socket, as for the client's.
    backend_readable: bool,
    backend_writable: bool,
    backend_read_closed: bool,
    request: Body,
    /// Request body content received so far, against the body limit.
    request_bytes: u64,
    response: Response,
    request_was_head: bool,
    request_id: RequestId,
    /// Close the client connection once this exchange is done.
    close: bool,
    /// When the connect began, and when each side last moved bytes (or stopped owing any).
    connect_started: Instant,
    client_moved: Instant,
    backend_moved: Instant,
    /// What the connection's deadline is waiting for.
    wait: Wait,
}

impl Exchange {
    /// Starts over on a new backend connection, a connect to `addrs[addr]` in progress.
    fn connecting(&mut self, addr: usize, now: Instant) {
        self.addr = addr;
        self.connected = false;
        self.connect_started = now;
        self.backend_readable = true;
        self.backend_writable = true;
        self.backend_read_closed = false;
    }
}

enum Response {
    Head,
    /// `decode`: the body is chunked and the client speaks HTTP/1.0, so only its content goes.
    Body {
        body: Body,
        decode: bool,
    },
    Done,
}

impl Drop for Conn {
    /// A request cut off before its end (the client went, the answer broke off, the drain
    /// deadline passed) is still told, with what it got.
    fn drop(&mut self) {
        if let Some(p) = &mut self.pending {
            p.upstream = p.upstream_started.map(|t| t.elapsed());
        }
        let (status, bytes) = self
            .pending
            .as_ref()
            .map_or((0, 0), |p| (p.status, p.bytes));
        self.end_log(status, bytes, Instant::now());
    }
}

/// A request still to be told in the access log.
struct Pending {
    started: Instant,
    id: RequestId,
    /// The answer's status, once its head went out (0 before).
    status: u16,
    /// Bytes of the answer's body sent so far.
    bytes: u64,
    /// When the request left for the backend, and how long the backend took to answer it all.
    upstream_started: Option<Instant>,
    upstream: Option<Duration>,
}

/// The names in a request's log line, as text reused from request to request.
#[derive(Default)]
struct LogFields {
    method: String,
    path: String,
    api: String,
    caller: String,
}

impl LogFields {
    fn set(field: &mut String, value: &str) {
        field.clear();
        field.push_str(value);
    }
}

/// A request that routing and policy let through.
struct Routed {
    api: usize,
    resource: Option<usize>,
    /// The certificate entry that let the caller in; none for a public resource.
    entry: Option<usize>,
}

/// A verdict of [`policy::standing`] and what it holds for.
struct CachedStanding {
    generation: u64,
    api: usize,
    /// Unix seconds when it was found: CA-issued chains are checked again after
    /// [`STANDING_TTL`], so that an intermediate's expiry is not missed.
    found: i64,
    standing: Standing,
}

/// How long a CA-issued certificate's checked chain is trusted without checking it again.
const STANDING_TTL: i64 = 60;

/// The APIs a connection keeps its certificate's standing for at once.
const MAX_STANDINGS: usize = 8;

/// Who an exchange waits for; the deadline runs from the last time that side moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// The backend to accept the connection (`connect_timeout`).
    Connect,
    /// The backend to read the request or send its answer (`backend_timeout`).
    Backend,
    /// The client to send more of its request body (`request_timeout`).
    ClientBody,
    /// The client to take the answer (`idle_timeout`).
    ClientRead,
}

pub struct Conn {
    /// Its number for the logs: one per connection since start, never reused.
    id: u64,
    sock: TcpStream,
    tls: ServerConnection,
    peer: SocketAddr,
    /// Its key in the loop's slab: what the pool knows it by.
    key: usize,
    /// The backend connection leased from the pool while an exchange runs.
    backend: Option<usize>,
    client_cert: Option<ClientCert>,
    /// The request being answered, for its access-log line once it is done.
    pending: Option<Pending>,
    /// What the line says of it, kept from when it was parsed: reused from request to request.
    log: LogFields,
    /// The client certificate's standing for the APIs it called, found under one snapshot
    /// generation ([`Conn::refresh_standing`]); at most [`MAX_STANDINGS`].
    standings: Vec<CachedStanding>,
    /// `Client-Cert` and `Client-Cert-Chain` values (RFC 9440) for the backend.
    cert_headers: Option<(String, Option<String>)>,
    /// Plaintext from the client not yet consumed.
    input: ReadBuf,
    /// The backend buffers, kept between exchanges so that requests reuse them.
    spare_buffers: (Vec<u8>, ReadBuf),
    /// Plaintext for the client not yet taken by rustls.
    output: Vec<u8>,
    client_eof: bool,
    /// Readiness of the client socket as events reported it: set by an event, cleared when an
    /// operation would block. Edge-triggered events come again only after such a block, so an
    /// operation is tried only when it can move bytes.
    client_readable: bool,
    client_writable: bool,
    /// The peer shut its side (an event said so): read on to the end, whatever the size of
    /// the last read.
    client_read_closed: bool,
    head: RequestHead,
    /// When the first bytes of a head still incomplete arrived.
    head_started: Option<Instant>,
    response_head: ResponseHead,
    phase: Phase,
    deadline: Instant,
}

impl Conn {
    pub fn new(
        sock: TcpStream,
        tls: ServerConnection,
        peer: SocketAddr,
        (key, id): (usize, u64),
        deadline: Instant,
    ) -> Self {
        Self {
            id,
            sock,
            tls,
            peer,
            key,
            backend: None,
            client_cert: None,
            standings: Vec::new(),
            pending: None,
            log: LogFields::default(),
            cert_headers: None,
            input: ReadBuf::default(),
            spare_buffers: (Vec::new(), ReadBuf::default()),
            output: Vec::new(),
            client_eof: false,
            client_readable: true,
            client_writable: true,
            client_read_closed: false,
            head: RequestHead::default(),
            head_started: None,
            response_head: ResponseHead::default(),
            phase: Phase::Handshaking,
            deadline,
        }
    }

    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// True while no request is in progress: the connection can go at once when draining.
    pub fn is_idle(&self) -> bool {
        match self.phase {
            Phase::Handshaking => true,
            Phase::ReadingHead => self.input.is_empty(),
            _ => false,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Notes what an event reported for the client socket.
    pub fn client_ready(&mut self, readiness: Readiness) {
        self.client_readable |= readiness.readable;
        self.client_writable |= readiness.writable;
        self.client_read_closed |= readiness.read_closed;
    }

    /// Notes what an event reported for the backend connection it leases.
    pub fn backend_ready(&mut self, readiness: Readiness) {
        if let Phase::Proxying(ex) = &mut self.phase {
            ex.backend_readable |= readiness.readable;
            ex.backend_writable |= readiness.writable;
            ex.backend_read_closed |= readiness.read_closed;
        }
    }

    /// Moves bytes until nothing more can move, or until the round budget is spent: then it
    /// returns true and the loop must call it again soon, as no new readiness event will come
    /// for bytes already waiting.
    pub fn pump(&mut self, cx: &mut Context<'_>) -> bool {
        let mut again = true;
        for _ in 0..ROUNDS {
            let read = self.read_client();
            let advanced = self.advance(cx);
            // While the exchange moves on, its output gathers: one TLS record and one write for
            // a head and body that arrived together, rather than one each.
            let flushed = !advanced && self.flush_client();
            if matches!(self.phase, Phase::Closed) {
                self.release(cx);
                return false;
            }
            if let Phase::Proxying(ex) = &mut self.phase {
                if read || flushed {
                    ex.client_moved = cx.now;
                }
            }
            if !(read || advanced || flushed) {
                again = false;
                break;
            }
        }
        self.settle(cx);
        again
    }

    /// Called when the deadline has passed; returns what [`Conn::pump`] returns.
    pub fn expire(&mut self, cx: &mut Context<'_>) -> bool {
        match mem::replace(&mut self.phase, Phase::Closed) {
            Phase::ReadingHead if !self.input.is_empty() => {
                let problem = Problem::new(
                    408,
                    "request-timeout",
                    "Request timeout",
                    "the request head did not arrive in time".into(),
                );
                let id = cx.request_ids.next();
                self.begin_unparsed_log(id, cx.now);
                let bytes = problem.write(id.as_str(), true, false, false, &mut self.output);
                self.end_log(problem.status, bytes as u64, cx.now);
                self.input.clear();
                self.close(cx.now);
            }
            // An idle keep-alive connection: say goodbye properly.
            Phase::ReadingHead => self.close(cx.now),
            Phase::Proxying(mut ex) => match ex.wait {
                Wait::Connect => {
                    let failed = ex.addrs[ex.addr];
                    let next =
                        connect_backend(&mut self.backend, self.key, &ex.addrs, ex.addr + 1, cx);
                    if let Ok(i) = next {
                        ex.connecting(i, cx.now);
                        self.phase = Phase::Proxying(ex);
                    } else {
                        self.phase = Phase::Proxying(ex);
                        let detail = format!(
                            "the backend at {failed} did not accept the connection within {:?}",
                            cx.limits.connect_timeout
                        );
                        self.fail_exchange(Problem::backend_unavailable(detail), cx);
                    }
                }
                Wait::Backend => {
                    self.phase = Phase::Proxying(ex);
                    let problem = Problem::new(
                        504,
                        "backend-timeout",
                        "Backend timeout",
                        format!(
                            "the backend did not answer within {:?}",
                            cx.limits.backend_timeout
                        ),
                    );
                    self.fail_exchange(problem, cx);
                }
                Wait::ClientBody => {
                    self.phase = Phase::Proxying(ex);
                    let problem = Problem::new(
                        408,
                        "request-timeout",
                        "Request timeout",
                        format!(
                            "the request body stopped arriving for {:?}",
                            cx.limits.request_timeout
                        ),
                    );
                    self.fail_exchange(problem, cx);
                }
                // A client that takes no part of its answer is given up on.
                Wait::ClientRead => {}
            },
            Phase::Handshaking => self.handshake_failed("timeout"),
            _ => {}
        }
        self.pump(cx)
    }

    /// Reads TLS records and decrypts them into `input` while it has room.
    fn read_client(&mut self) -> bool {
        if matches!(self.phase, Phase::Lingering) {
            return self.discard();
        }
        if matches!(self.phase, Phase::Closed | Phase::Closing | Phase::Notified) || self.client_eof
        {
            return false;
        }
        let mut progress = false;
        loop {
            if self.input.len() < BUFFER {
                let tls = &mut self.tls;
                match self.input.read_from(BUFFER, |room| tls.reader().read(room)) {
                    Ok(0) => {
                        self.client_eof = true;
                        return true;
                    }
                    Ok(_) => {
                        progress = true;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        self.client_eof = true;
                        return true;
                    }
                }
            }
            if !self.tls.wants_read() || !self.client_readable {
                return progress;
            }
            let mut sock = ShortReads {
                sock: &mut self.sock,
                short: false,
            };
            match self.tls.read_tls(&mut sock) {
                Ok(0) => {
                    self.client_eof = true;
                    return true;
                }
                Ok(_) => {
                    // A short read emptied the socket: the next bytes come with a new event.
                    if sock.short && !self.client_read_closed {
                        self.client_readable = false;
                    }
                    progress = true;
                    if let Err(e) = self.tls.process_new_packets() {
                        if self.tls.is_handshaking() {
                            self.handshake_failed(handshake_failure_reason(&e));
                        }
                        // rustls queued an alert; send it and go.
                        let _ = self.tls.write_tls(&mut self.sock);
                        self.phase = Phase::Closed;
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.client_readable = false;
                    return progress;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.phase = Phase::Closed;
                    return true;
                }
            }
        }
    }

    /// Hands `output` to rustls and rustls' records to the socket.
    fn flush_client(&mut self) -> bool {
        if matches!(self.phase, Phase::Closed | Phase::Lingering) {
            return false;
        }
        let mut progress = false;
        if !self.output.is_empty() {
            match self.tls.writer().write(&self.output) {
                Ok(n) if n > 0 => {
                    self.output.drain(..n);
                    progress = true;
                }
                _ => {}
            }
        }
        while self.tls.wants_write() && self.client_writable {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.client_writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.phase = Phase::Closed;
                    return true;
                }
            }
        }
        progress
    }

    fn advance(&mut self, cx: &mut Context<'_>) -> bool {
        match &self.phase {
            Phase::Handshaking => {
                if self.tls.is_handshaking() {
                    // A drain takes no new callers: a handshake not yet done is dropped.
                    if self.client_eof || cx.draining {
                        let reason = if cx.draining {
                            "draining"
                        } else {
                            "closed-by-client"
                        };
                        self.handshake_failed(reason);
                        self.phase = Phase::Closed;
                        return true;
                    }
                    return false;
                }
                let resumed = self.tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                crate::metrics::handshake(resumed);
                if let Some((leaf, chain)) =
                    self.tls.peer_certificates().and_then(|c| c.split_first())
                {
                    self.client_cert = Some(client_cert(leaf));
                    self.cert_headers = Some(rfc9440(leaf, chain));
                }
                self.phase = Phase::ReadingHead;
                self.deadline = cx.now + cx.limits.idle_timeout;
                true
            }
            Phase::ReadingHead => self.start_request(cx),
            Phase::Proxying(_) => self.proxy(cx),
            Phase::Closing => {
                if !self.output.is_empty() {
                    return false;
                }
                self.tls.send_close_notify();
                self.phase = Phase::Notified;
                true
            }
            Phase::Notified => {
                if self.tls.wants_write() {
                    return false;
                }
                let _ = self.sock.shutdown(Shutdown::Write);
                self.phase = Phase::Lingering;
                true
            }
            Phase::Lingering | Phase::Closed => false,
        }
    }

    /// Parses the next request head and either answers it or starts an exchange.
    fn start_request(&mut self, cx: &mut Context<'_>) -> bool {
        // Answers go out in order: the next request waits until the last answer is flushed.
        if !self.output.is_empty() || self.tls.wants_write() {
            return false;
        }
        if self.input.is_empty() {
            if self.client_eof || cx.draining {
                self.close(cx.now);
                return true;
            }
            return false;
        }
        match http::parse_request(&self.input, &mut self.head) {
            Ok(true) => self.head_started = None,
            Ok(false) if self.input.len() > cx.limits.max_head => {
                return self.refuse_unparsed(head_too_large(cx.limits.max_head), cx);
            }
            Ok(false) => {
                if self.client_eof {
                    self.close(cx.now);
                    return true;
                }
                // The head's own clock starts with its first bytes, whatever was left of
                // the idle one.
                if self.head_started.is_none() {
                    self.head_started = Some(cx.now);
                    self.deadline = cx.now + cx.limits.request_timeout;
                }
                return false;
            }
            Err(http::HeadError::Syntax(httparse::Error::TooManyHeaders)) => {
                let problem = Problem::new(
                    431,
                    "headers-too-large",
                    "Request header fields too large",
                    format!(
                        "the request has more than {} header lines",
                        http::MAX_HEADERS
                    ),
                );
                return self.refuse_unparsed(problem, cx);
            }
            Err(e) => return self.refuse_unparsed(Problem::bad_request(format!("{e}")), cx),
        }
        if self.head.len > cx.limits.max_head {
            return self.refuse_unparsed(head_too_large(cx.limits.max_head), cx);
        }
        let request_id = cx.request_ids.next();
        self.begin_log(request_id, cx.now);
        let refusal = match self.route(cx) {
            Ok(_) if matches!(self.head.framing, Some(Framing::Length(n)) if n > cx.limits.max_body) => {
                body_too_large(cx.limits.max_body)
            }
            Ok(routed) => match self.throttle(&routed, cx) {
                Ok(rate) => {
                    self.forward(routed.api, routed.entry.is_some(), rate, request_id, cx);
                    return true;
                }
                Err(problem) => problem,
            },
            Err(problem) => problem,
        };
        // The body, if any, is not read: the connection closes after the answer.
        let has_body = self.head.framing != Some(Framing::None);
        let close = has_body || !self.head.keep_alive || cx.draining;
        let http10 = self.head.minor_version == 0;
        let head = &self.input[self.head.method.clone()] == b"HEAD";
        let bytes = refusal.write(request_id.as_str(), close, http10, head, &mut self.output);
        self.end_log(refusal.status, bytes as u64, cx.now);
        self.input.consume(self.head.len);
        self.next_request_or_close(close, cx);
        true
    }

    /// A head that could not be parsed: answer, and close (the framing is unknown).
    fn refuse_unparsed(&mut self, problem: Problem, cx: &mut Context<'_>) -> bool {
        let id = cx.request_ids.next();
        self.begin_unparsed_log(id, cx.now);
        let bytes = problem.write(id.as_str(), true, false, false, &mut self.output);
        self.end_log(problem.status, bytes as u64, cx.now);
        self.input.clear();
        self.close(cx.now);
        true
    }

    /// Counts and tells a handshake that did not complete.
    fn handshake_failed(&self, reason: &'static str) {
        crate::metrics::handshake_failure(reason);
        crate::log::event("tls handshake failed", self.id, self.peer, reason);
    }

    /// Starts the log line of the request just parsed.
    fn begin_log(&mut self, id: RequestId, now: Instant) {
        let input = &self.input;
        let text =
            |range: std::ops::Range<usize>| std::str::from_utf8(&input[range]).unwrap_or("-");
        LogFields::set(&mut self.log.method, text(self.head.method.clone()));
        LogFields::set(
            &mut self.log.path,
            text(self.head.path.start..self.head.query.end),
        );
        LogFields::set(&mut self.log.api, "-");
        LogFields::set(&mut self.log.caller, "-");
        self.pending = Some(Pending {
            started: now,
            id,
            status: 0,
            bytes: 0,
            upstream_started: None,
            upstream: None,
        });
    }

    /// Starts the log line of a request whose head could not be read.
    fn begin_unparsed_log(&mut self, id: RequestId, now: Instant) {
        for field in [
            &mut self.log.method,
            &mut self.log.path,
            &mut self.log.api,
            &mut self.log.caller,
        ] {
            LogFields::set(field, "-");
        }
        self.pending = Some(Pending {
            started: self.head_started.unwrap_or(now),
            id,
            status: 0,
            bytes: 0,
            upstream_started: None,
            upstream: None,
        });
    }

    /// Writes the pending request's log line: its answer had `status` and `bytes` of body.
    fn end_log(&mut self, status: u16, bytes: u64, now: Instant) {
        let Some(p) = self.pending.take() else {
            return;
        };
        crate::metrics::request(&self.log.api, status);
        if let Some(d) = p.upstream {
            crate::metrics::backend_duration(d);
        }
        crate::log::request(&crate::log::Entry {
            conn: self.id,
            id: p.id.as_str(),
            peer: self.peer,
            api: &self.log.api,
            caller: &self.log.caller,
            method: &self.log.method,
            path: &self.log.path,
            status,
            bytes,
            duration: now - p.started,
            upstream: p.upstream,
        });
    }

    /// Routes and judges the parsed head: the API, the resource and the certificate entry that
    /// let the caller through (none for a public resource).
    fn route(&mut self, cx: &Context<'_>) -> Result<Routed, Problem> {
        let snapshot = cx.snapshot;
        // httparse only accepts visible ASCII in the target.
        let path = std::str::from_utf8(&self.input[self.head.path.clone()]).unwrap_or("/");
        let method = std::str::from_utf8(&self.input[self.head.method.clone()]).unwrap_or("");
        let (index, rest) = snapshot
            .router
            .find(path)
            .ok_or_else(|| Problem::not_found(path))?;
        let view = &snapshot.apis[index];
        LogFields::set(&mut self.log.api, &view.api.name);
        let resource_index = match crate::route::match_resource(&view.resources, method, rest) {
            ResourceMatch::Unrestricted => None,
            ResourceMatch::Matched(i) => Some(i),
            ResourceMatch::NotFound => return Err(Problem::not_found(path)),
            ResourceMatch::MethodNotAllowed(allow) => {
                let mut problem = Problem::new(
                    405,
                    "method-not-allowed",
                    "Method not allowed",
                    format!("{path} does not accept {method}; it accepts {allow}"),
                );
                problem.headers = format!("Allow: {allow}\r\n");
                return Err(problem);
            }
        };
        let resource = resource_index.map(|i| &view.resources[i]);
        let standing = self.refresh_standing(index, cx);
        let caller = self
            .client_cert
            .as_ref()
            .zip(standing.map(|i| &self.standings[i].standing));
        match policy::decide(caller, view, resource, cx.unix_now) {
            Decision::Allow { entry } => {
                LogFields::set(
                    &mut self.log.caller,
                    entry.map_or("-", |e| view.certs[e].alias.as_str()),
                );
                Ok(Routed {
                    api: index,
                    resource: resource_index,
                    entry,
                })
            }
            Decision::Refuse(refusal) => Err(refusal.to_problem()),
        }
    }

    /// Takes a token from every bucket that applies to the routed request (SPEC 3): the
    /// caller's, the resource's per caller, the API's. Refused with 429 when any is empty.
    fn throttle(
        &self,
        routed: &Routed,
        cx: &mut Context<'_>,
    ) -> Result<Option<RateHeaders>, Problem> {
        let view = &cx.snapshot.apis[routed.api];
        let t = &view.throttle;
        // A caller is its certificate; on a public resource without one, its address.
        let (entry_key, caller) = match (routed.entry, &self.client_cert) {
            (Some(e), Some(cert)) => (t.entries[e].0, throttle::caller_key(&cert.sha256)),
            (None, Some(cert)) => (0, throttle::caller_key(&cert.sha256)),
            (_, None) => (0, throttle::address_key(self.peer.ip())),
        };
        let key = |kind, scope, entry, caller| Key {
            kind,
            scope,
            entry,
            caller,
        };
        let wants = [
            routed.entry.and_then(|e| {
                let limit = t.entries[e].1?;
                Some((key(Kind::Caller, t.key, entry_key, caller), limit))
            }),
            routed.resource.and_then(|r| {
                let (scope, limit) = t.resources[r];
                Some((key(Kind::Resource, scope, entry_key, caller), limit?))
            }),
            t.limit.map(|limit| (key(Kind::Api, t.key, 0, 0), limit)),
        ];
        let outcome = cx.buckets.take(&wants, cx.bucket_now);
        let allowed = matches!(outcome, Outcome::Allowed(_));
        let counted = if routed.entry.is_some() { caller } else { 0 };
        cx.counters.count((t.key, entry_key, counted), allowed, || {
            let (alias, subject, caller) = match (routed.entry, &self.client_cert) {
                (Some(e), Some(cert)) => (
                    view.certs[e].alias.clone(),
                    cert.subject.clone(),
                    crate::certs::hex(&cert.sha256),
                ),
                _ => ("-".to_owned(), String::new(), String::new()),
            };
            let key = CountKey {
                api: view.api.name.clone(),
                alias,
                caller,
            };
            (key, subject)
        });
        match outcome {
            Outcome::Allowed(rate) => Ok(rate),
            Outcome::Throttled {
                by,
                retry_after,
                headers,
            } => {
                crate::metrics::throttled(&view.api.name);
                let (whose, tier) = match by {
                    Kind::Caller => (
                        "the caller's",
                        routed.entry.map(|e| view.certs[e].tier.as_str()),
                    ),
                    Kind::Resource => (
                        "the resource's",
                        routed
                            .resource
                            .and_then(|r| view.resources[r].tier.as_deref()),
                    ),
                    Kind::Api => ("the API's", view.api.tier.as_deref()),
                };
                let mut problem = Problem::new(
                    429,
                    "throttled",
                    "Too many requests",
                    format!(
                        "{whose} tier {} allows no more requests to API {} now; retry in {retry_after} s",
                        tier.unwrap_or("-"),
                        view.api.name
                    ),
                );
                problem.headers = format!("Retry-After: {retry_after}\r\n");
                add_rate_headers(&mut problem, Some(&headers));
                Err(problem)
            }
        }
    }

    /// The index in `standings` of the client certificate's standing for API `api` of the
    /// current snapshot, found now if it is not known: kept while the generation is the same
    /// (and, for a CA-issued certificate, for [`STANDING_TTL`]), so webpki runs once per
    /// connection, API and change rather than per request (SPEC 8).
    fn refresh_standing(&mut self, api: usize, cx: &Context<'_>) -> Option<usize> {
        let cert = self.client_cert.as_ref()?;
        let generation = cx.snapshot.generation;
        self.standings.retain(|c| c.generation == generation);
        let found = self.standings.iter().position(|c| c.api == api);
        if let Some(i) = found {
            let c = &self.standings[i];
            if matches!(c.standing, Standing::Pinned(_)) || cx.unix_now - c.found < STANDING_TTL {
                return Some(i);
            }
            self.standings.swap_remove(i);
        }
        if self.standings.len() >= MAX_STANDINGS {
            self.standings.remove(0);
        }
        let chain = self.tls.peer_certificates().unwrap_or(&[]);
        let view = &cx.snapshot.apis[api];
        self.standings.push(CachedStanding {
            generation,
            api,
            found: cx.unix_now,
            standing: policy::standing(cert, chain, view, cx.snapshot, cx.unix_now),
        });
        Some(self.standings.len() - 1)
    }

    /// Starts forwarding the parsed request to the API's backend, on a pooled connection when
    /// there is one.
    fn forward(
        &mut self,
        api: usize,
        cert_passed: bool,
        rate: Option<RateHeaders>,
        request_id: RequestId,
        cx: &mut Context<'_>,
    ) {
        let view = &cx.snapshot.apis[api];
        let backend = &view.api.backend;
        let path = std::str::from_utf8(&self.input[self.head.path.clone()]).unwrap_or("/");
        let rest = &path[view.base_path.len().min(path.len())..];
        let (mut to_backend, mut from_backend) = mem::take(&mut self.spare_buffers);
        from_backend.clear();
        let cert_headers = self.cert_headers.as_ref().filter(|_| cert_passed);
        let forwarding = Forwarding {
            backend_path: &backend.path,
            rest: rest.as_bytes(),
            backend_authority: &backend.authority,
            client_ip: self.peer.ip(),
            request_id: request_id.as_str(),
            client_cert: cert_headers.map(|h| h.0.as_str()),
            client_cert_chain: cert_headers.and_then(|h| h.1.as_deref()),
        };
        http::write_upstream_head(&self.input, &self.head, &forwarding, &mut to_backend);
        let framing = self.head.framing.unwrap_or(Framing::None);
        let method = &self.input[self.head.method.clone()];
        let request_was_head = method == b"HEAD";
        let close = !self.head.keep_alive || cx.draining;
        let expect_continue = self.head.expect_continue && framing != Framing::None;
        // The whole request fits in the buffer, so it can be sent again.
        let fits = match framing {
            Framing::None => true,
            Framing::Length(n) => n <= (BUFFER - to_backend.len().min(BUFFER)) as u64,
            Framing::Chunked | Framing::UntilClose => false,
        };
        let retryable = http::is_idempotent(method) && fits;
        let addrs = Rc::clone(&view.addrs);
        close_backend(&mut self.backend, cx);
        let reused = cx.pool.checkout(&addrs, self.key, cx.registry);
        let connected = reused.is_some();
        let retryable = retryable && connected;
        let fresh = match reused {
            Some((backend, addr)) => {
                self.backend = Some(backend);
                Ok(addr)
            }
            None => connect_backend(&mut self.backend, self.key, &addrs, 0, cx),
        };
        self.input.consume(self.head.len);
        let addr = match fresh {
            Ok(addr) => addr,
            Err(detail) => {
                self.spare_buffers = (to_backend, from_backend);
                let close = close || framing != Framing::None;
                let http10 = self.head.minor_version == 0;
                let mut problem = Problem::backend_unavailable(detail);
                add_rate_headers(&mut problem, rate.as_ref());
                let head = request_was_head;
                let bytes =
                    problem.write(request_id.as_str(), close, http10, head, &mut self.output);
                self.end_log(problem.status, bytes as u64, cx.now);
                self.next_request_or_close(close, cx);
                return;
            }
        };
        if expect_continue {
            self.output
                .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        if let Some(p) = &mut self.pending {
            p.upstream_started = Some(cx.now);
        }
        self.phase = Phase::Proxying(Exchange {
            rate,
            connected,
            addrs,
            addr,
            to_backend,
            sent: 0,
            retryable,
            backend_keep_alive: false,
            interim: 0,
            from_backend,
            backend_eof: false,
            backend_readable: true,
            backend_writable: true,
            backend_read_closed: false,
            request: Body::new(framing),
            request_bytes: 0,
            response: Response::Head,
            request_was_head,
            request_id,
            close,
            connect_started: cx.now,
            client_moved: cx.now,
            backend_moved: cx.now,
            wait: Wait::Backend,
        });
    }

    /// Moves the exchange along: connect, request body out, response back.
    fn proxy(&mut self, cx: &mut Context<'_>) -> bool {
        let Phase::Proxying(ex) = &mut self.phase else {
            return false;
        };
        let mut progress = false;
        if !ex.connected {
            match with_backend(self.backend, cx, |sock| connect_result(sock)) {
                Ok(true) => {
                    ex.connected = true;
                    ex.backend_moved = cx.now;
                    progress = true;
                }
                Ok(false) => {}
                Err(e) => {
                    let failed = ex.addrs[ex.addr];
                    match connect_backend(&mut self.backend, self.key, &ex.addrs, ex.addr + 1, cx) {
                        Ok(i) => {
                            ex.connecting(i, cx.now);
                            return true;
                        }
                        Err(_) => {
                            let detail = format!("cannot connect to the backend at {failed}: {e}");
                            return self.fail_exchange(Problem::backend_unavailable(detail), cx);
                        }
                    }
                }
            }
        }
        // The request body, from the client to the backend.
        if !ex.request.is_done() && ex.to_backend.len() < BUFFER && !self.input.is_empty() {
            let take = self.input.len().min(BUFFER - ex.to_backend.len());
            match ex.request.advance_counting(&self.input[..take]) {
                Ok((n, content)) => {
                    ex.request_bytes += content;
                    if ex.request_bytes > cx.limits.max_body {
                        // The rest of the body stays unread: the connection must close.
                        ex.close = true;
                        return self.fail_exchange(body_too_large(cx.limits.max_body), cx);
                    }
                    ex.to_backend.extend_from_slice(&self.input[..n]);
                    self.input.consume(n);
                    progress |= n > 0;
                }
                Err(e) => {
                    let problem = Problem::bad_request(format!("{e}"));
                    return self.fail_exchange(problem, cx);
                }
            }
        }
        if !ex.request.is_done() && self.client_eof && self.input.is_empty() {
            // The client went away in the middle of its request.
            self.phase = Phase::Closed;
            return true;
        }
        if ex.connected {
            match with_backend(self.backend, cx, |sock| write_backend(ex, sock)) {
                Ok(moved) => {
                    if moved {
                        ex.backend_moved = cx.now;
                        progress = true;
                    }
                }
                Err(e) => {
                    let detail =
                        format!("the backend connection failed while sending the request: {e}");
                    return self.backend_failed(detail, cx);
                }
            }
            match with_backend(self.backend, cx, |sock| read_backend(ex, sock)) {
                Ok(moved) => {
                    if moved {
                        ex.backend_moved = cx.now;
                        progress = true;
                    }
                }
                Err(e) => {
                    let detail = format!("the backend connection failed: {e}");
                    return self.backend_failed(detail, cx);
                }
            }
            if !ex.from_backend.is_empty() {
                // The answer has begun: the request can no longer go again elsewhere.
                ex.retryable = false;
            }
        }
        progress |= self.relay_response(cx);
        progress | self.finish_exchange(cx)
    }

    /// Parses the backend's head and streams its body into `output`.
    fn relay_response(&mut self, cx: &mut Context<'_>) -> bool {
        let Phase::Proxying(ex) = &mut self.phase else {
            return false;
        };
        match &mut ex.response {
            Response::Head => {
                if (ex.from_backend.is_empty() && !ex.backend_eof) || self.output.len() >= BUFFER {
                    return false;
                }
                let parsed = http::parse_response(
                    &ex.from_backend,
                    ex.request_was_head,
                    &mut self.response_head,
                );
                match parsed {
                    Ok(true) => {}
                    Ok(false) if ex.backend_eof => {
                        let detail = "the backend closed the connection without answering".into();
                        return self.backend_failed(detail, cx);
                    }
                    Ok(false) if ex.from_backend.len() >= MAX_RESPONSE_HEAD => {
                        let detail = "the backend's response head is too large".into();
                        return self.fail_exchange(Problem::backend_unavailable(detail), cx);
                    }
                    Ok(false) => return false,
                    Err(e) => {
                        let detail = format!("the backend sent a malformed response: {e}");
                        return self.fail_exchange(Problem::backend_unavailable(detail), cx);
                    }
                }
                let head = &self.response_head;
                if head.status == 101 {
                    let detail =
                        "the backend switched protocols, which certgate does not relay".into();
                    return self.fail_exchange(Problem::backend_unavailable(detail), cx);
                }
                if (100..200).contains(&head.status) {
                    ex.interim += 1;
                    if ex.interim > MAX_INTERIM {
                        let detail = "the backend sent too many interim (1xx) answers".into();
                        return self.fail_exchange(Problem::backend_unavailable(detail), cx);
                    }
                    // Interim answers pass on to HTTP/1.1 clients; the final one follows.
                    if self.head.minor_version == 1 {
                        let out = &mut self.output;
                        http::write_client_head(&ex.from_backend, head, false, false, None, out);
                    }
                    ex.from_backend.consume(head.len);
                    return true;
                }
                let framing = head.framing.unwrap_or(Framing::None);
                let http10 = self.head.minor_version == 0;
                // An HTTP/1.0 client cannot read chunks: it gets the content, ended by the close.
                let decode = http10 && framing == Framing::Chunked;
                ex.close |= framing == Framing::UntilClose
                    || decode
                    || cx.draining
                    || !ex.request.is_done();
                // A request that went upstream as HTTP/1.0 did not ask to keep the connection:
                // the backend closes it whatever its answer says.
                ex.backend_keep_alive =
                    head.keep_alive && framing != Framing::UntilClose && !http10;
                let out = &mut self.output;
                let rate = ex.rate.as_ref();
                http::write_client_head(&ex.from_backend, head, ex.close, http10, rate, out);
                if let Some(p) = &mut self.pending {
                    p.status = head.status;
                }
                ex.from_backend.consume(head.len);
                ex.response = Response::Body {
                    body: Body::new(framing),
                    decode,
                };
                true
            }
            Response::Body { body, decode } => {
                let mut progress = false;
                if !ex.from_backend.is_empty() && self.output.len() < BUFFER {
                    let take = ex.from_backend.len().min(BUFFER - self.output.len());
                    let input = &ex.from_backend[..take];
                    let before = self.output.len();
                    let relayed = if *decode {
                        body.advance_with(input, |content| self.output.extend_from_slice(content))
                    } else {
                        body.advance(input).inspect(|&n| {
                            self.output.extend_from_slice(&input[..n]);
                        })
                    };
                    match relayed {
                        Ok(n) => {
                            ex.from_backend.consume(n);
                            progress = n > 0;
                            if let Some(p) = &mut self.pending {
                                p.bytes += (self.output.len() - before) as u64;
                            }
                        }
                        Err(_) => {
                            // Part of the answer is out: all that is left is to close.
                            self.phase = Phase::Closed;
                            return true;
                        }
                    }
                }
                if body.is_done() {
                    ex.response = Response::Done;
                    return true;
                }
                if ex.backend_eof && ex.from_backend.is_empty() {
                    if *body == Body::UntilClose {
                        ex.response = Response::Done;
                    } else {
                        // Truncated: the client must not take it for the whole answer.
                        self.phase = Phase::Closed;
                    }
                    return true;
                }
                progress
            }
            Response::Done => false,
        }
    }

    /// Ends the exchange once the answer is relayed, parking the backend connection in the pool
    /// when both sides allow it.
    fn finish_exchange(&mut self, cx: &mut Context<'_>) -> bool {
        if !matches!(&self.phase, Phase::Proxying(ex) if matches!(ex.response, Response::Done)) {
            return false;
        }
        let Phase::Proxying(ex) = mem::replace(&mut self.phase, Phase::ReadingHead) else {
            return false;
        };
        let close = ex.close || !ex.request.is_done();
        let reusable = ex.backend_keep_alive
            && !ex.backend_eof
            && ex.from_backend.is_empty()
            && ex.sent == ex.to_backend.len();
        match self.backend.take() {
            Some(backend) if reusable => cx.pool.park(backend, cx.now, cx.registry),
            Some(backend) => cx.pool.close(backend, cx.registry),
            None => {}
        }
        self.spare_buffers = (ex.to_backend, ex.from_backend);
        if let Some(p) = &mut self.pending {
            p.upstream = p.upstream_started.map(|t| cx.now - t);
        }
        let (status, bytes) = self
            .pending
            .as_ref()
            .map_or((0, 0), |p| (p.status, p.bytes));
        self.end_log(status, bytes, cx.now);
        self.next_request_or_close(close, cx);
        true
    }

    /// The backend connection failed. A retryable request goes again on a fresh connection;
    /// anything else gets 502.
    fn backend_failed(&mut self, detail: String, cx: &mut Context<'_>) -> bool {
        if let Phase::Proxying(ex) = &mut self.phase {
            if ex.retryable && ex.from_backend.is_empty() && matches!(ex.response, Response::Head) {
                let fresh = connect_backend(&mut self.backend, self.key, &ex.addrs, 0, cx);
                if let Ok(i) = fresh {
                    ex.connecting(i, cx.now);
                    ex.retryable = false;
                    ex.sent = 0;
                    ex.backend_eof = false;
                    return true;
                }
            }
        }
        self.fail_exchange(Problem::backend_unavailable(detail), cx)
    }

    /// The exchange failed: answer with `problem` if no part of the answer went out yet,
    /// else close.
    fn fail_exchange(&mut self, problem: Problem, cx: &mut Context<'_>) -> bool {
        let Phase::Proxying(mut ex) = mem::replace(&mut self.phase, Phase::Closed) else {
            return true;
        };
        close_backend(&mut self.backend, cx);
        self.spare_buffers = (
            mem::take(&mut ex.to_backend),
            mem::take(&mut ex.from_backend),
        );
        if let Some(p) = &mut self.pending {
            p.upstream = p.upstream_started.map(|t| cx.now - t);
        }
        if !matches!(ex.response, Response::Head) {
            // Part of the answer went out: the line tells what did.
            let (status, bytes) = self
                .pending
                .as_ref()
                .map_or((0, 0), |p| (p.status, p.bytes));
            self.end_log(status, bytes, cx.now);
            return true;
        }
        let close = ex.close || !ex.request.is_done();
        let http10 = self.head.minor_version == 0;
        let mut problem = problem;
        add_rate_headers(&mut problem, ex.rate.as_ref());
        let head = ex.request_was_head;
        let id = ex.request_id;
        let bytes = problem.write(id.as_str(), close, http10, head, &mut self.output);
        self.end_log(problem.status, bytes as u64, cx.now);
        self.next_request_or_close(close, cx);
        true
    }

    /// Sets the deadline of an exchange from who it waits for. A side that owes nothing has
    /// its clock restarted, so that waiting on one side never counts against the other: a
    /// slowly arriving upload does not run down the backend's time, nor a slow backend the
    /// client's.
    fn settle(&mut self, cx: &Context<'_>) {
        let client_behind = !self.output.is_empty() || self.tls.wants_write();
        let Phase::Proxying(ex) = &mut self.phase else {
            return;
        };
        if !ex.connected {
            ex.wait = Wait::Connect;
            self.deadline = ex.connect_started + cx.limits.connect_timeout;
            return;
        }
        let answering = !matches!(ex.response, Response::Done);
        let backend_owes = ex.sent < ex.to_backend.len()
            || (ex.request.is_done() && answering && ex.from_backend.len() < BUFFER);
        let client_owes_body = !ex.request.is_done()
            && self.input.is_empty()
            && ex.to_backend.len() < BUFFER
            && !self.client_eof;
        if !backend_owes {
            ex.backend_moved = cx.now;
        }
        if !client_owes_body && !client_behind {
            ex.client_moved = cx.now;
        }
        let mut next = (Wait::Backend, ex.backend_moved + cx.limits.backend_timeout);
        let client = if client_owes_body {
            Some((
                Wait::ClientBody,
                ex.client_moved + cx.limits.request_timeout,
            ))
        } else if client_behind {
            Some((Wait::ClientRead, ex.client_moved + cx.limits.idle_timeout))
        } else {
            None
        };
        if let Some(client) = client {
            if !backend_owes || client.1 < next.1 {
                next = client;
            }
        }
        ex.wait = next.0;
        self.deadline = next.1;
    }

    /// After an answer: wait for the next request, or close.
    fn next_request_or_close(&mut self, close: bool, cx: &Context<'_>) {
        if close {
            self.close(cx.now);
        } else {
            self.phase = Phase::ReadingHead;
            self.deadline = cx.now + cx.limits.idle_timeout;
        }
    }

    /// Starts closing: what is in `output` still goes out, then close_notify.
    fn close(&mut self, now: Instant) {
        self.phase = Phase::Closing;
        self.deadline = now + LINGER;
    }

    /// Reads and drops what a lingering client still sends, until it closes.
    fn discard(&mut self) -> bool {
        let mut scratch = [0u8; 4096];
        loop {
            match self.sock.read(&mut scratch) {
                Ok(0) => {
                    self.phase = Phase::Closed;
                    return true;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.phase = Phase::Closed;
                    return true;
                }
            }
        }
    }

    /// Deregisters what is still registered and closes the backend connection it leased; the
    /// loop drops the connection after this batch.
    fn release(&mut self, cx: &mut Context<'_>) {
        let _ = cx.registry.deregister(&mut self.sock);
        close_backend(&mut self.backend, cx);
    }
}

/// RFC 9440 values: the certificate, and the chain the client sent, as `:base64:` items.
fn rfc9440(
    leaf: &rustls::pki_types::CertificateDer<'_>,
    chain: &[rustls::pki_types::CertificateDer<'_>],
) -> (String, Option<String>) {
    use base64::Engine as _;
    let item = |der: &[u8]| {
        format!(
            ":{}:",
            base64::engine::general_purpose::STANDARD.encode(der)
        )
    };
    let chain =
        (!chain.is_empty()).then(|| chain.iter().map(|c| item(c)).collect::<Vec<_>>().join(", "));
    (item(leaf), chain)
}

/// A handshake failure's label in `certgate_tls_handshake_failures_total`.
fn handshake_failure_reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::AlertReceived(_) => "alert-received",
        rustls::Error::PeerIncompatible(_) => "peer-incompatible",
        rustls::Error::NoCertificatesPresented => "no-client-certificate",
        rustls::Error::InvalidCertificate(_) => "bad-certificate",
        rustls::Error::PeerMisbehaved(_) => "peer-misbehaved",
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => "bad-message",
        rustls::Error::DecryptError => "decrypt-error",
        _ => "other",
    }
}

/// The `RateLimit-*` lines of a throttled request, on the gateway's own answer to it.
fn add_rate_headers(problem: &mut Problem, rate: Option<&RateHeaders>) {
    if let Some(rate) = rate {
        let mut lines = Vec::new();
        http::write_rate_headers(rate, &mut lines);
        problem.headers.push_str(&String::from_utf8_lossy(&lines));
    }
}

/// The client certificate's fingerprint and subject, once per connection.
fn client_cert(der: &rustls::pki_types::CertificateDer<'_>) -> ClientCert {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(digest.as_ref());
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => ClientCert {
            sha256,
            subject: cert.subject().to_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        },
        // rustls took it, so this hardly happens; such a certificate matches no entry.
        Err(_) => ClientCert {
            sha256,
            subject: "(unparseable certificate)".into(),
            not_before: i64::MAX,
            not_after: i64::MIN,
        },
    }
}

/// Connects to the first of `addrs` from `first` on that accepts at once (or starts to) as the
/// backend connection in `slot`, closing the one there; says which address. The error detail
/// names the last address tried.
fn connect_backend(
    slot: &mut Option<usize>,
    owner: usize,
    addrs: &[SocketAddr],
    first: usize,
    cx: &mut Context<'_>,
) -> Result<usize, String> {
    close_backend(slot, cx);
    let mut failure = "the backend has no address".to_owned();
    for (i, addr) in addrs.iter().enumerate().skip(first) {
        match cx.pool.connect(*addr, owner, cx.registry) {
            Ok(backend) => {
                *slot = Some(backend);
                return Ok(i);
            }
            Err(e) => failure = format!("cannot connect to the backend at {addr}: {e}"),
        }
    }
    Err(failure)
}

fn close_backend(slot: &mut Option<usize>, cx: &mut Context<'_>) {
    if let Some(backend) = slot.take() {
        cx.pool.close(backend, cx.registry);
    }
}

/// Runs `f` on the leased backend socket; a lease the pool does not know reads as a connection
/// that is gone.
fn with_backend<T>(
    backend: Option<usize>,
    cx: &mut Context<'_>,
    f: impl FnOnce(&mut TcpStream) -> io::Result<T>,
) -> io::Result<T> {
    match backend.and_then(|key| cx.pool.sock(key)) {
        Some(sock) => f(sock),
        None => Err(io::ErrorKind::NotConnected.into()),
    }
}

/// Whether a non-blocking connect has finished: `Ok(false)` while it is in progress.
fn connect_result(sock: &TcpStream) -> io::Result<bool> {
    if let Some(e) = sock.take_error()? {
        return Err(e);
    }
    match sock.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

fn write_backend(ex: &mut Exchange, sock: &mut TcpStream) -> io::Result<bool> {
    let mut written = 0;
    while ex.sent < ex.to_backend.len() && ex.backend_writable {
        match sock.write(&ex.to_backend[ex.sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                ex.sent += n;
                written += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ex.backend_writable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // A retryable request keeps its head until the answer starts; others free the room.
    if ex.sent == ex.to_backend.len() && !ex.retryable {
        ex.to_backend.clear();
        ex.sent = 0;
    }
    Ok(written > 0)
}

fn read_backend(ex: &mut Exchange, sock: &mut TcpStream) -> io::Result<bool> {
    let mut progress = false;
    while !ex.backend_eof && ex.from_backend.len() < BUFFER && ex.backend_readable {
        let mut sock = ShortReads {
            sock: &mut *sock,
            short: false,
        };
        match ex.from_backend.read_from(BUFFER, |room| sock.read(room)) {
            Ok(0) => {
                ex.backend_eof = true;
                progress = true;
            }
            Ok(_) => {
                // As for the client: a short read emptied the socket.
                if sock.short && !ex.backend_read_closed {
                    ex.backend_readable = false;
                }
                progress = true;
            }
            Err(e) => {
                match e.kind() {
                    io::ErrorKind::WouldBlock => ex.backend_readable = false,
                    io::ErrorKind::Interrupted => {}
                    _ if progress || !ex.from_backend.is_empty() => {
                        // Data arrived before the reset: relay it, then treat as closed.
                        ex.backend_eof = true;
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(progress)
}

/// What an event reported for a socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// The peer shut its writing side (or the connection failed).
    pub read_closed: bool,
}

/// A socket that notes whether its last read returned less than asked for. On a stream socket
/// that means the receive queue was emptied, so, unless the peer has shut its side, reading
/// again would only find `WouldBlock`: data that arrives later raises a new edge-triggered
/// event. (nginx reads the same way with epoll.)
struct ShortReads<'a> {
    sock: &'a mut TcpStream,
    short: bool,
}

impl Read for ShortReads<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.short = n < buf.len();
        Ok(n)
    }
}

fn head_too_large(max_head: usize) -> Problem {
    Problem::new(
        431,
        "headers-too-large",
        "Request header fields too large",
        format!("the request head is larger than {max_head} bytes"),
    )
}

fn body_too_large(max_body: u64) -> Problem {
    Problem::new(
        413,
        "payload-too-large",
        "Payload too large",
        format!("the request body is larger than {max_body} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_prefix_and_counter_in_hex() {
        let mut ids = RequestIds::new(0x0123_4567_89ab_cdef);
        assert_eq!(ids.next().as_str(), "0123456789abcdef00000001");
        assert_eq!(ids.next().as_str(), "0123456789abcdef00000002");
        assert_eq!(
            RequestId::new(u64::MAX, u64::from(u32::MAX)).as_str(),
            "ffffffffffffffffffffffff"
        );
    }

    #[test]
    fn default_limits_are_those_of_spec_6() {
        let limits = Limits::default();
        assert_eq!(limits.max_head, 16 * 1024);
        assert_eq!(limits.max_body, 10 * 1024 * 1024);
        assert_eq!(limits.handshake_timeout, Duration::from_secs(10));
        assert_eq!(limits.request_timeout, Duration::from_secs(10));
        assert_eq!(limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(limits.connect_timeout, Duration::from_secs(5));
        assert_eq!(limits.backend_timeout, Duration::from_secs(30));
    }
}
