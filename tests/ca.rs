//! CA entries and revocation (SPEC 3, 4 and 8) with the fixture PKI of `fixtures/`: any client
//! certificate that chains to a `--ca` entry of the API passes, whatever its key type, with
//! the client's intermediates used; expired, not-yet-valid, revoked, wrongly issued and
//! server-only certificates are refused with their own code and a detail naming the reason;
//! CRLs and CA entries apply live, also on connections already open.

mod common;

use common::{base64, fixture, fixture_cert_der, Backend, Db, Gateway};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::Value;

const MENU: &str = "/pizzashack/1.0.0/menu";

/// API pizzashack with the test CA as entry `test-ca`.
fn with_test_ca(backend: &Backend) -> Gateway {
    Gateway::start(|db| {
        db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &backend.url());
        db.ca_add("pizzashack", "test-ca", "ca");
    })
}

/// The refusal's `code` and `detail`.
fn refusal(gw: &Gateway, cert: &str) -> (u16, String, String) {
    let response = gw.client(Some(cert)).get(MENU);
    let problem = response.json();
    (
        response.status,
        problem["code"].as_str().unwrap_or_default().to_owned(),
        problem["detail"].as_str().unwrap_or_default().to_owned(),
    )
}

fn crl_add(db: &Db, name: &str) -> Value {
    let out = db.cli(&["crl", "add", "--json", fixture(name).to_str().unwrap()]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn leaves_the_ca_issued_pass_whatever_their_key_and_reach_the_backend_as_themselves() {
    let backend = Backend::start();
    let gw = with_test_ca(&backend);
    for leaf in ["leaf-p256", "leaf-p384", "leaf-rsa2048", "leaf-ed25519"] {
        let echo = gw.client(Some(leaf)).get(MENU).echo();
        let expected = format!(":{}:", base64(fixture_cert_der(leaf).as_ref()));
        assert_eq!(
            echo.header_values("client-cert"),
            [expected.as_str()],
            "{leaf}"
        );
        assert!(
            !echo.has_header("client-cert-chain"),
            "{leaf} sends no chain"
        );
    }
    // Issued by the intermediate, which the client sends after its certificate.
    let echo = gw.client(Some("leaf-via-intermediate")).get(MENU).echo();
    let chain: Vec<CertificateDer> =
        CertificateDer::pem_file_iter(fixture("leaf-via-intermediate.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(
        echo.header_values("client-cert"),
        [format!(":{}:", base64(&chain[0])).as_str()]
    );
    assert_eq!(
        echo.header_values("client-cert-chain"),
        [format!(":{}:", base64(&chain[1])).as_str()]
    );
    // A self-signed CA:TRUE certificate still works pinned beside the CA entry.
    gw.db().cert_add("pizzashack", "a-pizza", "client-a");
    common::eventually("client-a is pinned", || {
        (gw.client(Some("client-a")).get(MENU).status == 200).then_some(())
    });
}

#[test]
fn refusals_of_ca_issued_certificates_say_what_is_wrong() {
    let backend = Backend::start();
    let gw = with_test_ca(&backend);
    let (status, code, detail) = refusal(&gw, "leaf-expired");
    assert_eq!((status, code.as_str()), (401, "certificate-expired"));
    assert!(
        detail.contains("leaf-expired") && detail.contains("2021-01-01T00:00:00Z"),
        "{detail}"
    );
    let (status, code, detail) = refusal(&gw, "leaf-not-yet-valid");
    assert_eq!((status, code.as_str()), (401, "certificate-not-yet-valid"));
    assert!(detail.contains("2100-01-01T00:00:00Z"), "{detail}");
    let (status, code, detail) = refusal(&gw, "leaf-other-ca");
    assert_eq!((status, code.as_str()), (401, "certificate-not-allowed"));
    assert!(
        detail.contains("CN=leaf-other-ca") && detail.contains("not registered for API pizzashack"),
        "{detail}"
    );
    let (status, code, detail) = refusal(&gw, "leaf-server-eku");
    assert_eq!((status, code.as_str()), (401, "certificate-not-allowed"));
    assert!(detail.contains("extended key usage"), "{detail}");
    let (status, code, _) = refusal(&gw, "client-a");
    assert_eq!((status, code.as_str()), (401, "certificate-not-allowed"));
    // The gateway serves on.
    assert_eq!(gw.client(Some("leaf-p256")).get(MENU).status, 200);
}

#[test]
fn a_crl_added_while_serving_revokes_on_open_connections_and_removing_it_restores() {
    let backend = Backend::start();
    let gw = with_test_ca(&backend);
    // leaf-revoked is also pinned on a second API: the CRL applies to pinned entries too.
    gw.db().api_add("pinned", "/pinned", None, &backend.url());
    gw.db().cert_add("pinned", "revoked-pin", "leaf-revoked");
    let mut issued = gw.client(Some("leaf-revoked"));
    common::eventually("the pinned API is served", || {
        (issued.get("/pinned/x").status == 200).then_some(())
    });
    assert_eq!(issued.get(MENU).status, 200);
    let mut fine = gw.client(Some("leaf-p256"));
    assert_eq!(fine.get(MENU).status, 200);

    let crl = crl_add(gw.db(), "ca.crl.pem");
    assert_eq!(crl["revoked"], 1);
    assert_eq!(crl["number"], "2");
    common::eventually("the CRL applies on the open connection", || {
        let response = issued.get(MENU);
        (response.status == 401).then(|| response.json())
    });
    let problem = issued.get(MENU).json();
    assert_eq!(problem["code"], "certificate-revoked");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("CN=leaf-revoked"),
        "{problem}"
    );
    let pinned = issued.get("/pinned/x").json();
    assert_eq!(pinned["code"], "certificate-revoked", "{pinned}");
    assert_eq!(
        fine.get(MENU).status,
        200,
        "a certificate the CRL does not list passes"
    );
    let list = gw.db().cli(&["cert", "list", "--json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let pin = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["alias"] == "revoked-pin")
        .unwrap();
    assert_eq!(pin["status"], "revoked");

    gw.db().cli(&["crl", "remove", &crl["id"].to_string()]);
    common::eventually("removing the CRL restores the certificate", || {
        (issued.get(MENU).status == 200).then_some(())
    });
    assert_eq!(issued.get("/pinned/x").status, 200);
}

#[test]
fn a_ca_entry_removed_while_serving_refuses_its_leaves_on_open_connections() {
    let backend = Backend::start();
    let gw = with_test_ca(&backend);
    let mut client = gw.client(Some("leaf-p384"));
    assert_eq!(client.get(MENU).status, 200);
    gw.db().cert_remove("test-ca");
    common::eventually("the removal applies on the open connection", || {
        let response = client.get(MENU);
        (response.status == 401).then_some(())
    });
    assert_eq!(client.get(MENU).json()["code"], "certificate-not-allowed");
}

#[test]
fn crls_are_kept_one_per_issuer_and_refused_with_a_reason() {
    let db = Db::init();
    db.api_add(
        "pizzashack",
        "/pizzashack",
        Some("1.0.0"),
        "http://127.0.0.1:9",
    );
    let path = |name: &str| fixture(name).to_str().unwrap().to_owned();
    let refused = |args: &[&str], needle: &str| {
        let before = db.cli(&["crl", "list", "--json"]).stdout;
        let out = db.try_cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(needle) && stderr.lines().count() == 1,
            "{args:?}: {stderr}"
        );
        assert_eq!(
            db.cli(&["crl", "list", "--json"]).stdout,
            before,
            "{args:?} changed the store"
        );
    };

    let first = crl_add(&db, "ca-1.crl.pem");
    assert_eq!(
        (first["number"].as_str(), first["revoked"].as_u64()),
        (Some("1"), Some(0))
    );
    // A newer CRL of the same issuer replaces it; DER is read as well as PEM.
    let out = db.cli(&["crl", "add", &path("ca.crl.der")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("replacing"));
    let out = db.cli(&["crl", "add", &path("ca.crl.pem")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already stored"));
    refused(&["crl", "add", &path("ca-1.crl.pem")], "is not newer");
    refused(&["crl", "add", &path("ca-delta.crl.pem")], "delta CRL");
    refused(&["crl", "add", &path("ca.pem")], "not a CRL");
    refused(
        &["crl", "add", &path("client-a-with-key.pem")],
        "private key",
    );
    refused(&["crl", "remove", "999"], "no CRL with id 999");
    crl_add(&db, "other-ca.crl.pem");
    let list: Value = serde_json::from_slice(&db.cli(&["crl", "list", "--json"]).stdout).unwrap();
    let issuers: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["issuer"].as_str().unwrap())
        .collect();
    assert_eq!(issuers.len(), 2, "{list}");
    assert!(
        issuers.iter().any(|i| i.contains("certgate test CA")),
        "{list}"
    );

    // --ca takes only CA certificates.
    let ca_add = |alias: &str, file: &str| {
        vec![
            "cert".to_owned(),
            "add".into(),
            "--api".into(),
            "pizzashack".into(),
            "--alias".into(),
            alias.into(),
            "--ca".into(),
            path(file),
        ]
    };
    let args = ca_add("leaf", "leaf-p256.pem");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = db.try_cli(&args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a CA certificate"));
    let args = ca_add("with-key", "client-a-with-key.pem");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = db.try_cli(&args);
    assert!(String::from_utf8_lossy(&out.stderr).contains("private key"));
    let certs: Value = serde_json::from_slice(&db.cli(&["cert", "list", "--json"]).stdout).unwrap();
    assert_eq!(certs, serde_json::json!([]));
    let args = ca_add("test-ca", "ca.pem");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out: Value =
        serde_json::from_slice(&db.cli(&[&args[..], &["--json"]].concat()).stdout).unwrap();
    assert_eq!(
        (out["kind"].as_str(), out["status"].as_str()),
        (Some("ca"), Some("valid"))
    );
}
