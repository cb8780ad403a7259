//! The SQLite file: creating it, opening it, reading the whole configuration in one consistent
//! read for the serving loop, and the changes the commands make. The only module that touches
//! rusqlite.
//!
//! Every change runs in one immediate transaction that checks everything it refuses before it
//! writes, so a refused command leaves the file as it was. Validation of user-facing strings is
//! left to `model` and `certs`; the store checks what needs the stored state (names in use,
//! unknown references) and keeps the invariants the gateway relies on (one API per base path,
//! at least one mandatory authentication scheme).
//!
//! Schema: `schema.sql` at the top of the crate, version [`SCHEMA_VERSION`] in
//! `PRAGMA user_version`.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{
    params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior,
};
use thiserror::Error;

use crate::certs::{self, CertError, CertInfo};
use crate::model::{
    Api, AuthMode, Backend, CertEntry, CertKind, Config, CrlEntry, Rate, Resource, Template, Tier,
};
use crate::throttle;

/// The schema version this binary reads and writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = include_str!("../schema.sql");

/// What a database of version 1 is given to reach version 2: the part of `schema.sql` after
/// its version-2 marker.
fn migration_from_1() -> &'static str {
    let marker = "-- @@ version 2 @@";
    SCHEMA.find(marker).map_or("", |i| &SCHEMA[i..])
}

/// Why the store refused or failed; the message is the one-line reason shown to the user.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("no database at {}; run certgate init", .0.display())]
    Missing(PathBuf),
    #[error("{} already exists; certgate init never overwrites a database", .0.display())]
    Exists(PathBuf),
    #[error("{} is not a certgate database: {reason}", .path.display())]
    NotCertgate { path: PathBuf, reason: String },
    #[error("{} has schema version {found}, newer than this certgate knows ({SCHEMA_VERSION}); upgrade certgate", .path.display())]
    TooNew { path: PathBuf, found: i64 },
    #[error("cannot create {}: {source}", .path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot read {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("give both the server certificate and its key, or neither")]
    ServerPair,
    #[error("the server {what} {source}")]
    ServerCert {
        what: &'static str,
        source: CertError,
    },
    #[error("unknown API {0:?}")]
    UnknownApi(String),
    #[error("unknown tier {0:?}; see certgate tier list")]
    UnknownTier(String),
    #[error("a tier named {0:?} already exists")]
    TierExists(String),
    #[error("tier Unlimited is built in: it has no rate and cannot be changed or removed")]
    UnlimitedTier,
    #[error("tier {tier:?} is in use by {users}; move them to another tier first")]
    TierInUse { tier: String, users: String },
    #[error("an API named {0:?} already exists")]
    ApiExists(String),
    #[error("base path {base_path} is already served by API {api:?}")]
    BasePathTaken { base_path: String, api: String },
    #[error("API {0:?}: at least one of mtls and oauth2 must be mandatory")]
    NoMandatoryAuth(String),
    #[error("API {api:?} already has a resource {method} {path}")]
    ResourceExists {
        api: String,
        method: String,
        path: String,
    },
    #[error("API {api:?} has no resource {method} {path}")]
    UnknownResource {
        api: String,
        method: String,
        path: String,
    },
    #[error(
        "alias {alias:?} is already in use (on API {api:?}); aliases are unique in the gateway"
    )]
    AliasTaken { alias: String, api: String },
    #[error("this certificate is already registered on API {api:?} as {alias:?}")]
    AlreadyPinned { api: String, alias: String },
    #[error("a CRL of {issuer} numbered {stored} is stored; this one ({given}) is not newer")]
    OlderCrl {
        issuer: String,
        stored: String,
        given: String,
    },
    #[error("the CRL's signature does not verify with the certificate of its issuer {issuer} (alias {alias:?})")]
    CrlSignature { issuer: String, alias: String },
    #[error("no CRL with id {0}; see certgate crl list")]
    UnknownCrl(i64),
    #[error("unknown certificate alias {0:?}")]
    UnknownAlias(String),
    #[error("{} already exists; backup never overwrites a file", .0.display())]
    BackupExists(PathBuf),
    #[error("backup path {} is not valid UTF-8", .0.display())]
    BackupPath(PathBuf),
    #[error("the database is busy (another command is writing); try again")]
    Busy,
    #[error("the database holds an invalid value: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        ) {
            return Self::Busy;
        }
        match e {
            rusqlite::Error::FromSqlConversionFailure(_, _, reason) => {
                Self::Corrupt(reason.to_string())
            }
            e => Self::Sqlite(e),
        }
    }
}

/// What `certgate init` (or `serve` on a missing file) starts the database with.
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// Extra names or addresses for the generated certificate, besides localhost and loopback.
    pub hostnames: Vec<String>,
    pub server_cert_pem: Option<String>,
    pub server_key_pem: Option<String>,
}

/// One line of `certgate status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountRow {
    pub api: String,
    pub alias: String,
    /// The leaf's SHA-256, lower-case hex ('' for a public resource).
    pub caller: String,
    pub subject: String,
    /// In the gateway's current (or last) run.
    pub allowed: i64,
    pub throttled: i64,
    pub allowed_total: i64,
    pub throttled_total: i64,
}

/// What `add_crl` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrlAdded {
    New,
    /// It replaced the issuer's older CRL.
    Replaced,
    /// The very same CRL was already stored.
    Unchanged,
}

/// An API with what hangs off it, for `api list` and `api show`.
#[derive(Clone, Debug)]
pub struct ApiDetails {
    pub api: Api,
    pub resources: Vec<Resource>,
    pub certificates: u64,
}

/// The changes `api update` makes; `None` keeps the stored value.
#[derive(Clone, Debug, Default)]
pub struct ApiChange {
    pub context: Option<String>,
    pub version: Option<String>,
    /// Parsed and resolved by the caller.
    pub backend: Option<Backend>,
    pub mtls: Option<AuthMode>,
    pub oauth2: Option<AuthMode>,
    pub tier: Option<String>,
}

/// What removing an API took with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removed {
    pub resources: u64,
    pub certificates: u64,
}

/// An open certgate database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens an existing database; never creates a file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        match fs::metadata(path) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => return Err(not_certgate(path, "not a regular file")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Missing(path.to_owned()))
            }
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        let mut conn = connect(path)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|e| not_certgate(path, &e.to_string()))?;
        match version {
            SCHEMA_VERSION => {}
            1 => {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                // Another process may have migrated it since the version was read.
                let again: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
                if again == 1 {
                    tx.execute_batch(migration_from_1())?;
                }
                tx.commit()?;
            }
            0 => return Err(not_certgate(path, "it has no certgate schema")),
            found if found > SCHEMA_VERSION => {
                return Err(StoreError::TooNew {
                    path: path.to_owned(),
                    found,
                })
            }
            found => {
                return Err(not_certgate(
                    path,
                    &format!("unknown schema version {found}"),
                ))
            }
        }
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    /// Creates a new database (mode 0600: it holds the server's private key) with the schema,
    /// the default tiers and a server certificate: the one given, checked, or a generated
    /// self-signed one. Nothing is left behind when this fails.
    pub fn create(path: &Path, init: &InitOptions) -> Result<Self, StoreError> {
        let now = unix_now();
        let server = match (&init.server_cert_pem, &init.server_key_pem) {
            (Some(cert_pem), Some(key_pem)) => {
                check_server(cert_pem, key_pem, now)?;
                certs::ServerPem {
                    cert_pem: cert_pem.clone(),
                    key_pem: key_pem.clone(),
                }
            }
            (None, None) => {
                certs::generate_server_cert(&init.hostnames, now).map_err(|source| {
                    StoreError::ServerCert {
                        what: "certificate",
                        source,
                    }
                })?
            }
            _ => return Err(StoreError::ServerPair),
        };
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => StoreError::Exists(path.to_owned()),
                _ => StoreError::Create {
                    path: path.to_owned(),
                    source,
                },
            })?;
        Self::initialise(path, &server).inspect_err(|_| remove_database(path))
    }

    /// Opens the database, creating it first when the file is missing (for `serve`).
    pub fn open_or_create(path: &Path, init: &InitOptions) -> Result<Self, StoreError> {
        match Self::create(path, init) {
            Err(StoreError::Exists(_)) => Self::open(path),
            other => other,
        }
    }

    fn initialise(path: &Path, server: &certs::ServerPem) -> Result<Self, StoreError> {
        let mut conn = connect(path)?;
        // WAL cannot be switched on inside a transaction; the mode is stored in the file.
        conn.query_row("PRAGMA journal_mode = WAL", [], |row| {
            row.get::<_, String>(0)
        })?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA)?;
        put_server_cert(&tx, server)?;
        tx.commit()?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For the serving loop: a locked database fails at once with [`StoreError::Busy`] and the
    /// loop retries on its next tick instead of blocking; its own commits (throttling state)
    /// skip the fsync per commit (`synchronous = NORMAL`: in WAL mode a commit still survives
    /// the process being killed, only a power cut may take the last ones).
    pub fn set_nonblocking(&self) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        self.set_busy_timeout(Duration::ZERO)
    }

    pub fn set_busy_timeout(&self, timeout: Duration) -> Result<(), StoreError> {
        self.conn.busy_timeout(timeout)?;
        Ok(())
    }

    /// Changes whenever another connection commits; see SPEC 8.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "data_version", |row| row.get(0))?)
    }

    /// Saves throttling state in one transaction: `buckets` upserted, the saved ones full by
    /// `now` forgotten, and `counts` added to the totals and to the current run's.
    pub fn save_throttling(
        &mut self,
        buckets: &[(throttle::Key, throttle::Bucket)],
        counts: &[(throttle::CountKey, throttle::Count)],
        now: u64,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.execute("DELETE FROM buckets WHERE full_at <= ?1", [clamp_i64(now)])?;
        {
            let mut upsert = tx.prepare(
                "INSERT OR REPLACE INTO buckets (kind, scope, entry, caller, full_at, interval, burst)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for (key, bucket) in buckets {
                upsert.execute(params![
                    key.kind.as_str(),
                    key.scope as i64,
                    key.entry as i64,
                    key.caller as i64,
                    clamp_i64(bucket.full_at),
                    clamp_i64(bucket.limit.interval),
                    clamp_i64(bucket.limit.burst),
                ])?;
            }
            let mut upsert = tx.prepare(
                "INSERT INTO counters (api, alias, caller, subject, allowed_total, throttled_total,
                                       allowed_run, throttled_run)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?5, ?6)
                 ON CONFLICT (api, alias, caller) DO UPDATE SET
                     subject = excluded.subject,
                     allowed_total = allowed_total + excluded.allowed_total,
                     throttled_total = throttled_total + excluded.throttled_total,
                     allowed_run = allowed_run + excluded.allowed_run,
                     throttled_run = throttled_run + excluded.throttled_run",
            )?;
            for (key, count) in counts {
                upsert.execute(params![
                    key.api,
                    key.alias,
                    key.caller,
                    count.subject,
                    clamp_i64(count.allowed),
                    clamp_i64(count.throttled),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A new run of the gateway: the run's counts start from zero, at `started` (Unix seconds).
    pub fn start_run(&mut self, started: i64) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.execute("UPDATE counters SET allowed_run = 0, throttled_run = 0", [])?;
        tx.execute(
            "INSERT INTO settings (name, value) VALUES ('serve_started', ?1)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [started.to_string()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The counts per API and caller, and when the current (or last) run started.
    pub fn counts(&self) -> Result<(Option<i64>, Vec<CountRow>), StoreError> {
        let started: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM settings WHERE name = 'serve_started'",
                [],
                |row| row.get(0),
            )
            .optional()?;
        let rows = self
            .conn
            .prepare(
                "SELECT api, alias, caller, subject, allowed_run, throttled_run, allowed_total,
                        throttled_total
                 FROM counters ORDER BY api, alias, caller",
            )?
            .query_map([], |row| {
                Ok(CountRow {
                    api: row.get(0)?,
                    alias: row.get(1)?,
                    caller: row.get(2)?,
                    subject: row.get(3)?,
                    allowed: row.get(4)?,
                    throttled: row.get(5)?,
                    allowed_total: row.get(6)?,
                    throttled_total: row.get(7)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok((started.and_then(|s| s.parse().ok()), rows))
    }

    /// The saved buckets; rows that do not parse are skipped (a bucket lost is a full one).
    pub fn load_buckets(&self) -> Result<throttle::Buckets, StoreError> {
        let mut buckets = throttle::Buckets::default();
        let mut stmt = self
            .conn
            .prepare("SELECT kind, scope, entry, caller, full_at, interval, burst FROM buckets")?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, i64>(5)?,
                row.get::<_, i64>(6)?,
            ))
        })?;
        for row in rows {
            let (kind, scope, entry, caller, full_at, interval, burst) = row?;
            let (Some(kind), Ok(full_at), Ok(interval), Ok(burst)) = (
                throttle::Kind::parse(&kind),
                u64::try_from(full_at),
                u64::try_from(interval),
                u64::try_from(burst),
            ) else {
                continue;
            };
            if interval == 0 || burst == 0 {
                continue;
            }
            let key = throttle::Key {
                kind,
                scope: scope as u64,
                entry: entry as u64,
                caller: caller as u64,
            };
            buckets.insert(
                key,
                throttle::Bucket {
                    full_at,
                    limit: throttle::Limit { interval, burst },
                    unsaved: false,
                },
            );
        }
        Ok(buckets)
    }

    /// SQLite's `PRAGMA quick_check`: a damaged file is [`StoreError::Corrupt`].
    pub fn quick_check(&self) -> Result<(), StoreError> {
        let result: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |row| row.get(0))?;
        match result.as_str() {
            "ok" => Ok(()),
            _ => Err(StoreError::Corrupt(result)),
        }
    }

    /// Everything the serving loop needs, read in one transaction.
    pub fn load_config(&self) -> Result<Config, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let config = Config {
            server_cert_pem: setting(&tx, "server_cert_pem")?,
            server_key_pem: setting(&tx, "server_key_pem")?,
            tiers: select_tiers(&tx)?,
            apis: select_apis(&tx, None)?,
            resources: select_resources(&tx, None)?,
            certs: select_certs(&tx, Filter::All)?,
            crls: tx
                .prepare("SELECT der FROM crls ORDER BY id")?
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?,
        };
        tx.finish()?;
        Ok(config)
    }

    pub fn server_cert_pem(&self) -> Result<String, StoreError> {
        setting(&self.conn, "server_cert_pem")
    }

    /// Replaces the server certificate and key after checking that they belong together.
    pub fn set_server_cert(
        &mut self,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<CertInfo, StoreError> {
        let info = check_server(cert_pem, key_pem, unix_now())?;
        let tx = self.write()?;
        put_server_cert(
            &tx,
            &certs::ServerPem {
                cert_pem: cert_pem.to_owned(),
                key_pem: key_pem.to_owned(),
            },
        )?;
        tx.commit()?;
        Ok(info)
    }

    pub fn tiers(&self) -> Result<Vec<Tier>, StoreError> {
        select_tiers(&self.conn)
    }

    pub fn add_tier(&mut self, name: &str, rate: Rate) -> Result<Tier, StoreError> {
        let tx = self.write()?;
        if tier_id(&tx, name).is_ok() {
            return Err(StoreError::TierExists(name.to_owned()));
        }
        let tier = put_tier(&tx, name, rate)?;
        tx.commit()?;
        Ok(tier)
    }

    /// Changes a tier's numbers; `change` says what the new rate is given the old one.
    pub fn update_tier(
        &mut self,
        name: &str,
        change: impl FnOnce(Rate) -> Rate,
    ) -> Result<Tier, StoreError> {
        let tx = self.write()?;
        let tier = select_tier(&tx, name)?;
        let rate = change(tier.rate.ok_or(StoreError::UnlimitedTier)?);
        let tier = put_tier(&tx, &tier.name, rate)?;
        tx.commit()?;
        Ok(tier)
    }

    /// Removes a tier that nothing uses; else says who uses it.
    pub fn remove_tier(&mut self, name: &str) -> Result<Tier, StoreError> {
        let tx = self.write()?;
        let tier = select_tier(&tx, name)?;
        if tier.rate.is_none() {
            return Err(StoreError::UnlimitedTier);
        }
        let id = tier_id(&tx, &tier.name)?;
        let users = |sql: &str| -> Result<Vec<String>, StoreError> {
            Ok(tx
                .prepare(sql)?
                .query_map([id], |row| row.get(0))?
                .collect::<Result<_, _>>()?)
        };
        let mut parts = Vec::new();
        for (what, sql) in [
            (
                "certificates",
                "SELECT alias FROM certs WHERE tier_id = ?1 ORDER BY alias",
            ),
            (
                "APIs",
                "SELECT name FROM apis WHERE tier_id = ?1 ORDER BY name",
            ),
            (
                "resources",
                "SELECT a.name || ' ' || r.method || ' ' || r.path FROM resources r
                 JOIN apis a ON a.id = r.api_id WHERE r.tier_id = ?1 ORDER BY 1",
            ),
        ] {
            let names = users(sql)?;
            if !names.is_empty() {
                parts.push(format!("{what} {}", names.join(", ")));
            }
        }
        if !parts.is_empty() {
            return Err(StoreError::TierInUse {
                tier: tier.name,
                users: parts.join("; "),
            });
        }
        tx.execute("DELETE FROM tiers WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(tier)
    }

    pub fn add_api(&mut self, api: &Api) -> Result<(), StoreError> {
        let tx = self.write()?;
        if api_id(&tx, &api.name).is_ok() {
            return Err(StoreError::ApiExists(api.name.clone()));
        }
        check_api(&tx, api, None)?;
        let tier = api.tier.as_deref().map(|t| tier_id(&tx, t)).transpose()?;
        tx.execute(
            "INSERT INTO apis (name, context, version, base_path, backend_url, backend_addrs,
                               mtls, oauth2, tier_id, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, unixepoch())",
            params![
                api.name,
                api.context,
                api.version,
                api.base_path(),
                api.backend.url,
                join_addrs(&api.backend),
                api.mtls.as_str(),
                api.oauth2.as_str(),
                tier,
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Applies `change` to the API and returns it as stored.
    pub fn update_api(&mut self, name: &str, change: &ApiChange) -> Result<Api, StoreError> {
        let tx = self.write()?;
        let id = api_id(&tx, name)?;
        let mut api = select_apis(&tx, Some(name))?
            .pop()
            .ok_or_else(|| StoreError::UnknownApi(name.to_owned()))?;
        if let Some(context) = &change.context {
            api.context.clone_from(context);
        }
        if let Some(version) = &change.version {
            api.version = Some(version.clone());
        }
        if let Some(backend) = &change.backend {
            api.backend = backend.clone();
        }
        api.mtls = change.mtls.unwrap_or(api.mtls);
        api.oauth2 = change.oauth2.unwrap_or(api.oauth2);
        if let Some(tier) = &change.tier {
            api.tier = Some(tier.clone());
        }
        check_api(&tx, &api, Some(id))?;
        let tier = api.tier.as_deref().map(|t| tier_id(&tx, t)).transpose()?;
        tx.execute(
            "UPDATE apis SET context = ?2, version = ?3, base_path = ?4, backend_url = ?5,
                             backend_addrs = ?6, mtls = ?7, oauth2 = ?8, tier_id = ?9
             WHERE id = ?1",
            params![
                id,
                api.context,
                api.version,
                api.base_path(),
                api.backend.url,
                join_addrs(&api.backend),
                api.mtls.as_str(),
                api.oauth2.as_str(),
                tier,
            ],
        )?;
        // Read back so that the tier name comes out as stored.
        let api = select_apis(&tx, Some(name))?
            .pop()
            .ok_or_else(|| StoreError::UnknownApi(name.to_owned()))?;
        tx.commit()?;
        Ok(api)
    }

    /// Removes the API with its resources and certificates.
    pub fn remove_api(&mut self, name: &str) -> Result<Removed, StoreError> {
        let tx = self.write()?;
        let id = api_id(&tx, name)?;
        let removed = Removed {
            resources: count(&tx, "SELECT count(*) FROM resources WHERE api_id = ?1", id)?,
            certificates: count(&tx, "SELECT count(*) FROM certs WHERE api_id = ?1", id)?,
        };
        tx.execute("DELETE FROM apis WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(removed)
    }

    pub fn apis(&self) -> Result<Vec<ApiDetails>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let apis = select_apis(&tx, None)?;
        let details = apis
            .into_iter()
            .map(|api| api_details(&tx, api))
            .collect::<Result<_, _>>()?;
        tx.finish()?;
        Ok(details)
    }

    pub fn api(&self, name: &str) -> Result<ApiDetails, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let api = select_apis(&tx, Some(name))?
            .pop()
            .ok_or_else(|| StoreError::UnknownApi(name.to_owned()))?;
        let details = api_details(&tx, api)?;
        tx.finish()?;
        Ok(details)
    }

    pub fn add_resource(&mut self, resource: &Resource) -> Result<(), StoreError> {
        let tx = self.write()?;
        let api = api_id(&tx, &resource.api)?;
        let tier = resource
            .tier
            .as_deref()
            .map(|t| tier_id(&tx, t))
            .transpose()?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM resources WHERE api_id = ?1 AND method = ?2 AND path = ?3",
                params![api, resource.method, resource.template.text],
                |_| Ok(()),
            )
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::ResourceExists {
                api: resource.api.clone(),
                method: resource.method.clone(),
                path: resource.template.text.clone(),
            });
        }
        tx.execute(
            "INSERT INTO resources (api_id, method, path, tier_id, scopes, no_auth, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, unixepoch())",
            params![
                api,
                resource.method,
                resource.template.text,
                tier,
                resource.scopes.join(" "),
                resource.no_auth,
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The resources of one API; an unknown API is refused.
    pub fn resources(&self, api: &str) -> Result<Vec<Resource>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        api_id(&tx, api)?;
        let resources = select_resources(&tx, Some(api))?;
        tx.finish()?;
        Ok(resources)
    }

    pub fn remove_resource(
        &mut self,
        api: &str,
        method: &str,
        path: &str,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        let id = api_id(&tx, api)?;
        let removed = tx.execute(
            "DELETE FROM resources WHERE api_id = ?1 AND method = ?2 AND path = ?3",
            params![id, method, path],
        )?;
        if removed == 0 {
            return Err(StoreError::UnknownResource {
                api: api.to_owned(),
                method: method.to_owned(),
                path: path.to_owned(),
            });
        }
        tx.commit()?;
        Ok(())
    }

    /// Registers a certificate; `chain` is the DER of the certificates that followed it.
    pub fn add_cert(&mut self, entry: &CertEntry, chain: &[Vec<u8>]) -> Result<(), StoreError> {
        let tx = self.write()?;
        let api = api_id(&tx, &entry.api)?;
        let tier = tier_id(&tx, &entry.tier)?;
        if let Some(taken) = select_certs(&tx, Filter::Alias(&entry.alias))?.pop() {
            return Err(StoreError::AliasTaken {
                alias: taken.alias,
                api: taken.api,
            });
        }
        let sha256 = certs::hex(&entry.sha256);
        let pinned: Option<String> = tx
            .query_row(
                "SELECT alias FROM certs WHERE api_id = ?1 AND sha256 = ?2",
                params![api, sha256],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(alias) = pinned {
            return Err(StoreError::AlreadyPinned {
                api: entry.api.clone(),
                alias,
            });
        }
        let chain: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
        tx.execute(
            "INSERT INTO certs (alias, api_id, tier_id, kind, der, chain_pem, sha256, subject,
                                issuer, serial, not_before, not_after, scopes, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, unixepoch())",
            params![
                entry.alias,
                api,
                tier,
                entry.kind.as_str(),
                entry.der,
                certs::to_pem(&chain),
                sha256,
                entry.subject,
                entry.issuer,
                entry.serial,
                entry.not_before,
                entry.not_after,
                entry.scopes.join(" "),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// All certificate entries, or those of one API (an unknown API is refused).
    pub fn certs(&self, api: Option<&str>) -> Result<Vec<CertEntry>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let certs = match api {
            Some(api) => {
                api_id(&tx, api)?;
                select_certs(&tx, Filter::Api(api))?
            }
            None => select_certs(&tx, Filter::All)?,
        };
        tx.finish()?;
        Ok(certs)
    }

    pub fn cert(&self, alias: &str) -> Result<CertEntry, StoreError> {
        select_certs(&self.conn, Filter::Alias(alias))?
            .pop()
            .ok_or_else(|| StoreError::UnknownAlias(alias.to_owned()))
    }

    /// The certificate as PEM, followed by the chain it was added with.
    pub fn cert_pem(&self, alias: &str) -> Result<String, StoreError> {
        let found: Option<(Vec<u8>, String)> = self
            .conn
            .query_row(
                "SELECT der, chain_pem FROM certs WHERE alias = ?1",
                [alias],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let (der, chain) = found.ok_or_else(|| StoreError::UnknownAlias(alias.to_owned()))?;
        Ok(certs::to_pem(&[&der]) + &chain)
    }

    /// Changes the tier and, when given, replaces the scopes; returns the entry as stored.
    pub fn update_cert(
        &mut self,
        alias: &str,
        tier: Option<&str>,
        scopes: Option<&[String]>,
    ) -> Result<CertEntry, StoreError> {
        let tx = self.write()?;
        if select_certs(&tx, Filter::Alias(alias))?.is_empty() {
            return Err(StoreError::UnknownAlias(alias.to_owned()));
        }
        if let Some(tier) = tier {
            let id = tier_id(&tx, tier)?;
            tx.execute(
                "UPDATE certs SET tier_id = ?2 WHERE alias = ?1",
                params![alias, id],
            )?;
        }
        if let Some(scopes) = scopes {
            tx.execute(
                "UPDATE certs SET scopes = ?2 WHERE alias = ?1",
                params![alias, scopes.join(" ")],
            )?;
        }
        let entry = select_certs(&tx, Filter::Alias(alias))?
            .pop()
            .ok_or_else(|| StoreError::UnknownAlias(alias.to_owned()))?;
        tx.commit()?;
        Ok(entry)
    }

    /// Removes a certificate entry and returns it.
    pub fn remove_cert(&mut self, alias: &str) -> Result<CertEntry, StoreError> {
        let tx = self.write()?;
        let entry = select_certs(&tx, Filter::Alias(alias))?
            .pop()
            .ok_or_else(|| StoreError::UnknownAlias(alias.to_owned()))?;
        tx.execute("DELETE FROM certs WHERE alias = ?1", [alias])?;
        tx.commit()?;
        Ok(entry)
    }

    /// Stores a CRL in place of its issuer's older one; says whether it replaced one. The
    /// signature is checked against every stored certificate of the issuer (there may be
    /// none: a pinned certificate's issuer need not be stored).
    pub fn add_crl(&mut self, crl: &certs::Crl) -> Result<(CrlEntry, CrlAdded), StoreError> {
        let tx = self.write()?;
        let same: Option<i64> = tx
            .query_row(
                "SELECT id FROM crls WHERE issuer = ?1 AND der = ?2",
                params![crl.issuer, crl.der],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(id) = same {
            let entry = select_crls(&tx, Some(&crl.issuer))?
                .pop()
                .ok_or(StoreError::UnknownCrl(id))?;
            return Ok((entry, CrlAdded::Unchanged));
        }
        let issuers: Vec<(String, Vec<u8>)> = tx
            .prepare("SELECT alias, der FROM certs WHERE subject = ?1 ORDER BY alias")?
            .query_map([&crl.issuer], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        // One stored certificate of the issuer that verifies it is enough (a CA may have
        // renewed its certificate on the same key, or rolled its key under the same name).
        let verified = issuers
            .iter()
            .any(|(_, der)| certs::crl_signed_by(&crl.der, der));
        if let (false, Some((alias, _))) = (verified, issuers.first()) {
            return Err(StoreError::CrlSignature {
                issuer: crl.issuer.clone(),
                alias: alias.clone(),
            });
        }
        let stored = select_crls(&tx, Some(&crl.issuer))?.pop();
        if let Some(stored) = &stored {
            if !crl_is_newer(crl, stored) {
                return Err(StoreError::OlderCrl {
                    issuer: crl.issuer.clone(),
                    stored: crl_label(stored.number.as_deref(), stored.this_update),
                    given: crl_label(crl.number.as_deref(), crl.this_update),
                });
            }
            tx.execute("DELETE FROM crls WHERE id = ?1", [stored.id])?;
        }
        tx.execute(
            "INSERT INTO crls (issuer, number, this_update, next_update, der, created)
             VALUES (?1, ?2, ?3, ?4, ?5, unixepoch())",
            params![
                crl.issuer,
                crl.number,
                crl.this_update,
                crl.next_update,
                crl.der
            ],
        )?;
        let id = tx.last_insert_rowid();
        {
            let mut insert = tx.prepare(
                "INSERT OR IGNORE INTO crl_entries (crl_id, serial, revoked) VALUES (?1, ?2, ?3)",
            )?;
            for (serial, revoked) in &crl.revoked {
                insert.execute(params![id, serial, revoked])?;
            }
        }
        let entry = select_crls(&tx, Some(&crl.issuer))?
            .pop()
            .ok_or(StoreError::UnknownCrl(id))?;
        tx.commit()?;
        let added = match stored {
            Some(_) => CrlAdded::Replaced,
            None => CrlAdded::New,
        };
        Ok((entry, added))
    }

    pub fn crls(&self) -> Result<Vec<CrlEntry>, StoreError> {
        select_crls(&self.conn, None)
    }

    pub fn remove_crl(&mut self, id: i64) -> Result<CrlEntry, StoreError> {
        let tx = self.write()?;
        let entry = select_crls(&tx, None)?
            .into_iter()
            .find(|c| c.id == id)
            .ok_or(StoreError::UnknownCrl(id))?;
        tx.execute("DELETE FROM crls WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(entry)
    }

    /// A consistent copy of the live database (`VACUUM INTO`), mode 0600; never overwrites.
    pub fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        let dest_str = dest
            .to_str()
            .ok_or_else(|| StoreError::BackupPath(dest.to_owned()))?;
        // VACUUM INTO writes into an existing empty file, which keeps the mode given here.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => StoreError::BackupExists(dest.to_owned()),
                _ => StoreError::Create {
                    path: dest.to_owned(),
                    source,
                },
            })?;
        self.conn
            .execute("VACUUM INTO ?1", [dest_str])
            .map_err(|e| {
                remove_database(dest);
                StoreError::from(e)
            })?;
        Ok(())
    }

    /// A write transaction that takes the lock at once, so that two commands never deadlock
    /// upgrading their read locks.
    fn write(&mut self) -> Result<rusqlite::Transaction<'_>, StoreError> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    // Per connection, not per file: without it ON DELETE CASCADE does nothing.
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(conn)
}

fn not_certgate(path: &Path, reason: &str) -> StoreError {
    StoreError::NotCertgate {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Removes a database file that this process just created, with SQLite's side files.
fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let _ = fs::remove_file(name);
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn check_server(cert_pem: &str, key_pem: &str, now: i64) -> Result<CertInfo, StoreError> {
    certs::check_server_pair(cert_pem, key_pem, now).map_err(|source| StoreError::ServerCert {
        what: match source {
            CertError::Key(_) | CertError::KeyMismatch => "key",
            _ => "certificate",
        },
        source,
    })
}

fn put_server_cert(conn: &Connection, server: &certs::ServerPem) -> Result<(), StoreError> {
    let mut put = conn.prepare(
        "INSERT INTO settings (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )?;
    put.execute(["server_cert_pem", &server.cert_pem])?;
    put.execute(["server_key_pem", &server.key_pem])?;
    Ok(())
}

fn setting(conn: &Connection, name: &str) -> Result<String, StoreError> {
    conn.query_row(
        "SELECT value FROM settings WHERE name = ?1",
        [name],
        |row| row.get(0),
    )
    .optional()?
    .ok_or_else(|| StoreError::Corrupt(format!("setting {name} is missing")))
}

fn api_id(conn: &Connection, name: &str) -> Result<i64, StoreError> {
    conn.query_row("SELECT id FROM apis WHERE name = ?1", [name], |row| {
        row.get(0)
    })
    .optional()?
    .ok_or_else(|| StoreError::UnknownApi(name.to_owned()))
}

fn tier_id(conn: &Connection, name: &str) -> Result<i64, StoreError> {
    conn.query_row("SELECT id FROM tiers WHERE name = ?1", [name], |row| {
        row.get(0)
    })
    .optional()?
    .ok_or_else(|| StoreError::UnknownTier(name.to_owned()))
}

/// The invariants of an API against the stored state; `id` is its own row when updating.
fn check_api(conn: &Connection, api: &Api, id: Option<i64>) -> Result<(), StoreError> {
    if api.mtls != AuthMode::Mandatory && api.oauth2 != AuthMode::Mandatory {
        return Err(StoreError::NoMandatoryAuth(api.name.clone()));
    }
    let base_path = api.base_path();
    let holder: Option<String> = conn
        .query_row(
            "SELECT name FROM apis WHERE base_path = ?1 AND id IS NOT ?2",
            params![base_path, id],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(holder) = holder {
        return Err(StoreError::BasePathTaken {
            base_path,
            api: holder,
        });
    }
    Ok(())
}

fn api_details(conn: &Connection, api: Api) -> Result<ApiDetails, StoreError> {
    let resources = select_resources(conn, Some(&api.name))?;
    let certificates = count(
        conn,
        "SELECT count(*) FROM certs JOIN apis ON apis.id = certs.api_id WHERE apis.name = ?1",
        &api.name,
    )?;
    Ok(ApiDetails {
        api,
        resources,
        certificates,
    })
}

fn count(conn: &Connection, sql: &str, key: impl rusqlite::ToSql) -> Result<u64, StoreError> {
    let n: i64 = conn.query_row(sql, [key], |row| row.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn join_addrs(backend: &Backend) -> String {
    let addrs: Vec<String> = backend.addrs.iter().map(ToString::to_string).collect();
    addrs.join(" ")
}

fn split_scopes(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

/// Turns a stored value that does not parse into a conversion error of column `idx`.
fn parsed<T, E>(idx: usize, value: Result<T, E>) -> rusqlite::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    value.map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Stores tier `name` with `rate`, new or in place of its numbers, and reads it back.
fn put_tier(conn: &Connection, name: &str, rate: Rate) -> Result<Tier, StoreError> {
    conn.execute(
        "INSERT INTO tiers (name, requests, per, burst) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET requests = ?2, per = ?3, burst = ?4",
        params![
            name,
            clamp_i64(rate.requests),
            rate.per.as_str(),
            clamp_i64(rate.burst)
        ],
    )?;
    select_tier(conn, name)
}

fn select_tier(conn: &Connection, name: &str) -> Result<Tier, StoreError> {
    select_tiers(conn)?
        .into_iter()
        .find(|t| t.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| StoreError::UnknownTier(name.to_owned()))
}

/// SQLite integers are signed: larger counts are stored as the largest one.
fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn select_tiers(conn: &Connection) -> Result<Vec<Tier>, StoreError> {
    let mut stmt = conn.prepare("SELECT name, requests, per, burst FROM tiers ORDER BY id")?;
    let tiers = stmt
        .query_map([], |row| {
            let requests: Option<i64> = row.get(1)?;
            let per: Option<String> = row.get(2)?;
            let burst: Option<i64> = row.get(3)?;
            let rate = match (requests, per, burst) {
                (Some(requests), Some(per), Some(burst)) => Some(Rate {
                    requests: parsed(1, u64::try_from(requests))?,
                    per: parsed(2, per.parse())?,
                    burst: parsed(3, u64::try_from(burst))?,
                }),
                _ => None,
            };
            Ok(Tier {
                name: row.get(0)?,
                rate,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(tiers)
}

fn select_apis(conn: &Connection, name: Option<&str>) -> Result<Vec<Api>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT a.name, a.context, a.version, a.backend_url, a.backend_addrs, a.mtls, a.oauth2,
                t.name
         FROM apis a LEFT JOIN tiers t ON t.id = a.tier_id
         WHERE ?1 IS NULL OR a.name = ?1
         ORDER BY a.name",
    )?;
    let apis = stmt
        .query_map([name], read_api)?
        .collect::<Result<_, _>>()?;
    Ok(apis)
}

fn read_api(row: &Row<'_>) -> rusqlite::Result<Api> {
    let url: String = row.get(3)?;
    let mut backend = parsed(3, Backend::parse(&url))?;
    let addrs: String = row.get(4)?;
    backend.addrs = addrs
        .split_whitespace()
        .map(|a| parsed(4, a.parse()))
        .collect::<Result<_, _>>()?;
    Ok(Api {
        name: row.get(0)?,
        context: row.get(1)?,
        version: row.get(2)?,
        backend,
        mtls: parsed(5, row.get::<_, String>(5)?.parse())?,
        oauth2: parsed(6, row.get::<_, String>(6)?.parse())?,
        tier: row.get(7)?,
    })
}

fn select_resources(conn: &Connection, api: Option<&str>) -> Result<Vec<Resource>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT a.name, r.method, r.path, t.name, r.scopes, r.no_auth
         FROM resources r
         JOIN apis a ON a.id = r.api_id
         LEFT JOIN tiers t ON t.id = r.tier_id
         WHERE ?1 IS NULL OR a.name = ?1
         ORDER BY a.name, r.path, r.method",
    )?;
    let resources = stmt
        .query_map([api], |row| {
            let template: Template = parsed(2, row.get::<_, String>(2)?.parse())?;
            Ok(Resource {
                api: row.get(0)?,
                method: row.get(1)?,
                template,
                tier: row.get(3)?,
                scopes: split_scopes(&row.get::<_, String>(4)?),
                no_auth: row.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(resources)
}

enum Filter<'a> {
    All,
    Api(&'a str),
    Alias(&'a str),
}

fn select_certs(conn: &Connection, filter: Filter<'_>) -> Result<Vec<CertEntry>, StoreError> {
    let (condition, value) = match filter {
        Filter::All => ("?1 IS NULL", None),
        Filter::Api(api) => ("a.name = ?1", Some(api)),
        Filter::Alias(alias) => ("c.alias = ?1", Some(alias)),
    };
    let mut stmt = conn.prepare(&format!(
        "SELECT c.alias, a.name, t.name, c.kind, c.sha256, c.subject, c.issuer, c.serial,
                c.not_before, c.not_after, c.scopes, c.der,
                EXISTS (SELECT 1 FROM crls r JOIN crl_entries e ON e.crl_id = r.id
                        WHERE r.issuer = c.issuer AND e.serial = c.serial)
         FROM certs c
         JOIN apis a ON a.id = c.api_id
         JOIN tiers t ON t.id = c.tier_id
         WHERE {condition}
         ORDER BY c.alias"
    ))?;
    let certs = stmt
        .query_map([value], |row| {
            let kind = match row.get::<_, String>(3)?.as_str() {
                "ca" => CertKind::Ca,
                _ => CertKind::Pinned,
            };
            Ok(CertEntry {
                alias: row.get(0)?,
                api: row.get(1)?,
                tier: row.get(2)?,
                kind,
                sha256: parsed(4, unhex32(&row.get::<_, String>(4)?))?,
                subject: row.get(5)?,
                issuer: row.get(6)?,
                serial: row.get(7)?,
                not_before: row.get(8)?,
                not_after: row.get(9)?,
                scopes: split_scopes(&row.get::<_, String>(10)?),
                der: row.get(11)?,
                revoked: row.get(12)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(certs)
}

fn select_crls(conn: &Connection, issuer: Option<&str>) -> Result<Vec<CrlEntry>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT r.id, r.issuer, r.number, r.this_update, r.next_update,
                (SELECT count(*) FROM crl_entries e WHERE e.crl_id = r.id)
         FROM crls r
         WHERE ?1 IS NULL OR r.issuer = ?1
         ORDER BY r.id",
    )?;
    let crls = stmt
        .query_map([issuer], |row| {
            Ok(CrlEntry {
                id: row.get(0)?,
                issuer: row.get(1)?,
                number: row.get(2)?,
                this_update: row.get(3)?,
                next_update: row.get(4)?,
                revoked: row.get::<_, i64>(5)? as usize,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(crls)
}

/// A CRL replaces the stored one of its issuer when its number is higher or, where either has
/// no number, when it was issued later.
fn crl_is_newer(given: &certs::Crl, stored: &CrlEntry) -> bool {
    let number = |n: &str| (n.len(), n.to_owned());
    match (given.number.as_deref(), stored.number.as_deref()) {
        (Some(g), Some(s)) => number(g) > number(s),
        _ => given.this_update > stored.this_update,
    }
}

fn crl_label(number: Option<&str>, this_update: i64) -> String {
    match number {
        Some(n) => format!("number {n}, issued {}", certs::rfc3339(this_update)),
        None => format!("issued {}", certs::rfc3339(this_update)),
    }
}

#[derive(Debug, Error)]
#[error("not 64 hex digits")]
struct BadHex;

fn unhex32(text: &str) -> Result<[u8; 32], BadHex> {
    let mut out = [0; 32];
    if text.len() != 64 {
        return Err(BadHex);
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = text
            .get(2 * i..2 * i + 2)
            .and_then(|pair| u8::from_str_radix(pair, 16).ok())
            .ok_or(BadHex)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn create(dir: &tempfile::TempDir) -> (Store, PathBuf) {
        let path = dir.path().join("certgate.db");
        (Store::create(&path, &InitOptions::default()).unwrap(), path)
    }

    fn api(name: &str, context: &str) -> Api {
        let mut backend = Backend::parse("http://127.0.0.1:9000/v1").unwrap();
        backend.resolve().unwrap();
        Api {
            name: name.into(),
            context: context.into(),
            version: None,
            backend,
            mtls: AuthMode::Mandatory,
            oauth2: AuthMode::Off,
            tier: None,
        }
    }

    fn entry(alias: &str, api: &str, cn: &str) -> CertEntry {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let info = certs::inspect(&der).unwrap();
        CertEntry {
            alias: alias.into(),
            api: api.into(),
            tier: "Unlimited".into(),
            kind: CertKind::Pinned,
            sha256: info.sha256,
            subject: info.subject,
            issuer: info.issuer,
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
            scopes: vec!["read".into()],
            der,
            revoked: false,
        }
    }

    fn dump(store: &Store) -> String {
        format!("{:?}", store.load_config().unwrap())
    }

    #[test]
    fn create_makes_a_private_seeded_database() {
        let dir = tempfile::tempdir().unwrap();
        let (store, path) = create(&dir);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let config = store.load_config().unwrap();
        let names: Vec<&str> = config.tiers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["Unlimited", "Gold", "Silver", "Bronze"]);
        assert_eq!(config.tiers[0].rate, None);
        assert_eq!(
            config.tiers[1].rate,
            Some(Rate {
                requests: 5000,
                per: crate::model::Period::Minute,
                burst: 5000
            })
        );
        certs::check_server_pair(&config.server_cert_pem, &config.server_key_pem, unix_now())
            .unwrap();
        drop(store);
        let journal: String = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        assert!(matches!(
            Store::create(&path, &InitOptions::default()),
            Err(StoreError::Exists(_))
        ));
        Store::open_or_create(&path, &InitOptions::default()).unwrap();
    }

    #[test]
    fn a_version_1_database_is_migrated_on_open_and_keeps_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, path) = create(&dir);
        store.add_api(&api("pizza", "/pizza")).unwrap();
        store.add_cert(&entry("c1", "pizza", "one"), &[]).unwrap();
        drop(store);
        // What a version-1 database looks like: no CRL tables.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE crl_entries; DROP TABLE crls; DROP TABLE buckets; DROP TABLE counters; PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(conn);
        let store = Store::open(&path).unwrap();
        assert!(store.crls().unwrap().is_empty());
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(store.cert("c1").unwrap().api, "pizza");
        assert!(!store.cert("c1").unwrap().revoked);
        assert!(store.load_config().unwrap().crls.is_empty());
    }

    #[test]
    fn create_checks_a_given_server_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("certgate.db");
        let one = certs::generate_server_cert(&[], unix_now()).unwrap();
        let two = certs::generate_server_cert(&[], unix_now()).unwrap();
        let mismatched = InitOptions {
            hostnames: vec![],
            server_cert_pem: Some(one.cert_pem.clone()),
            server_key_pem: Some(two.key_pem),
        };
        let err = Store::create(&path, &mismatched).err().unwrap();
        assert_eq!(
            err.to_string(),
            "the server key does not match the certificate"
        );
        assert!(!path.exists());
        let half = InitOptions {
            server_cert_pem: Some(one.cert_pem.clone()),
            ..InitOptions::default()
        };
        assert!(matches!(
            Store::create(&path, &half),
            Err(StoreError::ServerPair)
        ));
        assert!(!path.exists());
        let given = InitOptions {
            hostnames: vec![],
            server_cert_pem: Some(one.cert_pem.clone()),
            server_key_pem: Some(one.key_pem),
        };
        let store = Store::create(&path, &given).unwrap();
        assert_eq!(store.server_cert_pem().unwrap(), one.cert_pem);
    }

    #[test]
    fn open_refuses_missing_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.db");
        let err = Store::open(&missing).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!("no database at {}; run certgate init", missing.display())
        );
        assert!(!missing.exists());

        let text = dir.path().join("notes.txt");
        fs::write(
            &text,
            "hello, this is not SQLite at all, just some text\n".repeat(20),
        )
        .unwrap();
        assert!(matches!(
            Store::open(&text),
            Err(StoreError::NotCertgate { .. })
        ));

        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(matches!(
            Store::open(&other),
            Err(StoreError::NotCertgate { .. })
        ));
        Connection::open(&other)
            .unwrap()
            .execute_batch("PRAGMA user_version = 7")
            .unwrap();
        assert!(matches!(
            Store::open(&other),
            Err(StoreError::TooNew { found: 7, .. })
        ));
    }

    #[test]
    fn apis_resources_and_certs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, path) = create(&dir);
        let mut pizza = api("pizza", "/pizzashack");
        pizza.version = Some("1.0.0".into());
        pizza.tier = Some("gold".into());
        store.add_api(&pizza).unwrap();
        let resource = Resource {
            api: "pizza".into(),
            method: "GET".into(),
            template: "/menu/{id}".parse().unwrap(),
            tier: Some("Silver".into()),
            scopes: vec!["read".into(), "write".into()],
            no_auth: false,
        };
        store.add_resource(&resource).unwrap();
        let cert = entry("c1", "pizza", "one");
        store.add_cert(&cert, &[]).unwrap();

        let store = Store::open(&path).unwrap();
        let config = store.load_config().unwrap();
        pizza.tier = Some("Gold".into());
        assert_eq!(config.apis, vec![pizza]);
        assert_eq!(config.resources, vec![resource]);
        assert_eq!(config.certs, vec![cert.clone()]);
        assert_eq!(store.cert("c1").unwrap(), cert);
        assert!(store
            .cert_pem("c1")
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----\n"));
        let details = store.api("pizza").unwrap();
        assert_eq!((details.resources.len(), details.certificates), (1, 1));
    }

    #[test]
    fn refused_changes_leave_the_store_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = create(&dir);
        store.add_api(&api("pizza", "/pizzashack")).unwrap();
        store.add_cert(&entry("c1", "pizza", "one"), &[]).unwrap();
        let before = dump(&store);

        let taken = store.add_api(&api("other", "/pizzashack")).unwrap_err();
        assert_eq!(
            taken.to_string(),
            "base path /pizzashack is already served by API \"pizza\""
        );
        assert!(matches!(
            store.add_api(&api("pizza", "/else")),
            Err(StoreError::ApiExists(_))
        ));
        let mut no_auth = api("open", "/open");
        no_auth.mtls = AuthMode::Optional;
        assert!(matches!(
            store.add_api(&no_auth),
            Err(StoreError::NoMandatoryAuth(_))
        ));
        let mut tiered = api("tiered", "/tiered");
        tiered.tier = Some("Platinum".into());
        assert!(matches!(
            store.add_api(&tiered),
            Err(StoreError::UnknownTier(_))
        ));
        let change = ApiChange {
            mtls: Some(AuthMode::Off),
            ..ApiChange::default()
        };
        assert!(matches!(
            store.update_api("pizza", &change),
            Err(StoreError::NoMandatoryAuth(_))
        ));
        let tier = ApiChange {
            context: Some("/moved".into()),
            tier: Some("Platinum".into()),
            ..ApiChange::default()
        };
        assert!(matches!(
            store.update_api("pizza", &tier),
            Err(StoreError::UnknownTier(_))
        ));

        let mut again = entry("c1", "pizza", "two");
        assert!(matches!(
            store.add_cert(&again, &[]),
            Err(StoreError::AliasTaken { .. })
        ));
        again.alias = "c2".into();
        again.api = "nope".into();
        assert!(matches!(
            store.add_cert(&again, &[]),
            Err(StoreError::UnknownApi(_))
        ));
        let mut same = store.cert("c1").unwrap();
        same.alias = "c2".into();
        let pinned = store.add_cert(&same, &[]).unwrap_err();
        assert_eq!(
            pinned.to_string(),
            "this certificate is already registered on API \"pizza\" as \"c1\""
        );
        assert!(matches!(
            store.update_cert("c1", Some("Platinum"), Some(&["x".into()])),
            Err(StoreError::UnknownTier(_))
        ));
        assert!(matches!(
            store.remove_cert("c9"),
            Err(StoreError::UnknownAlias(_))
        ));
        assert!(matches!(
            store.remove_resource("pizza", "GET", "/"),
            Err(StoreError::UnknownResource { .. })
        ));
        assert_eq!(dump(&store), before);
    }

    #[test]
    fn updates_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = create(&dir);
        store.add_api(&api("pizza", "/pizzashack")).unwrap();
        store.add_api(&api("menu", "/menu")).unwrap();
        let change = ApiChange {
            version: Some("2".into()),
            tier: Some("bronze".into()),
            ..ApiChange::default()
        };
        let updated = store.update_api("pizza", &change).unwrap();
        assert_eq!(updated.base_path(), "/pizzashack/2");
        assert_eq!(updated.tier.as_deref(), Some("Bronze"));
        // Its own base path does not count as taken.
        store.update_api("pizza", &ApiChange::default()).unwrap();

        store.add_cert(&entry("c1", "pizza", "one"), &[]).unwrap();
        store.add_cert(&entry("c2", "menu", "two"), &[]).unwrap();
        let updated = store
            .update_cert("c1", Some("Gold"), Some(&["a".into(), "b".into()]))
            .unwrap();
        assert_eq!((updated.tier.as_str(), updated.scopes.len()), ("Gold", 2));
        let resource = Resource {
            api: "pizza".into(),
            method: "GET".into(),
            template: "/".parse().unwrap(),
            tier: None,
            scopes: vec![],
            no_auth: true,
        };
        store.add_resource(&resource).unwrap();
        assert!(matches!(
            store.add_resource(&resource),
            Err(StoreError::ResourceExists { .. })
        ));

        let removed = store.remove_api("pizza").unwrap();
        assert_eq!(
            removed,
            Removed {
                resources: 1,
                certificates: 1
            }
        );
        let config = store.load_config().unwrap();
        assert_eq!(config.certs.len(), 1);
        assert!(config.resources.is_empty());
        assert_eq!(store.remove_cert("c2").unwrap().api, "menu");
        assert!(store.certs(None).unwrap().is_empty());
        assert!(matches!(
            store.certs(Some("pizza")),
            Err(StoreError::UnknownApi(_))
        ));
    }

    #[test]
    fn backup_writes_a_private_copy_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = create(&dir);
        store.add_api(&api("pizza", "/pizzashack")).unwrap();
        let copy = dir.path().join("copy.db");
        store.backup(&copy).unwrap();
        let mode = fs::metadata(&copy).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Store::open(&copy).unwrap().apis().unwrap().len(), 1);
        assert!(matches!(
            store.backup(&copy),
            Err(StoreError::BackupExists(_))
        ));
    }

    #[test]
    fn data_version_moves_on_other_connections_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (loop_store, path) = create(&dir);
        loop_store.set_nonblocking().unwrap();
        let before = loop_store.data_version().unwrap();
        let mut command = Store::open(&path).unwrap();
        command.add_api(&api("pizza", "/pizzashack")).unwrap();
        assert_ne!(loop_store.data_version().unwrap(), before);
    }
}
