//! What a hostile or broken peer sends must end as an answer or a closed connection, never as a
//! dead gateway, a smuggled request or unbounded memory. Regression tests for the review of the
//! first proxy state machine.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use common::{Backend, Gateway};

/// A backend that reads one request head per connection, answers `response` as is, then runs
/// `then` on the socket.
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

fn gateway_for(url: &str) -> Gateway {
    let url = url.to_owned();
    Gateway::start(move |db| {
        db.api_add("p", "/p", None, &url);
        db.cert_add("p", "a", "client-a");
    })
}

#[test]
fn a_status_line_without_reason_phrase_is_relayed() {
    let url = raw_backend(b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", |_| {});
    let mut gw = gateway_for(&url);
    let mut client = gw.client(Some("client-a"));
    let response = client.get("/p/x");
    assert_eq!((response.status, response.text().as_str()), (200, "ok"));
    gw.assert_running();
}

#[test]
fn connection_cannot_strip_content_length_to_smuggle_a_request() {
    let backend = Backend::start();
    let gw = gateway_for(&backend.url());
    let mut client = gw.client(Some("client-a"));
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\nClient-Cert: :AAAA:\r\n\r\n";
    let raw = format!(
        "POST /p/public HTTP/1.1\r\nHost: localhost\r\nConnection: Content-Length\r\n\
         Content-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let echo = client.request(raw.as_bytes()).echo();
    assert_eq!(echo.body_len, smuggled.len());
    // One more request on the connection proves the backend saw exactly what was sent.
    client.get("/p/after").echo();
    assert_eq!(backend.requests(), 2, "the body must not become a request");
}

#[test]
fn an_http10_client_never_gets_a_chunked_answer() {
    let backend = Backend::start();
    let gw = gateway_for(&backend.url());
    let mut client = gw.client(Some("client-a"));
    let response = client.request(b"GET /p/chunked?bytes=5000 HTTP/1.0\r\nHost: localhost\r\n\r\n");
    assert_eq!(response.status, 200);
    assert!(!response.chunked, "headers: {:?}", response.headers);
    assert_eq!(response.body, common::pattern(5000));
}

#[test]
fn an_answer_with_chunked_and_content_length_loses_content_length() {
    let url = raw_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        |_| {},
    );
    let gw = gateway_for(&url);
    let mut client = gw.client(Some("client-a"));
    let response = client.get("/p/x");
    assert_eq!(response.text(), "hello");
    assert!(
        response.header("content-length").is_none(),
        "{:?}",
        response.headers
    );
}

#[test]
fn endless_interim_answers_end_in_502_and_others_are_served() {
    let url = raw_backend(b"", |stream| {
        let hint = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n".repeat(100);
        for _ in 0..10_000 {
            if stream.write_all(&hint).is_err() {
                return;
            }
        }
    });
    let gw = gateway_for(&url);
    let mut client = gw.client(Some("client-a"));
    client
        .send(b"GET /p/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut statuses = Vec::new();
    loop {
        let response = client.read_response(false).unwrap();
        statuses.push(response.status);
        if response.status != 103 {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&502), "{statuses:?}");
    assert!(
        statuses.len() <= 17,
        "{} interim answers relayed",
        statuses.len() - 1
    );
    let mut other = gw.client(Some("client-a"));
    assert_eq!(other.get("/nowhere").status, 404);
}

#[test]
fn tls12_clients_are_judged_like_tls13_clients() {
    let backend = Backend::start();
    let gw = gateway_for(&backend.url());
    let roots = common::roots_from_pem(gw.server_pem());
    let tls12 = [&rustls::version::TLS12];
    let allowed = common::client_config_with_versions(roots.clone(), Some("client-a"), &tls12);
    let mut client = common::Client::connect(gw.addr(), allowed).unwrap();
    assert_eq!(
        client.tls().protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    client.get("/p/x").echo();
    let unknown = common::client_config_with_versions(roots.clone(), Some("client-c"), &tls12);
    let mut client = common::Client::connect(gw.addr(), unknown).unwrap();
    client
        .get("/p/x")
        .assert_problem(401, "certificate-not-allowed");
    let anonymous = common::client_config_with_versions(roots, None, &tls12);
    let mut client = common::Client::connect(gw.addr(), anonymous).unwrap();
    client
        .get("/p/x")
        .assert_problem(401, "client-certificate-required");
}

#[test]
fn an_upload_to_a_backend_that_reads_late_is_not_stalled() {
    const SIZE: usize = 8 * 1024 * 1024;
    // Reads the head, waits until the gateway's buffers and the kernel's are full, then reads
    // the whole body at once and answers with its length.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        thread::sleep(std::time::Duration::from_millis(1000));
        let mut body = vec![0u8; SIZE];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{SIZE}",
            SIZE.to_string().len()
        );
        let _ = stream.write_all(answer.as_bytes());
    });
    let gw = gateway_for(&url);
    let mut client = gw.client(Some("client-a"));
    let body = common::pattern(SIZE);
    let response = client.request(&common::request_with_body("POST", "/p/upload", &body));
    assert_eq!((response.status, response.text()), (200, SIZE.to_string()));
}
