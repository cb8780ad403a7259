//! The configuration as values: what the store keeps and what the serving loop builds its
//! snapshot from. Parsing of user-facing strings (auth modes, backend URLs, methods, path
//! templates) lives here so that the commands and the loop agree on one meaning.
//!
//! Nothing in this module touches SQLite, sockets or X.509; the store fills these types and the
//! snapshot consumes them.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use thiserror::Error;

/// Why a user-supplied value was refused; the message is the one-line reason shown to the user.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{0:?} is not one of mandatory, optional, off")]
    AuthMode(String),
    #[error("backend {0:?} must look like http://HOST[:PORT][/PATH]")]
    BackendUrl(String),
    #[error("cannot resolve backend host {host:?}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("context {0:?} must start with / and hold path segments of letters, digits and -._~")]
    Context(String),
    #[error("version {0:?} must be one path segment of letters, digits and -._~")]
    Version(String),
    #[error("method {0:?} must be an HTTP method such as GET or POST")]
    Method(String),
    #[error(
        "path template {0:?} must start with /, use {{name}} for whole segments and * only last, and have at most 63 segments"
    )]
    Template(String),
    #[error("{0:?} is not one of second, minute, hour, day")]
    Period(String),
}

/// How an API treats one authentication scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    Mandatory,
    Optional,
    Off,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mandatory => "mandatory",
            Self::Optional => "optional",
            Self::Off => "off",
        }
    }
}

impl FromStr for AuthMode {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mandatory" => Ok(Self::Mandatory),
            "optional" => Ok(Self::Optional),
            "off" => Ok(Self::Off),
            _ => Err(ParseError::AuthMode(s.to_owned())),
        }
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The refill period of a tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Second,
    Minute,
    Hour,
    Day,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    pub fn seconds(self) -> u64 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3600,
            Self::Day => 86_400,
        }
    }
}

impl FromStr for Period {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "second" => Ok(Self::Second),
            "minute" => Ok(Self::Minute),
            "hour" => Ok(Self::Hour),
            "day" => Ok(Self::Day),
            _ => Err(ParseError::Period(s.to_owned())),
        }
    }
}

/// A throttling tier; `rate` is `None` for Unlimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier {
    pub name: String,
    pub rate: Option<Rate>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub requests: u64,
    pub per: Period,
    pub burst: u64,
}

/// The URL of the echo backend built into the gateway ([`crate::echo`]).
pub const ECHO_BACKEND: &str = "builtin:echo";

/// An `http://` backend, parsed and resolved, or the built-in echo service. Addresses are
/// resolved by the command that stores the API and again by `serve` at start; the loop never
/// resolves names. The echo service's address is known only to a running `serve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// As the operator wrote it.
    pub url: String,
    /// `host[:port]` as written in the URL: the `Host` header the backend gets.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// The path prefix, without a trailing `/` (empty for none).
    pub path: String,
    pub addrs: Vec<SocketAddr>,
}

impl Backend {
    /// Parses `http://HOST[:PORT][/PATH]` without resolving the host.
    pub fn parse(url: &str) -> Result<Self, ParseError> {
        if url == ECHO_BACKEND {
            return Ok(Self {
                url: url.to_owned(),
                authority: url.to_owned(),
                host: url.to_owned(),
                port: 0,
                path: String::new(),
                addrs: Vec::new(),
            });
        }
        let bad = || ParseError::BackendUrl(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty()
            || authority.contains('@')
            || path.contains(['?', '#'])
            || !path.bytes().all(is_path_byte)
        {
            return Err(bad());
        }
        let (host, port) = split_host_port(authority).ok_or_else(bad)?;
        Ok(Self {
            url: url.to_owned(),
            authority: authority.to_owned(),
            host: host.to_owned(),
            port,
            path: path.trim_end_matches('/').to_owned(),
            addrs: Vec::new(),
        })
    }

    /// The built-in echo service rather than a host of the network.
    pub fn is_builtin(&self) -> bool {
        self.url == ECHO_BACKEND
    }

    /// Resolves the host to every address it has (blocking: never call this on the loop).
    pub fn resolve(&mut self) -> Result<(), ParseError> {
        if self.is_builtin() {
            return Ok(());
        }
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let addrs = (host, self.port)
            .to_socket_addrs()
            .map_err(|e| ParseError::Resolve {
                host: self.host.clone(),
                reason: e.to_string(),
            })?;
        self.addrs = addrs.collect();
        if self.addrs.is_empty() {
            return Err(ParseError::Resolve {
                host: self.host.clone(),
                reason: "no addresses".into(),
            });
        }
        Ok(())
    }
}

fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    if let Some(end) = authority
        .strip_prefix('[')
        .and_then(|_| authority.find(']'))
    {
        let host = &authority[..=end];
        return match &authority[end + 1..] {
            "" => Some((host, 80)),
            port => Some((host, port.strip_prefix(':')?.parse().ok()?)),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            Some((host, port.parse().ok()?))
        }
        Some(_) => None,
        None => Some((authority, 80)),
    }
}

fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b)
}

fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// Checks an API context: `/` followed by one or more segments, no trailing `/`.
pub fn parse_context(s: &str) -> Result<String, ParseError> {
    let bad = || ParseError::Context(s.to_owned());
    let rest = s.strip_prefix('/').ok_or_else(bad)?;
    if !rest.split('/').all(is_segment) {
        return Err(bad());
    }
    Ok(s.to_owned())
}

pub fn parse_version(s: &str) -> Result<String, ParseError> {
    if is_segment(s) {
        Ok(s.to_owned())
    } else {
        Err(ParseError::Version(s.to_owned()))
    }
}

/// Methods are tokens (RFC 9110); stored upper-case, as clients send them.
pub fn parse_method(s: &str) -> Result<String, ParseError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(ParseError::Method(s.to_owned()));
    }
    Ok(s.to_ascii_uppercase())
}

/// The most segments a resource's path template may have.
pub const MAX_TEMPLATE_SEGMENTS: usize = 63;

/// One segment of a resource's path template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{name}`: exactly one non-empty segment.
    Param,
    /// `*` as the last segment: zero or more segments.
    Rest,
}

/// A resource path template such as `/order/{id}` or `/menu/*`, relative to the API's base path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub text: String,
    pub segments: Vec<Segment>,
}

impl FromStr for Template {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError::Template(s.to_owned());
        let rest = s.strip_prefix('/').ok_or_else(bad)?;
        let mut segments = Vec::new();
        if !rest.is_empty() {
            let parts: Vec<&str> = rest.split('/').collect();
            if parts.len() > MAX_TEMPLATE_SEGMENTS {
                return Err(bad());
            }
            for (i, part) in parts.iter().enumerate() {
                let segment = if *part == "*" && i == parts.len() - 1 {
                    Segment::Rest
                } else if part.len() > 2 && part.starts_with('{') && part.ends_with('}') {
                    let name = &part[1..part.len() - 1];
                    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                        return Err(bad());
                    }
                    Segment::Param
                } else if is_segment(part) {
                    Segment::Literal((*part).to_owned())
                } else {
                    return Err(bad());
                };
                segments.push(segment);
            }
        }
        Ok(Self {
            text: s.to_owned(),
            segments,
        })
    }
}

/// An API as the loop needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Api {
    pub name: String,
    pub context: String,
    pub version: Option<String>,
    pub backend: Backend,
    pub mtls: AuthMode,
    pub oauth2: AuthMode,
    pub tier: Option<String>,
}

impl Api {
    /// The path prefix the API is served under: context, then `/VERSION` if it has one.
    pub fn base_path(&self) -> String {
        base_path(&self.context, self.version.as_deref())
    }
}

pub fn base_path(context: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{context}/{v}"),
        None => context.to_owned(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    pub api: String,
    pub method: String,
    pub template: Template,
    pub tier: Option<String>,
    pub scopes: Vec<String>,
    pub no_auth: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertKind {
    Pinned,
    Ca,
}

impl CertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pinned => "pinned",
            Self::Ca => "ca",
        }
    }
}

/// A client certificate registered for an API, with the fields parsed at `cert add`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertEntry {
    pub alias: String,
    pub api: String,
    pub tier: String,
    pub kind: CertKind,
    pub sha256: [u8; 32],
    pub subject: String,
    pub issuer: String,
    /// Lower-case hex.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub scopes: Vec<String>,
    pub der: Vec<u8>,
    /// A stored CRL of its issuer lists its serial number (worked out by the store).
    pub revoked: bool,
}

impl CertEntry {
    /// The entry for a certificate as read from a file; `tier` defaults to Unlimited.
    pub fn new(
        alias: String,
        api: String,
        tier: Option<String>,
        kind: CertKind,
        info: crate::certs::CertInfo,
        der: Vec<u8>,
        scopes: Vec<String>,
    ) -> Self {
        Self {
            alias,
            api,
            tier: tier.unwrap_or_else(|| "Unlimited".into()),
            kind,
            sha256: info.sha256,
            subject: info.subject,
            issuer: info.issuer,
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
            scopes,
            der,
            revoked: false,
        }
    }
}

/// A stored CRL, as `crl list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrlEntry {
    pub id: i64,
    pub issuer: String,
    pub number: Option<String>,
    pub this_update: i64,
    pub next_update: Option<i64>,
    /// How many serial numbers it revokes.
    pub revoked: usize,
}

/// Everything the serving loop reads from the store, in one consistent read.
#[derive(Clone, Debug)]
pub struct Config {
    /// PEM of the gateway's certificate chain and private key.
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub tiers: Vec<Tier>,
    pub apis: Vec<Api>,
    pub resources: Vec<Resource>,
    pub certs: Vec<CertEntry>,
    /// The DER of every stored CRL, for checking CA-issued chains.
    pub crls: Vec<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls() {
        let b = Backend::parse("http://127.0.0.1:9000/v2/").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.path.as_str()),
            ("127.0.0.1", 9000, "/v2")
        );
        assert_eq!(b.authority, "127.0.0.1:9000");
        let b = Backend::parse("http://example.com").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.path.as_str()),
            ("example.com", 80, "")
        );
        let b = Backend::parse("http://[::1]:8080").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("[::1]", 8080));
        for bad in [
            "https://x",
            "http://",
            "http://a:b",
            "http://u@h/",
            "http://h/?q",
            "ftp://h",
            "http://h:99999",
        ] {
            assert!(Backend::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolves_ip_literals() {
        let mut b = Backend::parse("http://[::1]:8080").unwrap();
        b.resolve().unwrap();
        assert_eq!(b.addrs, vec!["[::1]:8080".parse().unwrap()]);
    }

    #[test]
    fn contexts_and_templates() {
        assert!(parse_context("/pizzashack").is_ok());
        assert!(parse_context("/a/b").is_ok());
        for bad in ["", "/", "pizza", "/a/", "/a//b", "/a/../b", "/a b"] {
            assert!(parse_context(bad).is_err(), "{bad}");
        }
        let t: Template = "/order/{id}/*".parse().unwrap();
        assert_eq!(
            t.segments,
            vec![
                Segment::Literal("order".into()),
                Segment::Param,
                Segment::Rest
            ]
        );
        assert_eq!("/".parse::<Template>().unwrap().segments, vec![]);
        for bad in ["order", "/a/*/b", "/{}", "/a/{b-c}", "/a/.."] {
            assert!(bad.parse::<Template>().is_err(), "{bad}");
        }
        assert_eq!(parse_method("get").unwrap(), "GET");
        assert!(parse_method("G E").is_err());
    }
}
