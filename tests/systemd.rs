//! systemd integration by its protocols, with real sockets: the notify datagrams (READY=1 once
//! serving, RELOADING=1 and READY=1 around a SIGHUP reload, STOPPING=1 on SIGTERM, WATCHDOG=1
//! from the loop), socket activation (`systemd-socket-activate`, where installed), and the
//! unit files as `systemd-analyze` judges them (where installed).

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, Client, Db, EVENTUALLY};

/// The next notification that contains `needle`, skipping others (watchdog pings).
fn expect_notification(sock: &UnixDatagram, needle: &str) -> String {
    let deadline = Instant::now() + EVENTUALLY;
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.contains(needle) {
                    return text;
                }
                seen.push(text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading notifications: {e}"),
        }
    }
    panic!("no notification with {needle:?}; saw {seen:?}");
}

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_gateway_tells_systemd_it_is_ready_reloading_alive_and_stopping() {
    let backend = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let db = Db::init();
    db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &backend.url());
    db.cert_add("pizzashack", "a-pizza", "client-a");
    let notify = path.to_str().unwrap();
    let mut gw = db.serve_with_env(
        &[],
        &[("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", "400000")],
    );
    let ready = expect_notification(&sock, "READY=1");
    assert!(ready.contains("STATUS=serving 1 APIs"), "{ready}");
    // It is serving when it says so.
    assert_eq!(
        gw.client(Some("client-a")).get("/pizzashack/1.0.0/").status,
        200
    );
    expect_notification(&sock, "WATCHDOG=1");
    expect_notification(&sock, "WATCHDOG=1");
    gw.signal("HUP");
    expect_notification(&sock, "RELOADING=1");
    let ready = expect_notification(&sock, "READY=1");
    assert!(ready.contains("generation 2"), "{ready}");
    gw.signal("TERM");
    expect_notification(&sock, "STOPPING=1");
    assert!(gw.wait_exit(EVENTUALLY).success());
}

#[test]
fn a_watchdog_for_another_process_is_not_answered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let notify = path.to_str().unwrap();
    let gw = Db::init().serve_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", notify),
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    expect_notification(&sock, "READY=1");
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_millis(600);
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(
                !text.contains("WATCHDOG=1"),
                "pinged a watchdog of pid 1: {text}"
            );
        }
    }
    drop(gw);
}

#[test]
fn socket_activation_serves_the_socket_systemd_passes() {
    if !installed("systemd-socket-activate") {
        eprintln!("systemd-socket-activate not installed: socket activation not tested");
        return;
    }
    let backend = Backend::start();
    let db = Db::init();
    db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &backend.url());
    db.cert_add("pizzashack", "a-pizza", "client-a");
    let roots = common::roots_from_pem(&db.server_cert_pem());
    let port = common::free_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(addr.to_string())
        .arg(common::BIN)
        .arg("--db")
        .arg(db.path())
        .arg("serve")
        .env_remove("CERTGATE_DB")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The listening socket is systemd-socket-activate's until the first connection starts the
    // gateway, which then accepts on it.
    let config = common::client_config_with_roots(Arc::clone(&roots), Some("client-a"));
    let mut client = common::eventually("the activated gateway answers", || {
        Client::connect(addr, Arc::clone(&config)).ok()
    });
    assert_eq!(client.get("/pizzashack/1.0.0/").status, 200);
    let config = common::client_config_with_roots(roots, Some("client-a"));
    assert_eq!(
        Client::connect(addr, config)
            .unwrap()
            .get("/pizzashack/1.0.0/x")
            .status,
        200
    );
    common::stop_child(&mut child);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains(&format!("listening on {addr}")), "{stderr}");
}

#[test]
fn the_unit_files_pass_systemd_analyze() {
    if !installed("systemd-analyze") {
        eprintln!("systemd-analyze not installed: the unit files were not checked");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    // The unit names the installed binary; point it at this build for `verify`.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(format!("{root}/systemd/certgate.service")).unwrap();
    let unit = unit.replace("/usr/local/bin/certgate", common::BIN);
    std::fs::write(dir.path().join("certgate.service"), unit).unwrap();
    std::fs::copy(
        format!("{root}/systemd/certgate.socket"),
        dir.path().join("certgate.socket"),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("certgate.service"))
        .arg(dir.path().join("certgate.socket"))
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && complaints.trim().is_empty(),
        "{complaints}"
    );

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(format!("{root}/systemd/certgate.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for certgate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "exposure level {level}:\n{text}");
}

#[test]
fn the_install_script_places_binary_units_and_a_database() {
    let root = tempfile::tempdir().unwrap();
    let script = format!("{}/systemd/install.sh", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(&script)
        .args(["--binary", common::BIN, "--root"])
        .arg(root.path())
        .args(["--hostname", "gw.example"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = |p: &str| root.path().join(p);
    for file in [
        "usr/local/bin/certgate",
        "etc/systemd/system/certgate.service",
        "etc/systemd/system/certgate.socket",
        "var/lib/certgate/certgate.db",
    ] {
        assert!(path(file).exists(), "{file} not installed");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path("var/lib/certgate"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    // The database passes the unit's start-up check, and a second install keeps it.
    let check = Command::new(path("usr/local/bin/certgate"))
        .arg("--db")
        .arg(path("var/lib/certgate/certgate.db"))
        .args(["check", "--store-only"])
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let before = std::fs::read(path("var/lib/certgate/certgate.db")).unwrap();
    let again = Command::new("bash")
        .arg(&script)
        .args(["--binary", common::BIN, "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read(path("var/lib/certgate/certgate.db")).unwrap(),
        before
    );
}
