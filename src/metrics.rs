//! The gateway's counters, and their Prometheus text exposition (SPEC 7) for `/metrics`.
//!
//! One registry per thread, as a logger is one per process: the loop's thread counts as
//! things happen, wherever they happen (a connection's exchange, a handshake, a reload), and
//! the admin endpoint ([`crate::admin`]) renders it with the gauges only the loop knows (open
//! connections, days left per certificate). Counting allocates only the first time a label
//! value is seen.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Upper bounds, in seconds, of the backend latency histogram's buckets.
const BACKEND_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
struct Registry {
    /// Per API, per status.
    requests: HashMap<String, HashMap<u16, u64>>,
    throttled: HashMap<String, u64>,
    handshakes_full: u64,
    handshakes_resumed: u64,
    handshake_failures: HashMap<&'static str, u64>,
    backend_counts: [u64; BACKEND_BOUNDS.len()],
    backend_sum: f64,
    backend_count: u64,
    reloads: HashMap<&'static str, u64>,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::new(Registry::default());
}

/// A request answered with `status` (`api` is `-` when none matched).
pub fn request(api: &str, status: u16) {
    REGISTRY.with_borrow_mut(|r| {
        let per_status = match r.requests.get_mut(api) {
            Some(m) => m,
            None => r.requests.entry(api.to_owned()).or_default(),
        };
        *per_status.entry(status).or_default() += 1;
    });
}

/// A request refused with 429.
pub fn throttled(api: &str) {
    REGISTRY.with_borrow_mut(|r| match r.throttled.get_mut(api) {
        Some(n) => *n += 1,
        None => {
            r.throttled.insert(api.to_owned(), 1);
        }
    });
}

/// A TLS handshake that completed, full or resumed.
pub fn handshake(resumed: bool) {
    REGISTRY.with_borrow_mut(|r| {
        if resumed {
            r.handshakes_resumed += 1;
        } else {
            r.handshakes_full += 1;
        }
    });
}

/// A TLS handshake that failed, and why (a short kebab-case reason).
pub fn handshake_failure(reason: &'static str) {
    REGISTRY.with_borrow_mut(|r| *r.handshake_failures.entry(reason).or_default() += 1);
}

/// How long a backend took, from the request leaving to the answer's end.
pub fn backend_duration(d: Duration) {
    let secs = d.as_secs_f64();
    REGISTRY.with_borrow_mut(|r| {
        for (count, bound) in r.backend_counts.iter_mut().zip(BACKEND_BOUNDS) {
            if secs <= bound {
                *count += 1;
            }
        }
        r.backend_sum += secs;
        r.backend_count += 1;
    });
}

/// A snapshot reload, and whether it took.
pub fn reload(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    REGISTRY.with_borrow_mut(|r| *r.reloads.entry(result).or_default() += 1);
}

/// The gauges the loop knows at the moment of a scrape.
pub struct Gauges<'a> {
    pub open_connections: usize,
    /// Certificate alias and whole days until it expires (negative once expired).
    pub certificate_days_left: &'a [(String, i64)],
}

/// The Prometheus text exposition (format 0.0.4) of everything counted, and `gauges`.
pub fn render(gauges: &Gauges<'_>) -> String {
    let mut out = String::with_capacity(4096);
    REGISTRY.with_borrow(|r| {
        family(
            &mut out,
            "certgate_requests_total",
            "counter",
            "Requests answered, by API and status.",
        );
        let mut requests: Vec<(&String, u16, u64)> = r
            .requests
            .iter()
            .flat_map(|(api, m)| m.iter().map(move |(s, n)| (api, *s, *n)))
            .collect();
        requests.sort();
        for (api, status, n) in requests {
            let _ = writeln!(
                out,
                "certgate_requests_total{{api=\"{}\",status=\"{status}\"}} {n}",
                escape(api)
            );
        }
        family(
            &mut out,
            "certgate_throttled_total",
            "counter",
            "Requests refused with 429, by API.",
        );
        let mut throttled: Vec<_> = r.throttled.iter().collect();
        throttled.sort();
        for (api, n) in throttled {
            let _ = writeln!(
                out,
                "certgate_throttled_total{{api=\"{}\"}} {n}",
                escape(api)
            );
        }
        family(
            &mut out,
            "certgate_tls_handshakes_total",
            "counter",
            "TLS handshakes completed, full or resumed.",
        );
        let _ = writeln!(
            out,
            "certgate_tls_handshakes_total{{kind=\"full\"}} {}",
            r.handshakes_full
        );
        let _ = writeln!(
            out,
            "certgate_tls_handshakes_total{{kind=\"resumed\"}} {}",
            r.handshakes_resumed
        );
        family(
            &mut out,
            "certgate_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed, by reason.",
        );
        let mut failures: Vec<_> = r.handshake_failures.iter().collect();
        failures.sort();
        for (reason, n) in failures {
            let _ = writeln!(
                out,
                "certgate_tls_handshake_failures_total{{reason=\"{reason}\"}} {n}"
            );
        }
        family(
            &mut out,
            "certgate_open_connections",
            "gauge",
            "Client connections open now.",
        );
        let _ = writeln!(out, "certgate_open_connections {}", gauges.open_connections);
        family(
            &mut out,
            "certgate_backend_duration_seconds",
            "histogram",
            "Time from a request leaving for the backend to the end of its answer.",
        );
        for (count, bound) in r.backend_counts.iter().zip(BACKEND_BOUNDS) {
            let _ = writeln!(
                out,
                "certgate_backend_duration_seconds_bucket{{le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "certgate_backend_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            r.backend_count
        );
        let _ = writeln!(
            out,
            "certgate_backend_duration_seconds_sum {}",
            r.backend_sum
        );
        let _ = writeln!(
            out,
            "certgate_backend_duration_seconds_count {}",
            r.backend_count
        );
        family(
            &mut out,
            "certgate_certificate_days_left",
            "gauge",
            "Whole days until a registered client certificate expires, by alias.",
        );
        for (alias, days) in gauges.certificate_days_left {
            let _ = writeln!(
                out,
                "certgate_certificate_days_left{{alias=\"{}\"}} {days}",
                escape(alias)
            );
        }
        family(
            &mut out,
            "certgate_snapshot_reloads_total",
            "counter",
            "Configuration reloads, by result.",
        );
        for result in ["ok", "error"] {
            let n = r.reloads.get(result).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "certgate_snapshot_reloads_total{{result=\"{result}\"}} {n}"
            );
        }
    });
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the exposition format quotes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_as_families() {
        request("pizza", 200);
        request("pizza", 200);
        request("pizza", 429);
        throttled("pizza");
        handshake(false);
        handshake(true);
        handshake_failure("timeout");
        backend_duration(Duration::from_millis(3));
        reload(true);
        let days = [("a\"b".to_owned(), 12)];
        let text = render(&Gauges {
            open_connections: 3,
            certificate_days_left: &days,
        });
        for line in [
            "certgate_requests_total{api=\"pizza\",status=\"200\"} 2",
            "certgate_requests_total{api=\"pizza\",status=\"429\"} 1",
            "certgate_throttled_total{api=\"pizza\"} 1",
            "certgate_tls_handshakes_total{kind=\"resumed\"} 1",
            "certgate_tls_handshake_failures_total{reason=\"timeout\"} 1",
            "certgate_open_connections 3",
            "certgate_backend_duration_seconds_bucket{le=\"0.0025\"} 0",
            "certgate_backend_duration_seconds_bucket{le=\"0.005\"} 1",
            "certgate_backend_duration_seconds_count 1",
            "certgate_certificate_days_left{alias=\"a\\\"b\"} 12",
            "certgate_snapshot_reloads_total{result=\"ok\"} 1",
            "# TYPE certgate_backend_duration_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
