//! `certgate check` (SPEC 2): whether the store is usable, and which certificates have expired
//! or expire within the warning period, as one line each for an operator or a monitoring job.
//! The report is pure: entries and the time in, lines out; the command reads the store and maps
//! the outcome to its exit code (0 fine, 1 certificates need attention, 2 store unusable).

use crate::certs::{self, CertInfo, Validity};
use crate::model::CertEntry;

/// How one certificate stands, worst first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Expired,
    Expiring,
    NotYetValid,
    Revoked,
    Ok,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Expiring => "expiring",
            Self::NotYetValid => "not-yet-valid",
            Self::Revoked => "revoked",
            Self::Ok => "ok",
        }
    }

    /// Whether it makes `check` exit 1.
    pub fn needs_attention(self) -> bool {
        matches!(self, Self::Expired | Self::Expiring)
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub health: Health,
    /// `server certificate` or `cert ALIAS (API NAME)`.
    pub what: String,
    pub detail: String,
}

/// The report for the server certificate and every entry, at `now`, warning `warn_days` ahead.
pub fn report(server: &CertInfo, entries: &[CertEntry], now: i64, warn_days: i64) -> Vec<Line> {
    let mut lines = vec![line(
        "server certificate".to_owned(),
        &server.subject,
        server.not_before,
        server.not_after,
        false,
        now,
        warn_days,
    )];
    for e in entries {
        lines.push(line(
            format!("cert {} (API {}, {})", e.alias, e.api, e.kind.as_str()),
            &e.subject,
            e.not_before,
            e.not_after,
            e.revoked,
            now,
            warn_days,
        ));
    }
    lines
}

fn line(
    what: String,
    subject: &str,
    not_before: i64,
    not_after: i64,
    revoked: bool,
    now: i64,
    warn_days: i64,
) -> Line {
    let days = certs::days_left(not_after, now);
    let until = certs::rfc3339(not_after);
    let (health, detail) = match Validity::at(not_before, not_after, now) {
        Validity::Expired => (Health::Expired, format!("{subject} expired on {until}")),
        Validity::NotYetValid => (
            Health::NotYetValid,
            format!("{subject} is valid from {}", certs::rfc3339(not_before)),
        ),
        Validity::Valid if days < warn_days => (
            Health::Expiring,
            format!("{subject} expires on {until}, in {days} days"),
        ),
        Validity::Valid => (
            Health::Ok,
            format!("{subject} is valid until {until}, {days} days left"),
        ),
    };
    let (health, detail) = match health {
        Health::Ok | Health::NotYetValid if revoked => (
            Health::Revoked,
            format!("{subject} is revoked by a stored CRL of its issuer"),
        ),
        _ => (health, detail),
    };
    Line {
        health,
        what,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CertKind;

    const DAY: i64 = 86_400;
    const NOW: i64 = 1_750_000_000;

    fn entry(alias: &str, not_after: i64, revoked: bool) -> CertEntry {
        CertEntry {
            alias: alias.into(),
            api: "pizza".into(),
            tier: "Unlimited".into(),
            kind: CertKind::Pinned,
            sha256: [0; 32],
            subject: format!("CN={alias}"),
            issuer: "CN=ca".into(),
            serial: "01".into(),
            not_before: NOW - DAY,
            not_after,
            scopes: vec![],
            der: vec![],
            revoked,
        }
    }

    #[test]
    fn each_certificate_gets_its_health() {
        let server = CertInfo {
            subject: "CN=certgate".into(),
            issuer: "CN=certgate".into(),
            serial: "01".into(),
            not_before: NOW - DAY,
            not_after: NOW + 400 * DAY,
            sha256: [0; 32],
            sans: vec![],
            is_ca: false,
        };
        let entries = [
            entry("fine", NOW + 31 * DAY, false),
            entry("soon", NOW + 29 * DAY + 5, false),
            entry("gone", NOW - 1, false),
            entry("revoked", NOW + 100 * DAY, true),
        ];
        let lines = report(&server, &entries, NOW, 30);
        let health: Vec<Health> = lines.iter().map(|l| l.health).collect();
        assert_eq!(
            health,
            [
                Health::Ok,
                Health::Ok,
                Health::Expiring,
                Health::Expired,
                Health::Revoked
            ]
        );
        assert_eq!(
            lines[2].detail,
            "CN=soon expires on 2025-07-14T15:06:45Z, in 29 days"
        );
        assert!(lines[3].detail.contains("expired on"));
        assert_eq!(lines[1].what, "cert fine (API pizza, pinned)");
        let attention = lines.iter().filter(|l| l.health.needs_attention()).count();
        assert_eq!(attention, 2);
        // A longer warning period catches more.
        let lines = report(&server, &entries, NOW, 500);
        assert_eq!(lines[0].health, Health::Expiring);
    }
}
