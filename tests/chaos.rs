//! Chaos: many clients doing many different things to one gateway at once, for a while.
//!
//! [`THREADS`] client threads each run a random sequence of actions against one gateway in
//! front of the harness backend, until [`DEFAULT_SECS`] seconds have passed: keep-alive GETs,
//! pipelined bursts, uploads (Content-Length and chunked, some with `Expect: 100-continue`),
//! downloads (Content-Length and chunked), slow readers, HEAD, HTTP/1.0, `Connection: close`,
//! backend statuses, slow backends, malformed requests, and clients that go away in the middle
//! of a request head, of a request body or of an answer. Every well-formed request must get its
//! own, whole, correct answer, in order; every malformed one a 400 and a close. Afterwards the
//! gateway must still run and serve, its sockets must be back to the baseline (plus what the
//! pool parks), and its peak memory must have stayed bounded.
//!
//! Each thread draws its actions from its own xorshift generator, seeded from one run seed that
//! is printed (and named in any failure): `CHAOS_SEED=N cargo test --test chaos` replays the
//! same action sequences (the interleaving between threads is up to the scheduler).
//! `CHAOS_SECS=N` changes how long the clients run.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Backend, Gateway, HttpStream, Response, IO_TIMEOUT};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

const API: &str = "/pizzashack/1.0.0";
/// Client threads.
const THREADS: usize = 16;
/// How long the clients run (seconds), unless `CHAOS_SECS` says otherwise.
const DEFAULT_SECS: u64 = 12;
const MAX_UPLOAD: usize = 300 * 1024;
const MAX_DOWNLOAD: usize = 2 * 1024 * 1024;
/// Slow readers take smaller answers, so that one action does not take seconds.
const MAX_SLOW_DOWNLOAD: usize = 512 * 1024;
/// Reads a slow reader makes at most (with a pause of up to 10 ms before each).
const SLOW_READS: usize = 100;
/// Pipelined bodies are small: the client writes the whole burst before reading anything.
const MAX_PIPELINED_BODY: usize = 8 * 1024;
/// Open descriptors allowed above the warm-up baseline at the end: parked backend connections.
const FD_ALLOWANCE: usize = 20;
/// The gateway's peak resident set may not exceed this.
const MEMORY_BOUND_KIB: u64 = 64 * 1024;
/// Actions remembered per thread, for the failure report.
const HISTORY: usize = 16;
/// How long before a failing action the failure report looks for other threads' actions.
const CONCURRENT_WINDOW: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// A small deterministic generator
// ---------------------------------------------------------------------------------------------

/// xorshift64* (Vigna), seeded through splitmix64 so that neighbouring seeds diverge at once.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A size up to `max`, small ones as likely as large ones.
    fn size(&mut self, max: usize) -> usize {
        match self.below(4) {
            0 => self.range(0, 16),
            1 => self.range(0, 2048.min(max)),
            2 => self.range(0, (64 * 1024).min(max)),
            _ => self.range(0, max),
        }
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Client connections
// ---------------------------------------------------------------------------------------------

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A TLS stream whose reads can be made slow: at most `piece` bytes per read, after a pause.
struct Throttle {
    tls: Tls,
    slow: Option<(usize, Duration)>,
}

impl Read for Throttle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.slow {
            Some((piece, pause)) => {
                thread::sleep(pause);
                let n = buf.len().min(piece);
                self.tls.read(&mut buf[..n])
            }
            None => self.tls.read(buf),
        }
    }
}

impl Write for Throttle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tls.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tls.flush()
    }
}

type Conn = HttpStream<Throttle>;

/// What every thread needs to reach the gateway and check answers.
struct Target {
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    /// `common::pattern(MAX_DOWNLOAD)`, to compare downloads against.
    pattern: Vec<u8>,
    /// When the clients started; the journal's times count from it.
    started: Instant,
    /// Every action of every thread, as it ended, for the failure report: what the other
    /// threads were doing at the time of a failure.
    journal: Mutex<Vec<Entry>>,
}

/// One action done, in the journal.
struct Entry {
    thread: usize,
    index: usize,
    start: Duration,
    end: Duration,
    note: String,
}

impl Target {
    fn connect(&self) -> Result<Conn, String> {
        let sock = TcpStream::connect(self.addr).map_err(|e| io_failure("connecting", &e))?;
        sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        sock.set_nodelay(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(Arc::clone(&self.config), name).unwrap();
        let mut tls = StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| io_failure("the TLS handshake", &e))?;
        }
        Ok(HttpStream::new(Throttle { tls, slow: None }))
    }
}

/// An I/O error as a failure; a read that timed out is a stall of the gateway.
fn io_failure(what: &str, e: &io::Error) -> String {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        format!("STALL: nothing for {IO_TIMEOUT:?} while {what}: {e}")
    } else {
        format!("I/O error while {what}: {e} ({:?})", e.kind())
    }
}

fn send(conn: &mut Conn, raw: &[u8]) -> Result<(), String> {
    conn.inner
        .write_all(raw)
        .and_then(|()| conn.inner.flush())
        .map_err(|e| io_failure(&format!("sending {}", describe(raw)), &e))
}

/// Reads the final answer to one request, skipping interim (1xx) ones.
fn receive(conn: &mut Conn, head_request: bool, what: &str) -> Result<Response, String> {
    for _ in 0..4 {
        let response = conn
            .read_response(head_request)
            .map_err(|e| io_failure(&format!("reading the answer to {what}"), &e))?;
        if !(100..200).contains(&response.status) {
            return Ok(response);
        }
    }
    Err(format!("more than 3 interim answers to {what}"))
}

/// The first line of a raw request, for messages.
fn describe(raw: &[u8]) -> String {
    let line = raw.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned();
    format!("{line:?} ({} bytes)", raw.len())
}

/// The gateway closes `conn` now (EOF or reset), with nothing more sent.
fn expect_closed(conn: &mut Conn, after: &str) -> Result<(), String> {
    if conn.at_eof() {
        Ok(())
    } else {
        Err(format!(
            "the gateway did not close the connection after {after} (more bytes, or a read timeout)"
        ))
    }
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Requests and what must answer them
// ---------------------------------------------------------------------------------------------

/// What a request must get.
#[derive(Clone, Debug)]
enum Expect {
    /// The backend's echo of `method` on `path` (as the backend sees it: without the API's
    /// base path) with a body of this length and SHA-256, sent chunked or not.
    Echo {
        method: &'static str,
        path: String,
        body: Option<(usize, String, bool)>,
    },
    /// `len` bytes of `common::pattern`, chunked or with Content-Length.
    Pattern { len: usize, chunked: bool },
    /// The head of a GET answer: 200, no body, Content-Length `len` when given.
    Head { len: Option<usize> },
    /// A backend status passed on (an echo body unless 204).
    Status { code: u16, path: String },
    /// A refusal by the gateway itself.
    Problem { code: u16 },
}

/// One request: its bytes, whether it is HEAD, and what must answer it.
struct Request {
    raw: Vec<u8>,
    head: bool,
    expect: Expect,
}

impl Request {
    /// A request that is not HEAD.
    fn new(raw: Vec<u8>, expect: Expect) -> Request {
        Request {
            raw,
            head: false,
            expect,
        }
    }
}

/// The backend's view of a gateway path.
fn backend_path(path: &str) -> String {
    let rest = path.strip_prefix(API).expect("paths start with the API");
    if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    }
}

fn get_request(path: &str, version: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/{version}\r\nHost: localhost\r\n{extra}\r\n").into_bytes()
}

fn echo_get(path: &str, extra: &str) -> Request {
    Request {
        raw: get_request(path, "1.1", extra),
        head: false,
        expect: Expect::Echo {
            method: "GET",
            path: backend_path(path),
            body: None,
        },
    }
}

/// An upload of `body` with Content-Length or chunked (random chunk sizes, sometimes a chunk
/// extension and a trailer), sometimes with `Expect: 100-continue`.
fn upload(rng: &mut Rng, path: &str, body: &[u8], chunked: bool, extra: &str) -> Request {
    let method = *rng.pick(&["POST", "PUT"]);
    let expect_continue = rng.chance(1, 4);
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}").into_bytes();
    raw.extend_from_slice(b"Content-Type: application/octet-stream\r\n");
    if expect_continue {
        raw.extend_from_slice(b"Expect: 100-continue\r\n");
    }
    if chunked {
        raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        let mut rest = body;
        let mut first = true;
        while !rest.is_empty() {
            let n = rng.range(1, 20_000).min(rest.len());
            let ext = if first && rng.chance(1, 3) {
                ";x=y"
            } else {
                ""
            };
            first = false;
            raw.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
            raw.extend_from_slice(&rest[..n]);
            raw.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        raw.extend_from_slice(b"0\r\n");
        if rng.chance(1, 4) {
            raw.extend_from_slice(b"X-Trailer: yes\r\n");
        }
        raw.extend_from_slice(b"\r\n");
    } else {
        raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        raw.extend_from_slice(body);
    }
    Request {
        raw,
        head: false,
        expect: Expect::Echo {
            method,
            path: backend_path(path),
            body: Some((body.len(), common::sha256_hex(body), chunked)),
        },
    }
}

/// Reads the answer to `request` on a keep-alive connection and checks it, and that it leaves
/// the connection open.
fn receive_kept(
    conn: &mut Conn,
    request: &Request,
    target: &Target,
    what: &str,
) -> Result<(), String> {
    let response = receive(conn, request.head, what)?;
    check(&response, &request.expect, target, what)?;
    ensure!(
        !response.closes(),
        "{what}: the answer closes a keep-alive connection: {:?}",
        response.headers
    );
    Ok(())
}

/// Checks `response` against `expect`; `what` names the request.
fn check(response: &Response, expect: &Expect, target: &Target, what: &str) -> Result<(), String> {
    let summary = || {
        let mut text = response.text();
        text.truncate(400);
        format!(
            "{} {} {:?} {text}",
            response.status, response.reason, response.headers
        )
    };
    match expect {
        Expect::Echo { method, path, body } => {
            ensure!(
                response.status == 200,
                "{what}: expected the backend's 200, got {}",
                summary()
            );
            let echo = response.echo();
            ensure!(
                echo.method == *method && echo.path == *path,
                "{what}: answered with the echo of {} {} (expected {method} {path}): the answer \
                 of another request",
                echo.method,
                echo.path
            );
            let (len, sha, chunked) = body.clone().unwrap_or((0, common::sha256_hex(b""), false));
            ensure!(
                echo.body_len == len && echo.body_sha256 == sha,
                "{what}: the backend received a {}-byte body with SHA-256 {} instead of {len} \
                 bytes with {sha}",
                echo.body_len,
                echo.body_sha256
            );
            ensure!(
                echo.body_chunked == chunked,
                "{what}: the backend received the body chunked: {} (expected {chunked})",
                echo.body_chunked
            );
        }
        Expect::Pattern { len, chunked } => {
            ensure!(
                response.status == 200,
                "{what}: expected 200, got {}",
                summary()
            );
            ensure!(
                response.chunked == *chunked,
                "{what}: answer chunked: {} (expected {chunked}); {:?}",
                response.chunked,
                response.headers
            );
            ensure!(
                response.body.len() == *len,
                "{what}: a {}-byte body instead of {len}",
                response.body.len()
            );
            if response.body[..] != target.pattern[..*len] {
                let at = response
                    .body
                    .iter()
                    .zip(&target.pattern)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "{what}: the body differs from the pattern at byte {at} of {len}"
                ));
            }
        }
        Expect::Head { len } => {
            ensure!(
                response.status == 200,
                "{what}: expected 200, got {}",
                summary()
            );
            if let Some(len) = len {
                let got = response.header("content-length");
                ensure!(
                    got == Some(len.to_string().as_str()),
                    "{what}: Content-Length {got:?}, expected {len}"
                );
            }
        }
        Expect::Status { code, path } => {
            ensure!(
                response.status == *code,
                "{what}: expected the backend's {code}, got {}",
                summary()
            );
            if *code != 204 {
                let echo: serde_json::Value = serde_json::from_slice(&response.body)
                    .map_err(|e| format!("{what}: not the backend's echo ({e}): {}", summary()))?;
                ensure!(
                    echo["path"] == serde_json::json!(path),
                    "{what}: the echo of {} (expected {path})",
                    echo["path"]
                );
            } else {
                ensure!(
                    response.body.is_empty(),
                    "{what}: a 204 with a body: {}",
                    summary()
                );
            }
        }
        Expect::Problem { code } => {
            ensure!(
                response.status == *code,
                "{what}: expected the gateway's {code}, got {}",
                summary()
            );
            let content_type = response.header("content-type").unwrap_or_default();
            ensure!(
                content_type.starts_with("application/problem+json"),
                "{what}: a {code} that is not a problem: {}",
                summary()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The actions
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    KeepAliveGets,
    Pipeline,
    UploadLength,
    UploadChunked,
    Download,
    SlowReader,
    Head,
    BackendStatus,
    SlowBackend,
    Http10,
    ConnectionClose,
    Malformed,
    AbortRequest,
    AbortResponse,
    HalfHead,
}

/// Actions and their weights.
const ACTIONS: &[(Action, usize)] = &[
    (Action::KeepAliveGets, 10),
    (Action::Pipeline, 8),
    (Action::UploadLength, 6),
    (Action::UploadChunked, 6),
    (Action::Download, 5),
    (Action::SlowReader, 3),
    (Action::Head, 4),
    (Action::BackendStatus, 4),
    (Action::SlowBackend, 3),
    (Action::Http10, 4),
    (Action::ConnectionClose, 4),
    (Action::Malformed, 4),
    (Action::AbortRequest, 4),
    (Action::AbortResponse, 4),
    (Action::HalfHead, 4),
];

struct Worker {
    id: usize,
    rng: Rng,
    target: Arc<Target>,
    /// The thread's keep-alive connection, used across actions until one ends it.
    conn: Option<Conn>,
    /// Requests made so far (a tag in every path, so that answers can be told apart).
    n: usize,
    /// The last actions, newest last.
    history: Vec<String>,
    /// Where this action is at, for the failure report.
    note: String,
}

/// A thread's failure.
struct Failure {
    thread: usize,
    seed: u64,
    action: usize,
    error: String,
    history: Vec<String>,
    /// When the failing action ran, from the start.
    span: (Duration, Duration),
}

impl Worker {
    fn run(mut self, seed: u64, until: Instant) -> Result<BTreeMap<Action, usize>, Failure> {
        let total: usize = ACTIONS.iter().map(|(_, w)| w).sum();
        let mut done = BTreeMap::new();
        let mut index = 0;
        while Instant::now() < until {
            let mut roll = self.rng.below(total);
            let action = ACTIONS
                .iter()
                .find(|(_, w)| {
                    let hit = roll < *w;
                    roll = roll.saturating_sub(*w);
                    hit
                })
                .map(|(a, _)| *a)
                .unwrap();
            self.note = format!("{action:?}");
            let start = self.target.started.elapsed();
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| self.act(action)))
                .unwrap_or_else(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    Err(format!("panicked: {message}"))
                });
            if self.history.len() == HISTORY {
                self.history.remove(0);
            }
            self.history.push(format!("#{index} {}", self.note));
            let end = self.target.started.elapsed();
            self.target.journal.lock().unwrap().push(Entry {
                thread: self.id,
                index,
                start,
                end,
                note: format!(
                    "{}{}",
                    self.note,
                    if outcome.is_err() { " FAILED" } else { "" }
                ),
            });
            if let Err(error) = outcome {
                return Err(Failure {
                    thread: self.id,
                    seed,
                    action: index,
                    error,
                    history: self.history,
                    span: (start, end),
                });
            }
            *done.entry(action).or_insert(0) += 1;
            index += 1;
        }
        Ok(done)
    }

    fn next_path(&mut self, kind: &str) -> String {
        self.n += 1;
        let r = self.rng.next() % 1000;
        format!(
            "{API}/{kind}/{}/{}?tag=t{}n{}&r={r}",
            self.id, self.n, self.id, self.n
        )
    }

    /// The keep-alive connection, opened if need be.
    fn keep_alive(&mut self) -> Result<&mut Conn, String> {
        if self.conn.is_none() {
            self.conn = Some(self.target.connect()?);
            self.note.push_str(" [new conn]");
        }
        Ok(self.conn.as_mut().unwrap())
    }

    /// The keep-alive connection (taken: the action ends it) or a fresh one, at random.
    fn doomed(&mut self) -> Result<Conn, String> {
        if self.rng.chance(1, 2) {
            if let Some(conn) = self.conn.take() {
                self.note.push_str(" [keep-alive conn]");
                return Ok(conn);
            }
        }
        self.note.push_str(" [fresh conn]");
        self.target.connect()
    }

    /// Sends `request` on the keep-alive connection and checks its answer, which must leave
    /// the connection open.
    fn exchange(&mut self, request: &Request) -> Result<(), String> {
        let what = describe(&request.raw);
        let target = Arc::clone(&self.target);
        let conn = self.keep_alive()?;
        send(conn, &request.raw)?;
        let answered = receive_kept(conn, request, &target, &what);
        if answered.is_err() {
            self.conn = None;
        }
        answered
    }

    fn act(&mut self, action: Action) -> Result<(), String> {
        match action {
            Action::KeepAliveGets => {
                let count = self.rng.range(1, 5);
                let _ = write!(self.note, " x{count}");
                for _ in 0..count {
                    let path = self.next_path("echo");
                    self.exchange(&echo_get(&path, ""))?;
                }
                Ok(())
            }
            Action::Pipeline => self.pipeline(),
            Action::UploadLength | Action::UploadChunked => {
                let chunked = action == Action::UploadChunked;
                let len = self.rng.size(MAX_UPLOAD);
                let body = self.rng.bytes(len);
                let path = self.next_path("upload");
                let request = upload(&mut self.rng, &path, &body, chunked, "");
                let _ = write!(self.note, " {}", describe(&request.raw));
                self.exchange(&request)
            }
            Action::Download => {
                let len = self.rng.size(MAX_DOWNLOAD);
                let request = self.download(len);
                let _ = write!(self.note, " {}", describe(&request.raw));
                self.exchange(&request)
            }
            Action::SlowReader => self.slow_reader(),
            Action::Head => {
                let request = match self.rng.below(3) {
                    0 => {
                        let path = self.next_path("echo");
                        Request {
                            raw: format!("HEAD {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
                                .into_bytes(),
                            head: true,
                            expect: Expect::Head { len: None },
                        }
                    }
                    kind => {
                        let len = self.rng.size(MAX_DOWNLOAD);
                        let which = if kind == 1 { "big" } else { "chunked" };
                        Request {
                            raw: format!(
                                "HEAD {API}/{which}?bytes={len} HTTP/1.1\r\nHost: localhost\r\n\r\n"
                            )
                            .into_bytes(),
                            head: true,
                            expect: Expect::Head {
                                len: (kind == 1).then_some(len),
                            },
                        }
                    }
                };
                let _ = write!(self.note, " {}", describe(&request.raw));
                self.exchange(&request)
            }
            Action::BackendStatus => {
                let code = *self.rng.pick(&[201u16, 204, 404, 500, 503]);
                let request = self.status(code);
                let _ = write!(self.note, " {}", describe(&request.raw));
                self.exchange(&request)
            }
            Action::SlowBackend => {
                let ms = self.rng.range(10, 300);
                self.n += 1;
                // `.../slow` must end the path.
                let path = format!(
                    "{API}/x/{}/{}/slow?ms={ms}&tag=t{}n{}",
                    self.id, self.n, self.id, self.n
                );
                let _ = write!(self.note, " {path}");
                self.exchange(&echo_get(&path, ""))
            }
            Action::Http10 => self.http10(),
            Action::ConnectionClose => self.connection_close(),
            Action::Malformed => self.malformed(),
            Action::AbortRequest => self.abort_request(),
            Action::AbortResponse => self.abort_response(),
            Action::HalfHead => self.half_head(),
        }
    }

    fn download(&mut self, len: usize) -> Request {
        self.n += 1;
        let chunked = self.rng.chance(1, 2);
        let which = if chunked { "chunked" } else { "big" };
        let tag = format!("t{}n{}", self.id, self.n);
        Request {
            raw: get_request(&format!("{API}/{which}?bytes={len}&tag={tag}"), "1.1", ""),
            head: false,
            expect: Expect::Pattern { len, chunked },
        }
    }

    fn status(&mut self, code: u16) -> Request {
        self.n += 1;
        // `.../status/N` must end the path.
        let path = format!(
            "{API}/x/{}/{}/status/{code}?tag=t{}n{}",
            self.id, self.n, self.id, self.n
        );
        Request {
            raw: get_request(&path, "1.1", ""),
            head: false,
            expect: Expect::Status {
                code,
                path: backend_path(&path),
            },
        }
    }

    /// 2 to 5 requests of any kind written at once; the answers must come back in order.
    fn pipeline(&mut self) -> Result<(), String> {
        let count = self.rng.range(2, 5);
        let mut requests = Vec::new();
        for _ in 0..count {
            let request = match self.rng.below(7) {
                0 | 1 => {
                    let path = self.next_path("echo");
                    echo_get(&path, "")
                }
                2 => {
                    let path = self.next_path("echo");
                    Request {
                        raw: format!("HEAD {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
                            .into_bytes(),
                        head: true,
                        expect: Expect::Head { len: None },
                    }
                }
                3 | 4 => {
                    let len = self.rng.size(MAX_PIPELINED_BODY);
                    let body = self.rng.bytes(len);
                    let path = self.next_path("upload");
                    let chunked = self.rng.chance(1, 2);
                    upload(&mut self.rng, &path, &body, chunked, "")
                }
                5 => {
                    let len = self.rng.size(100_000);
                    self.download(len)
                }
                _ => {
                    let code = *self.rng.pick(&[204u16, 404]);
                    self.status(code)
                }
            };
            requests.push(request);
        }
        let mut burst = Vec::new();
        for request in &requests {
            burst.extend_from_slice(&request.raw);
            let _ = write!(self.note, " | {}", describe(&request.raw));
        }
        let target = Arc::clone(&self.target);
        let conn = self.keep_alive()?;
        send(conn, &burst)?;
        for (i, request) in requests.iter().enumerate() {
            let what = format!(
                "pipelined request {} of {count}, {}",
                i + 1,
                describe(&request.raw)
            );
            if let Err(e) = receive_kept(conn, request, &target, &what) {
                self.conn = None;
                return Err(e);
            }
        }
        Ok(())
    }

    /// A download read in small pieces with pauses, on the keep-alive connection (which
    /// must serve on afterwards) or a fresh one.
    fn slow_reader(&mut self) -> Result<(), String> {
        // At most SLOW_READS reads of `piece` bytes, each after `pause`: about a second.
        let piece = self.rng.range(512, 16 * 1024);
        let pause = Duration::from_millis(self.rng.range(1, 10) as u64);
        let len = self.rng.size(MAX_SLOW_DOWNLOAD.min(piece * SLOW_READS));
        let request = self.download(len);
        let _ = write!(
            self.note,
            " {} read {piece} bytes every {pause:?}",
            describe(&request.raw)
        );
        if self.rng.chance(1, 2) {
            self.conn = None;
        }
        self.keep_alive()?.inner.slow = Some((piece, pause));
        let outcome = self.exchange(&request);
        if let Some(conn) = self.conn.as_mut() {
            conn.inner.slow = None;
        }
        outcome
    }

    fn http10(&mut self) -> Result<(), String> {
        let mut conn = self.target.connect()?;
        let variant = self.rng.below(4);
        let (request, keep_alive) = match variant {
            0 => {
                let path = self.next_path("echo");
                let raw = format!("GET {path} HTTP/1.0\r\n\r\n").into_bytes();
                let expect = Expect::Echo {
                    method: "GET",
                    path: backend_path(&path),
                    body: None,
                };
                (Request::new(raw, expect), false)
            }
            1 => {
                // The backend answers HTTP/1.0 with Content-Length even for /chunked.
                let len = self.rng.size(MAX_DOWNLOAD / 4);
                let path = format!("{API}/chunked?bytes={len}");
                let raw = get_request(&path, "1.0", "");
                let expect = Expect::Pattern {
                    len,
                    chunked: false,
                };
                (Request::new(raw, expect), false)
            }
            2 => {
                let len = self.rng.size(32 * 1024);
                let body = self.rng.bytes(len);
                let path = self.next_path("upload");
                let mut raw = format!(
                    "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {len}\r\n\r\n"
                )
                .into_bytes();
                raw.extend_from_slice(&body);
                let expect = Expect::Echo {
                    method: "POST",
                    path: backend_path(&path),
                    body: Some((len, common::sha256_hex(&body), false)),
                };
                (Request::new(raw, expect), false)
            }
            _ => {
                let path = self.next_path("echo");
                let raw = get_request(&path, "1.0", "Connection: keep-alive\r\n");
                let expect = Expect::Echo {
                    method: "GET",
                    path: backend_path(&path),
                    body: None,
                };
                (Request::new(raw, expect), true)
            }
        };
        let what = describe(&request.raw);
        let _ = write!(self.note, " {what}");
        send(&mut conn, &request.raw)?;
        let response = receive(&mut conn, false, &what)?;
        check(&response, &request.expect, &self.target, &what)?;
        if keep_alive {
            let connection = response.header("connection").unwrap_or_default();
            ensure!(
                connection.eq_ignore_ascii_case("keep-alive"),
                "{what}: Connection: {connection:?} (expected keep-alive)"
            );
            // The connection serves on, in HTTP/1.1 too; it becomes the keep-alive one.
            self.conn = Some(conn);
            let path = self.next_path("echo");
            self.note.push_str(" then a GET");
            self.exchange(&echo_get(&path, ""))
        } else {
            ensure!(
                response.closes(),
                "{what}: the answer to HTTP/1.0 does not say close: {:?}",
                response.headers
            );
            expect_closed(&mut conn, &what)
        }
    }

    fn connection_close(&mut self) -> Result<(), String> {
        let path = self.next_path("echo");
        let request = if self.rng.chance(1, 2) {
            echo_get(&path, "Connection: close\r\n")
        } else {
            let len = self.rng.size(MAX_UPLOAD);
            let body = self.rng.bytes(len);
            let chunked = self.rng.chance(1, 2);
            upload(
                &mut self.rng,
                &path,
                &body,
                chunked,
                "Connection: close\r\n",
            )
        };
        let what = describe(&request.raw);
        let _ = write!(self.note, " {what}");
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.target.connect()?,
        };
        send(&mut conn, &request.raw)?;
        let response = receive(&mut conn, false, &what)?;
        check(&response, &request.expect, &self.target, &what)?;
        ensure!(
            response.closes(),
            "{what}: the answer does not say close: {:?}",
            response.headers
        );
        expect_closed(&mut conn, &what)
    }

    fn malformed(&mut self) -> Result<(), String> {
        let bad: Vec<u8> = match self.rng.below(9) {
            0 => b"HELLO WORLD\r\n\r\n".to_vec(),
            1 => format!("GET {API}/x HTTP/1.1\r\n\r\n").into_bytes(),
            2 => format!("GET {API}/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").into_bytes(),
            3 => format!(
                "POST {API}/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            4 => format!("GET {API}/a/../b HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes(),
            5 => format!("GET {API}/x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n").into_bytes(),
            6 => format!("PUT {API}/x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n")
                .into_bytes(),
            7 => b"\x01\x02\x03\x04 / HTTP/1.1\r\n\r\n".to_vec(),
            _ => format!(
                "POST {API}/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
            )
            .into_bytes(),
        };
        let mut conn = self.doomed()?;
        // Sometimes a good request first, in the same write: it is answered, then the 400.
        let mut raw = Vec::new();
        let good = self.rng.chance(1, 3).then(|| {
            let path = self.next_path("echo");
            echo_get(&path, "")
        });
        if let Some(good) = &good {
            raw.extend_from_slice(&good.raw);
        }
        raw.extend_from_slice(&bad);
        let what = describe(&bad);
        let _ = write!(
            self.note,
            " {}{what}",
            if good.is_some() { "GET then " } else { "" }
        );
        send(&mut conn, &raw)?;
        if let Some(good) = &good {
            let what = describe(&good.raw);
            let response = receive(&mut conn, false, &what)?;
            check(&response, &good.expect, &self.target, &what)?;
        }
        let response = receive(&mut conn, false, &what)?;
        check(
            &response,
            &Expect::Problem { code: 400 },
            &self.target,
            &what,
        )?;
        ensure!(
            response.closes(),
            "{what}: a 400 that does not say close: {:?}",
            response.headers
        );
        expect_closed(&mut conn, &what)
    }

    /// A request whose body stops in the middle; the client goes away.
    fn abort_request(&mut self) -> Result<(), String> {
        let mut conn = self.doomed()?;
        let path = self.next_path("upload");
        let len = self.rng.range(1, MAX_UPLOAD);
        let sent = self.rng.below(len);
        let body = self.rng.bytes(sent);
        let (head, with_body) = match self.rng.below(4) {
            0 => (
                format!("PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len}\r\n\r\n"),
                true,
            ),
            1 => (
                format!(
                    "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len}\r\n\
                     Expect: 100-continue\r\n\r\n"
                ),
                true,
            ),
            2 => (
                format!(
                    "POST {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\
                     \r\n{len:x}\r\n"
                ),
                true,
            ),
            // The body stops in the middle of a chunk-size line.
            _ => (
                format!(
                    "POST {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\
                     \r\n{len:x}"
                ),
                false,
            ),
        };
        let mut raw = head.into_bytes();
        if with_body {
            raw.extend_from_slice(&body);
        }
        let pause = self.rng.below(30) as u64;
        let _ = write!(
            self.note,
            " {} with {sent} of {len} body bytes, then gone after {pause} ms",
            describe(&raw)
        );
        send(&mut conn, &raw)?;
        thread::sleep(Duration::from_millis(pause));
        self.hang_up(conn);
        Ok(())
    }

    /// A request whose answer the client stops reading; it goes away.
    fn abort_response(&mut self) -> Result<(), String> {
        let mut conn = self.doomed()?;
        let (path, read) = match self.rng.below(3) {
            0 => {
                let ms = self.rng.range(10, 300);
                (format!("{API}/slow?ms={ms}"), 0)
            }
            kind => {
                let len = self.rng.range(200_000, MAX_DOWNLOAD);
                let which = if kind == 1 { "big" } else { "chunked" };
                (
                    format!("{API}/{which}?bytes={len}"),
                    self.rng.below(len / 2),
                )
            }
        };
        let _ = write!(self.note, " GET {path}, gone after reading {read} bytes");
        send(&mut conn, &get_request(&path, "1.1", ""))?;
        let mut got = 0;
        let mut scratch = vec![0u8; 16 * 1024];
        while got < read {
            match conn.inner.read(&mut scratch) {
                Ok(0) => return Err(format!("GET {path}: the answer ended at byte {got}")),
                Ok(n) => got += n,
                Err(e) => return Err(io_failure(&format!("reading GET {path}"), &e)),
            }
        }
        self.hang_up(conn);
        Ok(())
    }

    /// The start of a request head, then the client goes away.
    fn half_head(&mut self) -> Result<(), String> {
        let mut conn = self.doomed()?;
        let path = self.next_path("echo");
        let raw = get_request(&path, "1.1", "Accept: */*\r\nX-Filler: abcdefghij\r\n");
        let cut = self.rng.range(1, raw.len() - 2);
        let pause = self.rng.below(50) as u64;
        let _ = write!(
            self.note,
            " {cut} of {} head bytes, then gone after {pause} ms",
            raw.len()
        );
        send(&mut conn, &raw[..cut])?;
        thread::sleep(Duration::from_millis(pause));
        self.hang_up(conn);
        Ok(())
    }

    /// Drops a connection, with close_notify or without.
    fn hang_up(&mut self, mut conn: Conn) {
        if self.rng.chance(1, 2) {
            self.note.push_str(" (close_notify)");
            conn.inner.tls.conn.send_close_notify();
            let _ = conn.inner.tls.flush();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------

/// The seed of thread `id`'s generator.
fn thread_seed(seed: u64, id: usize) -> u64 {
    seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn sixteen_clients_doing_anything_get_their_answers_and_leave_nothing_behind() {
    let seed = env_u64("CHAOS_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let secs = env_u64("CHAOS_SECS").unwrap_or(DEFAULT_SECS);
    eprintln!("chaos: seed {seed} (replay with CHAOS_SEED={seed}), {THREADS} threads for {secs} s");

    let backend = Backend::start();
    let mut gw = Gateway::pizzashack(&backend, &[]);
    let pid = gw.pid();
    // Warm up: a few exchanges of each kind on one connection, one backend connection parked.
    {
        let mut client = gw.client(Some("client-a"));
        assert_eq!(client.get(&format!("{API}/warm")).status, 200);
        let body = common::pattern(100_000);
        let echo = client
            .request(&common::request_with_body(
                "POST",
                &format!("{API}/warm"),
                &body,
            ))
            .echo();
        assert_eq!(echo.body_len, body.len());
        let echo = client
            .request(&common::request_chunked(
                "POST",
                &format!("{API}/warm"),
                &body,
                7000,
            ))
            .echo();
        assert_eq!(echo.body_len, body.len());
        assert_eq!(
            client.get(&format!("{API}/big?bytes=300000")).body.len(),
            300_000
        );
    }
    let baseline = common::eventually("the warm-up connection is gone", || {
        let fds = common::open_fds(pid);
        thread::sleep(Duration::from_millis(300));
        (common::open_fds(pid) == fds).then_some(fds)
    });
    eprintln!(
        "chaos: baseline {baseline} open fds, VmHWM {} KiB",
        common::proc_status_kib(pid, "VmHWM")
    );

    let pattern = common::pattern(MAX_DOWNLOAD);
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let target = Arc::new(Target {
        addr: gw.addr(),
        config: gw.client_config(Some("client-a")),
        pattern,
        started,
        journal: Mutex::new(Vec::new()),
    });
    let workers: Vec<_> = (0..THREADS)
        .map(|id| {
            let worker = Worker {
                id,
                rng: Rng::new(thread_seed(seed, id)),
                target: Arc::clone(&target),
                conn: None,
                n: 0,
                history: Vec::new(),
                note: String::new(),
            };
            thread::Builder::new()
                .name(format!("chaos-{id}"))
                .spawn(move || worker.run(seed, until))
                .unwrap()
        })
        .collect();
    let mut failures = Vec::new();
    let mut totals: BTreeMap<Action, usize> = BTreeMap::new();
    for (id, worker) in workers.into_iter().enumerate() {
        match worker.join() {
            Ok(Ok(done)) => {
                for (action, count) in done {
                    *totals.entry(action).or_insert(0) += count;
                }
            }
            Ok(Err(failure)) => failures.push(failure),
            Err(_) => failures.push(Failure {
                thread: id,
                seed,
                action: 0,
                error: "the thread panicked outside an action".into(),
                history: Vec::new(),
                span: (Duration::ZERO, started.elapsed()),
            }),
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "chaos: {} actions in {elapsed:?}: {totals:?}",
        totals.values().sum::<usize>()
    );

    // The details of each client failure go to stderr; the panic message sums them up.
    let mut details = String::new();
    let mut report = String::new();
    for f in &failures {
        let _ = writeln!(
            report,
            "thread {} failed at action #{} (details above): {}",
            f.thread, f.action, f.error
        );
        let _ = writeln!(
            details,
            "thread {} (seed {}, thread seed {}) failed at action #{}: {}\n  last actions:\n    {}",
            f.thread,
            f.seed,
            thread_seed(f.seed, f.thread),
            f.action,
            f.error,
            f.history.join("\n    ")
        );
        // What the other threads did meanwhile (and just before: a connection one of them
        // left behind may be what failed).
        let journal = target.journal.lock().unwrap();
        let from = f.span.0.saturating_sub(CONCURRENT_WINDOW);
        let mut concurrent: Vec<&Entry> = journal
            .iter()
            .filter(|e| e.thread != f.thread && e.end >= from && e.start <= f.span.1)
            .collect();
        concurrent.sort_by_key(|e| e.end);
        let _ = writeln!(
            details,
            "  it ran from {:?} to {:?}; actions of other threads ending from {from:?} on and \
             starting before its end:",
            f.span.0, f.span.1
        );
        for e in concurrent.iter().rev().take(40).rev() {
            let _ = writeln!(
                details,
                "    [{:?} .. {:?}] thread {} #{} {}",
                e.start, e.end, e.thread, e.index, e.note
            );
        }
    }

    if !details.is_empty() {
        eprintln!("chaos: client failures (seed {seed}):\n{details}");
    }

    // The gateway lives on and serves.
    gw.assert_running();
    let mut client = gw.client(Some("client-a"));
    let response = client.get(&format!("{API}/after"));
    if response.status != 200 {
        let _ = writeln!(
            report,
            "a fresh client after the chaos got {} {}",
            response.status,
            response.text()
        );
    }
    drop(client);

    // Its sockets go back to the baseline, but for the backend connections the pool parks.
    let deadline = Instant::now() + common::EVENTUALLY;
    let mut fds = common::open_fds(pid);
    while fds > baseline + FD_ALLOWANCE && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        fds = common::open_fds(pid);
    }
    let peak = common::proc_status_kib(pid, "VmHWM");
    eprintln!(
        "chaos: at the end {fds} open fds (baseline {baseline}), VmHWM {peak} KiB, backend \
         connections {}",
        backend.connections()
    );
    if fds > baseline + FD_ALLOWANCE {
        let listing: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|p| p.display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            report,
            "the gateway holds {fds} fds {:?} after the chaos, more than the baseline {baseline} \
             + {FD_ALLOWANCE}: {listing:?}",
            common::EVENTUALLY
        );
    }
    if peak > MEMORY_BOUND_KIB {
        let _ = writeln!(
            report,
            "the gateway's peak resident memory was {peak} KiB, above {MEMORY_BOUND_KIB} KiB"
        );
    }
    gw.assert_running();
    assert!(
        report.is_empty(),
        "chaos seed {seed} (replay with CHAOS_SEED={seed}):\n{report}"
    );
}
