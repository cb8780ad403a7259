//! Throttling (SPEC 3): a token bucket per API and caller with the tier of its certificate
//! entry (one per leaf under a CA entry), per resource and caller, and per API; 429 `throttled`
//! with `Retry-After`, and `RateLimit-*` headers on every answer of a throttled API. Tier
//! changes apply live and keep what was used; the quota survives a restart.

mod common;

use common::{fixture, Backend, Client, Db, Gateway, Response};

const MENU: &str = "/pizzashack/1.0.0/menu";

fn number(response: &Response, name: &str) -> u64 {
    response
        .header(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", response.headers))
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// API pizzashack with a tier `Five` of 5 requests a minute.
fn db_with_five(backend: &Backend) -> Db {
    let db = Db::init();
    db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &backend.url());
    db.cli(&["tier", "add", "Five", "--requests", "5", "--per", "minute"]);
    db
}

fn set_tier(db: &Db, alias: &str, tier: &str) {
    db.cli(&["cert", "update", alias, "--tier", tier]);
}

/// Sends GETs of `path` until one is refused; returns how many passed, and the refusal.
fn until_throttled(client: &mut Client, path: &str, most: usize) -> (usize, Response) {
    for passed in 0..most {
        let response = client.get(path);
        if response.status == 429 {
            return (passed, response);
        }
        assert_eq!(response.status, 200, "{}", response.text());
    }
    panic!("{most} requests passed without a 429");
}

#[test]
fn a_five_per_minute_tier_allows_five_and_throttles_the_sixth() {
    let backend = Backend::start();
    let db = db_with_five(&backend);
    db.cert_add("pizzashack", "a-pizza", "client-a");
    set_tier(&db, "a-pizza", "Five");
    let gw = db.serve();
    let mut client = gw.client(Some("client-a"));
    for left in (0..5).rev() {
        let response = client.get(MENU);
        assert_eq!(response.status, 200);
        assert_eq!(number(&response, "ratelimit-limit"), 5);
        assert_eq!(number(&response, "ratelimit-remaining"), left);
        let reset = number(&response, "ratelimit-reset");
        assert!((1..=60).contains(&reset), "RateLimit-Reset {reset}");
    }
    let refused = client.get(MENU);
    assert_eq!(refused.status, 429);
    let problem = refused.json();
    assert_eq!(problem["code"], "throttled");
    assert!(
        problem["detail"].as_str().unwrap().contains("Five"),
        "{problem}"
    );
    let retry = number(&refused, "retry-after");
    assert!(
        (1..=12).contains(&retry),
        "Retry-After {retry}: one request is back in 12 s"
    );
    assert_eq!(number(&refused, "ratelimit-remaining"), 0);
    // The refusal took nothing and the connection serves on; a HEAD gets its 429 without a
    // body, so the next answer on the connection is read as itself.
    assert_eq!(client.get(MENU).status, 429);
    assert!(!refused.closes());
    client
        .send(format!("HEAD {MENU} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .unwrap();
    let head = client.read_response(true).unwrap();
    assert_eq!((head.status, head.body.len()), (429, 0));
    assert!(head.header("retry-after").is_some());
    let next = client.get(MENU);
    assert_eq!(next.json()["code"], "throttled");
}

#[test]
fn a_public_resource_throttles_each_caller_by_certificate_or_address() {
    let backend = Backend::start();
    let db = db_with_five(&backend);
    db.cli(&["tier", "add", "Two", "--requests", "2", "--per", "minute"]);
    db.cli(&[
        "api",
        "resource",
        "add",
        "pizzashack",
        "--method",
        "GET",
        "--path",
        "/menu",
        "--tier",
        "Two",
        "--no-auth",
    ]);
    db.cert_add("pizzashack", "a-pizza", "client-a");
    let gw = db.serve();
    assert_eq!(
        until_throttled(&mut gw.client(Some("client-a")), MENU, 10).0,
        2
    );
    // Another certificate (registered or not) is another caller; so is no certificate.
    assert_eq!(
        until_throttled(&mut gw.client(Some("client-b")), MENU, 10).0,
        2
    );
    assert_eq!(until_throttled(&mut gw.client(None), MENU, 10).0, 2);
    assert_eq!(
        gw.client(None).get(MENU).status,
        429,
        "the same address is the same caller"
    );
}

#[test]
fn two_certificates_and_two_leaves_of_a_ca_are_throttled_each_on_its_own() {
    let backend = Backend::start();
    let db = db_with_five(&backend);
    db.cli(&["tier", "add", "Two", "--requests", "2", "--per", "minute"]);
    db.cert_add("pizzashack", "a-pizza", "client-a");
    db.cert_add("pizzashack", "b-pizza", "client-b");
    set_tier(&db, "a-pizza", "Five");
    set_tier(&db, "b-pizza", "Two");
    db.cli(&[
        "cert",
        "add",
        "--api",
        "pizzashack",
        "--alias",
        "test-ca",
        "--ca",
        "--tier",
        "Two",
        fixture("ca.pem").to_str().unwrap(),
    ]);
    let gw = db.serve();
    assert_eq!(
        until_throttled(&mut gw.client(Some("client-b")), MENU, 10).0,
        2
    );
    assert_eq!(
        until_throttled(&mut gw.client(Some("client-a")), MENU, 10).0,
        5
    );
    assert_eq!(
        until_throttled(&mut gw.client(Some("leaf-p256")), MENU, 10).0,
        2
    );
    assert_eq!(
        until_throttled(&mut gw.client(Some("leaf-p384")), MENU, 10).0,
        2
    );
    // An Unlimited caller gets no RateLimit headers.
    gw.db().cert_add("pizzashack", "free", "client-c");
    let response = common::eventually("the new entry applies", || {
        let response = gw.client(Some("client-c")).get(MENU);
        (response.status == 200).then_some(response)
    });
    assert!(
        response.header("ratelimit-limit").is_none(),
        "{:?}",
        response.headers
    );
}

#[test]
fn a_resource_tier_and_an_api_tier_each_bite() {
    let backend = Backend::start();
    let db = db_with_five(&backend);
    db.cli(&["tier", "add", "Two", "--requests", "2", "--per", "minute"]);
    db.cli(&["tier", "add", "Three", "--requests", "3", "--per", "minute"]);
    db.cli(&[
        "api",
        "resource",
        "add",
        "pizzashack",
        "--method",
        "GET",
        "--path",
        "/menu",
        "--tier",
        "Two",
    ]);
    db.resource_add("pizzashack", "GET", "/order");
    db.cert_add("pizzashack", "a-pizza", "client-a");
    db.cert_add("pizzashack", "b-pizza", "client-b");
    let gw = db.serve();
    // The resource's bucket is per caller: each has two of /menu, and /order is free.
    let mut a = gw.client(Some("client-a"));
    let mut b = gw.client(Some("client-b"));
    let (passed, refused) = until_throttled(&mut a, MENU, 10);
    assert_eq!(passed, 2);
    assert!(refused.json()["detail"]
        .as_str()
        .unwrap()
        .contains("resource's tier Two"));
    assert_eq!(until_throttled(&mut b, MENU, 10).0, 2);
    for _ in 0..5 {
        assert_eq!(a.get("/pizzashack/1.0.0/order").status, 200);
    }
    // The API's tier: three requests a minute for everyone together.
    gw.db()
        .cli(&["api", "update", "pizzashack", "--tier", "Three"]);
    common::eventually("the API tier applies", || {
        let response = a.get("/pizzashack/1.0.0/order");
        (response.header("ratelimit-limit") == Some("3")).then_some(())
    });
    let mut served = 1;
    while a.get("/pizzashack/1.0.0/order").status == 200 {
        served += 1;
    }
    assert_eq!(served, 3);
    let refused = b.get("/pizzashack/1.0.0/order");
    assert_eq!(refused.status, 429, "the API's bucket is shared");
    assert!(refused.json()["detail"]
        .as_str()
        .unwrap()
        .contains("API's tier Three"));
}

#[test]
fn a_tier_change_applies_live_and_keeps_what_was_used() {
    let backend = Backend::start();
    let db = db_with_five(&backend);
    db.cert_add("pizzashack", "a-pizza", "client-a");
    set_tier(&db, "a-pizza", "Five");
    let gw = db.serve();
    let mut client = gw.client(Some("client-a"));
    assert_eq!(until_throttled(&mut client, MENU, 10).0, 5);
    // Five becomes ten a minute: five used, so five are left, on the same connection (the
    // requests refused meanwhile took nothing).
    gw.db().cli(&["tier", "update", "Five", "--requests", "10"]);
    let remaining = common::eventually("the new rate applies", || {
        let response = client.get(MENU);
        (response.header("ratelimit-limit") == Some("10"))
            .then(|| number(&response, "ratelimit-remaining"))
    });
    assert_eq!(remaining, 4, "five used before, one now");
    let (passed, _) = until_throttled(&mut client, MENU, 20);
    assert!((4..=5).contains(&passed), "{passed} passed of the 4 left");
    // Moving the certificate to another tier applies live too.
    gw.db().cli(&[
        "tier",
        "add",
        "Many",
        "--requests",
        "1000",
        "--per",
        "minute",
    ]);
    set_tier(gw.db(), "a-pizza", "Many");
    common::eventually("the certificate's new tier applies", || {
        (client.get(MENU).status == 200).then_some(())
    });
}

#[test]
fn the_quota_survives_a_restart() {
    let backend = Backend::start();
    let db = db_with_five(&backend);
    db.cli(&["tier", "add", "Daily", "--requests", "4", "--per", "day"]);
    db.cert_add("pizzashack", "a-pizza", "client-a");
    set_tier(&db, "a-pizza", "Daily");
    let gw = db.serve();
    let mut client = gw.client(Some("client-a"));
    for _ in 0..3 {
        assert_eq!(client.get(MENU).status, 200);
    }
    drop(client);
    let db = gw.stop();
    let gw: Gateway = db.serve();
    let mut client = gw.client(Some("client-a"));
    let response = client.get(MENU);
    assert_eq!(response.status, 200);
    assert_eq!(
        number(&response, "ratelimit-remaining"),
        0,
        "a day tier stays a day tier"
    );
    let refused = client.get(MENU);
    assert_eq!(refused.status, 429);
    assert!(
        number(&refused, "retry-after") > 3_600 * 5,
        "a token is back in six hours"
    );
}

/// `status --json` as rows.
fn status(db: &Db) -> Vec<serde_json::Value> {
    let out = db.cli(&["status", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn status_counts_allowed_and_throttled_per_caller_in_the_run_and_in_all() {
    let backend = Backend::start();
    let db = db_with_five(&backend);
    db.cert_add("pizzashack", "a-pizza", "client-a");
    set_tier(&db, "a-pizza", "Five");
    db.ca_add("pizzashack", "test-ca", "ca");
    let gw = db.serve();
    let mut client = gw.client(Some("client-a"));
    assert_eq!(until_throttled(&mut client, MENU, 10).0, 5);
    assert_eq!(client.get(MENU).status, 429);
    for _ in 0..3 {
        assert_eq!(gw.client(Some("leaf-p256")).get(MENU).status, 200);
    }
    let rows = common::eventually("the counts are saved", || {
        let rows = status(gw.db());
        let total: u64 = rows.iter().map(|r| r["allowed"].as_u64().unwrap()).sum();
        (total == 8).then_some(rows)
    });
    let row = |rows: &[serde_json::Value], alias: &str| {
        rows.iter()
            .find(|r| r["alias"] == alias)
            .unwrap_or_else(|| panic!("no row for {alias}: {rows:?}"))
            .clone()
    };
    let a = row(&rows, "a-pizza");
    assert_eq!(
        (a["allowed"].as_u64(), a["throttled"].as_u64()),
        (Some(5), Some(2))
    );
    let leaf = row(&rows, "test-ca");
    assert_eq!(leaf["allowed"], 3);
    assert_eq!(leaf["subject"], "O=certgate tests, CN=leaf-p256");
    assert_eq!(leaf["caller_sha256"].as_str().unwrap().len(), 64);

    // A restart zeroes the run's counts and keeps the totals.
    drop(client);
    let db = gw.stop();
    let gw = db.serve();
    let rows = status(gw.db());
    let a = row(&rows, "a-pizza");
    assert_eq!(
        (a["allowed"].as_u64(), a["allowed_total"].as_u64()),
        (Some(0), Some(5))
    );
    assert_eq!(a["throttled_total"], 2);
    let text = String::from_utf8(gw.db().cli(&["status"]).stdout).unwrap();
    assert!(
        text.starts_with("counts since the gateway started at"),
        "{text}"
    );
}
