//! `certgate quickstart` (SPEC 7) and the built-in echo backend: the demo it makes is served,
//! the commands it prints run as printed from where it started (curl, and newman where
//! installed), and a second run serves the demo it finds.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Db, EVENTUALLY};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;

/// A running `certgate quickstart` in `cwd`, and the lines it printed up to `# Ctrl-C`.
struct Quickstart {
    child: Child,
    lines: Vec<String>,
    _stdout: BufReader<ChildStdout>,
}

impl Quickstart {
    fn start(cwd: &Path) -> Quickstart {
        let mut child = Command::new(common::BIN)
            .args(["quickstart", "--listen", "127.0.0.1:0"])
            .current_dir(cwd)
            .env_remove("CERTGATE_DB")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn certgate quickstart");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = stdout.read_line(&mut line).expect("read quickstart output");
            assert!(n > 0, "quickstart ended its output early: {lines:#?}");
            let line = line.trim_end().to_owned();
            let last = line.starts_with("# Ctrl-C");
            lines.push(line);
            if last {
                break;
            }
        }
        Quickstart {
            child,
            lines,
            _stdout: stdout,
        }
    }

    /// The printed line that starts with `prefix`.
    fn line(&self, prefix: &str) -> &str {
        self.lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in {:#?}", self.lines))
    }

    /// The port in the printed curl command's URL.
    fn port(&self) -> u16 {
        let url = self.line("curl ").rsplit(' ').next().unwrap();
        let authority = url
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap();
        authority.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "quickstart exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "quickstart did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        common::stop_child(&mut self.child);
    }
}

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A rustls client configuration from the demo's files.
fn demo_client(dir: &Path, with_cert: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("server.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let config = if with_cert {
        let chain = CertificateDer::pem_file_iter(dir.join("client.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("client.key")).unwrap();
        builder.with_client_auth_cert(chain, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(config)
}

#[test]
fn quickstart_serves_a_demo_that_its_printed_commands_call() {
    let cwd = tempfile::tempdir().unwrap();
    let demo = cwd.path().join("certgate-demo");
    let qs = Quickstart::start(cwd.path());
    for name in [
        "certgate.db",
        "ca.pem",
        "client.pem",
        "client.key",
        "server.pem",
    ] {
        assert!(demo.join(name).exists(), "{name} missing from the demo");
    }
    let curl = qs.line("curl ");
    assert!(
        curl.contains("--cert certgate-demo/client.pem") && curl.contains("/echo/1.0.0/"),
        "{curl}"
    );
    let port = qs.port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));

    // The echo backend shows what a backend receives.
    let mut client = Client::connect(addr, demo_client(&demo, true)).unwrap();
    let request = common::request_with_body("POST", "/echo/1.0.0/orders?id=7", b"two pizzas");
    let echo: Value = serde_json::from_slice(&client.request(&request).body).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/orders?id=7");
    assert_eq!(echo["body"], "two pizzas");
    assert_eq!(echo["body_bytes"], 10);
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    let client_cert = echo["headers"]["client-cert"].as_str().unwrap();
    let der = CertificateDer::pem_file_iter(demo.join("client.pem"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(client_cert, format!(":{}:", common::base64(&der)));
    // A chunked body, then a bodiless request on the same connection.
    let chunked =
        common::request_chunked("PUT", "/echo/1.0.0/big", &common::pattern(100_000), 7_000);
    let echo: Value = serde_json::from_slice(&client.request(&chunked).body).unwrap();
    assert_eq!(echo["body_bytes"], 100_000);
    // A HEAD gets the head alone, and the connection (to the gateway and, pooled, to the
    // echo backend) carries on.
    client
        .send(b"HEAD /echo/1.0.0/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let head = client.read_response(true).unwrap();
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert!(head.header("content-length").is_some_and(|n| n != "0"));
    let echo: Value = serde_json::from_slice(&client.get("/echo/1.0.0/").body).unwrap();
    assert_eq!(
        (echo["method"].as_str(), echo["body_bytes"].as_u64()),
        (Some("GET"), Some(0))
    );

    // Without the demo certificate: refused, with the reason.
    let mut anonymous = Client::connect(addr, demo_client(&demo, false)).unwrap();
    let refused = anonymous.get("/echo/1.0.0/hello");
    assert_eq!(refused.status, 401);
    assert!(refused.text().contains("client-certificate-required"));

    if installed("curl") {
        let out = Command::new("sh")
            .args(["-c", &format!("{curl} -sS --fail")])
            .current_dir(cwd.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{curl}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let echo: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (echo["method"].as_str(), echo["path"].as_str()),
            (Some("GET"), Some("/hello"))
        );
    } else {
        eprintln!("curl not installed: the printed curl command was not run");
    }
    if installed("newman") {
        let newman = qs.line("newman ");
        let out = Command::new("sh")
            .args(["-c", newman])
            .current_dir(cwd.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{newman}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("the echo backend answers"), "{text}");
    } else {
        eprintln!("newman not installed: the printed newman command was not run");
    }
    qs.stop();

    // A second run serves the same demo: same certificate, same database.
    let client_pem = std::fs::read(demo.join("client.pem")).unwrap();
    let qs = Quickstart::start(cwd.path());
    assert!(
        qs.lines[0].contains("using the demo already"),
        "{:#?}",
        qs.lines
    );
    assert_eq!(std::fs::read(demo.join("client.pem")).unwrap(), client_pem);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], qs.port()));
    let mut client = Client::connect(addr, demo_client(&demo, true)).unwrap();
    assert_eq!(client.get("/echo/1.0.0/again").status, 200);
    qs.stop();
}

#[test]
fn an_api_added_on_the_echo_backend_while_serving_is_served() {
    let db = Db::init();
    db.api_add(
        "pizzashack",
        "/pizzashack",
        Some("1.0.0"),
        "http://127.0.0.1:9",
    );
    db.cert_add("pizzashack", "client-a", "client-a");
    let gw = db.serve();
    db_add_echo(gw.db());
    common::eventually("the echo API is served", || {
        let mut client = gw.client(Some("client-a"));
        let response = client.get("/echo/x?y=1");
        (response.status == 200).then_some(())
    });
    let mut client = gw.client(Some("client-a"));
    let echo: Value = serde_json::from_slice(&client.get("/echo/x?y=1").body).unwrap();
    assert_eq!(echo["path"], "/x?y=1");
    assert_eq!(echo["headers"]["host"], "builtin:echo");
    // Malformed input to the gateway still gets its 400, and the echo API keeps serving.
    let bad = client.request(b"GET /echo/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
    assert_eq!(bad.status, 400);
    let mut client = gw.client(Some("client-a"));
    assert_eq!(client.get("/echo/").status, 200);
}

fn db_add_echo(db: &Db) {
    db.cli(&[
        "api",
        "add",
        "echo",
        "--context",
        "/echo",
        "--backend",
        "builtin:echo",
    ]);
    db.cert_add("echo", "client-a-echo", "client-a");
}
