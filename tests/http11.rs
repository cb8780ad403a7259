//! HTTP/1.1 on both sides of the gateway (SPEC 3, "Forwarding"): message framing, interim
//! answers, `Expect: 100-continue`, persistent connections and HTTP/1.0 peers, header rules.
//! Each test is one row of the HTTP/1.1 case table; rows already covered in `gateway.rs` and
//! `hardening.rs` are not repeated here.
//!
//! Besides the harness [`Backend`], some tests use a [`ScriptedBackend`] that answers fixed bytes
//! (framings and headers the harness backend never sends) and real Python HTTP/1.0 servers.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

use common::{
    eventually, fixture, free_port, get, pattern, sha256_hex, Backend, Gateway, HttpStream,
    RequestHead, Response, IO_TIMEOUT,
};

const API: &str = "/pizzashack/1.0.0";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The usual API (`/pizzashack/1.0.0`, client-a pinned) in front of any backend URL.
fn gateway_for(url: &str) -> Gateway {
    let url = url.to_owned();
    Gateway::start(move |db| {
        db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &url);
        db.cert_add("pizzashack", "a-pizza", "client-a");
    })
}

/// What a [`ScriptedBackend`] answers to one request (head, de-framed body, connection number
/// from 1): the raw bytes, and whether it closes the connection after them.
type Script = fn(&RequestHead, &[u8], usize) -> (Vec<u8>, bool);

/// A keep-alive backend that reads whole requests (with the harness reader) and answers each
/// with the bytes its [`Script`] returns.
struct ScriptedBackend {
    url: String,
    connections: Arc<AtomicUsize>,
    /// Every request received: its connection number and target.
    seen: Arc<Mutex<Vec<(usize, String)>>>,
}

impl ScriptedBackend {
    fn start(script: Script) -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind scripted backend");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        {
            let connections = Arc::clone(&connections);
            let seen = Arc::clone(&seen);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let id = connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let seen = Arc::clone(&seen);
                    thread::spawn(move || serve_script(stream, id, script, &seen));
                }
            });
        }
        ScriptedBackend {
            url,
            connections,
            seen,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<(usize, String)> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_script(stream: TcpStream, id: usize, script: Script, seen: &Mutex<Vec<(usize, String)>>) {
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(60)));
    let mut http = HttpStream::new(stream);
    while let Ok(Some(head)) = http.read_request_head() {
        let Ok(body) = http.read_request_body(&head) else {
            break;
        };
        seen.lock().unwrap().push((id, head.target.clone()));
        let (answer, close) = script(&head, &body, id);
        if http.inner.write_all(&answer).is_err() || close {
            break;
        }
    }
    let _ = http.inner.shutdown(Shutdown::Both);
}

/// A fixed 200 with a Content-Length body.
fn answer_200(body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A raw TLS connection to the gateway, for tests that look at the exact bytes of an answer.
type Tls = StreamOwned<ClientConnection, TcpStream>;

fn raw_tls(gw: &Gateway, cert: Option<&str>) -> Tls {
    let sock = TcpStream::connect(gw.addr()).expect("connect to the gateway");
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(gw.client_config(cert), name).unwrap();
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    tls
}

/// Reads into `buf` until `done(buf)`; panics on EOF or timeout, showing what arrived.
fn read_until(tls: &mut Tls, buf: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) {
    let mut chunk = [0u8; 16 * 1024];
    while !done(buf) {
        match tls.read(&mut chunk) {
            Ok(0) => panic!(
                "connection closed early; got {:?}",
                String::from_utf8_lossy(buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read failed ({e}); got {:?}", String::from_utf8_lossy(buf)),
        }
    }
}

/// Reads until the gateway closes the connection (close_notify or a bare TCP close).
fn read_to_close(tls: &mut Tls) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return out,
            Err(e) => panic!(
                "read failed before the close ({e}); got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// The value of header `name` in a raw head (first match, any case).
fn raw_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// True when the `Connection` header(s) of `response` list `token`.
fn connection_has(response: &Response, token: &str) -> bool {
    response
        .header_values("connection")
        .iter()
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A child process (a Python server) killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `python3 ARGS...`, which must listen on 127.0.0.1:`port`, and waits until it accepts.
/// `None` (with a note) when python3 is not installed.
fn python_server(args: &[&str], port: u16) -> Option<Server> {
    let child = match Command::new("python3")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("note: python3 cannot be started ({e}); skipping");
            return None;
        }
    };
    let mut server = Server(child);
    eventually(&format!("python3 listens on port {port}"), || {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("python3 {args:?} exited early ({status})");
        }
        TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
    Some(server)
}

// ---------------------------------------------------------------------------------------------
// Response framing
// ---------------------------------------------------------------------------------------------

#[test]
fn a_file_from_an_http10_python_server_arrives_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(300 * 1024);
    std::fs::write(dir.path().join("data.bin"), &data).unwrap();
    let port = free_port();
    let port_arg = port.to_string();
    let dir_arg = dir.path().to_str().unwrap();
    let args = [
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        &port_arg,
        "--directory",
        dir_arg,
    ];
    let Some(_server) = python_server(&args, port) else {
        return;
    };
    let gw = gateway_for(&format!("http://127.0.0.1:{port}"));
    let mut client = gw.client(Some("client-a"));

    // http.server answers HTTP/1.0 with Content-Length and closes after each answer.
    for round in 0..2 {
        let response = client.get(&format!("{API}/data.bin"));
        assert_eq!(response.status, 200, "round {round}: {}", response.text());
        assert_eq!(
            response.header("content-length"),
            Some("307200"),
            "{:?}",
            response.headers
        );
        assert!(
            response.body == data,
            "round {round}: the file was altered ({} bytes)",
            response.body.len()
        );
        // The backend's close is its own: a Content-Length answer keeps the client connection.
        assert!(!response.closes(), "{:?}", response.headers);
    }
}

/// An HTTP/1.0 server that answers `GET ...?bytes=N` with N bytes of `pattern` and no
/// Content-Length: the body ends when it closes.
const CLOSE_DELIMITED_SERVER: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        n = int(self.path.rsplit("bytes=", 1)[1])
        body = bytes(i % 251 for i in range(n))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        for i in range(0, n, 7000):
            self.wfile.write(body[i:i + 7000])
            self.wfile.flush()

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

#[test]
fn a_close_delimited_answer_arrives_whole_and_is_framed_or_closed() {
    let port = free_port();
    let port_arg = port.to_string();
    let Some(_server) = python_server(&["-c", CLOSE_DELIMITED_SERVER, &port_arg], port) else {
        return;
    };
    let gw = gateway_for(&format!("http://127.0.0.1:{port}"));
    let mut client = gw.client(Some("client-a"));

    let len = 250_000;
    let response = client.get(&format!("{API}/data?bytes={len}"));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("application/octet-stream")
    );
    assert!(
        response.body == pattern(len),
        "the close-delimited body was altered ({} of {len} bytes)",
        response.body.len()
    );
    // An HTTP/1.1 client must learn where the body ends: either the gateway re-frames it
    // (chunked) and the connection goes on, or it says `Connection: close` and closes.
    if response.chunked || response.header("content-length").is_some() {
        assert!(!response.closes(), "{:?}", response.headers);
        let again = client.get(&format!("{API}/data?bytes=10"));
        assert_eq!(again.body, pattern(10));
    } else {
        assert!(
            response.closes(),
            "a close-delimited answer without Connection: close: {:?}",
            response.headers
        );
        assert!(client.is_closed_by_peer());
    }
}

#[test]
fn a_chunked_answer_with_trailers_ends_where_it_ends() {
    let backend = ScriptedBackend::start(|head, _, _| {
        if head.target.ends_with("/trailers") {
            let answer = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
                          Transfer-Encoding: chunked\r\nTrailer: X-Checksum, X-Other\r\n\r\n\
                          5;name=value\r\nhello\r\n7\r\n, world\r\n\
                          0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n";
            (answer.as_bytes().to_vec(), false)
        } else {
            (answer_200(&head.target, ""), false)
        }
    });
    let gw = gateway_for(&backend.url);
    let mut client = gw.client(Some("client-a"));

    let response = client.get(&format!("{API}/trailers"));
    assert_eq!(response.status, 200);
    assert!(response.chunked, "{:?}", response.headers);
    assert_eq!(response.text(), "hello, world");
    // The trailer section was the end of that answer: the next one on the connection is whole,
    // and the backend connection was clean enough to be reused for it.
    let next = client.get(&format!("{API}/next"));
    assert_eq!((next.status, next.text().as_str()), (200, "/next"));
    assert_eq!(
        backend.seen(),
        [(1, "/trailers".to_owned()), (1, "/next".to_owned())]
    );
}

// ---------------------------------------------------------------------------------------------
// Interim answers
// ---------------------------------------------------------------------------------------------

#[test]
fn a_103_goes_to_http11_clients_and_not_to_http10_clients() {
    let backend = ScriptedBackend::start(|_, _, _| {
        let mut answer =
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n".to_vec();
        answer.extend_from_slice(&answer_200("early", ""));
        (answer, false)
    });
    let gw = gateway_for(&backend.url);

    let mut http11 = raw_tls(&gw, Some("client-a"));
    http11
        .write_all(get(&format!("{API}/page")).as_bytes())
        .unwrap();
    let mut raw = Vec::new();
    read_until(&mut http11, &mut raw, |buf| buf.ends_with(b"\r\n\r\nearly"));
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let interim = "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n";
    assert!(raw.starts_with(interim), "{raw:?}");
    let last = &raw[interim.len()..];
    assert!(last.starts_with("HTTP/1.1 200 OK\r\n"), "{raw:?}");
    assert_eq!(raw_header(last, "content-length"), Some("5"), "{raw:?}");
    assert!(!last.contains(" 103 "), "{raw:?}");

    let mut http10 = raw_tls(&gw, Some("client-a"));
    http10
        .write_all(format!("GET {API}/page HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let raw = String::from_utf8_lossy(&read_to_close(&mut http10)).into_owned();
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw:?}");
    assert!(
        !raw.contains("103") && !raw.contains("Link"),
        "an interim answer reached an HTTP/1.0 client: {raw:?}"
    );
    assert!(raw.ends_with("\r\n\r\nearly"), "{raw:?}");
}

// ---------------------------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------------------------

#[test]
fn a_chunked_request_with_extensions_and_trailers_reaches_the_backend_whole() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let mut client = gw.client(Some("client-a"));

    let data = pattern(70_000);
    let mut raw = format!(
        "POST {API}/upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\
         Trailer: X-Sum\r\n\r\n"
    )
    .into_bytes();
    for (i, piece) in data.chunks(30_000).enumerate() {
        let ext = match i {
            0 => ";a=1",
            1 => ";b=\"quoted;value\";c",
            _ => "",
        };
        raw.extend_from_slice(format!("{:X}{ext}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\nX-Sum: 70000\r\nX-More: yes\r\n\r\n");
    // A second request right behind the trailers: the body must end exactly there.
    raw.extend_from_slice(get(&format!("{API}/after")).as_bytes());
    client.send(&raw).unwrap();

    let echo = client.read_response(false).unwrap().echo();
    assert_eq!(echo.method, "POST");
    assert!(echo.body_chunked, "{:?}", echo.headers);
    assert_eq!(echo.body_len, data.len());
    assert_eq!(echo.body_sha256, sha256_hex(&data));
    let after = client.read_response(false).unwrap().echo();
    assert_eq!((after.path.as_str(), after.body_len), ("/after", 0));
    assert_eq!(backend.requests(), 2);
}

#[test]
fn a_bodiless_get_reaches_the_backend_without_body_or_framing() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let mut client = gw.client(Some("client-a"));
    let echo = client.get(&format!("{API}/menu")).echo();
    assert_eq!(echo.body_len, 0);
    assert!(!echo.body_chunked);
    for name in ["content-length", "transfer-encoding"] {
        assert!(
            !echo.has_header(name),
            "{name} on a GET: {:?}",
            echo.headers
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Expect: 100-continue
// ---------------------------------------------------------------------------------------------

#[test]
fn curl_gets_100_continue_only_when_allowed() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("note: curl is not installed; skipping");
        return;
    }
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let cacert = gw.server_pem_file();
    let body = pattern(1024 * 1024 + 300_000);
    let body_file = gw.db().dir().join("upload.bin");
    std::fs::write(&body_file, &body).unwrap();
    let port = gw.port();
    let url = format!("https://localhost:{port}{API}/upload");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let data = format!("@{}", body_file.display());
    // Runs curl -v and returns (status, body, verbose output).
    let curl = |cert: Option<&str>| {
        let mut command = Command::new("curl");
        command
            .args(["-v", "-sS", "--max-time", "30", "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(&cacert)
            .args(["--resolve", &resolve])
            .args(["-H", "Content-Type: application/octet-stream"])
            .args(["--data-binary", &data]);
        if let Some(name) = cert {
            command
                .arg("--cert")
                .arg(fixture(&format!("{name}.pem")))
                .arg("--key")
                .arg(fixture(&format!("{name}.key")));
        }
        let output = command.arg(&url).output().expect("run curl");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let verbose = String::from_utf8_lossy(&output.stderr).into_owned();
        let (body, status) = stdout
            .rsplit_once('\n')
            .unwrap_or_else(|| panic!("curl printed no status: {stdout}\n{verbose}"));
        (status.trim().to_owned(), body.to_owned(), verbose)
    };

    let (status, answer, verbose) = curl(Some("client-a"));
    assert!(
        verbose.contains("> Expect: 100-continue"),
        "curl sent no Expect:\n{verbose}"
    );
    assert!(
        verbose.contains("< HTTP/1.1 100 Continue"),
        "no 100 Continue for an allowed caller:\n{verbose}"
    );
    assert_eq!(status, "200", "{answer}\n{verbose}");
    let echo: serde_json::Value = serde_json::from_str(&answer).expect("the backend's echo");
    assert_eq!(echo["body_len"], body.len());
    assert_eq!(echo["body_sha256"], sha256_hex(&body));

    for (cert, code) in [
        (None, "client-certificate-required"),
        (Some("client-b"), "certificate-not-allowed"),
    ] {
        let (status, answer, verbose) = curl(cert);
        assert!(
            verbose.contains("> Expect: 100-continue"),
            "curl sent no Expect:\n{verbose}"
        );
        assert!(
            !verbose.contains("100 Continue"),
            "{cert:?}: 100 Continue before a refusal:\n{verbose}"
        );
        assert_eq!(status, "401", "{cert:?}: {answer}\n{verbose}");
        let problem: serde_json::Value = serde_json::from_str(&answer).expect("problem+json");
        assert_eq!(problem["code"], code, "{cert:?}");
    }
    assert_eq!(
        backend.requests(),
        1,
        "only the allowed upload is forwarded"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals and persistent connections
// ---------------------------------------------------------------------------------------------

#[test]
fn a_refusal_in_the_middle_of_an_upload_arrives_and_closes() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let mut client = gw.client(Some("client-b"));
    let mut raw =
        format!("POST {API}/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000000\r\n\r\n")
            .into_bytes();
    raw.extend_from_slice(&pattern(100_000));
    client.send(&raw).unwrap();

    let response = client.read_response(false).unwrap();
    response.assert_problem(401, "certificate-not-allowed");
    assert!(
        response.closes(),
        "the rest of the body is unread: the answer must close ({:?})",
        response.headers
    );
    assert!(client.is_closed_by_peer());
    assert_eq!(backend.requests(), 0);
}

#[test]
fn connection_close_from_the_client_ends_the_connection() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let mut client = gw.client(Some("client-a"));
    let response = client.request(
        format!("GET {API}/menu HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(response.echo().path, "/menu");
    assert!(response.closes(), "{:?}", response.headers);
    assert!(client.is_closed_by_peer());
}

#[test]
fn connection_close_from_the_backend_keeps_the_client_connection() {
    let backend = ScriptedBackend::start(|head, _, connection| {
        let body = format!("{} on connection {connection}", head.target);
        (answer_200(&body, "Connection: close\r\n"), true)
    });
    let gw = gateway_for(&backend.url);
    let mut client = gw.client(Some("client-a"));
    for (i, path) in ["/one", "/two", "/three"].into_iter().enumerate() {
        let response = client.get(&format!("{API}{path}"));
        assert_eq!(
            (response.status, response.text()),
            (200, format!("{path} on connection {}", i + 1)),
            "each request needs a fresh backend connection"
        );
        assert!(
            !response.closes(),
            "the backend's Connection: close reached the client: {:?}",
            response.headers
        );
    }
    assert_eq!(backend.connections(), 3);
}

#[test]
fn an_http10_client_gets_a_whole_unchunked_answer_and_a_close() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let mut client = gw.client(Some("client-a"));
    let response =
        client.request(format!("GET {API}/chunked?bytes=5000 HTTP/1.0\r\n\r\n").as_bytes());
    assert_eq!(response.status, 200);
    assert!(!response.chunked, "{:?}", response.headers);
    assert_eq!(response.body, pattern(5000));
    assert!(client.is_closed_by_peer(), "HTTP/1.0 without keep-alive");
}

#[test]
fn an_http10_client_never_gets_chunked_even_from_a_backend_that_chunks() {
    // The gateway asks in HTTP/1.0, but a backend may still answer chunked (RFC 9112 6.1 then
    // forbids passing it on: an HTTP/1.0 client cannot decode it).
    let backend = ScriptedBackend::start(|_, _, _| {
        let answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        (answer.as_bytes().to_vec(), false)
    });
    let gw = gateway_for(&backend.url);
    let mut tls = raw_tls(&gw, Some("client-a"));
    tls.write_all(format!("GET {API}/x HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let raw = String::from_utf8_lossy(&read_to_close(&mut tls)).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole head");
    assert!(head.starts_with("HTTP/1.1 200 "), "{raw:?}");
    assert_eq!(
        raw_header(head, "transfer-encoding"),
        None,
        "chunked to an HTTP/1.0 client: {raw:?}"
    );
    assert_eq!(body, "hello world", "{raw:?}");
}

#[test]
fn an_http10_keep_alive_client_is_told_keep_alive() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let mut client = gw.client(Some("client-a"));
    let keep_alive = |path: &str| {
        format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
    };

    // An HTTP/1.0 client keeps the connection only when the answer says `Connection:
    // keep-alive` (RFC 9112 9.3); a gateway that keeps it open without saying so leaves the
    // client to close it.
    let response = client.request(keep_alive(&format!("{API}/menu")).as_bytes());
    assert_eq!(response.echo().path, "/menu");
    assert!(!response.chunked);
    assert_eq!(
        response.header("content-length").map(str::parse::<usize>),
        Some(Ok(response.body.len()))
    );
    assert!(
        connection_has(&response, "keep-alive"),
        "answer to an HTTP/1.0 keep-alive request lacks Connection: keep-alive: {:?}",
        response.headers
    );

    // The same for the gateway's own answers, and the connection goes on.
    let response = client.request(keep_alive("/nowhere").as_bytes());
    response.assert_problem(404, "not-found");
    assert!(
        connection_has(&response, "keep-alive"),
        "the gateway's own answer to an HTTP/1.0 keep-alive request lacks Connection: \
         keep-alive: {:?}",
        response.headers
    );
    let response = client.request(keep_alive(&format!("{API}/again")).as_bytes());
    assert_eq!(response.echo().path, "/again");
}

// ---------------------------------------------------------------------------------------------
// Header rules
// ---------------------------------------------------------------------------------------------

#[test]
fn client_sent_identity_headers_are_removed_in_any_case_and_count() {
    let backend = Backend::start();
    let url = backend.url();
    let gw = Gateway::start(move |db| {
        db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &url);
        db.cli(&[
            "api",
            "resource",
            "add",
            "pizzashack",
            "--method",
            "GET",
            "--path",
            "/public",
            "--no-auth",
        ]);
        db.cert_add("pizzashack", "a-pizza", "client-a");
    });
    let raw = format!(
        "GET {API}/public HTTP/1.1\r\n\
         Host: localhost\r\n\
         x-forwarded-for: 6.6.6.6\r\n\
         X-FORWARDED-FOR: 7.7.7.7\r\n\
         X-Forwarded-Port: 1\r\n\
         X-Forwarded-Prefix: /evil\r\n\
         X-Forwarded-Host: evil.example\r\n\
         FORWARDED: for=6.6.6.6\r\n\
         x-real-ip: 6.6.6.6\r\n\
         x-request-id: chosen-by-client\r\n\
         client-cert: :Zm9yZ2Vk:\r\n\
         CLIENT-CERT-CHAIN: :Zm9yZ2Vk:\r\n\r\n"
    );
    // Anonymous, and with a certificate that is not registered: on a public resource both pass,
    // but neither presented a certificate that passed, so no Client-Cert reaches the backend.
    for cert in [None, Some("client-c")] {
        let echo = gw.client(cert).request(raw.as_bytes()).echo();
        assert_eq!(echo.path, "/public");
        assert_eq!(
            echo.header_values("x-forwarded-for"),
            ["127.0.0.1"],
            "{cert:?}"
        );
        assert_eq!(
            echo.header_values("x-forwarded-host"),
            ["localhost"],
            "{cert:?}"
        );
        for name in [
            "x-forwarded-port",
            "x-forwarded-prefix",
            "forwarded",
            "x-real-ip",
            "client-cert",
            "client-cert-chain",
        ] {
            assert!(
                !echo.has_header(name),
                "{cert:?}: the client's {name} reached the backend: {:?}",
                echo.headers
            );
        }
        let ids = echo.header_values("x-request-id");
        assert_eq!(ids.len(), 1, "{cert:?}: {ids:?}");
        assert_ne!(ids[0], "chosen-by-client");
    }
}

#[test]
fn backend_connection_options_and_keep_alive_stay_with_the_backend() {
    let backend = ScriptedBackend::start(|_, _, _| {
        let headers = "Connection: keep-alive, X-Backend-Hop, X-Other-Hop\r\n\
                       Connection: X-Second-Line\r\n\
                       Keep-Alive: timeout=77, max=5\r\n\
                       Proxy-Connection: keep-alive\r\n\
                       X-Backend-Hop: 1\r\nx-other-hop: 2\r\nX-Second-Line: 3\r\n\
                       X-Kept: yes\r\n";
        (answer_200("ok", headers), false)
    });
    let gw = gateway_for(&backend.url);
    let mut client = gw.client(Some("client-a"));
    let response = client.get(&format!("{API}/x"));
    assert_eq!((response.status, response.text().as_str()), (200, "ok"));
    for name in [
        "x-backend-hop",
        "x-other-hop",
        "x-second-line",
        "proxy-connection",
    ] {
        assert!(
            response.header(name).is_none(),
            "{name} reached the client: {:?}",
            response.headers
        );
    }
    assert!(
        !response
            .header_values("keep-alive")
            .iter()
            .any(|v| v.contains("77")),
        "the backend's Keep-Alive reached the client: {:?}",
        response.headers
    );
    for token in ["x-backend-hop", "x-other-hop", "x-second-line"] {
        assert!(!connection_has(&response, token), "{:?}", response.headers);
    }
    assert_eq!(response.header("x-kept"), Some("yes"));
    // Still one connection on both sides.
    assert_eq!(client.get(&format!("{API}/y")).text(), "ok");
    assert_eq!(backend.connections(), 1);
}
