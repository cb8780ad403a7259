//! The security decision for one routed request (SPEC 3): how the caller's client certificate
//! stands for this API, whether that lets the request through, and whether its entry holds the
//! resource's scopes. Pure: the connection's certificate, the API's view in the snapshot and
//! the time go in, a verdict comes out.
//!
//! Two steps, so that the costly one can be cached: [`standing`] finds the certificate's entry
//! (a pinned fingerprint by hash, or a chain to a CA entry built and checked by webpki against
//! the stored CRLs), which the connection keeps per API and snapshot generation; [`decide`]
//! then checks the clock, revocation of pinned entries and scopes on every request.
//!
//! OAuth2 is not part of this version: the commands refuse to enable it, so mTLS is always
//! mandatory here.

use rustls::pki_types::{CertificateDer, UnixTime};
use webpki::{
    EndEntityCert, KeyUsage, RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

use crate::http::Problem;
use crate::model::{CertEntry, Resource};
use crate::snapshot::{ApiView, Snapshot};

/// What the TLS layer learnt about the client, computed once per connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub sha256: [u8; 32],
    /// The subject as x509-parser prints it, for refusals that name it.
    pub subject: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// How a client certificate stands for one API, before the clock and the scopes are asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Its fingerprint is pinned: entry `i` of the API's certificates.
    Pinned(usize),
    /// It chains to the CA entry `i`, and no stored CRL revokes it or its issuers.
    Issued(usize),
    /// Neither: not registered for this API (the reason, when webpki gave a telling one).
    NotRegistered(Option<&'static str>),
    /// It chains to a CA entry but fails there: expired, not yet valid or revoked.
    Refused(Refusal),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// `entry` indexes the API's certificate entries; `None` for a public resource.
    Allow {
        entry: Option<usize>,
    },
    Refuse(Refusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    ClientCertificateRequired {
        api: String,
    },
    CertificateNotAllowed {
        subject: String,
        api: String,
        why: Option<&'static str>,
    },
    /// `who` names the certificate: its alias when pinned, else its subject.
    CertificateExpired {
        who: String,
        not_after: i64,
    },
    CertificateNotYetValid {
        who: String,
        not_before: i64,
    },
    CertificateRevoked {
        who: String,
    },
    InsufficientScope {
        missing: String,
    },
}

/// Finds how `cert` (the leaf of `chain`, as the client sent it) stands for `api`. A pinned
/// entry wins over a CA entry; webpki runs only where no pinned entry matches and the API has
/// CA entries.
pub fn standing(
    cert: &ClientCert,
    chain: &[CertificateDer<'_>],
    api: &ApiView,
    snapshot: &Snapshot,
    now: i64,
) -> Standing {
    if let Some(&i) = api.pinned.get(&cert.sha256) {
        return Standing::Pinned(i);
    }
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Standing::NotRegistered(None);
    };
    if api.anchors.is_empty() {
        return Standing::NotRegistered(None);
    }
    let Ok(leaf) = EndEntityCert::try_from(leaf) else {
        return Standing::NotRegistered(Some("it cannot be parsed"));
    };
    let crls: Vec<_> = snapshot.crls.iter().collect();
    let revocation = RevocationOptionsBuilder::new(&crls).ok().map(|builder| {
        builder
            .with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
            .build()
    });
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    let verified = leaf.verify_for_usage(
        algorithms,
        &api.anchors,
        intermediates,
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64)),
        KeyUsage::client_auth(),
        revocation,
        None,
    );
    let who = || cert.subject.clone();
    match verified {
        Ok(path) => {
            // webpki hands back the very anchor of the slice it was given.
            let anchor = path.anchor();
            let found = api.anchors.iter().position(|a| std::ptr::eq(a, anchor));
            match found {
                Some(i) => Standing::Issued(api.anchor_entries[i]),
                None => Standing::NotRegistered(None),
            }
        }
        Err(webpki::Error::CertExpired { not_after, .. }) => {
            Standing::Refused(Refusal::CertificateExpired {
                who: chain_member(cert, not_after.as_secs() as i64, cert.not_after),
                not_after: not_after.as_secs() as i64,
            })
        }
        Err(webpki::Error::CertNotValidYet { not_before, .. }) => {
            Standing::Refused(Refusal::CertificateNotYetValid {
                who: chain_member(cert, not_before.as_secs() as i64, cert.not_before),
                not_before: not_before.as_secs() as i64,
            })
        }
        Err(webpki::Error::CertRevoked) => {
            Standing::Refused(Refusal::CertificateRevoked { who: who() })
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(_)) => Standing::NotRegistered(Some(
            "its extended key usage does not allow client authentication",
        )),
        Err(webpki::Error::UnknownIssuer) => Standing::NotRegistered(None),
        Err(_) => Standing::NotRegistered(Some(
            "its chain to a CA registered for this API does not verify",
        )),
    }
}

/// Names the certificate whose time webpki refused: the client's own, or one of its chain.
fn chain_member(cert: &ClientCert, refused: i64, leaf: i64) -> String {
    if refused == leaf {
        cert.subject.clone()
    } else {
        format!("{} (a certificate of its chain)", cert.subject)
    }
}

/// Decides one request from the caller's certificate and its standing for `api`. `now` is
/// Unix seconds.
pub fn decide(
    caller: Option<(&ClientCert, &Standing)>,
    api: &ApiView,
    resource: Option<&Resource>,
    now: i64,
) -> Decision {
    if resource.is_some_and(|r| r.no_auth) {
        return Decision::Allow { entry: None };
    }
    let Some((cert, standing)) = caller else {
        return Decision::Refuse(Refusal::ClientCertificateRequired {
            api: api.api.name.clone(),
        });
    };
    let (index, who, not_before, not_after) = match standing {
        Standing::Pinned(i) => {
            let entry = &api.certs[*i];
            if entry.revoked {
                return Decision::Refuse(Refusal::CertificateRevoked {
                    who: format!("{:?}", entry.alias),
                });
            }
            (
                *i,
                format!("{:?}", entry.alias),
                entry.not_before,
                entry.not_after,
            )
        }
        // The chain was checked when the standing was found; the clock moves on since. The
        // CA entry itself is an anchor to webpki, which never judges anchors: its own
        // revocation and validity are checked here.
        Standing::Issued(i) => {
            let ca = &api.certs[*i];
            if ca.revoked {
                return Decision::Refuse(Refusal::CertificateRevoked {
                    who: format!("{} (its CA entry {:?})", cert.subject, ca.alias),
                });
            }
            if now > ca.not_after {
                return Decision::Refuse(Refusal::CertificateExpired {
                    who: format!("{} (its CA entry {:?})", cert.subject, ca.alias),
                    not_after: ca.not_after,
                });
            }
            (*i, cert.subject.clone(), cert.not_before, cert.not_after)
        }
        Standing::NotRegistered(why) => {
            return Decision::Refuse(Refusal::CertificateNotAllowed {
                subject: cert.subject.clone(),
                api: api.api.name.clone(),
                why: *why,
            })
        }
        Standing::Refused(refusal) => return Decision::Refuse(refusal.clone()),
    };
    if now > not_after {
        return Decision::Refuse(Refusal::CertificateExpired { who, not_after });
    }
    if now < not_before {
        return Decision::Refuse(Refusal::CertificateNotYetValid { who, not_before });
    }
    let entry: &CertEntry = &api.certs[index];
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
            Self::CertificateNotAllowed { subject, api, why } => Problem::new(
                401,
                "certificate-not-allowed",
                "Certificate not allowed",
                match why {
                    None => format!("the client certificate {subject:?} is not registered for API {api}"),
                    Some(why) => format!("the client certificate {subject:?} is not allowed for API {api}: {why}"),
                },
            ),
            Self::CertificateExpired { who, not_after } => Problem::new(
                401,
                "certificate-expired",
                "Certificate expired",
                format!("the client certificate {who} expired on {}", rfc3339(*not_after)),
            ),
            Self::CertificateNotYetValid { who, not_before } => Problem::new(
                401,
                "certificate-not-yet-valid",
                "Certificate not yet valid",
                format!("the client certificate {who} is valid from {}", rfc3339(*not_before)),
            ),
            Self::CertificateRevoked { who } => Problem::new(
                401,
                "certificate-revoked",
                "Certificate revoked",
                format!("the client certificate {who} is revoked by a stored CRL of its issuer"),
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
            revoked: false,
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
            anchors: Vec::new(),
            anchor_entries: Vec::new(),
            throttle: Default::default(),
        }
    }

    fn client(sha: u8) -> ClientCert {
        ClientCert {
            sha256: [sha; 32],
            subject: "CN=someone".into(),
            not_before: 500,
            not_after: 3_000,
        }
    }

    /// Decides for a client whose standing is the pinned lookup (no CA entries here).
    fn decide_pinned(
        api: &ApiView,
        sha: Option<u8>,
        resource: Option<&Resource>,
        now: i64,
    ) -> Decision {
        let cert = sha.map(client);
        let standing = cert.as_ref().map(|c| match api.pinned.get(&c.sha256) {
            Some(&i) => Standing::Pinned(i),
            None => Standing::NotRegistered(None),
        });
        decide(cert.as_ref().zip(standing.as_ref()), api, resource, now)
    }

    #[test]
    fn pinned_certificates() {
        let api = view(vec![entry("a", 1, &[]), entry("b", 2, &["read"])]);
        assert_eq!(
            decide_pinned(&api, Some(1), None, 1_500),
            Decision::Allow { entry: Some(0) }
        );
        assert_eq!(
            decide_pinned(&api, Some(2), None, 1_500),
            Decision::Allow { entry: Some(1) }
        );
        assert!(matches!(
            decide_pinned(&api, None, None, 1_500),
            Decision::Refuse(Refusal::ClientCertificateRequired { .. })
        ));
        assert!(matches!(
            decide_pinned(&api, Some(3), None, 1_500),
            Decision::Refuse(Refusal::CertificateNotAllowed { why: None, .. })
        ));
        // The entry's validity counts, not the presented certificate's.
        assert_eq!(
            decide_pinned(&api, Some(1), None, 2_001),
            Decision::Refuse(Refusal::CertificateExpired {
                who: "\"a\"".into(),
                not_after: 2_000
            })
        );
        assert!(matches!(
            decide_pinned(&api, Some(1), None, 999),
            Decision::Refuse(Refusal::CertificateNotYetValid { .. })
        ));
    }

    #[test]
    fn a_revoked_pinned_entry_is_refused_and_public_resources_stay_public() {
        let mut revoked = entry("a", 1, &[]);
        revoked.revoked = true;
        let api = view(vec![revoked]);
        assert!(matches!(
            decide_pinned(&api, Some(1), None, 1_500),
            Decision::Refuse(Refusal::CertificateRevoked { .. })
        ));
        let public = Resource {
            api: "pizza".into(),
            method: "GET".into(),
            template: "/menu".parse().unwrap(),
            tier: None,
            scopes: vec![],
            no_auth: true,
        };
        assert_eq!(
            decide_pinned(&api, Some(1), Some(&public), 1_500),
            Decision::Allow { entry: None }
        );
    }

    #[test]
    fn a_ca_issued_standing_is_held_to_the_leafs_and_the_cas_validity_and_revocation() {
        // The CA entry is valid from 1000 to 2000, the leaf from 500 to 3000.
        let mut ca = entry("ca", 9, &["read"]);
        ca.kind = CertKind::Ca;
        let mut api = view(vec![ca]);
        let cert = client(7);
        let issued = Standing::Issued(0);
        assert_eq!(
            decide(Some((&cert, &issued)), &api, None, 1_500),
            Decision::Allow { entry: Some(0) }
        );
        assert!(
            matches!(
                decide(Some((&cert, &issued)), &api, None, 2_500),
                Decision::Refuse(Refusal::CertificateExpired {
                    not_after: 2_000,
                    ..
                })
            ),
            "an expired CA entry lets no leaf in"
        );
        let mut leaf = client(7);
        leaf.not_after = 1_200;
        assert!(matches!(
            decide(Some((&leaf, &issued)), &api, None, 1_500),
            Decision::Refuse(Refusal::CertificateExpired {
                not_after: 1_200,
                ..
            })
        ));
        api.certs[0].revoked = true;
        assert!(
            matches!(
                decide(Some((&cert, &issued)), &api, None, 1_500),
                Decision::Refuse(Refusal::CertificateRevoked { .. })
            ),
            "a revoked CA entry lets no leaf in"
        );
        let refused = Standing::Refused(Refusal::CertificateRevoked { who: "CN=x".into() });
        assert!(matches!(
            decide(Some((&cert, &refused)), &api, None, 1_500),
            Decision::Refuse(Refusal::CertificateRevoked { .. })
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
            decide_pinned(&api, Some(1), Some(&resource), 1_500),
            Decision::Refuse(Refusal::InsufficientScope {
                missing: "read".into()
            })
        );
        assert_eq!(
            decide_pinned(&api, Some(2), Some(&resource), 1_500),
            Decision::Allow { entry: Some(1) }
        );
        resource.no_auth = true;
        assert_eq!(
            decide_pinned(&api, None, Some(&resource), 1_500),
            Decision::Allow { entry: None }
        );
    }

    #[test]
    fn refusals_name_their_reason() {
        let problem = Refusal::CertificateExpired {
            who: "\"a\"".into(),
            not_after: 0,
        }
        .to_problem();
        assert_eq!((problem.status, problem.code), (401, "certificate-expired"));
        assert!(
            problem.detail.contains("1970-01-01T00:00:00Z"),
            "{}",
            problem.detail
        );
        let problem = Refusal::CertificateNotAllowed {
            subject: "CN=x".into(),
            api: "pizza".into(),
            why: None,
        }
        .to_problem();
        assert!(
            problem.detail.contains("CN=x")
                && problem.detail.contains("not registered for API pizza")
        );
    }
}
