//! The `certgate` binary as users and scripts see it: exit codes, `error:` lines on stderr,
//! JSON on stdout, and the database file it creates.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn certgate(db: &Path, args: &[&str]) -> Output {
    certgate_with_stdin(db, args, b"")
}

fn certgate_with_stdin(db: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_certgate"))
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("CERTGATE_DB")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The one `error:` line of a failed command.
fn error(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8(output.stderr.clone()).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn client_pem() -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "client");
    let key = rcgen::KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

#[test]
fn init_creates_a_private_database_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("certgate.db");
    let missing = certgate(&db, &["api", "list"]);
    assert!(error(&missing).contains("no database at"));
    assert!(!db.exists());

    stdout(&certgate(&db, &["init", "--hostname", "gw.example"]));
    let mode = std::fs::metadata(&db).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(error(&certgate(&db, &["init"])).contains("already exists"));

    let pem = stdout(&certgate(&db, &["server-cert", "show", "--pem"]));
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    let shown = stdout(&certgate(&db, &["server-cert", "show", "--json"]));
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        shown["sans"],
        serde_json::json!(["localhost", "127.0.0.1", "::1", "gw.example"])
    );
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("certgate.db");
    let output = certgate(&db, &["api", "add", "pizza"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
}

#[test]
fn cert_add_from_stdin_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("certgate.db");
    stdout(&certgate(&db, &["init"]));
    stdout(&certgate(
        &db,
        &[
            "api",
            "add",
            "pizza",
            "--context",
            "/pizzashack",
            "--version",
            "1.0.0",
            "--backend",
            "http://127.0.0.1:9000",
        ],
    ));
    let (cert, key) = client_pem();
    let add = [
        "cert", "add", "--api", "pizza", "--alias", "c1", "--json", "-",
    ];
    let out = stdout(&certgate_with_stdin(&db, &add, cert.as_bytes()));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["alias"], "c1");
    assert_eq!(json["status"], "valid");

    let again = certgate_with_stdin(
        &db,
        &["cert", "add", "--api", "pizza", "--alias", "c2", "-"],
        cert.as_bytes(),
    );
    assert!(error(&again).contains("already registered on API \"pizza\" as \"c1\""));
    let keyed = certgate_with_stdin(
        &db,
        &["cert", "add", "--api", "pizza", "--alias", "c2", "-"],
        (cert + &key).as_bytes(),
    );
    assert!(error(&keyed).contains("stdin holds a private key; give only the certificate"));

    let list = stdout(&certgate(&db, &["cert", "list", "--json"]));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);

    let apis = stdout(&certgate(&db, &["api", "list", "--json"]));
    let apis: serde_json::Value = serde_json::from_str(&apis).unwrap();
    assert_eq!(apis[0]["base_path"], "/pizzashack/1.0.0");
    assert_eq!(apis[0]["certificates"], 1);

    let backup = dir.path().join("backup.db");
    stdout(&certgate(&db, &["backup", backup.to_str().unwrap()]));
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let copied = stdout(&certgate(&backup, &["cert", "list", "--json"]));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&copied).unwrap(),
        list
    );
}

fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_exits_0_1_or_2_and_names_each_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("certgate.db");
    let missing = certgate(&db, &["check"]);
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no database at"));
    assert!(!db.exists());

    stdout(&certgate(&db, &["init"]));
    let report = stdout(&certgate(&db, &["check"]));
    assert!(
        report.contains("usable") && report.contains("server certificate"),
        "{report}"
    );
    stdout(&certgate(
        &db,
        &[
            "api",
            "add",
            "pizza",
            "--context",
            "/pizza",
            "--backend",
            "http://127.0.0.1:9",
        ],
    ));
    stdout(&certgate(
        &db,
        &[
            "cert",
            "add",
            "--api",
            "pizza",
            "--alias",
            "p256",
            &fixture("leaf-p256.pem"),
        ],
    ));
    stdout(&certgate(
        &db,
        &[
            "cert",
            "add",
            "--api",
            "pizza",
            "--alias",
            "gone",
            &fixture("leaf-revoked.pem"),
        ],
    ));
    stdout(&certgate(&db, &["crl", "add", &fixture("ca.crl.pem")]));
    let report = stdout(&certgate(&db, &["check"]));
    let line = |alias: &str| {
        report
            .lines()
            .find(|l| l.contains(&format!("cert {alias} ")))
            .unwrap_or_else(|| panic!("no line for {alias}: {report}"))
            .to_owned()
    };
    assert!(line("p256").starts_with("ok "), "{report}");
    assert!(line("gone").starts_with("revoked "), "{report}");

    // The fixtures are valid for 100 years: a longer warning period finds them.
    let soon = certgate(&db, &["check", "--warn-days", "40000"]);
    assert_eq!(soon.status.code(), Some(1), "{soon:?}");
    let report = String::from_utf8_lossy(&soon.stdout);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("expiring ") && l.contains("cert p256 ")),
        "{report}"
    );
    let stderr = String::from_utf8_lossy(&soon.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("need attention"),
        "{stderr}"
    );
    stdout(&certgate(
        &db,
        &["check", "--warn-days", "40000", "--store-only"],
    ));

    // A damaged file: exit 2, with the reason.
    let bytes = std::fs::read(&db).unwrap();
    let damaged = dir.path().join("damaged.db");
    std::fs::write(&damaged, &bytes[..bytes.len().min(1000)]).unwrap();
    let out = certgate(&damaged, &["check", "--store-only"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: the store is unusable"),
        "{stderr}"
    );
    std::fs::write(&damaged, b"not a database at all").unwrap();
    assert_eq!(certgate(&damaged, &["check"]).status.code(), Some(2));
}

#[test]
fn cert_show_pem_gives_back_the_certificate_and_its_chain_and_der_is_read_too() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("certgate.db");
    stdout(&certgate(&db, &["init"]));
    stdout(&certgate(
        &db,
        &[
            "api",
            "add",
            "pizza",
            "--context",
            "/pizza",
            "--backend",
            "http://127.0.0.1:9",
        ],
    ));
    let chained = fixture("leaf-via-intermediate.pem");
    stdout(&certgate(
        &db,
        &[
            "cert", "add", "--api", "pizza", "--alias", "chained", &chained,
        ],
    ));
    let shown = stdout(&certgate(&db, &["cert", "show", "chained", "--pem"]));
    let ders = |pem: &[u8]| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let given = ders(&std::fs::read(&chained).unwrap());
    assert_eq!(given.len(), 2);
    assert_eq!(ders(shown.as_bytes()), given);

    // The same leaf as DER is the same certificate: refused as already registered.
    let der_file = dir.path().join("leaf.der");
    std::fs::write(&der_file, &given[0]).unwrap();
    let again = certgate(
        &db,
        &[
            "cert",
            "add",
            "--api",
            "pizza",
            "--alias",
            "der",
            der_file.to_str().unwrap(),
        ],
    );
    assert!(error(&again).contains("already registered on API \"pizza\" as \"chained\""));
    let p256 = ders(&std::fs::read(fixture("leaf-p256.pem")).unwrap());
    std::fs::write(&der_file, &p256[0]).unwrap();
    let added = stdout(&certgate(
        &db,
        &[
            "cert",
            "add",
            "--api",
            "pizza",
            "--alias",
            "der",
            "--json",
            der_file.to_str().unwrap(),
        ],
    ));
    let added: serde_json::Value = serde_json::from_str(&added).unwrap();
    assert_eq!(added["subject"], "O=certgate tests, CN=leaf-p256");
    assert_eq!(added["kind"], "pinned");
}

#[test]
fn tiers_are_added_updated_and_removed_only_when_unused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("certgate.db");
    stdout(&certgate(&db, &["init"]));
    stdout(&certgate(
        &db,
        &[
            "api",
            "add",
            "pizza",
            "--context",
            "/pizza",
            "--backend",
            "http://127.0.0.1:9",
        ],
    ));
    let add = [
        "tier",
        "add",
        "Five",
        "--requests",
        "5",
        "--per",
        "minute",
        "--json",
    ];
    let five: serde_json::Value = serde_json::from_str(&stdout(&certgate(&db, &add))).unwrap();
    assert_eq!(
        (five["requests"].as_u64(), five["burst"].as_u64()),
        (Some(5), Some(5))
    );
    assert!(error(&certgate(&db, &add)).contains("already exists"));
    // The burst followed the requests, so it follows them on; a burst given stays.
    let up = stdout(&certgate(
        &db,
        &["tier", "update", "five", "--requests", "8", "--json"],
    ));
    let up: serde_json::Value = serde_json::from_str(&up).unwrap();
    assert_eq!(
        (up["name"].as_str(), up["burst"].as_u64()),
        (Some("Five"), Some(8))
    );
    stdout(&certgate(&db, &["tier", "update", "Five", "--burst", "20"]));
    let up = stdout(&certgate(
        &db,
        &["tier", "update", "Five", "--requests", "9", "--json"],
    ));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&up).unwrap()["burst"],
        20
    );
    assert!(error(&certgate(
        &db,
        &["tier", "update", "Unlimited", "--requests", "3"]
    ))
    .contains("Unlimited is built in"));
    assert!(error(&certgate(
        &db,
        &["tier", "add", "Zero", "--requests", "0", "--per", "day"]
    ))
    .contains("from 1 up"));

    let cert = format!("{}/fixtures/leaf-p256.pem", env!("CARGO_MANIFEST_DIR"));
    stdout(&certgate(
        &db,
        &[
            "cert", "add", "--api", "pizza", "--alias", "p", "--tier", "Five", &cert,
        ],
    ));
    stdout(&certgate(
        &db,
        &["api", "update", "pizza", "--tier", "Five"],
    ));
    let in_use = error(&certgate(&db, &["tier", "remove", "Five"]));
    assert!(
        in_use.contains("certificates p") && in_use.contains("APIs pizza"),
        "{in_use}"
    );
    stdout(&certgate(&db, &["cert", "update", "p", "--tier", "Gold"]));
    stdout(&certgate(
        &db,
        &["api", "update", "pizza", "--tier", "Gold"],
    ));
    stdout(&certgate(&db, &["tier", "remove", "Five"]));
    let list = stdout(&certgate(&db, &["tier", "list", "--json"]));
    assert!(!list.contains("Five"), "{list}");
}
