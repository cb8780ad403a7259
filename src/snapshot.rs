//! The immutable, in-memory view of the store that the loop serves from. A new snapshot is built
//! whenever the database changes; connections pick up the newest one on their next request.
//! Building needs no X.509 parsing of client certificates, whose fields the store keeps; only
//! the CA entries and the CRLs are read into the forms webpki checks chains against.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::ServerConfig;
use webpki::{CertRevocationList, OwnedCertRevocationList};

use crate::model::{Api, CertEntry, CertKind, Config, Resource};
use crate::route::Router;
use crate::throttle::{self, Limit};
use crate::tls::{SessionState, TlsError};

/// One API with everything a request to it needs.
#[derive(Debug)]
pub struct ApiView {
    pub api: Api,
    pub base_path: String,
    /// The backend's addresses, shared with the exchanges under way so that starting one
    /// copies nothing.
    pub addrs: Rc<[SocketAddr]>,
    pub resources: Vec<Resource>,
    pub certs: Vec<CertEntry>,
    /// SHA-256 of a pinned certificate to its index in `certs`.
    pub pinned: HashMap<[u8; 32], usize>,
    /// The CA entries as trust anchors, and the index in `certs` of each.
    pub anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    pub anchor_entries: Vec<usize>,
    pub throttle: ApiThrottle,
}

/// What throttling needs of an API, worked out once per snapshot: the limit of each tier that
/// applies (none for Unlimited) and the stable keys of its buckets.
#[derive(Debug, Default)]
pub struct ApiThrottle {
    pub key: u64,
    /// The API's own tier: one bucket for the whole API.
    pub limit: Option<Limit>,
    /// Per resource, in `resources` order.
    pub resources: Vec<(u64, Option<Limit>)>,
    /// Per certificate entry, in `certs` order.
    pub entries: Vec<(u64, Option<Limit>)>,
}

pub struct Snapshot {
    /// Grows by one with every reload; verdicts cached under an older one are stale.
    pub generation: u64,
    pub tls: Arc<ServerConfig>,
    /// The PEM the TLS configuration was built from, to rebuild it only when it changes.
    server_pem: (String, String),
    pub router: Router,
    pub apis: Vec<ApiView>,
    /// Every stored CRL, for checking CA-issued chains (pinned entries carry their verdict).
    pub crls: Vec<CertRevocationList<'static>>,
    /// The throttling keys of every API, resource and certificate entry.
    bucket_owners: HashSet<u64>,
}

impl Snapshot {
    /// Whether a bucket's API, resource and entry are still here: buckets of removed
    /// certificates, resources and APIs are dropped at a reload.
    pub fn has_bucket_owner(&self, key: &throttle::Key) -> bool {
        let live = |k: u64| self.bucket_owners.contains(&k);
        match key.kind {
            throttle::Kind::Api => live(key.scope),
            throttle::Kind::Caller => live(key.scope) && live(key.entry),
            throttle::Kind::Resource => live(key.scope) && (key.entry == 0 || live(key.entry)),
        }
    }

    /// Builds a snapshot. `resolved` holds backend addresses looked up by `serve` at start,
    /// which win over those the store kept; `previous` lends its TLS configuration when the
    /// server certificate did not change.
    pub fn build(
        config: Config,
        generation: u64,
        session: &SessionState,
        require_client_cert: bool,
        resolved: &HashMap<String, Vec<SocketAddr>>,
        previous: Option<&Snapshot>,
    ) -> Result<Self, TlsError> {
        let server_pem = (config.server_cert_pem, config.server_key_pem);
        let tls = match previous {
            Some(p) if p.server_pem == server_pem => p.tls.clone(),
            _ => session.server_config(&server_pem.0, &server_pem.1, require_client_cert)?,
        };
        let mut apis: Vec<ApiView> = config
            .apis
            .into_iter()
            .map(|mut api| {
                if let Some(addrs) = resolved.get(&api.backend.authority) {
                    api.backend.addrs.clone_from(addrs);
                }
                ApiView {
                    base_path: api.base_path(),
                    addrs: api.backend.addrs.as_slice().into(),
                    api,
                    resources: Vec::new(),
                    certs: Vec::new(),
                    pinned: HashMap::new(),
                    anchors: Vec::new(),
                    anchor_entries: Vec::new(),
                    throttle: ApiThrottle::default(),
                }
            })
            .collect();
        let index: HashMap<String, usize> = apis
            .iter()
            .enumerate()
            .map(|(i, v)| (v.api.name.clone(), i))
            .collect();
        for resource in config.resources {
            if let Some(&i) = index.get(&resource.api) {
                apis[i].resources.push(resource);
            }
        }
        for cert in config.certs {
            let Some(&i) = index.get(&cert.api) else {
                continue;
            };
            let view = &mut apis[i];
            match cert.kind {
                CertKind::Pinned => {
                    view.pinned.insert(cert.sha256, view.certs.len());
                }
                CertKind::Ca => {
                    // `cert add --ca` checked that webpki takes it; one that it does not
                    // (a store edited by hand) only never matches.
                    let der = CertificateDer::from(cert.der.as_slice());
                    if let Ok(anchor) = webpki::anchor_from_trusted_cert(&der) {
                        view.anchors.push(anchor.to_owned());
                        view.anchor_entries.push(view.certs.len());
                    }
                }
            }
            view.certs.push(cert);
        }
        let crls = config
            .crls
            .iter()
            .filter_map(|der| OwnedCertRevocationList::from_der(der).ok())
            .map(CertRevocationList::from)
            .collect();
        let limits: HashMap<String, Limit> = config
            .tiers
            .iter()
            .filter_map(|t| Some((t.name.to_ascii_lowercase(), Limit::new(t.rate.as_ref()?))))
            .collect();
        let limit =
            |tier: Option<&str>| tier.and_then(|t| limits.get(&t.to_ascii_lowercase()).copied());
        for view in &mut apis {
            let name = view.api.name.as_str();
            view.throttle = ApiThrottle {
                key: throttle::name_key(&["api", name]),
                limit: limit(view.api.tier.as_deref()),
                resources: view
                    .resources
                    .iter()
                    .map(|r| {
                        let key =
                            throttle::name_key(&["resource", name, &r.method, &r.template.text]);
                        (key, limit(r.tier.as_deref()))
                    })
                    .collect(),
                entries: view
                    .certs
                    .iter()
                    .map(|c| {
                        (
                            throttle::name_key(&["cert", &c.alias]),
                            limit(Some(&c.tier)),
                        )
                    })
                    .collect(),
            };
        }
        let bucket_owners = apis
            .iter()
            .flat_map(|v| {
                let t = &v.throttle;
                let parts = t.resources.iter().chain(&t.entries).map(|(k, _)| *k);
                std::iter::once(t.key).chain(parts)
            })
            .collect();
        let router = Router::new(apis.iter().map(|v| v.base_path.as_str()));
        Ok(Self {
            generation,
            tls,
            server_pem,
            router,
            apis,
            crls,
            bucket_owners,
        })
    }
}
