//! The security decision for one routed request (SPEC 3): does the caller's client certificate
//! pass for this API, and does its entry hold the resource's scopes. Pure: the connection's
//! identity, the API's view in the snapshot and the time go in, a verdict comes out.
//!
//! OAuth2 is not part of this version: the commands refuse to enable it, so mTLS is always
//! mandatory here.

use crate::http::Problem;
use crate::model::{CertEntry, Resource};
use crate::snapshot::ApiView;

/// What the TLS layer learnt about the client, computed once per connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub sha256: [u8; 32],
    /// The subject as x509-parser prints it, for refusals that name it.
    pub subject: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// `entry` indexes the API's certificate entries; `None` for a public resource.
    Allow {
        entry: Option<usize>,
    },
    Refuse(Refusal),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    ClientCertificateRequired { api: String },
    CertificateNotAllowed { subject: String, api: String },
    CertificateExpired { alias: String, not_after: i64 },
    CertificateNotYetValid { alias: String, not_before: i64 },
    InsufficientScope { missing: String },
}

/// Decides one request. `now` is Unix seconds.
pub fn decide(
    cert: Option<&ClientCert>,
    api: &ApiView,
    resource: Option<&Resource>,
    now: i64,
) -> Decision {
    if resource.is_some_and(|r| r.no_auth) {
        return Decision::Allow { entry: None };
    }
    let Some(cert) = cert else {
        return Decision::Refuse(Refusal::ClientCertificateRequired {
            api: api.api.name.clone(),
        });
    };
    let Some(&index) = api.pinned.get(&cert.sha256) else {
        return Decision::Refuse(Refusal::CertificateNotAllowed {
            subject: cert.subject.clone(),
            api: api.api.name.clone(),
        });
    };
    let entry: &CertEntry = &api.certs[index];
    if now > entry.not_after {
        return Decision::Refuse(Refusal::CertificateExpired {
            alias: entry.alias.clone(),
            not_after: entry.not_after,
        });
    }
    if now < entry.not_before {
        return Decision::Refuse(Refusal::CertificateNotYetValid {
            alias: entry.alias.clone(),
            not_before: entry.not_before,
        });
    }
    if let Some(resource) = resource {
        if let Some(missing) = resource.scopes.iter().find(|s| !entry.scopes.contains(s)) {
            return Decision::Refuse(Refusal::InsufficientScope {
                missing: missing.clone(),
            });
        }
    }
    Decision::Allow { entry: Some(index) }
}

impl Refusal {
    pub fn to_problem(&self) -> Problem {
        match self {
            Self::ClientCertificateRequired { api } => Problem::new(
                401,
                "client-certificate-required",
                "Client certificate required",
                format!("API {api} requires a client certificate; none was presented in the TLS handshake"),
            ),
            Self::CertificateNotAllowed { subject, api } => Problem::new(
                401,
                "certificate-not-allowed",
                "Certificate not allowed",
                format!("the client certificate {subject:?} is not registered for API {api}"),
            ),
            Self::CertificateExpired { alias, not_after } => Problem::new(
                401,
                "certificate-expired",
                "Certificate expired",
                format!("the client certificate {alias:?} expired on {}", rfc3339(*not_after)),
            ),
            Self::CertificateNotYetValid { alias, not_before } => Problem::new(
                401,
                "certificate-not-yet-valid",
                "Certificate not yet valid",
                format!("the client certificate {alias:?} is valid from {}", rfc3339(*not_before)),
            ),
            Self::InsufficientScope { missing } => Problem::new(
                403,
                "insufficient-scope",
                "Insufficient scope",
                format!("this resource needs scope {missing:?}, which the caller does not hold"),
            ),
        }
    }
}

/// Unix seconds as RFC 3339 UTC.
pub fn rfc3339(unix: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::{Api, AuthMode, Backend, CertKind};

    fn entry(alias: &str, sha: u8, scopes: &[&str]) -> CertEntry {
        CertEntry {
            alias: alias.into(),
            api: "pizza".into(),
            tier: "Unlimited".into(),
            kind: CertKind::Pinned,
            sha256: [sha; 32],
            subject: format!("CN={alias}"),
            issuer: format!("CN={alias}"),
            serial: "01".into(),
            not_before: 1_000,
            not_after: 2_000,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            der: vec![],
        }
    }

    fn view(certs: Vec<CertEntry>) -> ApiView {
        let pinned: HashMap<[u8; 32], usize> = certs
            .iter()
            .enumerate()
            .map(|(i, c)| (c.sha256, i))
            .collect();
        ApiView {
            api: Api {
                name: "pizza".into(),
                context: "/pizza".into(),
                version: None,
                backend: Backend::parse("http://127.0.0.1:1").unwrap(),
                mtls: AuthMode::Mandatory,
                oauth2: AuthMode::Off,
                tier: None,
            },
            base_path: "/pizza".into(),
            addrs: Vec::new().into(),
            resources: vec![],
            certs,
            pinned,
        }
    }

    fn client(sha: u8) -> ClientCert {
        ClientCert {
            sha256: [sha; 32],
            subject: "CN=someone".into(),
        }
    }

    #[test]
    fn pinned_certificates() {
        let api = view(vec![entry("a", 1, &[]), entry("b", 2, &["read"])]);
        assert_eq!(
            decide(Some(&client(1)), &api, None, 1_500),
            Decision::Allow { entry: Some(0) }
        );
        assert_eq!(
            decide(Some(&client(2)), &api, None, 1_500),
            Decision::Allow { entry: Some(1) }
        );
        assert!(matches!(
            decide(None, &api, None, 1_500),
            Decision::Refuse(Refusal::ClientCertificateRequired { .. })
        ));
        assert!(matches!(
            decide(Some(&client(3)), &api, None, 1_500),
            Decision::Refuse(Refusal::CertificateNotAllowed { .. })
        ));
        assert!(matches!(
            decide(Some(&client(1)), &api, None, 2_001),
            Decision::Refuse(Refusal::CertificateExpired { .. })
        ));
        assert!(matches!(
            decide(Some(&client(1)), &api, None, 999),
            Decision::Refuse(Refusal::CertificateNotYetValid { .. })
        ));
    }

    #[test]
    fn scopes_and_public_resources() {
        let api = view(vec![entry("a", 1, &[]), entry("b", 2, &["read"])]);
        let mut resource = Resource {
            api: "pizza".into(),
            method: "GET".into(),
            template: "/menu".parse().unwrap(),
            tier: None,
            scopes: vec!["read".into()],
            no_auth: false,
        };
        assert_eq!(
            decide(Some(&client(1)), &api, Some(&resource), 1_500),
            Decision::Refuse(Refusal::InsufficientScope {
                missing: "read".into()
            })
        );
        assert_eq!(
            decide(Some(&client(2)), &api, Some(&resource), 1_500),
            Decision::Allow { entry: Some(1) }
        );
        resource.no_auth = true;
        assert_eq!(
            decide(None, &api, Some(&resource), 1_500),
            Decision::Allow { entry: None }
        );
    }

    #[test]
    fn refusals_name_their_reason() {
        let problem = Refusal::CertificateExpired {
            alias: "a".into(),
            not_after: 0,
        }
        .to_problem();
        assert_eq!((problem.status, problem.code), (401, "certificate-expired"));
        assert!(
            problem.detail.contains("1970-01-01T00:00:00Z"),
            "{}",
            problem.detail
        );
    }
}
