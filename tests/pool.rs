//! Backend connection pooling (SPEC 3, Forwarding): connections are shared by every client
//! connection, a connection the backend closes while parked is dropped, a request on a reused
//! connection that dies before any answer is retried once when idempotent, and parked
//! connections are closed after `--idle-timeout`.

mod common;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Backend, Gateway};

const GET: &str = "/pizzashack/1.0.0/menu";

/// Reads one request (head and Content-Length body) from `stream`; `None` on EOF, error or read
/// timeout before a whole request arrived. Returns the method and the body.
fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut slots);
    parsed.parse(&head).ok()?;
    let method = parsed.method?.to_owned();
    let length = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .unwrap_or(0usize);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    Some((method, body))
}

/// A keep-alive answer whose body is `text`.
fn answer(stream: &mut TcpStream, text: &str) -> bool {
    let raw = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: keep-alive\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(raw.as_bytes()).is_ok()
}

/// A raw backend: accepts connections, counting them (numbered from 1), and runs `serve` on each
/// in a thread of its own.
fn raw_backend(
    serve: impl Fn(TcpStream, usize) + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let serve = Arc::new(serve);
    {
        let accepted = Arc::clone(&accepted);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let id = accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let serve = Arc::clone(&serve);
                thread::spawn(move || serve(stream, id));
            }
        });
    }
    (url, accepted)
}

fn gateway_for(url: &str, extra: &[&str]) -> Gateway {
    let db = common::Db::init();
    db.api_add("p", "/p", None, url);
    db.cert_add("p", "a", "client-a");
    db.serve_with(extra)
}

#[test]
fn the_pool_is_shared_by_client_connections_one_after_another() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    for round in 0..2 {
        let mut client = gw.client(Some("client-a"));
        for i in 0..3 {
            let echo = client.get(&format!("{GET}?round={round}&i={i}")).echo();
            assert_eq!(echo.connection, 1, "round {round}, request {i}");
        }
        drop(client);
    }
    assert_eq!(backend.requests(), 6);
    assert_eq!(
        backend.connections(),
        1,
        "the second client connection must reuse the first one's backend connection"
    );
}

#[test]
fn concurrent_clients_get_their_own_backend_connections_which_later_clients_reuse() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let mut first = gw.client(Some("client-a"));
    let mut second = gw.client(Some("client-a"));
    // Both exchanges are in flight at once: the backend holds each answer for 500 ms.
    let slow = common::get("/pizzashack/1.0.0/slow?ms=500");
    first.send(slow.as_bytes()).unwrap();
    second.send(slow.as_bytes()).unwrap();
    let a = first.read_response(false).unwrap().echo().connection;
    let b = second.read_response(false).unwrap().echo().connection;
    assert_eq!(
        HashSet::from([a, b]),
        HashSet::from([1, 2]),
        "two exchanges in flight at once need two backend connections"
    );
    assert_eq!(backend.connections(), 2);
    drop(first);
    drop(second);

    let mut third = gw.client(Some("client-a"));
    let used: Vec<usize> = (0..3)
        .map(|i| third.get(&format!("{GET}?third={i}")).echo().connection)
        .collect();
    assert!(
        used.iter().all(|&c| c == used[0]) && (used[0] == 1 || used[0] == 2),
        "the third client must reuse one parked connection (most recent first): {used:?}"
    );
    assert_eq!(
        backend.connections(),
        2,
        "no new backend connection for the third client"
    );
    assert_eq!(backend.requests(), 5);
}

#[test]
fn a_pooled_connection_the_backend_closes_is_dropped_not_used() {
    // Answers keep-alive requests until the connection has been idle for 200 ms, then closes.
    let (url, accepted) = raw_backend(|mut stream, id| {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while read_request(&mut stream).is_some() {
            if !answer(&mut stream, &format!("connection {id}")) {
                return;
            }
        }
        let _ = stream.shutdown(Shutdown::Both);
    });
    let mut gw = gateway_for(&url, &[]);
    let mut client = gw.client(Some("client-a"));
    let response = client.get("/p/one");
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 1".into())
    );

    // The backend closes the parked connection meanwhile.
    thread::sleep(Duration::from_millis(500));
    let response = client.get("/p/two");
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 2".into()),
        "a request after the backend closed the pooled connection: {:?}",
        response.headers
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // The same from a new client connection.
    thread::sleep(Duration::from_millis(500));
    let mut other = gw.client(Some("client-a"));
    let response = other.get("/p/three");
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 3".into())
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    gw.assert_running();
}

#[test]
fn a_connection_that_carried_an_http10_request_is_not_pooled() {
    // Like most servers, answers an HTTP/1.0 request without keep-alive and then closes, a
    // moment later, without saying `Connection: close`.
    let (url, accepted) = raw_backend(|mut stream, id| {
        if read_request(&mut stream).is_some() {
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nconnection {id}");
            let _ = stream.write_all(raw.as_bytes());
            thread::sleep(Duration::from_millis(300));
        }
        let _ = stream.shutdown(Shutdown::Both);
    });
    let mut gw = gateway_for(&url, &[]);
    let mut old = gw.client(Some("client-a"));
    let response = old.request(b"GET /p/one HTTP/1.0\r\n\r\n");
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 1".into())
    );

    // A POST is never retried: had the first connection been parked, it would get 502.
    let mut client = gw.client(Some("client-a"));
    let response = client.request(&common::request_with_body("POST", "/p/two", b"order"));
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 2".into()),
        "{:?}",
        response.headers
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    gw.assert_running();
}

#[test]
fn a_dead_reused_connection_is_retried_for_idempotent_requests_only() {
    // Answers the first request on each connection; reads the second one whole, then closes
    // without a word.
    let seen: Arc<Mutex<Vec<(usize, String, usize)>>> = Arc::default();
    let (url, accepted) = {
        let seen = Arc::clone(&seen);
        raw_backend(move |mut stream, id| {
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let Some((method, body)) = read_request(&mut stream) else {
                return;
            };
            seen.lock().unwrap().push((id, method.clone(), body.len()));
            let text = format!("connection {id} {method} {}", body.len());
            if !answer(&mut stream, &text) {
                return;
            }
            if let Some((method, body)) = read_request(&mut stream) {
                seen.lock().unwrap().push((id, method, body.len()));
            }
            let _ = stream.shutdown(Shutdown::Both);
        })
    };
    let mut gw = gateway_for(&url, &[]);
    let mut client = gw.client(Some("client-a"));
    let connections = || accepted.load(Ordering::SeqCst);

    let response = client.get("/p/one");
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 1 GET 0".into())
    );
    assert_eq!(connections(), 1);

    // Reuses connection 1, which dies: retried on a fresh connection.
    let response = client.get("/p/two");
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 2 GET 0".into()),
        "a GET on a dead pooled connection must be retried: {:?}",
        response.headers
    );
    assert_eq!(connections(), 2);

    // PUT is idempotent too, and a small body fits in the buffer: retried, body intact.
    let body = common::pattern(1000);
    let response = client.request(&common::request_with_body("PUT", "/p/three", &body));
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 3 PUT 1000".into()),
        "a PUT on a dead pooled connection must be retried: {:?}",
        response.headers
    );
    assert_eq!(connections(), 3);

    // POST is not idempotent: 502, not sent twice.
    let response = client.request(&common::request_with_body("POST", "/p/four", b"hello"));
    response.assert_problem(502, "backend-unavailable");
    assert_eq!(connections(), 3, "a POST must not be retried");

    // The gateway keeps serving, on the same client connection (the POST was whole, so the
    // 502 need not close it) and on a new one.
    assert!(!response.closes(), "{:?}", response.headers);
    let response = client.get("/p/five");
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 4 GET 0".into())
    );

    // A PUT whose body does not fit in the 64 KiB buffer cannot be sent again: 502.
    let mut other = gw.client(Some("client-a"));
    let big = common::pattern(100 * 1024);
    let response = other.request(&common::request_with_body("PUT", "/p/six", &big));
    response.assert_problem(502, "backend-unavailable");
    assert_eq!(
        connections(),
        4,
        "a PUT larger than the buffer must not be retried"
    );

    let response = other.get("/p/seven");
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 5 GET 0".into())
    );
    gw.assert_running();

    let seen = seen.lock().unwrap().clone();
    let posts: Vec<_> = seen.iter().filter(|(_, m, _)| m == "POST").collect();
    assert_eq!(
        posts,
        [&(3, "POST".to_owned(), 5)],
        "the backend saw the POST once, on the reused connection: {seen:?}"
    );
    let puts: Vec<_> = seen.iter().filter(|(_, m, _)| m == "PUT").collect();
    assert_eq!(
        puts,
        [
            &(2, "PUT".to_owned(), 1000),
            &(3, "PUT".to_owned(), 1000),
            &(4, "PUT".to_owned(), 100 * 1024)
        ],
        "the small PUT went on a dead connection and again on a fresh one, the big one once: {seen:?}"
    );
}

#[test]
fn a_parked_connection_is_closed_after_the_idle_timeout() {
    // Answers one request, then reports how long after its answer the gateway closed the
    // connection (or that it did not within 5 s).
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let (url, accepted) = raw_backend(move |mut stream, _| {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        if read_request(&mut stream).is_none() || !answer(&mut stream, "ok") {
            return;
        }
        let answered = Instant::now();
        let mut byte = [0u8; 1];
        let outcome = match stream.read(&mut byte) {
            Ok(0) => Ok(answered.elapsed()),
            Ok(_) => Err("the gateway sent more bytes".to_owned()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err("the gateway kept the connection open for 5 s".to_owned())
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(answered.elapsed()),
            Err(e) => Err(format!("read failed: {e}")),
        };
        let _ = tx.lock().unwrap().send(outcome);
    });
    let gw = gateway_for(&url, &["--idle-timeout", "0.5"]);
    let mut client = gw.client(Some("client-a"));
    let response = client.get("/p/one");
    assert_eq!((response.status, response.text()), (200, "ok".into()));
    let closed_after = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend reports")
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("the gateway closed the parked connection {closed_after:?} after the answer");
    assert!(
        closed_after >= Duration::from_millis(300),
        "closed {closed_after:?} after the answer: before the idle timeout"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "closed only {closed_after:?} after the answer"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn a_request_is_retried_only_once() {
    // Connection 1 answers its first request; every other request on any connection is read
    // and dropped without an answer.
    let (url, accepted) = raw_backend(|mut stream, id| {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        if id == 1 && read_request(&mut stream).is_some() {
            answer(&mut stream, "connection 1");
        }
        let _ = read_request(&mut stream);
        let _ = stream.shutdown(Shutdown::Both);
    });
    let mut gw = gateway_for(&url, &[]);
    let mut client = gw.client(Some("client-a"));
    let response = client.get("/p/one");
    assert_eq!(
        (response.status, response.text()),
        (200, "connection 1".into())
    );
    // The reused connection 1 dies, and so does the fresh connection 2 of the retry: 502.
    client
        .get("/p/two")
        .assert_problem(502, "backend-unavailable");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "one retry on one fresh connection, no more"
    );
    gw.assert_running();
}

#[test]
fn no_socket_is_left_behind_however_exchanges_end() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--backend-timeout", "0.3"]);
    // Warm up: one parked backend connection, then the baseline.
    assert_eq!(gw.client(Some("client-a")).get(GET).status, 200);
    let baseline = common::open_fds(gw.pid());
    for _ in 0..10 {
        // Clients that go away in the middle of an upload.
        let mut client = gw.client(Some("client-a"));
        let head =
            format!("PUT {GET} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n");
        client.send(head.as_bytes()).unwrap();
        client.send(&[b'x'; 5000]).unwrap();
        drop(client);
        // Clients that go away while the backend thinks.
        let mut client = gw.client(Some("client-a"));
        let slow = "GET /pizzashack/1.0.0/slow?ms=200 HTTP/1.1\r\nHost: localhost\r\n\r\n";
        client.send(slow.as_bytes()).unwrap();
        drop(client);
        // Backends too slow: 504, the backend connection closed.
        let mut client = gw.client(Some("client-a"));
        let response = client.get("/pizzashack/1.0.0/slow?ms=1000");
        assert_eq!(response.status, 504);
        // And plain requests on connections of their own.
        assert_eq!(gw.client(Some("client-a")).get(GET).status, 200);
    }
    // Once every exchange has ended, only what the pool parks is left (a few connections to
    // the backend, each one socket).
    common::eventually("the gateway's sockets are back to the baseline", || {
        let now = common::open_fds(gw.pid());
        (now <= baseline + 3).then_some(())
    });
    assert_eq!(gw.client(Some("client-a")).get(GET).status, 200);
}
