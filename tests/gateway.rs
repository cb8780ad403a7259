//! The gateway core (issue 2) end to end: the real binary, a real TLS client with the fixtures'
//! client certificates, and a real HTTP/1.1 backend. SPEC sections 2, 3 and 4 are the contract.

mod common;

use std::collections::HashSet;
use std::net::TcpStream;
use std::process::Command;

use common::{
    base64, dead_backend_url, eventually, fixture, fixture_cert_der, get, pattern, request_chunked,
    request_with_body, sha256_hex, Backend, Gateway, HttpStream,
};

const MENU: &str = "/pizzashack/1.0.0/menu?x=1";

fn pizzashack(backend: &Backend) -> Gateway {
    Gateway::pizzashack(backend, &[])
}

// ---------------------------------------------------------------------------------------------
// The harness itself, without a gateway: a failure here is a harness bug, not a gateway bug.
// ---------------------------------------------------------------------------------------------

#[test]
fn harness_backend_speaks_keep_alive_http11() {
    let backend = Backend::start();
    let sock = TcpStream::connect(backend.addr()).unwrap();
    sock.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    let mut http = HttpStream::new(sock);
    use std::io::Write;

    http.inner
        .write_all(b"GET /menu?x=1 HTTP/1.1\r\nHost: b\r\nX-Thing: 1\r\n\r\n")
        .unwrap();
    let echo = http.read_response(false).unwrap().echo();
    assert_eq!(echo.path, "/menu?x=1");
    assert_eq!(echo.header("x-thing"), Some("1"));
    assert_eq!(echo.body_sha256, sha256_hex(b""));

    let body = pattern(70_000);
    http.inner
        .write_all(&request_chunked("POST", "/up", &body, 7000))
        .unwrap();
    let echo = http.read_response(false).unwrap().echo();
    assert!(echo.body_chunked);
    assert_eq!(
        (echo.body_len, echo.body_sha256),
        (body.len(), sha256_hex(&body))
    );

    http.inner
        .write_all(get("/v2/chunked?bytes=50000").as_bytes())
        .unwrap();
    let response = http.read_response(false).unwrap();
    assert!(response.chunked);
    assert_eq!(response.body, pattern(50_000));

    http.inner
        .write_all(b"HEAD /big?bytes=10 HTTP/1.1\r\nHost: b\r\n\r\n")
        .unwrap();
    let response = http.read_response(true).unwrap();
    assert_eq!(response.header("content-length"), Some("10"));
    assert!(response.body.is_empty());

    http.inner
        .write_all(get("/big?bytes=10").as_bytes())
        .unwrap();
    assert_eq!(http.read_response(false).unwrap().body, pattern(10));
    assert_eq!(backend.connections(), 1);
    assert_eq!(backend.requests(), 5);
}

#[test]
fn harness_base64_matches_rfc_4648_vectors() {
    let cases = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];
    for (input, expected) in cases {
        assert_eq!(base64(input.as_bytes()), expected);
    }
}

// ---------------------------------------------------------------------------------------------
// Routing (SPEC 3, "Routing")
// ---------------------------------------------------------------------------------------------

#[test]
fn allowed_certificate_reaches_backend_with_base_path_stripped() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));

    let echo = client.get(MENU).echo();
    assert_eq!(echo.method, "GET");
    assert_eq!(echo.path, "/menu?x=1");

    assert_eq!(client.get("/pizzashack/1.0.0/a/b/c").echo().path, "/a/b/c");
    // The base path itself: the rest is empty, and a request target is never empty.
    assert_eq!(client.get("/pizzashack/1.0.0").echo().path, "/");
    assert_eq!(client.get("/pizzashack/1.0.0?x=1").echo().path, "/?x=1");
    assert_eq!(client.get("/pizzashack/1.0.0/").echo().path, "/");
}

#[test]
fn backend_url_path_is_prefixed() {
    let backend = Backend::start();
    let gw = Gateway::start(|db| {
        db.api_add(
            "prefixed",
            "/pizzashack",
            Some("1.0.0"),
            &format!("{}/v2", backend.url()),
        );
        db.cert_add("prefixed", "a-prefixed", "client-a");
    });
    let mut client = gw.client(Some("client-a"));
    assert_eq!(client.get(MENU).echo().path, "/v2/menu?x=1");
    assert_eq!(client.get("/pizzashack/1.0.0/a/b").echo().path, "/v2/a/b");
    assert_eq!(client.get("/pizzashack/1.0.0?q=2").echo().path, "/v2?q=2");
}

#[test]
fn longest_base_path_wins_at_a_segment_boundary() {
    let backend = Backend::start();
    let gw = Gateway::start(|db| {
        let url = backend.url();
        db.api_add("root", "/pizzashack", None, &format!("{url}/root"));
        db.api_add("v1", "/pizzashack", Some("1.0.0"), &format!("{url}/v1"));
        db.cert_add("root", "a-root", "client-a");
        db.cert_add("v1", "a-v1", "client-a");
    });
    let mut client = gw.client(Some("client-a"));
    assert_eq!(client.get("/pizzashack/1.0.0/menu").echo().path, "/v1/menu");
    assert_eq!(
        client.get("/pizzashack/2.0.0/menu").echo().path,
        "/root/2.0.0/menu"
    );
    // `1.0.0x` is not the segment `1.0.0`.
    assert_eq!(
        client.get("/pizzashack/1.0.0x/menu").echo().path,
        "/root/1.0.0x/menu"
    );
    client
        .get("/pizzashackx/menu")
        .assert_problem(404, "not-found");
}

#[test]
fn unknown_path_is_404_even_without_a_certificate() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));
    client.get("/nothing/here").assert_problem(404, "not-found");
    client.get("/").assert_problem(404, "not-found");
    client
        .get("/pizzashack/2.0.0/menu")
        .assert_problem(404, "not-found");
    // Security is decided after routing: no API, nothing to authenticate against.
    let mut anonymous = gw.client(None);
    anonymous
        .get("/nothing/here")
        .assert_problem(404, "not-found");
    assert_eq!(backend.requests(), 0, "refusals must not reach the backend");
}

#[test]
fn resources_restrict_methods_and_paths() {
    let backend = Backend::start();
    let gw = Gateway::start(|db| {
        db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &backend.url());
        db.resource_add("pizzashack", "GET", "/menu");
        db.resource_add("pizzashack", "POST", "/order/{id}");
        db.cert_add("pizzashack", "a-pizza", "client-a");
    });
    let mut client = gw.client(Some("client-a"));

    assert_eq!(client.get(MENU).echo().path, "/menu?x=1");
    let echo = client
        .request(&request_with_body(
            "POST",
            "/pizzashack/1.0.0/order/7",
            b"{}",
        ))
        .echo();
    assert_eq!(
        (echo.method.as_str(), echo.path.as_str()),
        ("POST", "/order/7")
    );

    for raw in [
        "DELETE /pizzashack/1.0.0/order/7 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET /pizzashack/1.0.0/order/7 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ] {
        let response = client.request(raw.as_bytes());
        response.assert_problem(405, "method-not-allowed");
        let allow = response.header_values("allow").join(",");
        assert!(
            allow.split(',').any(|m| m.trim() == "POST"),
            "Allow {allow:?} lacks POST"
        );
        assert!(
            !allow.split(',').any(|m| m.trim() == "DELETE"),
            "Allow {allow:?} offers DELETE"
        );
    }

    client
        .get("/pizzashack/1.0.0/unknown")
        .assert_problem(404, "not-found");
    client
        .get("/pizzashack/1.0.0/menu/extra")
        .assert_problem(404, "not-found");
    client
        .get("/pizzashack/1.0.0/order")
        .assert_problem(404, "not-found");
    assert_eq!(backend.requests(), 2, "only the two allowed requests pass");
}

// ---------------------------------------------------------------------------------------------
// Client certificates (SPEC 3, "Security"; SPEC 4)
// ---------------------------------------------------------------------------------------------

#[test]
fn no_client_certificate_is_401_client_certificate_required() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(None);
    client
        .get(MENU)
        .assert_problem(401, "client-certificate-required");
    assert_eq!(backend.requests(), 0);
}

#[test]
fn unregistered_certificate_is_401_certificate_not_allowed() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    // client-c is RSA: the handshake must work for RSA client keys too.
    let mut client = gw.client(Some("client-c"));
    client
        .get(MENU)
        .assert_problem(401, "certificate-not-allowed");
    assert_eq!(backend.requests(), 0);
}

#[test]
fn certificate_of_another_api_is_401_certificate_not_allowed() {
    let backend = Backend::start();
    let gw = Gateway::start(|db| {
        db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &backend.url());
        db.api_add("weather", "/weather", Some("1.0"), &backend.url());
        db.cert_add("pizzashack", "a-pizza", "client-a");
        db.cert_add("weather", "b-weather", "client-b");
    });

    let mut b = gw.client(Some("client-b"));
    b.get(MENU).assert_problem(401, "certificate-not-allowed");
    assert_eq!(b.get("/weather/1.0/now").echo().path, "/now");

    let mut a = gw.client(Some("client-a"));
    a.get("/weather/1.0/now")
        .assert_problem(401, "certificate-not-allowed");
    assert_eq!(a.get(MENU).echo().path, "/menu?x=1");
    assert_eq!(backend.requests(), 2);
}

#[test]
fn certificate_added_and_removed_while_serving_takes_effect() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);

    // Opened before the change, and refused once.
    let mut before = gw.client(Some("client-c"));
    let first = before.get(MENU);
    first.assert_problem(401, "certificate-not-allowed");

    gw.db().cert_add("pizzashack", "c-pizza", "client-c");
    eventually(
        "a new client-c connection is allowed after `cert add`",
        || {
            let mut client = gw.try_client(Some("client-c")).ok()?;
            let response = client.try_get(MENU).ok()?;
            (response.status == 200).then_some(())
        },
    );
    // The snapshot is current now, so a connection opened (and refused) before the change is
    // judged afresh: a verdict cached without the snapshot generation would still say 401.
    if first.closes() {
        eprintln!("note: the gateway closed the connection after its 401; skipped reusing it");
    } else {
        assert_eq!(before.get(MENU).echo().path, "/menu?x=1");
    }

    let mut kept = gw.client(Some("client-c"));
    assert_eq!(kept.get(MENU).echo().path, "/menu?x=1");

    gw.db().cert_remove("c-pizza");
    eventually(
        "the kept-open client-c connection is refused after `cert remove`",
        || {
            let response = kept
                .try_get(MENU)
                .unwrap_or_else(|e| panic!("the kept-open connection broke: {e}"));
            match response.status {
                200 => None,
                _ => Some(response.assert_problem(401, "certificate-not-allowed")),
            }
        },
    );
    gw.client(Some("client-c"))
        .get(MENU)
        .assert_problem(401, "certificate-not-allowed");
    // client-a was never touched.
    assert_eq!(gw.client(Some("client-a")).get(MENU).status, 200);
}

// ---------------------------------------------------------------------------------------------
// Forwarding (SPEC 3, "Forwarding")
// ---------------------------------------------------------------------------------------------

#[test]
fn forwarding_headers_are_set() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));
    let client_host = format!("localhost:{}", gw.port());
    let raw = format!("GET {MENU} HTTP/1.1\r\nHost: {client_host}\r\nAccept: */*\r\n\r\n");

    let echo = client.request(raw.as_bytes()).echo();
    assert_eq!(echo.header_values("host"), [backend.host().as_str()]);
    assert_eq!(echo.header_values("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(echo.header_values("x-forwarded-proto"), ["https"]);
    assert_eq!(
        echo.header_values("x-forwarded-host"),
        [client_host.as_str()]
    );
    assert_eq!(
        echo.header_values("accept"),
        ["*/*"],
        "end-to-end headers pass"
    );
    let ids = echo.header_values("x-request-id");
    assert_eq!(ids.len(), 1, "exactly one X-Request-Id: {ids:?}");
    assert!(!ids[0].trim().is_empty());

    let again = client.request(raw.as_bytes()).echo();
    assert_ne!(
        again.header("x-request-id"),
        echo.header("x-request-id"),
        "each request gets a fresh id"
    );
}

#[test]
fn hop_by_hop_headers_are_not_forwarded() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));
    let raw = format!(
        "GET {MENU} HTTP/1.1\r\n\
         Host: localhost\r\n\
         Connection: keep-alive, X-Foo, TE\r\n\
         X-Foo: bar\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Upgrade: example/1\r\n\
         Proxy-Connection: keep-alive\r\n\
         X-End-To-End: yes\r\n\r\n"
    );

    let echo = client.request(raw.as_bytes()).echo();
    for name in ["x-foo", "keep-alive", "te", "upgrade", "proxy-connection"] {
        assert!(
            !echo.has_header(name),
            "hop-by-hop {name} reached the backend: {:?}",
            echo.headers
        );
    }
    let connection = echo.header_values("connection").join(",").to_lowercase();
    assert!(
        !connection
            .split(',')
            .any(|t| ["x-foo", "te"].contains(&t.trim())),
        "the client's Connection options reached the backend: {connection:?}"
    );
    assert_eq!(echo.header("x-end-to-end"), Some("yes"));

    // And on the way back: the backend's hop-by-hop headers stay with the backend.
    let response = client.get("/pizzashack/1.0.0/hop");
    assert_eq!(response.status, 200);
    for name in ["x-hop", "proxy-connection", "upgrade"] {
        assert!(
            response.header(name).is_none(),
            "hop-by-hop {name} reached the client: {:?}",
            response.headers
        );
    }
    // The gateway may send its own Keep-Alive and Connection, but not the backend's.
    assert_ne!(response.header("keep-alive"), Some("timeout=5"));
    let connection = response
        .header_values("connection")
        .join(",")
        .to_lowercase();
    assert!(
        !connection.split(',').any(|t| t.trim() == "x-hop"),
        "the backend's Connection options reached the client: {connection:?}"
    );
    assert_eq!(response.header("x-end-to-end"), Some("kept"));
    assert_eq!(response.header("content-type"), Some("application/json"));
}

#[test]
fn client_sent_forwarding_headers_are_replaced() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));
    let raw = format!(
        "GET {MENU} HTTP/1.1\r\n\
         Host: localhost\r\n\
         X-Forwarded-For: 6.6.6.6\r\n\
         X-Forwarded-Host: evil.example\r\n\
         X-Forwarded-Proto: http\r\n\
         X-Forwarded-Port: 1\r\n\
         X-Forwarded-Client-Cert: forged\r\n\
         Forwarded: for=6.6.6.6;proto=http\r\n\
         X-Real-IP: 6.6.6.6\r\n\
         X-Request-Id: chosen-by-client\r\n\
         Client-Cert: :Zm9yZ2Vk:\r\n\
         Client-Cert-Chain: :Zm9yZ2Vk:\r\n\r\n"
    );

    let echo = client.request(raw.as_bytes()).echo();
    assert_eq!(echo.header_values("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(echo.header_values("x-forwarded-host"), ["localhost"]);
    assert_eq!(echo.header_values("x-forwarded-proto"), ["https"]);
    assert!(!echo.header_values("x-forwarded-port").contains(&"1"));
    assert!(!echo.has_header("x-forwarded-client-cert"));
    assert!(!echo.has_header("forwarded"));
    assert!(!echo.has_header("x-real-ip"));
    let ids = echo.header_values("x-request-id");
    assert_eq!(ids.len(), 1, "X-Request-Id: {ids:?}");
    assert_ne!(ids[0], "chosen-by-client");
    for name in ["client-cert", "client-cert-chain"] {
        assert!(
            !echo.header_values(name).contains(&":Zm9yZ2Vk:"),
            "the client's own {name} reached the backend"
        );
    }
}

#[test]
fn client_cert_header_carries_the_presented_certificate() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let echo = gw.client(Some("client-a")).get(MENU).echo();
    let expected = format!(":{}:", base64(fixture_cert_der("client-a").as_ref()));
    assert_eq!(echo.header_values("client-cert"), [expected.as_str()]);
    assert!(
        !echo.has_header("client-cert-chain"),
        "client-a sends no chain"
    );
}

#[test]
fn large_request_bodies_stream_through() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));

    let body = pattern(3 * 1024 * 1024);
    let echo = client
        .request(&request_with_body(
            "POST",
            "/pizzashack/1.0.0/upload",
            &body,
        ))
        .echo();
    assert_eq!(echo.path, "/upload");
    assert_eq!(echo.body_len, body.len());
    assert_eq!(echo.body_sha256, sha256_hex(&body));

    let body = pattern(1024 * 1024 + 17);
    let echo = client
        .request(&request_chunked(
            "PUT",
            "/pizzashack/1.0.0/upload",
            &body,
            10_000,
        ))
        .echo();
    assert_eq!(echo.method, "PUT");
    assert_eq!(echo.body_len, body.len());
    assert_eq!(echo.body_sha256, sha256_hex(&body));
}

#[test]
fn large_response_bodies_stream_through() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));

    let len = 3 * 1024 * 1024;
    let response = client.get(&format!("/pizzashack/1.0.0/big?bytes={len}"));
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-length"), Some("3145728"));
    assert_eq!(response.body.len(), len);
    assert!(response.body == pattern(len), "the 3 MB body was altered");

    // Still in step on the same connection.
    assert_eq!(client.get(MENU).echo().path, "/menu?x=1");
}

#[test]
fn chunked_response_passes_through_intact() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));

    let response = client.get("/pizzashack/1.0.0/chunked?bytes=300000");
    assert_eq!(response.status, 200);
    assert_eq!(response.body.len(), 300_000);
    assert!(
        response.body == pattern(300_000),
        "the chunked body was altered"
    );
    // The framing ended where it should: the next response on this connection is whole.
    assert_eq!(client.get(MENU).echo().path, "/menu?x=1");
}

#[test]
fn head_204_and_304_responses_have_no_body() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));

    let response = client
        .request(b"HEAD /pizzashack/1.0.0/big?bytes=1000 HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-length"), Some("1000"));
    assert_eq!(client.get(MENU).echo().path, "/menu?x=1");

    assert_eq!(client.get("/pizzashack/1.0.0/status/204").status, 204);
    assert_eq!(client.get(MENU).echo().path, "/menu?x=1");

    assert_eq!(client.get("/pizzashack/1.0.0/status/304").status, 304);
    assert_eq!(client.get(MENU).echo().path, "/menu?x=1");

    // A backend error status is the backend's answer, passed on, not a gateway problem.
    let response = client.get("/pizzashack/1.0.0/status/503");
    assert_eq!(response.status, 503);
    assert_eq!(response.json()["path"], "/status/503");
}

#[test]
fn two_hundred_requests_on_one_connection() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));
    for i in 0..200 {
        let echo = client.get(&format!("/pizzashack/1.0.0/menu?i={i}")).echo();
        assert_eq!(echo.path, format!("/menu?i={i}"));
    }
    assert_eq!(backend.requests(), 200);
}

#[test]
fn backend_connections_are_reused() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));
    let mut used = HashSet::new();
    for _ in 0..50 {
        used.insert(client.get(MENU).echo().connection);
    }
    assert!(
        backend.connections() <= 5,
        "50 sequential requests opened {} backend connections",
        backend.connections()
    );
    assert_eq!(used.len(), backend.connections());
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));
    let mut raw = Vec::new();
    for i in 1..=3 {
        raw.extend_from_slice(get(&format!("/pizzashack/1.0.0/menu?n={i}")).as_bytes());
    }
    raw.extend_from_slice(&request_with_body(
        "POST",
        "/pizzashack/1.0.0/menu?n=4",
        b"four",
    ));
    raw.extend_from_slice(get("/nothing/here").as_bytes());
    client.send(&raw).unwrap();
    for i in 1..=4 {
        let echo = client.read_response(false).unwrap().echo();
        assert_eq!(echo.path, format!("/menu?n={i}"));
    }
    client
        .read_response(false)
        .unwrap()
        .assert_problem(404, "not-found");
    assert_eq!(backend.requests(), 4);
}

#[test]
fn expect_100_continue_is_answered_only_once_allowed() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let head = "POST /pizzashack/1.0.0/order HTTP/1.1\r\nHost: localhost\r\n\
                Content-Length: 5\r\nExpect: 100-continue\r\n\r\n";

    let mut allowed = gw.client(Some("client-a"));
    allowed.send(head.as_bytes()).unwrap();
    let interim = allowed.read_response(false).unwrap();
    assert_eq!(interim.status, 100, "expected 100 Continue first");
    allowed.send(b"hello").unwrap();
    let mut response = allowed.read_response(false).unwrap();
    while response.status == 100 {
        response = allowed.read_response(false).unwrap();
    }
    let echo = response.echo();
    assert_eq!(echo.body_sha256, sha256_hex(b"hello"));

    let mut anonymous = gw.client(None);
    anonymous.send(head.as_bytes()).unwrap();
    anonymous
        .read_response(false)
        .unwrap()
        .assert_problem(401, "client-certificate-required");
}

// ---------------------------------------------------------------------------------------------
// Failures (SPEC 4)
// ---------------------------------------------------------------------------------------------

#[test]
fn backend_down_is_502_and_the_gateway_keeps_serving() {
    let backend = Backend::start();
    let dead = dead_backend_url();
    let mut gw = Gateway::start(|db| {
        db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &backend.url());
        db.api_add("dead", "/dead", Some("1.0"), &dead);
        db.cert_add("pizzashack", "a-pizza", "client-a");
        db.cert_add("dead", "a-dead", "client-a");
    });

    let mut client = gw.client(Some("client-a"));
    let response = client.get("/dead/1.0/menu");
    response.assert_problem(502, "backend-unavailable");
    if !response.closes() {
        assert_eq!(client.get(MENU).echo().path, "/menu?x=1");
        client
            .get("/dead/1.0/again")
            .assert_problem(502, "backend-unavailable");
    }
    assert_eq!(
        gw.client(Some("client-a")).get(MENU).echo().path,
        "/menu?x=1"
    );
    gw.assert_running();
}

#[test]
fn malformed_requests_get_400_and_others_are_still_served() {
    let backend = Backend::start();
    let mut gw = pizzashack(&backend);
    let malformed: [&[u8]; 5] = [
        b"GARBAGE\r\n\r\n",
        b"GET /pizzashack/1.0.0/menu HTTP/1.1\r\nHost: localhost\r\nBad Header Line\r\n\r\n",
        b"GET /pizzashack/1.0.0/menu HTTP/1.1\r\nHost: localhost\r\nX\0: y\r\n\r\n",
        // Request smuggling shapes: conflicting framing must not reach the backend.
        b"POST /pizzashack/1.0.0/menu HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /pizzashack/1.0.0/menu HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\
          Content-Length: 6\r\n\r\nhello!",
    ];
    // Every shape is tried before judging, so that one run reports all that fail.
    let mut failures = Vec::new();
    for raw in malformed {
        let shown = String::from_utf8_lossy(raw).into_owned();
        let mut client = gw.client(Some("client-a"));
        match client.try_request(raw) {
            Ok(response) if response.status == 400 => {
                response.assert_problem(400, "bad-request");
            }
            Ok(response) => failures.push(format!(
                "{shown:?}: {} {}\n{}",
                response.status,
                response.reason,
                response.text()
            )),
            Err(e) => failures.push(format!("{shown:?}: no answer: {e}")),
        }
        assert_eq!(
            gw.client(Some("client-a")).get(MENU).echo().path,
            "/menu?x=1",
            "after {shown:?}"
        );
    }
    gw.assert_running();
    assert!(
        failures.is_empty(),
        "malformed requests without a 400:\n{}",
        failures.join("\n")
    );
    assert_eq!(
        backend.requests(),
        malformed.len(),
        "only the good requests"
    );
}

#[test]
fn refusing_a_request_with_a_body_still_delivers_the_answer() {
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let post = request_with_body("POST", "/pizzashack/1.0.0/order", b"{\"pizza\":1}");

    let mut anonymous = gw.client(None);
    anonymous
        .request(&post)
        .assert_problem(401, "client-certificate-required");

    let mut unknown = gw.client(Some("client-c"));
    unknown
        .request(&post)
        .assert_problem(401, "certificate-not-allowed");

    let mut client = gw.client(Some("client-a"));
    client
        .request(&request_with_body("POST", "/nothing/here", b"x"))
        .assert_problem(404, "not-found");
    assert_eq!(backend.requests(), 0);
}

// ---------------------------------------------------------------------------------------------
// A real third-party client
// ---------------------------------------------------------------------------------------------

#[test]
fn curl_with_and_without_a_client_certificate() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("note: curl is not installed; skipping");
        return;
    }
    let backend = Backend::start();
    let gw = pizzashack(&backend);
    let cacert = gw.server_pem_file();
    let port = gw.port();
    let url = format!("https://localhost:{port}{MENU}");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let curl = |extra: &[&str]| {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(&cacert)
            .args(["--resolve", &resolve])
            .args(extra)
            .arg(&url)
            .output()
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "curl {extra:?} failed: {}\n{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (body, status) = stdout.rsplit_once('\n').expect("curl printed a status");
        (status.trim().to_owned(), body.to_owned())
    };

    let (cert, key) = (fixture("client-a.pem"), fixture("client-a.key"));
    let (status, body) = curl(&[
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(status, "200", "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("JSON from the backend");
    assert_eq!(echo["path"], "/menu?x=1");

    let (status, body) = curl(&[]);
    assert_eq!(status, "401", "{body}");
    let problem: serde_json::Value = serde_json::from_str(&body).expect("problem+json");
    assert_eq!(problem["code"], "client-certificate-required");

    // Also by IP address: the server certificate names 127.0.0.1 too.
    let output = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(&cacert)
        .args([
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ])
        .arg(format!("https://127.0.0.1:{port}{MENU}"))
        .output()
        .expect("run curl");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "200",
        "curl by IP: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
