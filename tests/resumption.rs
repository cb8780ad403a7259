//! Resumed TLS sessions (SPEC 3 and 8): a session resumed from a ticket (TLS 1.3) or a session
//! id (TLS 1.2) carries the certificate of its first handshake and is judged on every request
//! exactly like a full handshake, against the configuration of that moment. Each test asserts
//! that the session really was resumed, so a gateway that stopped resuming would fail it.

mod common;

use std::sync::Arc;

use common::{base64, fixture, fixture_cert_der, Backend, Client, Gateway};
use rustls::{ClientConfig, HandshakeKind, SupportedProtocolVersion};

const MENU: &str = "/pizzashack/1.0.0/menu";

/// API pizzashack with the test CA as a CA entry and client-a pinned as `a-pizza`.
fn gateway(backend: &Backend) -> Gateway {
    Gateway::start(|db| {
        db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &backend.url());
        db.cert_add("pizzashack", "a-pizza", "client-a");
        db.ca_add("pizzashack", "test-ca", "ca");
    })
}

fn config(
    gw: &Gateway,
    cert: &str,
    version: &'static SupportedProtocolVersion,
) -> Arc<ClientConfig> {
    let roots = common::roots_from_pem(gw.server_pem());
    common::client_config_with_versions(roots, Some(cert), &[version])
}

/// A connection with `config`: resumed when the client holds a session from an earlier one.
fn connect(gw: &Gateway, config: &Arc<ClientConfig>) -> Client {
    Client::connect(gw.addr(), Arc::clone(config)).expect("TLS connection to the gateway")
}

fn assert_resumed(client: &Client) {
    assert_eq!(
        client.tls().handshake_kind(),
        Some(HandshakeKind::Resumed),
        "the session was not resumed"
    );
}

fn resumed_sessions_are_judged_like_full_handshakes(version: &'static SupportedProtocolVersion) {
    let backend = Backend::start();
    let gw = gateway(&backend);
    let issued = config(&gw, "leaf-revoked", version);
    let pinned = config(&gw, "client-a", version);

    // Full handshakes, which leave the clients a session to resume.
    for config in [&issued, &pinned] {
        let mut client = connect(&gw, config);
        assert_eq!(client.tls().handshake_kind(), Some(HandshakeKind::Full));
        assert_eq!(client.get(MENU).status, 200);
    }

    // Resumed: the certificate of the first handshake reaches the backend.
    let mut open = connect(&gw, &issued);
    assert_resumed(&open);
    let echo = open.get(MENU).echo();
    let expected = format!(":{}:", base64(fixture_cert_der("leaf-revoked").as_ref()));
    assert_eq!(echo.header_values("client-cert"), [expected.as_str()]);
    let mut pinned_open = connect(&gw, &pinned);
    assert_resumed(&pinned_open);
    assert_eq!(pinned_open.get(MENU).status, 200);

    // A CRL and a removal after those handshakes: refused on the open connections...
    gw.db()
        .cli(&["crl", "add", fixture("ca.crl.pem").to_str().unwrap()]);
    gw.db().cert_remove("a-pizza");
    common::eventually("the changes apply on the open connections", || {
        let revoked = open.get(MENU).status == 401;
        let removed = pinned_open.get(MENU).status == 401;
        (revoked && removed).then_some(())
    });
    assert_eq!(open.get(MENU).json()["code"], "certificate-revoked");
    assert_eq!(
        pinned_open.get(MENU).json()["code"],
        "certificate-not-allowed"
    );

    // ...and on sessions resumed after them, which the reloads did not stop resuming.
    let mut again = connect(&gw, &issued);
    assert_resumed(&again);
    assert_eq!(again.get(MENU).json()["code"], "certificate-revoked");
    let mut again = connect(&gw, &pinned);
    assert_resumed(&again);
    assert_eq!(again.get(MENU).json()["code"], "certificate-not-allowed");

    // A certificate that still passes resumes and passes.
    let fine = config(&gw, "leaf-p256", version);
    assert_eq!(connect(&gw, &fine).get(MENU).status, 200);
    let mut resumed = connect(&gw, &fine);
    assert_resumed(&resumed);
    assert_eq!(resumed.get(MENU).status, 200);
}

#[test]
fn tls13_resumed_sessions_are_judged_like_full_handshakes() {
    resumed_sessions_are_judged_like_full_handshakes(&rustls::version::TLS13);
}

#[test]
fn tls12_resumed_sessions_are_judged_like_full_handshakes() {
    resumed_sessions_are_judged_like_full_handshakes(&rustls::version::TLS12);
}
