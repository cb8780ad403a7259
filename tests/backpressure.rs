//! Flow control (SPEC 3, Forwarding; SPEC 6): a side that takes its bytes slowly stops the
//! gateway reading from the other side, so that the gateway's memory stays bounded by its
//! 64 KiB buffers however large the body. Each test streams hundreds of megabytes through a
//! slow reader and checks the gateway's peak resident memory (VmHWM).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::{Backend, Gateway, IO_TIMEOUT};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

/// The gateway's peak resident set may not exceed this (idle it is about 5 MiB).
const MEMORY_BOUND_KIB: u64 = 40 * 1024;

/// The tests stream hundreds of megabytes each: one at a time, so that they do not compete for
/// the CPU and each one's timing means something.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection to the gateway presenting client-a, handshake done.
fn connect(gw: &Gateway) -> TlsStream {
    let sock = TcpStream::connect(gw.addr()).unwrap();
    sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(gw.client_config(Some("client-a")), name).unwrap();
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

/// Reads a message head (up to the blank line) from `stream`; what came after it is returned
/// too. Returns the status code (responses) or method (requests) and the headers.
fn read_head(stream: &mut impl Read, response: bool) -> (String, Vec<(String, String)>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).expect("reading a message head");
        assert!(n > 0, "closed before a whole message head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let parsed = if response {
            let mut r = httparse::Response::new(&mut slots);
            match r.parse(&buf).unwrap() {
                httparse::Status::Complete(len) => {
                    Some((r.code.unwrap().to_string(), owned(r.headers), len))
                }
                httparse::Status::Partial => None,
            }
        } else {
            let mut r = httparse::Request::new(&mut slots);
            match r.parse(&buf).unwrap() {
                httparse::Status::Complete(len) => {
                    Some((r.method.unwrap().to_owned(), owned(r.headers), len))
                }
                httparse::Status::Partial => None,
            }
        };
        if let Some((first, headers, len)) = parsed {
            return (first, headers, buf.split_off(len));
        }
        assert!(buf.len() < 64 * 1024, "message head too large");
    }
}

fn owned(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

fn content_length(headers: &[(String, String)]) -> usize {
    headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map(|(_, value)| value.trim().parse().unwrap())
        .expect("a Content-Length header")
}

/// Bytes `offset..offset + out.len()` of [`common::pattern`], without building all of it.
fn pattern_at(offset: usize, out: &mut [u8]) {
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = ((offset + i) % 251) as u8;
    }
}

/// Checks that `data` is [`common::pattern`] from `offset` on.
fn assert_pattern_at(offset: usize, data: &[u8]) {
    let mut expected = vec![0u8; data.len()];
    pattern_at(offset, &mut expected);
    if data != expected.as_slice() {
        let at = data
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!(
            "the body differs from the pattern at byte {} ({} instead of {})",
            offset + at,
            data[at],
            expected[at]
        );
    }
}

#[test]
fn a_slow_client_download_keeps_the_gateway_memory_bounded() {
    const SIZE: usize = 200_000_000;
    const PIECE: usize = 64 * 1024;
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let pid = gw.pid();
    let idle = common::proc_status_kib(pid, "VmHWM");
    let started = Instant::now();

    let mut stream = connect(&gw);
    let request =
        format!("GET /pizzashack/1.0.0/big?bytes={SIZE} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.flush().unwrap();
    let (status, headers, mut body) = read_head(&mut stream, true);
    assert_eq!(status, "200", "{headers:?}");
    assert_eq!(content_length(&headers), SIZE);
    // The answer is flowing; nothing more is read for a second, so the backend's, the
    // gateway's and the kernel's buffers fill.
    thread::sleep(Duration::from_secs(1));
    let stalled = common::proc_status_kib(pid, "VmHWM");
    assert_pattern_at(0, &body);
    let mut received = body.len();
    body.clear();
    let mut piece = vec![0u8; PIECE];
    let mut pieces = 0usize;
    while received < SIZE {
        // One 64 KiB piece (or what is left), read in as many calls as it takes.
        let want = PIECE.min(SIZE - received);
        let mut got = 0;
        while got < want {
            let n = stream
                .read(&mut piece[got..want])
                .unwrap_or_else(|e| panic!("reading the body at byte {}: {e}", received + got));
            assert!(n > 0, "the body ended at byte {} of {SIZE}", received + got);
            got += n;
        }
        assert_pattern_at(received, &piece[..want]);
        received += want;
        pieces += 1;
        // A slow reader: a pause after every 16th piece (1 MiB).
        if pieces % 16 == 0 {
            thread::sleep(Duration::from_millis(20));
        }
    }
    let elapsed = started.elapsed();
    let peak = common::proc_status_kib(pid, "VmHWM");
    eprintln!(
        "download of {SIZE} bytes took {elapsed:?}; gateway VmHWM idle {idle} KiB, after the \
         stall {stalled} KiB, at the end {peak} KiB (VmRSS {} KiB)",
        common::proc_status_kib(pid, "VmRSS")
    );
    assert!(
        peak <= MEMORY_BOUND_KIB,
        "the gateway's peak resident memory was {peak} KiB, above {MEMORY_BOUND_KIB} KiB"
    );

    // The connection is still good for another request.
    let request = "GET /pizzashack/1.0.0/big?bytes=10 HTTP/1.1\r\nHost: localhost\r\n\r\n";
    stream.write_all(request.as_bytes()).unwrap();
    let (status, headers, rest) = read_head(&mut stream, true);
    assert_eq!((status.as_str(), content_length(&headers)), ("200", 10));
    assert!(rest.len() <= 10);
}

#[test]
fn a_slow_backend_upload_keeps_the_gateway_memory_bounded() {
    const SIZE: usize = 100_000_000;
    const PIECE: usize = 64 * 1024;
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());

    // Reads the head, waits a second (every buffer on the way fills), then reads the body in
    // 64 KiB pieces with pauses, and answers with the byte count and the body's SHA-256.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let backend = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let (method, headers, early) = read_head(&mut stream, false);
        assert_eq!(method, "POST");
        let length = content_length(&headers);
        thread::sleep(Duration::from_secs(1));
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        digest.update(&early);
        let mut count = early.len();
        let mut piece = vec![0u8; PIECE];
        let mut pieces = 0usize;
        while count < length {
            let want = PIECE.min(length - count);
            let n = stream.read(&mut piece[..want]).unwrap();
            if n == 0 {
                break;
            }
            digest.update(&piece[..n]);
            count += n;
            pieces += 1;
            // A slow reader: a pause after every 32nd read.
            if pieces % 32 == 0 {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let text = format!("{count} {}", common::hex(digest.finish().as_ref()));
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        stream.write_all(answer.as_bytes()).unwrap();
        count
    });

    let db = common::Db::init();
    db.api_add("p", "/p", None, &url);
    db.cert_add("p", "a", "client-a");
    let gw = db.serve_with(&["--max-body", "300000000"]);
    let pid = gw.pid();
    let idle = common::proc_status_kib(pid, "VmHWM");
    let started = Instant::now();

    let mut stream = connect(&gw);
    let head = format!(
        "POST /p/upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {SIZE}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut piece = vec![0u8; PIECE];
    let mut sent = 0;
    while sent < SIZE {
        let n = PIECE.min(SIZE - sent);
        pattern_at(sent, &mut piece[..n]);
        digest.update(&piece[..n]);
        stream
            .write_all(&piece[..n])
            .unwrap_or_else(|e| panic!("sending the body at byte {sent}: {e}"));
        sent += n;
    }
    stream.flush().unwrap();
    let expected = format!("{SIZE} {}", common::hex(digest.finish().as_ref()));

    let (status, headers, mut body) = read_head(&mut stream, true);
    let length = content_length(&headers);
    while body.len() < length {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the answer ended early");
        body.extend_from_slice(&chunk[..n]);
    }
    let elapsed = started.elapsed();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!((status.as_str(), body.as_str()), ("200", expected.as_str()));
    assert_eq!(backend.join().unwrap(), SIZE);

    let peak = common::proc_status_kib(pid, "VmHWM");
    eprintln!(
        "upload of {SIZE} bytes took {elapsed:?}; gateway VmHWM idle {idle} KiB, at the end \
         {peak} KiB (VmRSS {} KiB)",
        common::proc_status_kib(pid, "VmRSS")
    );
    assert!(
        peak <= MEMORY_BOUND_KIB,
        "the gateway's peak resident memory was {peak} KiB, above {MEMORY_BOUND_KIB} KiB"
    );
}
