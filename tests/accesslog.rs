//! The access log (SPEC 7): one line per request on stderr, in logfmt by default or JSON,
//! with time, request id, peer, API, caller, method, path, status, bytes, duration and
//! upstream time; for proxied answers, refusals, unreadable heads and failed backends alike.

mod common;

use common::{Backend, Db, Gateway};
use serde_json::Value;

const MENU: &str = "/pizzashack/1.0.0/menu?size=large";

fn request_lines(gw: &Gateway) -> Vec<String> {
    gw.log_text()
        .lines()
        .filter(|l| l.contains("msg=request") || l.contains("\"msg\":\"request\""))
        .map(str::to_owned)
        .collect()
}

/// The value of `key` in a logfmt line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len()
        + 2;
    let rest = &line[start..];
    rest.split(' ').next().unwrap()
}

#[test]
fn every_request_gets_one_logfmt_line() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let mut client = gw.client(Some("client-a"));
    let echo = client.get(MENU);
    assert_eq!(echo.status, 200);
    // The id the backend got is the one in the line.
    let id = echo.echo().header_values("x-request-id")[0].to_owned();
    assert_eq!(gw.client(None).get(MENU).status, 401);
    assert_eq!(client.get("/nowhere").status, 404);
    let mut raw = gw.client(Some("client-a"));
    assert_eq!(raw.request(b"GET / HTTP/1.1\r\n\r\n").status, 400);
    gw.wait_for_log("msg=request", 3);
    let lines = request_lines(&gw);
    assert_eq!(lines.len(), 4, "{lines:#?}");

    let ok = &lines[0];
    assert!(ok.starts_with("time=20"), "{ok}");
    assert_eq!(field(ok, "api"), "pizzashack");
    assert_eq!(field(ok, "caller"), "a-pizza");
    assert_eq!(field(ok, "method"), "GET");
    assert_eq!(
        field(ok, "path"),
        format!("{MENU:?}"),
        "a value with = is quoted"
    );
    assert_eq!(field(ok, "status"), "200");
    assert_eq!(
        field(ok, "bytes").parse::<usize>().unwrap(),
        echo.body.len()
    );
    assert!(field(ok, "peer").starts_with("127.0.0.1:"), "{ok}");
    assert!(field(ok, "duration_ms").parse::<f64>().unwrap() >= 0.0);
    assert!(field(ok, "upstream_ms").parse::<f64>().unwrap() >= 0.0);
    assert_eq!(field(ok, "id"), id);

    let refused = &lines[1];
    assert_eq!(
        (field(refused, "status"), field(refused, "caller")),
        ("401", "-")
    );
    assert_eq!(field(refused, "upstream_ms"), "-");
    assert_eq!(field(&lines[2], "status"), "404");
    assert_eq!(
        (field(&lines[3], "status"), field(&lines[3], "method")),
        ("400", "-")
    );
}

#[test]
fn json_lines_parse_and_a_dead_backend_is_logged_as_its_502() {
    let db = Db::init();
    db.api_add(
        "pizzashack",
        "/pizzashack",
        Some("1.0.0"),
        &common::dead_backend_url(),
    );
    db.cert_add("pizzashack", "a-pizza", "client-a");
    let gw = db.serve_with(&["--log-format", "json"]);
    assert_eq!(gw.client(Some("client-a")).get(MENU).status, 502);
    gw.wait_for_log("\"msg\":\"request\"", 0);
    let lines = request_lines(&gw);
    let line: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(line["status"], 502);
    assert_eq!(line["api"], "pizzashack");
    assert_eq!(line["path"], MENU);
    assert!(line["upstream_ms"].as_f64().is_some(), "{line}");
    assert!(line["time"].as_str().unwrap().ends_with('Z'));
    // The gateway's other lines are JSON too, but for the `listening on` announcements.
    gw.signal("HUP");
    gw.wait_for_log("configuration reloaded", 0);
    for line in gw.log_text().lines() {
        if line.starts_with("listening on ") {
            continue;
        }
        let parsed: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(parsed["msg"].is_string(), "{line}");
    }
}

#[test]
fn the_log_can_be_off_and_a_bad_format_is_refused() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &["--log-format", "off"]);
    assert_eq!(gw.client(Some("client-a")).get(MENU).status, 200);
    assert!(request_lines(&gw).is_empty());
    let out = Db::init().try_cli(&["serve", "--log-format", "xml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not one of logfmt, json, off"));
}

#[test]
fn a_failed_handshake_is_told_with_its_connection_and_peer() {
    let backend = Backend::start();
    let gw = Gateway::pizzashack(&backend, &[]);
    let mut sock = std::net::TcpStream::connect(gw.addr()).unwrap();
    std::io::Write::write_all(&mut sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    gw.wait_for_log("tls handshake failed", 0);
    let text = gw.log_text();
    let line = text
        .lines()
        .find(|l| l.contains("tls handshake failed"))
        .unwrap();
    assert!(line.contains(" conn=1 "), "{line}");
    assert_eq!(field(line, "peer"), sock.local_addr().unwrap().to_string());
    assert_eq!(field(line, "reason"), "bad-message");
    // The next connection has the next number, in its request lines too.
    assert_eq!(gw.client(Some("client-a")).get(MENU).status, 200);
    gw.wait_for_log("msg=request", 0);
    let lines = request_lines(&gw);
    assert_eq!(field(&lines[0], "conn"), "2");
}
