//! The gateway's life while it serves: signals (SIGTERM/SIGINT drain and exit 0, SIGHUP
//! reloads), configuration changes that reach a running gateway without dropping connections,
//! `--require-client-cert`, a new server certificate, refused commands, and many clients at once.
//! SPEC sections 2, 3, 5 and 7 are the contract. No test asserts a timing: effects are polled
//! for with generous deadlines.

mod common;

use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::{
    client_config_with_roots, eventually, fixture, get, roots_from_pem, Backend, Client, Gateway,
    Response,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

const MENU: &str = "/pizzashack/1.0.0/menu";
const RELOADED: &str = "configuration reloaded";
/// Longer than any wait below: a gateway that waits for the drain deadline instead of exiting
/// once drained fails the test instead of passing slowly.
const DRAIN_TIMEOUT: &str = "60";
/// How long a gateway may take to exit once nothing is in flight (well below [`DRAIN_TIMEOUT`]).
const EXIT_LIMIT: Duration = Duration::from_secs(20);

fn pizzashack_with(backend: &Backend, extra: &[&str]) -> Gateway {
    Gateway::pizzashack(backend, extra)
}

fn pizzashack(backend: &Backend) -> Gateway {
    Gateway::pizzashack(backend, &[])
}

/// Polls until a plain TCP connect to the gateway's port is refused.
fn wait_until_connect_refused(gw: &Gateway) {
    eventually(
        "new connections to the gateway are refused",
        || match TcpStream::connect_timeout(&gw.addr(), Duration::from_secs(2)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        },
    );
}

/// Asserts a CLI outcome: failed, with exactly one stderr line, starting `error:` (SPEC 2).
fn assert_refused(output: &std::process::Output, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "{what} succeeded, but must be refused; stdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error:"),
        "{what}: stderr must be one `error:` line, got {stderr:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Signals (SPEC 7)
// ---------------------------------------------------------------------------------------------

#[test]
fn harness_backend_slow_path_answers_late() {
    let backend = Backend::start();
    let sock = TcpStream::connect(backend.addr()).unwrap();
    sock.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    let mut http = common::HttpStream::new(sock);
    use std::io::Write;
    http.inner
        .write_all(get("/x/slow?ms=300").as_bytes())
        .unwrap();
    let started = std::time::Instant::now();
    let echo = http.read_response(false).unwrap().echo();
    assert_eq!(echo.path, "/x/slow?ms=300");
    // A lower bound only: the backend must not answer before it was asked to.
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[test]
fn sigterm_finishes_the_exchange_in_flight_refuses_new_connections_and_exits_0() {
    let backend = Backend::start();
    let mut gw = pizzashack_with(&backend, &["--drain-timeout", DRAIN_TIMEOUT]);
    let mut client = gw.client(Some("client-a"));
    client.get(MENU).echo();

    client
        .send(get("/pizzashack/1.0.0/slow?ms=3000").as_bytes())
        .unwrap();
    eventually("the slow request reaches the backend", || {
        (backend.requests() == 2).then_some(())
    });
    gw.signal("TERM");

    wait_until_connect_refused(&gw);
    let response = client
        .read_response(false)
        .unwrap_or_else(|e| panic!("the exchange in flight at SIGTERM got no answer: {e}"));
    let echo = response.echo();
    assert_eq!(echo.path, "/slow?ms=3000");
    assert!(
        response.closes(),
        "an answer finished while draining must carry Connection: close: {:?}",
        response.headers
    );
    assert!(
        client.is_closed_by_peer(),
        "the gateway must close the connection after the drained exchange"
    );

    let status = gw.wait_exit(EXIT_LIMIT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}; stderr:\n{}",
        gw.log_text()
    );
    assert_eq!(backend.requests(), 2);
}

#[test]
fn sigint_on_an_idle_gateway_closes_idle_connections_and_exits_0() {
    let backend = Backend::start();
    let mut gw = pizzashack_with(&backend, &["--drain-timeout", DRAIN_TIMEOUT]);
    // An idle keep-alive connection must not hold the exit back.
    let mut idle = gw.client(Some("client-a"));
    idle.get(MENU).echo();

    gw.signal("INT");
    assert!(
        idle.is_closed_by_peer(),
        "an idle keep-alive connection must be closed at SIGINT"
    );
    let status = gw.wait_exit(EXIT_LIMIT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGINT: {status}; stderr:\n{}",
        gw.log_text()
    );
    wait_until_connect_refused(&gw);
}

#[test]
fn a_connection_still_before_its_handshake_does_not_hold_the_drain() {
    let backend = Backend::start();
    let mut gw = pizzashack_with(&backend, &["--drain-timeout", DRAIN_TIMEOUT]);
    // A TCP connection that never starts TLS. Left alone it would be closed by the handshake
    // timeout (10 s); a drain closes it at once, well within the 5 s this client waits.
    let mut silent = std::net::TcpStream::connect(gw.addr()).unwrap();
    silent
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut idle = gw.client(Some("client-a"));
    idle.get(MENU).echo();

    gw.signal("TERM");
    let mut byte = [0u8; 1];
    let read = std::io::Read::read(&mut silent, &mut byte);
    let closed = match &read {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    assert!(
        closed,
        "the silent connection must be closed at SIGTERM, got {read:?}"
    );
    let status = gw.wait_exit(EXIT_LIMIT);
    assert_eq!(status.code(), Some(0), "stderr:\n{}", gw.log_text());
}

#[test]
fn sighup_reloads_the_store_now() {
    let backend = Backend::start();
    let mut gw = pizzashack(&backend);
    let mut b = gw.client(Some("client-b"));
    b.get(MENU).assert_problem(401, "certificate-not-allowed");

    // Nothing changed in the store, so only SIGHUP can cause this reload (the 500 ms poll
    // rebuilds nothing while `PRAGMA data_version` stays the same).
    let before = gw.log_count(RELOADED);
    gw.signal("HUP");
    gw.wait_for_log(RELOADED, before);
    gw.assert_running();

    let before = gw.log_count(RELOADED);
    gw.cli(&[
        "cert",
        "add",
        "--api",
        "pizzashack",
        "--alias",
        "b-pizza",
        fixture("client-b.pem").to_str().unwrap(),
    ]);
    gw.signal("HUP");
    gw.wait_for_log(RELOADED, before);
    let echo = eventually("client-b is accepted after cert add + SIGHUP", || {
        let response = b.get(MENU);
        (response.status == 200).then(|| response.echo())
    });
    assert_eq!(echo.path, "/menu");
    gw.assert_running();
}

// ---------------------------------------------------------------------------------------------
// TLS configuration (SPEC 2, 3)
// ---------------------------------------------------------------------------------------------

#[test]
fn require_client_cert_refuses_a_handshake_without_a_certificate() {
    let backend = Backend::start();
    let mut gw = pizzashack_with(&backend, &["--require-client-cert"]);

    // With TLS 1.3 the client may finish its side of the handshake before the server has seen
    // its (empty) Certificate message, so the refusal can also come on the first read.
    let outcome: io::Result<Response> = gw.try_client(None).and_then(|mut c| c.try_get(MENU));
    match outcome {
        Ok(response) => panic!(
            "a client without a certificate got an HTTP answer under --require-client-cert: \
             {} {:?}\n{}",
            response.status,
            response.headers,
            response.text()
        ),
        Err(e) => {
            let alert = matches!(
                e.get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::AlertReceived(_))
            );
            let closed = matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            );
            assert!(
                alert || closed,
                "the handshake without a certificate must end with a TLS alert or a closed \
                 connection, got: {e} ({:?})",
                e.kind()
            );
        }
    }
    assert_eq!(backend.requests(), 0);

    let mut a = gw.client(Some("client-a"));
    assert_eq!(a.get(MENU).echo().path, "/menu");
    // A certificate the gateway does not know passes the TLS layer; the refusal is HTTP.
    gw.client(Some("client-b"))
        .get(MENU)
        .assert_problem(401, "certificate-not-allowed");
    gw.assert_running();
}

/// Makes a self-signed P-256 certificate and key for localhost with the openssl CLI in `dir`;
/// returns (cert path, key path). `CA:FALSE`: webpki refuses a CA certificate as a server's
/// end-entity certificate, and `openssl req -x509` makes CA certificates by default.
fn openssl_server_cert(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join("new-server.pem");
    let key = dir.join("new-server.key");
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-days",
            "30",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("running openssl");
    assert!(
        output.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (cert, key)
}

#[test]
fn server_cert_set_applies_to_new_connections_and_keeps_open_ones() {
    let backend = Backend::start();
    let mut gw = pizzashack(&backend);
    let mut old = gw.client(Some("client-a"));
    old.get(MENU).echo();

    let (cert, key) = openssl_server_cert(gw.db().dir());
    gw.cli(&[
        "server-cert",
        "set",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    let new_pem = std::fs::read_to_string(&cert).unwrap();
    let new_der = CertificateDer::from_pem_slice(new_pem.as_bytes()).unwrap();
    let shown = gw.db().server_cert_pem();
    assert_eq!(
        CertificateDer::from_pem_slice(shown.as_bytes()).unwrap(),
        new_der,
        "server-cert show --pem must print the certificate just set"
    );

    let trusts_new = client_config_with_roots(roots_from_pem(&new_pem), Some("client-a"));
    let mut fresh = eventually(
        "a client trusting only the new certificate connects",
        || {
            Client::connect(gw.addr(), trusts_new.clone())
                .inspect_err(|e| eprintln!("handshake trusting only the new certificate: {e}"))
                .ok()
        },
    );
    let presented = fresh
        .tls()
        .peer_certificates()
        .and_then(|chain| chain.first().cloned())
        .expect("the gateway presents a certificate");
    assert_eq!(presented, new_der);
    assert_eq!(fresh.get(MENU).echo().path, "/menu");

    // The connection opened before the change keeps its session and keeps being served.
    assert_eq!(old.get(MENU).echo().path, "/menu");
    // And a client trusting only the old certificate no longer gets through.
    assert!(
        gw.try_client(Some("client-a"))
            .and_then(|mut c| c.try_get(MENU))
            .is_err(),
        "a client trusting only the old server certificate still completed a handshake"
    );
    gw.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Configuration changes while serving (SPEC 5)
// ---------------------------------------------------------------------------------------------

#[test]
fn a_keep_alive_connection_survives_an_unrelated_change_and_sees_it() {
    let backend = Backend::start();
    let mut gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));
    client.get(MENU).echo();
    client.get("/other/x").assert_problem(404, "not-found");

    let before = gw.log_count(RELOADED);
    gw.db().api_add("other", "/other", None, &backend.url());
    gw.wait_for_log(RELOADED, before);

    // Same TLS connection: still served, and judged against the new snapshot.
    let response = client.get(MENU);
    assert!(
        !response.closes(),
        "a reload must not close a keep-alive connection: {:?}",
        response.headers
    );
    response.echo();
    client
        .get("/other/x")
        .assert_problem(401, "certificate-not-allowed");
    assert_eq!(client.get(MENU).echo().path, "/menu");
    gw.assert_running();
}

#[test]
fn refused_commands_leave_the_gateway_serving() {
    let backend = Backend::start();
    let mut gw = pizzashack(&backend);
    let mut client = gw.client(Some("client-a"));
    client.get(MENU).echo();

    let key = fixture("client-a.key");
    let key = key.to_str().unwrap();
    let b = fixture("client-b.pem");
    let b = b.to_str().unwrap();
    let db = gw.db();
    assert_refused(
        &db.try_cli(&[
            "cert",
            "add",
            "--api",
            "pizzashack",
            "--alias",
            "a-key",
            key,
        ]),
        "cert add of a private key",
    );
    assert_refused(
        &db.try_cli(&["cert", "add", "--api", "nope", "--alias", "b-nope", b]),
        "cert add to an unknown API",
    );
    assert_refused(
        &db.try_cli(&[
            "api",
            "add",
            "open",
            "--context",
            "/open",
            "--backend",
            &backend.url(),
            "--mtls",
            "off",
        ]),
        "api add with no mandatory scheme",
    );
    let listed = db.cli(&["cert", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let aliases: Vec<&str> = listed
        .as_array()
        .expect("cert list --json prints an array")
        .iter()
        .filter_map(|c| c["alias"].as_str())
        .collect();
    assert_eq!(aliases, ["a-pizza"], "a refused command wrote to the store");

    gw.assert_running();
    assert_eq!(client.get(MENU).echo().path, "/menu");
    assert_eq!(gw.client(Some("client-a")).get(MENU).echo().path, "/menu");
    gw.client(Some("client-b"))
        .get(MENU)
        .assert_problem(401, "certificate-not-allowed");
    gw.client(Some("client-a"))
        .get("/open/x")
        .assert_problem(404, "not-found");
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

#[test]
fn twenty_concurrent_keep_alive_clients_of_twenty_requests_each() {
    const CLIENTS: usize = 20;
    const REQUESTS: usize = 20;
    let backend = Backend::start();
    let mut gw = pizzashack(&backend);
    let config = gw.client_config(Some("client-a"));
    let addr = gw.addr();

    thread::scope(|scope| {
        let workers: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let config = config.clone();
                scope.spawn(move || {
                    let mut client = Client::connect(addr, config)
                        .unwrap_or_else(|e| panic!("client {c}: TLS connection failed: {e}"));
                    for r in 0..REQUESTS {
                        let path = format!("/pizzashack/1.0.0/c{c}/r{r}");
                        let response = client
                            .try_get(&path)
                            .unwrap_or_else(|e| panic!("client {c}, request {r}: {e}"));
                        assert!(
                            !response.closes(),
                            "client {c}, request {r}: the gateway closed a keep-alive connection"
                        );
                        assert_eq!(response.echo().path, format!("/c{c}/r{r}"));
                    }
                })
            })
            .collect();
        for worker in workers {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    assert_eq!(backend.requests(), CLIENTS * REQUESTS);
    gw.assert_running();
}
