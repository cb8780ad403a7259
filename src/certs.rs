//! Certificates as files and fields: reading a client certificate (PEM or DER) and the fields
//! the store keeps of it, checking and generating the gateway's own server certificate, and the
//! validity arithmetic the commands print.
//!
//! Pure functions over bytes and times: no files, no SQLite, no clock. The commands read the
//! files and pass `now`; the store persists what these functions return.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::{Error as PemError, PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use thiserror::Error;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;

/// Why bytes were refused as a certificate. Messages read well after a file name
/// (`client.pem holds a private key; ...`).
#[derive(Debug, Error)]
pub enum CertError {
    #[error("holds a private key; give only the certificate")]
    PrivateKey,
    #[error("is empty")]
    Empty,
    #[error("is not a certificate: neither PEM with a CERTIFICATE block nor DER X.509")]
    NotCertificate,
    #[error("is not a certificate: no CERTIFICATE block in the PEM")]
    NoCertificate,
    #[error("is not a certificate: bad PEM: {0}")]
    Pem(String),
    #[error("is not a certificate: malformed X.509 ({0})")]
    X509(String),
    #[error("is not a certificate: {0} trailing bytes after the DER certificate")]
    Trailing(usize),
    #[error("expired on {0}")]
    Expired(String),
    #[error("is not a usable private key: {0}")]
    Key(String),
    #[error("does not match the certificate")]
    KeyMismatch,
    #[error("cannot generate the server certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("is not a CRL: neither PEM with an X509 CRL block nor DER")]
    NotCrl,
    #[error("is not a CRL: {0}")]
    BadCrl(String),
    #[error("is a delta CRL, which certgate does not take; give the issuer's full CRL")]
    DeltaCrl,
    #[error("is an indirect CRL, which certgate does not take; give the CRL its issuer signed for its own certificates")]
    IndirectCrl,
    #[error("is a CRL partitioned by revocation reason, which certgate does not take")]
    PartitionedCrl,
}

/// A client certificate as read from a file: the certificate, the chain that followed it, and
/// its parsed fields.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub der: Vec<u8>,
    pub chain: Vec<Vec<u8>>,
    pub info: CertInfo,
}

/// The fields of a certificate that the store keeps and the commands print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// Lower-case hex of the serial number's bytes, leading zero bytes removed.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub sha256: [u8; 32],
    /// Subject alternative names: DNS names and IP addresses.
    pub sans: Vec<String>,
    /// Basic constraints say CA:TRUE (what `openssl req -x509` makes by default).
    pub is_ca: bool,
}

/// A certificate revocation list as read from a file, with the fields the store keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crl {
    pub der: Vec<u8>,
    /// The issuer's name, in the form [`CertInfo::issuer`] has.
    pub issuer: String,
    /// The CRL number, in decimal.
    pub number: Option<String>,
    pub this_update: i64,
    pub next_update: Option<i64>,
    /// Serial numbers (as [`CertInfo::serial`]) with their revocation times.
    pub revoked: Vec<(String, i64)>,
}

/// Where a certificate stands against the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    Valid,
    Expired,
    NotYetValid,
}

impl Validity {
    pub fn at(not_before: i64, not_after: i64, now: i64) -> Self {
        if now < not_before {
            Self::NotYetValid
        } else if now > not_after {
            Self::Expired
        } else {
            Self::Valid
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Expired => "expired",
            Self::NotYetValid => "not-yet-valid",
        }
    }
}

/// A freshly generated or validated server certificate chain and key, as PEM.
#[derive(Clone, Debug)]
pub struct ServerPem {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Reads a client certificate from PEM (one or more CERTIFICATE blocks: the certificate, then
/// its chain) or DER. Any private key in the input refuses it, so a key is never stored by
/// mistake.
pub fn read_client_cert(bytes: &[u8]) -> Result<ClientCert, CertError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(CertError::Empty);
    }
    if !looks_like_pem(bytes) {
        let info = inspect(bytes).map_err(|_| CertError::NotCertificate)?;
        return Ok(ClientCert {
            der: bytes.to_vec(),
            chain: Vec::new(),
            info,
        });
    }
    if holds_private_key(bytes) {
        return Err(CertError::PrivateKey);
    }
    let mut certs = pem_certificates(bytes)?.into_iter();
    let der = certs.next().ok_or(CertError::NoCertificate)?;
    let chain: Vec<Vec<u8>> = certs.collect();
    for extra in &chain {
        inspect(extra)?;
    }
    let info = inspect(&der)?;
    Ok(ClientCert { der, chain, info })
}

/// Reads a CRL from PEM (an `X509 CRL` block) or DER. Refuses what webpki cannot check a
/// chain against (delta, indirect and reason-partitioned CRLs), and any private key.
pub fn read_crl(bytes: &[u8]) -> Result<Crl, CertError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(CertError::Empty);
    }
    let der = if looks_like_pem(bytes) {
        if holds_private_key(bytes) {
            return Err(CertError::PrivateKey);
        }
        let mut crls = <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes).filter_map(|s| match s {
            Ok((SectionKind::Crl, der)) => Some(Ok(der)),
            Ok(_) => None,
            Err(e) => Some(Err(CertError::Pem(pem_reason(e)))),
        });
        crls.next().ok_or(CertError::NotCrl)??
    } else {
        bytes.to_vec()
    };
    webpki::OwnedCertRevocationList::from_der(&der).map_err(|e| match e {
        webpki::Error::UnsupportedDeltaCrl => CertError::DeltaCrl,
        webpki::Error::UnsupportedIndirectCrl => CertError::IndirectCrl,
        webpki::Error::UnsupportedRevocationReasonsPartitioning => CertError::PartitionedCrl,
        webpki::Error::BadDer if !looks_like_pem(bytes) => CertError::NotCrl,
        other => CertError::BadCrl(format!("{other:?}")),
    })?;
    let (rest, crl) =
        x509_parser::parse_x509_crl(&der).map_err(|e| CertError::BadCrl(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::BadCrl(format!("{} trailing bytes", rest.len())));
    }
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| (serial_hex(r.raw_serial()), r.revocation_date.timestamp()))
        .collect();
    Ok(Crl {
        issuer: crl.issuer().to_string(),
        number: crl.crl_number().map(ToString::to_string),
        this_update: crl.last_update().timestamp(),
        next_update: crl.next_update().map(|t| t.timestamp()),
        revoked,
        der,
    })
}

/// Whether `crl_der` is signed by the key of certificate `issuer_der`.
pub fn crl_signed_by(crl_der: &[u8], issuer_der: &[u8]) -> bool {
    let (Ok((_, crl)), Ok((_, issuer))) = (
        x509_parser::parse_x509_crl(crl_der),
        x509_parser::parse_x509_certificate(issuer_der),
    ) else {
        return false;
    };
    crl.verify_signature(issuer.public_key()).is_ok()
}

/// Parses one DER certificate into the fields the store keeps.
pub fn inspect(der: &[u8]) -> Result<CertInfo, CertError> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::X509(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Trailing(rest.len()));
    }
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.iter().filter_map(san).collect(),
        _ => Vec::new(),
    };
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: serial_hex(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        sha256: sha256(der),
        sans,
        is_ca: matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca),
    })
}

/// Checks a server certificate chain and key given as PEM: the chain parses, its first
/// certificate is not expired at `now`, and the key is the one of that certificate.
/// Returns the leaf's fields.
pub fn check_server_pair(cert_pem: &str, key_pem: &str, now: i64) -> Result<CertInfo, CertError> {
    if holds_private_key(cert_pem.as_bytes()) {
        return Err(CertError::PrivateKey);
    }
    let chain = pem_certificates(cert_pem.as_bytes())?;
    let leaf = chain.first().ok_or(CertError::NoCertificate)?;
    let info = inspect(leaf)?;
    for extra in &chain[1..] {
        inspect(extra)?;
    }
    if Validity::at(info.not_before, info.not_after, now) == Validity::Expired {
        return Err(CertError::Expired(rfc3339(info.not_after)));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CertError::Key(pem_reason(e)))?;
    let chain = chain.into_iter().map(CertificateDer::from).collect();
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider()).map_err(|e| {
        match e {
            rustls::Error::InconsistentKeys(_) => CertError::KeyMismatch,
            other => CertError::Key(other.to_string()),
        }
    })?;
    Ok(info)
}

/// Generates a self-signed ECDSA P-256 server certificate, CN `certgate`, valid for ten years
/// from `now`, for localhost, 127.0.0.1, ::1 and `hostnames` (names or IP addresses).
pub fn generate_server_cert(hostnames: &[String], now: i64) -> Result<ServerPem, CertError> {
    let mut params = CertificateParams::new(hostnames.to_vec())?;
    let mut sans = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    for name in params.subject_alt_names.drain(..) {
        if !sans.contains(&name) {
            sans.push(name);
        }
    }
    params.subject_alt_names = sans;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "certgate");
    params.distinguished_name = dn;
    let start = OffsetDateTime::from_unix_timestamp(now - 3600).map_err(|_| rcgen::Error::Time)?;
    params.not_before = start;
    params.not_after = start + Duration::days(3653);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok(ServerPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A demo PKI as PEM: a CA and one client certificate it issued, with their keys.
#[derive(Clone, Debug)]
pub struct DemoPki {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub client_pem: String,
    pub client_key_pem: String,
}

/// Generates a CA (`CN=certgate demo CA`, ten years) and a client certificate it issues
/// (`CN=client`, one year, client-auth EKU), both ECDSA P-256, valid from an hour before `now`.
pub fn generate_demo_pki(client: &str, now: i64) -> Result<DemoPki, CertError> {
    let start = OffsetDateTime::from_unix_timestamp(now - 3600).map_err(|_| rcgen::Error::Time)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "certgate demo CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = start;
    ca.not_after = start + Duration::days(3653);
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::default();
    leaf.distinguished_name.push(DnType::CommonName, client);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.not_before = start;
    leaf.not_after = start + Duration::days(365);
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok(DemoPki {
        ca_pem: ca_cert.pem(),
        ca_key_pem,
        client_pem: leaf_cert.pem(),
        client_key_pem: leaf_key.serialize_pem(),
    })
}

/// All CERTIFICATE blocks of a PEM text, in order. Other sections are skipped.
pub fn pem_certificates(bytes: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    let mut certs = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes) {
        let (kind, der) = section.map_err(|e| CertError::Pem(pem_reason(e)))?;
        if kind == SectionKind::Certificate {
            certs.push(der);
        }
    }
    if certs.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(certs)
}

/// PEM text of DER certificates, one CERTIFICATE block each.
pub fn to_pem(ders: &[&[u8]]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    ders.iter()
        .map(|der| pem::encode_config(&pem::Pem::new("CERTIFICATE", *der), config))
        .collect()
}

pub fn sha256(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// A serial number as lower-case hex of its bytes, leading zero bytes removed.
fn serial_hex(serial: &[u8]) -> String {
    let first = serial
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(serial.len().saturating_sub(1));
    hex(&serial[first..])
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whole days from `now` to `not_after`, rounded down: negative once expired.
pub fn days_left(not_after: i64, now: i64) -> i64 {
    (not_after - now).div_euclid(86_400)
}

/// RFC 3339 in UTC, e.g. `2030-01-01T00:00:00Z`; the raw number for a time out of range.
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// Any `BEGIN ... PRIVATE KEY` line, encrypted and OpenSSH keys included (which the PEM
/// iterator would skip as unknown sections).
fn holds_private_key(bytes: &[u8]) -> bool {
    String::from_utf8_lossy(bytes).lines().any(|line| {
        let line = line.trim();
        line.starts_with("-----BEGIN ") && line.ends_with("PRIVATE KEY-----")
    })
}

fn pem_reason(e: PemError) -> String {
    match e {
        PemError::NoItemsFound => "no private key found".into(),
        other => other.to_string(),
    }
}

fn san(name: &GeneralName<'_>) -> Option<String> {
    match name {
        GeneralName::DNSName(dns) => Some((*dns).to_owned()),
        GeneralName::IPAddress(&[a, b, c, d]) => Some(Ipv4Addr::new(a, b, c, d).to_string()),
        GeneralName::IPAddress(bytes) => <[u8; 16]>::try_from(*bytes)
            .ok()
            .map(|octets| Ipv6Addr::from(octets).to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000;

    fn client(not_after: i64) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "client one");
        params.not_before = OffsetDateTime::from_unix_timestamp(NOW - 86_400).unwrap();
        params.not_after = OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        params.serial_number = Some(vec![0x00, 0x8a, 0x01].into());
        let key = KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn reads_pem_with_chain_and_der() {
        let (cert, _) = client(NOW + 86_400 * 10);
        let (other, _) = client(NOW + 86_400 * 20);
        let pem = format!("{}{}", cert.pem(), other.pem());
        let read = read_client_cert(pem.as_bytes()).unwrap();
        assert_eq!(read.der, cert.der().to_vec());
        assert_eq!(read.chain, vec![other.der().to_vec()]);
        assert_eq!(read.info.subject, "CN=client one");
        assert_eq!(read.info.serial, "8a01");
        assert_eq!(read.info.not_after, NOW + 86_400 * 10);
        assert_eq!(read.info.sans, vec!["client.example"]);
        assert_eq!(read.info.sha256, sha256(cert.der()));

        let der = read_client_cert(cert.der()).unwrap();
        assert_eq!(der.info, read.info);
        assert!(der.chain.is_empty());
    }

    #[test]
    fn refuses_keys_and_garbage() {
        let (cert, key) = client(NOW + 86_400);
        let with_key = format!("{}{}", cert.pem(), key.serialize_pem());
        assert!(matches!(
            read_client_cert(with_key.as_bytes()),
            Err(CertError::PrivateKey)
        ));
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(matches!(
            read_client_cert(encrypted.as_bytes()),
            Err(CertError::PrivateKey)
        ));
        assert!(matches!(read_client_cert(b" \n"), Err(CertError::Empty)));
        assert!(matches!(
            read_client_cert(b"hello world"),
            Err(CertError::NotCertificate)
        ));
        let csr = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(
            read_client_cert(csr.as_bytes()),
            Err(CertError::NoCertificate)
        ));
        let mut der = cert.der().to_vec();
        der.push(0);
        assert!(matches!(inspect(&der), Err(CertError::Trailing(1))));
        assert!(matches!(
            read_client_cert(&der),
            Err(CertError::NotCertificate)
        ));
    }

    #[test]
    fn validity_and_days() {
        assert_eq!(Validity::at(10, 20, 5), Validity::NotYetValid);
        assert_eq!(Validity::at(10, 20, 15), Validity::Valid);
        assert_eq!(Validity::at(10, 20, 21), Validity::Expired);
        assert_eq!(days_left(NOW + 86_400 * 2 + 5, NOW), 2);
        assert_eq!(days_left(NOW - 1, NOW), -1);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn demo_pki_is_a_ca_and_a_client_it_issued() {
        let pki = generate_demo_pki("demo-client", NOW).unwrap();
        let ca = read_client_cert(pki.ca_pem.as_bytes()).unwrap().info;
        let client = read_client_cert(pki.client_pem.as_bytes()).unwrap().info;
        assert!(ca.is_ca && !client.is_ca);
        assert_eq!(client.subject, "CN=demo-client");
        assert_eq!(client.issuer, ca.subject);
        assert_eq!(
            Validity::at(client.not_before, client.not_after, NOW),
            Validity::Valid
        );
        assert!(pki.client_key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn generated_server_cert_checks() {
        let pem = generate_server_cert(&["gw.example".into(), "10.0.0.1".into()], NOW).unwrap();
        let info = check_server_pair(&pem.cert_pem, &pem.key_pem, NOW).unwrap();
        assert_eq!(info.subject, "CN=certgate");
        assert_eq!(
            info.sans,
            vec!["localhost", "127.0.0.1", "::1", "gw.example", "10.0.0.1"]
        );
        assert!(info.not_after - NOW > 86_400 * 3650);

        let other = generate_server_cert(&[], NOW).unwrap();
        assert!(matches!(
            check_server_pair(&pem.cert_pem, &other.key_pem, NOW),
            Err(CertError::KeyMismatch)
        ));
        assert!(matches!(
            check_server_pair(&pem.cert_pem, &pem.cert_pem, NOW),
            Err(CertError::Key(_))
        ));
        assert!(matches!(
            check_server_pair(&pem.key_pem, &pem.key_pem, NOW),
            Err(CertError::PrivateKey)
        ));
        assert!(matches!(
            check_server_pair(&pem.cert_pem, &pem.key_pem, NOW + 86_400 * 4000),
            Err(CertError::Expired(_))
        ));
    }
}
