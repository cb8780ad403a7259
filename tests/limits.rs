//! SPEC 6: every limit and timeout `certgate serve` takes, set small so each shows quickly.
//! Each test asserts the exact refusal (status and problem `code`, SPEC 4), what becomes of the
//! connection, and that the gateway goes on serving other clients afterwards. No test asserts
//! how fast something happened, only that it happens within generous bounds.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

use common::{eventually, get, pattern, Backend, Client, Gateway, HttpStream, Response};

/// The base path of the API that [`Gateway::pizzashack`] sets up.
const API: &str = "/pizzashack/1.0.0";

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A new client gets the backend's answer: the gateway still serves after a refusal.
fn assert_serves(gw: &Gateway) {
    let mut other = gw.client(Some("client-a"));
    let echo = other.get(&format!("{API}/after")).echo();
    assert_eq!(echo.path, "/after");
}

/// Like [`assert_serves`] for a gateway from [`gateway_for`]: the gateway is up (404 for a
/// path no API serves, answered by the gateway itself).
fn assert_serves_p(gw: &Gateway) {
    let mut other = gw.client(Some("client-a"));
    other.get("/nowhere").assert_problem(404, "not-found");
}

/// Asserts that the answer announces `Connection: close` and that the gateway then closes.
fn assert_closes(client: &mut Client, response: &Response) {
    assert!(
        response.closes(),
        "a {} that ends the connection must say Connection: close: {:?}",
        response.status,
        response.headers
    );
    assert!(
        client.is_closed_by_peer(),
        "the gateway must close the connection after its {}",
        response.status
    );
}

/// A TLS connection with client-a, handshake done, whose socket stays reachable (for
/// close_notify checks and for peeking at what arrived).
fn tls_stream(gw: &Gateway) -> HttpStream<TlsStream> {
    let sock = TcpStream::connect(gw.addr()).expect("connect to the gateway");
    sock.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(common::IO_TIMEOUT)).unwrap();
    sock.set_nodelay(true).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(gw.client_config(Some("client-a")), name).unwrap();
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("TLS handshake with the gateway");
    }
    HttpStream::new(stream)
}

/// Reads until the gateway ends the TLS session; panics unless it ends with close_notify.
fn assert_close_notify(stream: &mut TlsStream) {
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "expected close_notify, got data: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("expected the gateway to close with close_notify, got: {e}"),
    }
}

/// Reads from a raw TCP socket until the peer closes (EOF or reset); returns what arrived.
/// Panics if the socket is still open after the read timeout.
fn wait_closed(sock: &mut TcpStream) -> Vec<u8> {
    sock.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return received,
            Err(e) => panic!("the gateway did not close the connection: {e}"),
        }
    }
}

/// A head with `Content-Length: len` and no body bytes.
fn post_head(len: usize, extra: &str) -> String {
    format!(
        "POST {API}/upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {len}\r\n{extra}\r\n"
    )
}

/// Reads responses until a final (non-1xx) one.
fn final_response(client: &mut Client) -> Response {
    loop {
        let response = client.read_response(false).expect("read a response");
        if !(100..200).contains(&response.status) {
            return response;
        }
    }
}

/// An address whose listener never accepts and whose accept queue is full, so that the kernel
/// drops further SYNs: a connect to it neither succeeds nor fails until the connector gives up.
/// (Non-routable addresses do not serve for this in every sandbox: some answer any connect.)
struct Blackhole {
    addr: SocketAddr,
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    fn new() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(sock) => queued.push(sock),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
                Err(e) => panic!("filling the accept queue of {addr}: {e}"),
            }
            assert!(
                queued.len() < 10_000,
                "the accept queue of {addr} never filled"
            );
        }
        Blackhole {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }
}

/// A keep-alive backend for bodiless requests, answering each with 200 `ok`, that counts the
/// connections it accepted and the ones the gateway closed.
fn tracking_backend() -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let opened = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    {
        let (opened, closed) = (Arc::clone(&opened), Arc::clone(&closed));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                opened.fetch_add(1, Ordering::SeqCst);
                let closed = Arc::clone(&closed);
                thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while let Ok(1) = stream.read(&mut byte) {
                        head.push(byte[0]);
                        if head.ends_with(b"\r\n\r\n") {
                            head.clear();
                            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if stream.write_all(answer).is_err() {
                                break;
                            }
                        }
                    }
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
    }
    (url, opened, closed)
}

/// A backend that reads one request head per connection, answers `response` as is, then runs
/// `then` on the socket (as in tests/hardening.rs).
fn raw_backend(response: &'static [u8], then: fn(&mut TcpStream)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = stream.write_all(response);
                then(&mut stream);
            });
        }
    });
    format!("http://{addr}")
}

/// A gateway with API `/p` in front of `url`, client-a pinned on it.
fn gateway_for(url: &str, extra: &[&str]) -> Gateway {
    let db = common::Db::init();
    db.api_add("p", "/p", None, url);
    db.cert_add("p", "a", "client-a");
    db.serve_with(extra)
}

// ---------------------------------------------------------------------------------------------
// --max-head
// ---------------------------------------------------------------------------------------------

#[test]
fn max_head_refuses_a_larger_head_with_431_and_closes() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--max-head", "1024"]);

    // A head of exactly the limit (request line to the empty line) passes.
    let head_of = |len: usize| {
        let bare = format!("GET {API}/small HTTP/1.1\r\nHost: localhost\r\nX-Pad: \r\n\r\n");
        format!(
            "GET {API}/small HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(len - bare.len())
        )
    };
    let mut client = gw.client(Some("client-a"));
    let exact = head_of(1024);
    assert_eq!(exact.len(), 1024);
    client.request(exact.as_bytes()).echo();

    // One byte more is refused.
    let response = client.request(head_of(1025).as_bytes());
    response.assert_problem(431, "headers-too-large");
    assert_closes(&mut client, &response);
    assert_serves(&gw);

    // A head that grows past the limit without ever ending is refused without waiting for its
    // end (the request timeout is long, so a 408 here would be a different bug).
    let mut client = gw.client(Some("client-a"));
    let endless = format!(
        "GET {API}/endless HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}",
        "a".repeat(3000)
    );
    let response = client.request(endless.as_bytes());
    response.assert_problem(431, "headers-too-large");
    assert_closes(&mut client, &response);
    assert_serves(&gw);
    assert_eq!(
        backend.requests(),
        3,
        "only the small request and the checks reach the backend"
    );
}

#[test]
fn more_than_100_header_lines_get_431_and_close() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let with_headers = |count: usize| {
        let mut raw = format!("GET {API}/many HTTP/1.1\r\nHost: localhost\r\n");
        for i in 1..count {
            raw.push_str(&format!("X-H{i}: {i}\r\n"));
        }
        raw.push_str("\r\n");
        raw
    };
    let mut client = gw.client(Some("client-a"));
    client.request(with_headers(100).as_bytes()).echo();
    let response = client.request(with_headers(101).as_bytes());
    response.assert_problem(431, "headers-too-large");
    assert_closes(&mut client, &response);
    assert_serves(&gw);
}

// ---------------------------------------------------------------------------------------------
// --max-body
// ---------------------------------------------------------------------------------------------

#[test]
fn content_length_above_max_body_gets_413_before_any_body_byte() {
    let backend = Backend::start();
    // A long request timeout: a gateway that waited for the body would time the read out
    // rather than answer.
    let gw = Gateway::pizzashack(&backend, &["--max-body", "1000", "--request-timeout", "30"]);
    let mut client = gw.client(Some("client-a"));
    // Only the head is sent: the answer must come without any body byte.
    let response = client.request(post_head(1001, "").as_bytes());
    let problem = response.assert_problem(413, "payload-too-large");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("1000"),
        "the detail names the limit: {problem}"
    );
    assert_closes(&mut client, &response);
    assert_eq!(
        backend.requests(),
        0,
        "a refused request never reaches the backend"
    );
    assert_serves(&gw);
}

#[test]
fn expect_continue_above_max_body_gets_413_and_no_100() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--max-body", "1000", "--request-timeout", "30"]);
    let mut client = gw.client(Some("client-a"));
    client
        .send(post_head(5000, "Expect: 100-continue\r\n").as_bytes())
        .unwrap();
    // The very first answer is the refusal: a `100 Continue` would invite the body.
    let response = client.read_response(false).expect("an answer to the head");
    response.assert_problem(413, "payload-too-large");
    assert_closes(&mut client, &response);
    assert_eq!(backend.requests(), 0);
    assert_serves(&gw);
}

#[test]
fn a_body_of_exactly_max_body_passes() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--max-body", "1000"]);
    let body = pattern(1000);
    let mut client = gw.client(Some("client-a"));

    // Content-Length.
    let response = client.request(&common::request_with_body(
        "POST",
        &format!("{API}/upload"),
        &body,
    ));
    assert!(!response.closes(), "{:?}", response.headers);
    let echo = response.echo();
    assert_eq!(echo.body_len, 1000);
    assert_eq!(echo.body_sha256, common::sha256_hex(&body));

    // Chunked, on the same connection.
    let response = client.request(&common::request_chunked(
        "POST",
        &format!("{API}/upload"),
        &body,
        100,
    ));
    assert!(!response.closes(), "{:?}", response.headers);
    let echo = response.echo();
    assert!(echo.body_chunked);
    assert_eq!(echo.body_len, 1000);
    assert_eq!(echo.body_sha256, common::sha256_hex(&body));

    // Expect: 100-continue, still on the same connection: the head is allowed, so the
    // client is invited to send the body.
    client
        .send(post_head(1000, "Expect: 100-continue\r\n").as_bytes())
        .unwrap();
    let interim = client.read_response(false).expect("an answer to the head");
    assert_eq!(
        interim.status,
        100,
        "{:?}\n{}",
        interim.headers,
        interim.text()
    );
    client.send(&body).unwrap();
    let echo = final_response(&mut client).echo();
    assert_eq!(echo.body_len, 1000);
    assert_eq!(echo.body_sha256, common::sha256_hex(&body));
}

#[test]
fn a_chunked_body_crossing_max_body_gets_413_and_closes() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--max-body", "1000"]);
    let mut client = gw.client(Some("client-a"));
    let raw = common::request_chunked("POST", &format!("{API}/upload"), &pattern(1001), 100);
    let response = client.request(&raw);
    response.assert_problem(413, "payload-too-large");
    assert_closes(&mut client, &response);
    assert_serves(&gw);

    // Also when the body arrives in one chunk larger than the limit.
    let mut client = gw.client(Some("client-a"));
    let raw = common::request_chunked("POST", &format!("{API}/upload"), &pattern(5000), 5000);
    let response = client.request(&raw);
    response.assert_problem(413, "payload-too-large");
    assert_closes(&mut client, &response);
    assert_serves(&gw);
}

// ---------------------------------------------------------------------------------------------
// --request-timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn an_unfinished_head_gets_408_and_closes() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--request-timeout", "0.5"]);
    let mut client = gw.client(Some("client-a"));
    client
        .send(format!("GET {API}/x HTTP/1.1\r\nHost: loc").as_bytes())
        .unwrap();
    let response = client.read_response(false).expect("an answer");
    response.assert_problem(408, "request-timeout");
    assert_closes(&mut client, &response);
    assert_eq!(backend.requests(), 0);
    assert_serves(&gw);
}

#[test]
fn the_request_timeout_does_not_cut_idle_keep_alive_connections() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--request-timeout", "0.5"]);
    // Quiet after the handshake, and quiet after an answer: idle, not a late request.
    let mut client = gw.client(Some("client-a"));
    thread::sleep(Duration::from_millis(1500));
    client.get(&format!("{API}/one")).echo();
    thread::sleep(Duration::from_millis(1500));
    client.get(&format!("{API}/two")).echo();
}

#[test]
fn a_head_begun_late_in_the_idle_period_gets_the_whole_request_timeout() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(
        &backend,
        &["--idle-timeout", "1.5", "--request-timeout", "30"],
    );
    let mut client = gw.client(Some("client-a"));
    client.get(&format!("{API}/first")).echo();
    // The next request starts 1 s into the idle period and takes 2 s to complete: it is no
    // longer idle, and 2 s is well inside the request timeout.
    thread::sleep(Duration::from_millis(1000));
    client
        .send(format!("GET {API}/second HTTP/1.1\r\nHost: loc").as_bytes())
        .unwrap();
    thread::sleep(Duration::from_millis(2000));
    let response = client
        .try_request(b"alhost\r\n\r\n")
        .unwrap_or_else(|e| panic!("the gateway dropped a request in progress: {e}"));
    response.echo();
}

#[test]
fn a_head_trickling_in_gets_408_all_the_same() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--request-timeout", "0.5"]);
    let mut http = tls_stream(&gw);
    // One whole request first, so that the session tickets are read and anything arriving
    // later is the answer to the trickled head.
    http.inner
        .write_all(get(&format!("{API}/first")).as_bytes())
        .unwrap();
    http.read_response(false).unwrap().echo();

    // A byte every 100 ms, never the end of the head: it keeps arriving, but the head is not
    // complete in time. Stops at the first sign of an answer.
    let head = format!(
        "GET {API}/slowloris HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}",
        "a".repeat(200)
    );
    let started = Instant::now();
    let mut answered = false;
    for byte in head.as_bytes() {
        http.inner.write_all(&[*byte]).unwrap();
        http.inner.flush().unwrap();
        http.inner
            .sock
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let peeked = http.inner.sock.peek(&mut [0u8; 1]);
        if matches!(peeked, Ok(n) if n > 0) {
            answered = true;
            break;
        }
    }
    http.inner
        .sock
        .set_read_timeout(Some(common::IO_TIMEOUT))
        .unwrap();
    assert!(
        answered,
        "no answer after trickling the head for {:?}",
        started.elapsed()
    );
    let response = http.read_response(false).expect("the 408");
    response.assert_problem(408, "request-timeout");
    assert!(response.closes(), "{:?}", response.headers);
    assert!(http.at_eof(), "the gateway must close after its 408");
    assert_eq!(backend.requests(), 1);
    assert_serves(&gw);
}

#[test]
fn a_content_length_body_that_stops_midway_gets_408_and_closes() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--request-timeout", "0.5"]);
    let mut client = gw.client(Some("client-a"));
    let mut raw = post_head(1000, "").into_bytes();
    raw.extend_from_slice(&pattern(400));
    let response = client.request(&raw);
    let problem = response.assert_problem(408, "request-timeout");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("body"),
        "the detail says the body stopped: {problem}"
    );
    assert_closes(&mut client, &response);
    assert_serves(&gw);
}

#[test]
fn a_chunked_body_that_stops_midway_gets_408_and_closes() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--request-timeout", "0.5"]);
    let mut client = gw.client(Some("client-a"));
    let mut raw = format!(
        "POST {API}/upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    // One whole chunk, then half of the next one.
    raw.extend_from_slice(b"64\r\n");
    raw.extend_from_slice(&pattern(100));
    raw.extend_from_slice(b"\r\n64\r\n");
    raw.extend_from_slice(&pattern(50));
    let response = client.request(&raw);
    response.assert_problem(408, "request-timeout");
    assert_closes(&mut client, &response);
    assert_serves(&gw);
}

/// Sends `head`, then `pieces` one by one, `gap` apart; returns the final answer.
fn send_slowly(client: &mut Client, head: &[u8], pieces: &[Vec<u8>], gap: Duration) -> Response {
    client.send(head).unwrap();
    for piece in pieces {
        thread::sleep(gap);
        client
            .send(piece)
            .unwrap_or_else(|e| panic!("the gateway stopped taking the body: {e}"));
    }
    final_response(client)
}

#[test]
fn a_slow_content_length_body_that_keeps_coming_gets_the_backends_200() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(
        &backend,
        &["--backend-timeout", "1", "--request-timeout", "1"],
    );
    let mut client = gw.client(Some("client-a"));
    let body = pattern(1000);
    let pieces: Vec<Vec<u8>> = body.chunks(100).map(<[u8]>::to_vec).collect();
    // 10 pieces, 300 ms apart: the upload takes about 3 s, longer than either timeout, while
    // no gap between arrivals comes near them.
    let response = send_slowly(
        &mut client,
        post_head(body.len(), "").as_bytes(),
        &pieces,
        Duration::from_millis(300),
    );
    assert!(!response.closes(), "{:?}", response.headers);
    let echo = response.echo();
    assert_eq!(echo.body_len, 1000);
    assert_eq!(echo.body_sha256, common::sha256_hex(&body));
    // The connection goes on.
    client.get(&format!("{API}/next")).echo();
}

#[test]
fn a_slow_chunked_body_that_keeps_coming_gets_the_backends_200() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(
        &backend,
        &["--backend-timeout", "1", "--request-timeout", "1"],
    );
    let mut client = gw.client(Some("client-a"));
    let body = pattern(1000);
    let mut pieces: Vec<Vec<u8>> = body
        .chunks(100)
        .map(|chunk| {
            let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
            piece.extend_from_slice(chunk);
            piece.extend_from_slice(b"\r\n");
            piece
        })
        .collect();
    pieces.push(b"0\r\n\r\n".to_vec());
    let head = format!(
        "POST {API}/upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let response = send_slowly(
        &mut client,
        head.as_bytes(),
        &pieces,
        Duration::from_millis(300),
    );
    assert!(!response.closes(), "{:?}", response.headers);
    let echo = response.echo();
    assert!(echo.body_chunked);
    assert_eq!(echo.body_len, 1000);
    assert_eq!(echo.body_sha256, common::sha256_hex(&body));
    client.get(&format!("{API}/next")).echo();
}

// ---------------------------------------------------------------------------------------------
// --backend-timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn a_backend_that_does_not_answer_gets_504() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--backend-timeout", "0.5"]);
    let mut client = gw.client(Some("client-a"));
    let response = client.get(&format!("{API}/slow?ms=5000"));
    response.assert_problem(504, "backend-timeout");
    // The request was complete, so the client connection is still good for the next one.
    assert!(!response.closes(), "{:?}", response.headers);
    client.get(&format!("{API}/again")).echo();
    assert_serves(&gw);
}

#[test]
fn a_backend_answering_slowly_but_steadily_is_not_cut_off() {
    let url = raw_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", |stream| {
        for byte in b"0123456789" {
            thread::sleep(Duration::from_millis(300));
            if stream.write_all(&[*byte]).is_err() {
                return;
            }
        }
    });
    let gw = gateway_for(&url, &["--backend-timeout", "1"]);
    let mut client = gw.client(Some("client-a"));
    // About 3 s in all, longer than the backend timeout, with no gap near it.
    let response = client.get("/p/dribble");
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "0123456789")
    );
}

#[test]
fn a_backend_stalling_mid_answer_loses_the_connection_not_a_504() {
    let url = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234",
        |_| thread::sleep(Duration::from_secs(20)),
    );
    let gw = gateway_for(&url, &["--backend-timeout", "0.5"]);
    let mut client = gw.client(Some("client-a"));
    client.send(get("/p/stall").as_bytes()).unwrap();
    // The head is out, so the only honest end is a truncated body and a closed connection.
    match client.read_response(false) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}"),
        Ok(response) => panic!(
            "a half-sent answer must end in a closed connection, got {} {:?} {:?}",
            response.status,
            response.headers,
            response.text()
        ),
    }
    assert_serves_p(&gw);
}

// ---------------------------------------------------------------------------------------------
// --connect-timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn a_backend_that_never_accepts_the_connection_gets_502() {
    let blackhole = Blackhole::new();
    let backend = Backend::start();
    let url = format!("http://{}", blackhole.addr);
    let backend_url = backend.url();
    let db = common::Db::init();
    db.api_add("hole", "/hole", None, &url);
    db.cert_add("hole", "a-hole", "client-a");
    db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &backend_url);
    db.cert_add("pizzashack", "a-pizza", "client-a");
    let gw = db.serve_with(&["--connect-timeout", "0.5"]);

    let mut client = gw.client(Some("client-a"));
    let response = client.get("/hole/x");
    let problem = response.assert_problem(502, "backend-unavailable");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&blackhole.addr.to_string()),
        "the detail names the backend: {problem}"
    );
    assert!(
        detail.contains("did not accept the connection"),
        "the 502 comes from the connect timeout: {problem}"
    );
    // A bodiless request: the client connection goes on.
    assert!(!response.closes(), "{:?}", response.headers);
    client.get(&format!("{API}/next")).echo();
    assert_serves(&gw);
}

// ---------------------------------------------------------------------------------------------
// --idle-timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn an_idle_client_connection_is_closed_with_close_notify() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--idle-timeout", "0.5"]);

    // A connection that never sends a request.
    let mut quiet = tls_stream(&gw);
    assert_close_notify(&mut quiet.inner);

    // A kept-alive connection after a request.
    let mut http = tls_stream(&gw);
    http.inner
        .write_all(get(&format!("{API}/x")).as_bytes())
        .unwrap();
    let response = http.read_response(false).unwrap();
    assert!(!response.closes(), "{:?}", response.headers);
    response.echo();
    assert_close_notify(&mut http.inner);

    assert_serves(&gw);
}

#[test]
fn an_idle_pooled_backend_connection_is_closed() {
    let (url, opened, closed) = tracking_backend();
    let db = common::Db::init();
    db.api_add("p", "/p", None, &url);
    db.cert_add("p", "a", "client-a");
    let gw = db.serve_with(&["--idle-timeout", "1"]);
    let before = opened.load(Ordering::SeqCst);

    let mut client = gw.client(Some("client-a"));
    assert_eq!(client.get("/p/one").text(), "ok");
    assert_eq!(client.get("/p/two").text(), "ok");
    assert_eq!(
        opened.load(Ordering::SeqCst),
        before + 1,
        "the second request reuses the pooled backend connection"
    );
    let closed_before = closed.load(Ordering::SeqCst);
    eventually(
        "the gateway closes the idle pooled backend connection",
        || (closed.load(Ordering::SeqCst) > closed_before).then_some(()),
    );

    // The next request needs, and gets, a fresh backend connection.
    let mut client = gw.client(Some("client-a"));
    assert_eq!(client.get("/p/three").text(), "ok");
    assert_eq!(opened.load(Ordering::SeqCst), before + 2);
}

// ---------------------------------------------------------------------------------------------
// --handshake-timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn a_connection_that_never_finishes_its_handshake_is_dropped() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--handshake-timeout", "0.5"]);

    // Nothing at all.
    let mut silent = TcpStream::connect(gw.addr()).unwrap();
    let received = wait_closed(&mut silent);
    assert!(received.is_empty(), "unexpected bytes: {received:?}");

    // The start of a ClientHello record (announcing 512 bytes), then nothing.
    let mut partial = TcpStream::connect(gw.addr()).unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    wait_closed(&mut partial);

    // A finished handshake is not held to it: an idle moment after it costs nothing.
    let mut client = gw.client(Some("client-a"));
    thread::sleep(Duration::from_millis(1500));
    client.get(&format!("{API}/late")).echo();
    assert_serves(&gw);
}

// ---------------------------------------------------------------------------------------------
// --max-connections
// ---------------------------------------------------------------------------------------------

#[test]
fn connections_beyond_max_connections_wait_until_one_closes() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--max-connections", "2"]);
    let mut first = gw.client(Some("client-a"));
    first.get(&format!("{API}/first")).echo();
    let mut second = gw.client(Some("client-a"));
    second.get(&format!("{API}/second")).echo();

    // A third connection: TCP completes in the kernel's backlog, TLS does not progress.
    let (tx, rx) = mpsc::channel();
    let addr = gw.addr();
    let config = gw.client_config(Some("client-a"));
    thread::spawn(move || {
        let _ = tx.send(Client::connect(addr, config));
    });
    match rx.recv_timeout(Duration::from_millis(1500)) {
        Err(mpsc::RecvTimeoutError::Timeout) => {}
        Ok(Ok(_)) => panic!("a third TLS handshake completed while 2 connections were open"),
        Ok(Err(e)) => panic!("the third connection failed instead of waiting: {e}"),
        Err(e) => panic!("{e}"),
    }

    // One of the two closes: the waiting connection is accepted and served.
    drop(first);
    let mut third = rx
        .recv_timeout(common::EVENTUALLY)
        .expect("the third handshake completes once a connection closed")
        .expect("the third handshake succeeds");
    third.get(&format!("{API}/third")).echo();
    second.get(&format!("{API}/second-again")).echo();
}

// ---------------------------------------------------------------------------------------------
// --drain-timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn draining_ends_at_the_drain_timeout_with_requests_still_in_flight() {
    let backend = Backend::start();
    let mut gw = Gateway::pizzashack(&backend, &["--drain-timeout", "0.5"]);
    let mut client = gw.client(Some("client-a"));
    client
        .send(get(&format!("{API}/slow?ms=30000")).as_bytes())
        .unwrap();
    eventually("the slow request reaches the backend", || {
        (backend.requests() == 1).then_some(())
    });
    gw.signal("TERM");
    // Well before the backend would answer.
    let status = gw.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(
        gw.log_text().contains("drain deadline passed"),
        "log:\n{}",
        gw.log_text()
    );
    assert!(client.is_closed_by_peer());
}

// ---------------------------------------------------------------------------------------------
// Bad values
// ---------------------------------------------------------------------------------------------

/// Runs `certgate serve` with `args` against a database path that does not exist yet; expects
/// it to refuse at once. Returns its stderr.
fn serve_refused(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("certgate.db");
    let mut child = Command::new(common::BIN)
        .arg("--db")
        .arg(&db)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("CERTGATE_DB")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + common::IO_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("certgate serve {args:?} kept running instead of refusing");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "serve {args:?} exited {status}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "serve {args:?}: one error line expected:\n{stderr}"
    );
    assert!(
        !db.exists(),
        "serve {args:?} refused its options but left a database behind"
    );
    stderr
}

#[test]
fn bad_values_are_refused_with_one_error_line() {
    let seconds = [
        "--handshake-timeout",
        "--request-timeout",
        "--idle-timeout",
        "--connect-timeout",
        "--backend-timeout",
        "--drain-timeout",
    ];
    for option in seconds {
        for value in ["0", "-1", "soon", "inf", "NaN", ""] {
            let stderr = serve_refused(&[option, value]);
            assert_eq!(
                stderr.trim_end(),
                format!("error: {option} {value:?} is not a number of seconds"),
            );
        }
    }
    for option in ["--max-head", "--max-body", "--max-connections"] {
        for value in ["0", "-1", "many", "1.5"] {
            let stderr = serve_refused(&[option, value]);
            assert!(
                stderr.starts_with(&format!("error: {option} {value:?} ")),
                "{stderr}"
            );
        }
    }
}
