//! The admin endpoint (`serve --admin ADDR`, SPEC 7): `/healthz` is 200 while serving and 503
//! while draining; `/metrics` is Prometheus text that a real parser (the Python
//! `prometheus_client` package, where installed) reads, with the families SPEC 7 names and
//! numbers that follow what the gateway did.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Client, Gateway};

const MENU: &str = "/pizzashack/1.0.0/menu";

fn admin_addr(gw: &Gateway) -> SocketAddr {
    gw.wait_for_log("admin endpoint on http://", 0);
    let text = gw.log_text();
    let line = text
        .lines()
        .find(|l| l.contains("admin endpoint on http://"))
        .unwrap();
    line.rsplit("http://").next().unwrap().parse().unwrap()
}

/// GET `path` from the admin endpoint: status and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    write!(sock, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    sock.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

/// The value of the sample `name{labels}` (exactly as rendered).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
        .parse()
        .unwrap()
}

fn python_parses(metrics: &str) -> Option<bool> {
    let script = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        names = [f.name for f in text_string_to_metric_families(sys.stdin.read())]\n\
        print(' '.join(names))\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().ok()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named") {
        return None;
    }
    assert!(
        out.status.success(),
        "prometheus_client refused the metrics: {stderr}\n{metrics}"
    );
    let names = String::from_utf8_lossy(&out.stdout).into_owned();
    for family in [
        "certgate_requests",
        "certgate_throttled",
        "certgate_tls_handshakes",
        "certgate_tls_handshake_failures",
        "certgate_open_connections",
        "certgate_backend_duration_seconds",
        "certgate_certificate_days_left",
        "certgate_snapshot_reloads",
    ] {
        assert!(
            names.split(' ').any(|n| n.trim() == family),
            "no family {family} in {names}"
        );
    }
    Some(true)
}

#[test]
fn healthz_and_metrics_follow_what_the_gateway_does() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&gw);
    assert_eq!(get(admin, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(admin, "/nothing").0, 404);

    let config = gw.client_config(Some("client-a"));
    for _ in 0..2 {
        let mut client = Client::connect(gw.addr(), Arc::clone(&config)).unwrap();
        assert_eq!(client.get(MENU).status, 200);
    }
    assert_eq!(gw.client(None).get(MENU).status, 401);
    // A handshake that never finishes is counted when it is given up (here: the client goes).
    drop(TcpStream::connect(gw.addr()).unwrap());
    let open = gw.client(Some("client-a"));

    let metrics = common::eventually("the metrics count the dropped handshake", || {
        let (status, body) = get(admin, "/metrics");
        assert_eq!(status, 200);
        body.contains("certgate_tls_handshake_failures_total{reason=")
            .then_some(body)
    });
    assert_eq!(
        sample(
            &metrics,
            "certgate_requests_total{api=\"pizzashack\",status=\"200\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &metrics,
            "certgate_requests_total{api=\"pizzashack\",status=\"401\"}"
        ),
        1.0
    );
    assert!(sample(&metrics, "certgate_tls_handshakes_total{kind=\"full\"}") >= 2.0);
    assert!(sample(&metrics, "certgate_tls_handshakes_total{kind=\"resumed\"}") >= 1.0);
    assert_eq!(
        sample(&metrics, "certgate_backend_duration_seconds_count"),
        2.0
    );
    assert!(sample(&metrics, "certgate_open_connections") >= 1.0);
    let days = sample(
        &metrics,
        "certgate_certificate_days_left{alias=\"a-pizza\"}",
    );
    assert!(days > 30_000.0, "client-a is valid for 100 years: {days}");
    match python_parses(&metrics) {
        Some(_) => {}
        None => eprintln!("prometheus_client not installed: the metrics were not parsed"),
    }

    // A reload is counted.
    gw.signal("HUP");
    common::eventually("the reload is counted", || {
        let (_, body) = get(admin, "/metrics");
        (sample(&body, "certgate_snapshot_reloads_total{result=\"ok\"}") >= 1.0).then_some(())
    });

    // Draining: /healthz says so while a slow request finishes.
    let mut slow = gw.client(Some("client-a"));
    slow.send(common::get("/pizzashack/1.0.0/slow?ms=1500").as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(open);
    gw.signal("TERM");
    common::eventually("healthz says draining", || {
        (get(admin, "/healthz") == (503, "draining\n".to_owned())).then_some(())
    });
    assert_eq!(slow.read_response(false).unwrap().status, 200);
}
