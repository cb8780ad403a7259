//! `certgate quickstart` (SPEC 7): a working demo in one command. In a directory of its own it
//! makes a database, a demo CA with a client certificate and key, and an API `/echo/1.0.0` on
//! the built-in echo backend; then it serves it and prints the curl command and the
//! Postman/newman settings that call it, runnable as printed from where quickstart started.
//!
//! A second run in the same directory serves the demo it finds there. This module owns the
//! demo's files; the store, the certificates and the loop are the ordinary ones.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use thiserror::Error;

use crate::certs::{self, CertError};
use crate::model::{Api, AuthMode, Backend, CertEntry, CertKind, ECHO_BACKEND};
use crate::server::{self, ServeError, ServeOptions};
use crate::store::{InitOptions, Store, StoreError};

pub const API_NAME: &str = "echo";
/// The demo CA's entry: every client certificate it issues may call the API.
pub const CA_ALIAS: &str = "demo-ca";
/// The client certificate's subject CN.
pub const CLIENT_NAME: &str = "demo-client";

#[derive(Debug, Error)]
pub enum QuickstartError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{db} exists but {missing} does not; remove {dir} to start the demo afresh")]
    Incomplete {
        db: PathBuf,
        missing: PathBuf,
        dir: PathBuf,
    },
    #[error("cannot make the demo certificates: {0}")]
    Cert(#[from] CertError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Parse(#[from] crate::model::ParseError),
    #[error("{0}")]
    Serve(#[from] ServeError),
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
}

/// The demo's files, under the directory given (relative paths stay relative, so that the
/// printed commands run from where quickstart started).
struct Files {
    dir: PathBuf,
}

impl Files {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Prepares the demo in `dir` (or finds it there), serves it on `listen`, and tells `out` how
/// to call it. Returns when the gateway stops.
pub fn run(
    dir: &Path,
    listen: SocketAddr,
    mut options: ServeOptions,
    now: i64,
    out: &mut dyn Write,
) -> Result<(), QuickstartError> {
    let files = Files {
        dir: dir.to_owned(),
    };
    let store = prepare(&files, listen, now, out)?;
    fs::write(files.path("server.pem"), store.server_cert_pem()?).map_err(|source| {
        QuickstartError::Write {
            path: files.path("server.pem"),
            source,
        }
    })?;
    options.listen = vec![listen];
    let listeners = server::bind(&options.listen)?;
    let bound = listeners[0].local_addr()?;
    let base_url = format!("https://{}/echo/1.0.0", url_authority(bound));
    let collection = files.path("echo.postman_collection.json");
    write_file(&collection, &postman_collection(&base_url), 0o644)?;
    let show = |name: &str| shell_quote(&files.path(name).display().to_string());
    let (cert, key, ca) = (show("client.pem"), show("client.key"), show("server.pem"));
    writeln!(
        out,
        "# certgate demo in {}: API {API_NAME} at {base_url}/ on the built-in echo backend; \
         every client certificate that ca.pem issues may call it",
        files.dir.display()
    )?;
    writeln!(out, "# call it with curl:")?;
    writeln!(
        out,
        "curl --cert {cert} --key {key} --cacert {ca} {base_url}/hello"
    )?;
    writeln!(out, "# or with newman (npm install -g newman):")?;
    writeln!(
        out,
        "newman run {} --ssl-client-cert {cert} --ssl-client-key {key} --ssl-extra-ca-certs {ca}",
        shell_quote(&collection.display().to_string())
    )?;
    writeln!(
        out,
        "# Postman: Settings > Certificates: CA certificate {ca}; client certificate for host {}: CRT file {cert}, KEY file {key}",
        url_authority(bound)
    )?;
    writeln!(out, "# Ctrl-C stops the gateway")?;
    out.flush()?;
    server::run(store, listeners, options)?;
    Ok(())
}

/// Opens the demo's store, making the demo first when `files.dir` holds none.
fn prepare(
    files: &Files,
    listen: SocketAddr,
    now: i64,
    out: &mut dyn Write,
) -> Result<Store, QuickstartError> {
    let db = files.path("certgate.db");
    if db.exists() {
        for name in ["client.pem", "client.key"] {
            if !files.path(name).exists() {
                return Err(QuickstartError::Incomplete {
                    db,
                    missing: files.path(name),
                    dir: files.dir.clone(),
                });
            }
        }
        writeln!(out, "# using the demo already in {}", files.dir.display())?;
        return Ok(Store::open(&db)?);
    }
    fs::create_dir_all(&files.dir).map_err(|source| QuickstartError::Write {
        path: files.dir.clone(),
        source,
    })?;
    let pki = certs::generate_demo_pki(CLIENT_NAME, now)?;
    write_file(&files.path("ca.pem"), &pki.ca_pem, 0o644)?;
    write_file(&files.path("ca.key"), &pki.ca_key_pem, 0o600)?;
    write_file(&files.path("client.pem"), &pki.client_pem, 0o644)?;
    write_file(&files.path("client.key"), &pki.client_key_pem, 0o600)?;
    // The server certificate covers localhost and loopback; a demo served on another address
    // gets that address too, so that the printed commands reach it.
    let ip = listen.ip();
    let init = InitOptions {
        hostnames: if ip.is_loopback() || ip.is_unspecified() {
            Vec::new()
        } else {
            vec![ip.to_string()]
        },
        ..InitOptions::default()
    };
    let mut store = Store::create(&db, &init)?;
    let registered = register(&mut store, &pki.ca_pem);
    if let Err(e) = registered {
        drop(store);
        for suffix in ["", "-wal", "-shm"] {
            let _ = fs::remove_file(format!("{}{suffix}", db.display()));
        }
        return Err(e);
    }
    writeln!(out, "# created the demo in {}", files.dir.display())?;
    Ok(store)
}

/// Adds the echo API and the demo CA as its CA entry.
fn register(store: &mut Store, ca_pem: &str) -> Result<(), QuickstartError> {
    store.add_api(&Api {
        name: API_NAME.into(),
        context: "/echo".into(),
        version: Some("1.0.0".into()),
        backend: Backend::parse(ECHO_BACKEND)?,
        mtls: AuthMode::Mandatory,
        oauth2: AuthMode::Off,
        tier: None,
    })?;
    let cert = certs::read_client_cert(ca_pem.as_bytes())?;
    let entry = CertEntry::new(
        CA_ALIAS.into(),
        API_NAME.into(),
        None,
        CertKind::Ca,
        cert.info,
        cert.der,
        Vec::new(),
    );
    store.add_cert(&entry, &cert.chain)?;
    Ok(())
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), QuickstartError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| QuickstartError::Write {
            path: path.to_owned(),
            source,
        })
}

/// `localhost:PORT` for a loopback or unspecified address (names the server certificate
/// holds), else the address itself.
fn url_authority(addr: SocketAddr) -> String {
    if addr.ip().is_loopback() || addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// A Postman collection (v2.1) of one request to the echo API, with a test that it answered.
fn postman_collection(base_url: &str) -> String {
    let collection = json!({
        "info": {
            "name": "certgate quickstart",
            "schema": "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
        },
        "item": [{
            "name": "GET /echo/1.0.0/hello",
            "request": { "method": "GET", "url": format!("{base_url}/hello") },
            "event": [{
                "listen": "test",
                "script": {
                    "type": "text/javascript",
                    "exec": [
                        "pm.test('the echo backend answers', function () {",
                        "    pm.response.to.have.status(200);",
                        "    pm.expect(pm.response.json().method).to.eql('GET');",
                        "});"
                    ]
                }
            }]
        }]
    });
    format!("{collection:#}\n")
}

/// A path as a shell word: as it is when it needs no quoting, else in single quotes.
fn shell_quote(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:@%=".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words() {
        assert_eq!(
            shell_quote("certgate-demo/client.pem"),
            "certgate-demo/client.pem"
        );
        assert_eq!(shell_quote("my demo/x"), "'my demo/x'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn authority_for_urls() {
        assert_eq!(
            url_authority("127.0.0.1:8443".parse().unwrap()),
            "localhost:8443"
        );
        assert_eq!(url_authority("0.0.0.0:1".parse().unwrap()), "localhost:1");
        assert_eq!(
            url_authority("192.0.2.1:443".parse().unwrap()),
            "192.0.2.1:443"
        );
    }
}
