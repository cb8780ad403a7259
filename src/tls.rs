//! The rustls server side: the server configuration built from the store's certificate and key,
//! and the client-certificate verifier that accepts any certificate whose key the client proves
//! it holds (SPEC 3 and 8), so that every judgement is made per request and answered in HTTP.
//!
//! Session storage and the ticketer live in [`SessionState`], shared by every configuration the
//! gateway builds, so that resumption keeps working across reloads.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("the server certificate is not valid PEM: {0}")]
    Certificate(rustls::pki_types::pem::Error),
    #[error("the server key is not valid PEM: {0}")]
    Key(rustls::pki_types::pem::Error),
    #[error("the server certificate PEM holds no certificate")]
    NoCertificate,
    #[error("cannot use the server certificate and key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What outlives any one `ServerConfig`: the resumption state and the provider.
#[derive(Clone)]
pub struct SessionState {
    provider: Arc<CryptoProvider>,
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn ProducesTickets>,
}

impl SessionState {
    pub fn new() -> Result<Self, TlsError> {
        Ok(Self {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            sessions: ServerSessionMemoryCache::new(4096),
            ticketer: rustls::crypto::ring::Ticketer::new()?,
        })
    }

    /// Builds the server configuration for a certificate chain and key given as PEM.
    pub fn server_config(
        &self,
        cert_pem: &str,
        key_pem: &str,
        require_client_cert: bool,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(TlsError::Certificate)?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(TlsError::Key)?;
        let verifier = Arc::new(AnyClientCert {
            algorithms: self.provider.signature_verification_algorithms,
            mandatory: require_client_cert,
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.session_storage = self.sessions.clone();
        config.ticketer = self.ticketer.clone();
        Ok(Arc::new(config))
    }
}

/// Asks every client for a certificate, sends no CA hints, and accepts any certificate (or none,
/// unless mandatory) once the client has proved possession of its key. Who may call what is
/// decided per request by [`crate::policy`].
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
