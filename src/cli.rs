//! The subcommands: their arguments as argh parses them, the checks that turn those into model
//! values, and their output on stdout (aligned text, or JSON with `--json`).
//!
//! Commands return a [`CliError`] whose message is the one-line reason; [`main`] prints it as
//! `error: ...` and maps it to the exit code. The store does the writing and the checks that
//! need stored state; `model` and `certs` parse what the user typed or gave as a file.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argh::FromArgs;
use serde::Serialize;
use thiserror::Error;

use crate::certs::{self, CertError, CertInfo, Validity};
use crate::model::{
    self, Api, AuthMode, Backend, CertEntry, CertKind, CrlEntry, ParseError, Period, Rate,
    Resource, Tier,
};
use crate::quickstart;
use crate::server::{self, ServeError, ServeOptions};
use crate::store::{ApiChange, ApiDetails, CrlAdded, InitOptions, Store, StoreError};

/// Why a command failed; the message is the one-line reason printed after `error: `.
#[derive(Debug, Error)]
pub enum CliError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("{0}")]
    Serve(#[from] ServeError),
    #[error("{0}")]
    Quickstart(#[from] crate::quickstart::QuickstartError),
    #[error("{file} {source}")]
    Cert { file: String, source: CertError },
    #[error("cannot read {file}: {source}")]
    Read { file: String, source: io::Error },
    #[error("the certificate in {file} expired on {date}")]
    Expired { file: String, date: String },
    #[error("{0}")]
    Unusable(Box<CliError>),
    #[error("{0}")]
    LogFormat(String),
    #[error(
        "{0} of the certificates checked need attention (expired, or expiring within {1} days)"
    )]
    Attention(usize, i64),
    #[error("{0} is not a CA certificate (its basic constraints do not say CA:TRUE); add it without --ca to pin it")]
    NotCa(String),
    #[error("{file} cannot serve as a CA: {reason}")]
    BadCa { file: String, reason: String },
    #[error("OAuth2 is not available yet in this version of certgate; use --oauth2 off")]
    OAuth2Unavailable,
    #[error("give both --server-cert and --server-key, or neither")]
    ServerPair,
    #[error("{what} {name:?} must be 1 to 64 letters, digits and -._@")]
    Name { what: &'static str, name: String },
    #[error("scope {0:?} must be printable ASCII without spaces, quotes or backslashes")]
    Scope(String),
    #[error("--listen {0:?} is not an address such as 0.0.0.0:8443 or [::]:8443")]
    Listen(String),
    #[error("--{option} {value:?} is not a number of seconds")]
    Seconds { option: &'static str, value: String },
    #[error("--{option} {value:?} is not a whole number from 1 up")]
    Count { option: &'static str, value: String },
    #[error("argument {0:?} is not valid UTF-8")]
    Utf8(OsString),
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// certgate: an API gateway that secures HTTP APIs with mutual TLS.
#[derive(FromArgs, Debug)]
pub struct Args {
    /// the database file (default: $CERTGATE_DB, else ./certgate.db)
    #[argh(option)]
    pub db: Option<PathBuf>,
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Init(InitArgs),
    ServerCert(ServerCertArgs),
    Serve(ServeArgs),
    Api(ApiArgs),
    Cert(CertArgs),
    Tier(TierArgs),
    Backup(BackupArgs),
    Quickstart(QuickstartArgs),
    Crl(CrlArgs),
    Check(CheckArgs),
    Status(StatusArgs),
}

/// Certificate revocation lists: a client certificate a stored CRL of its issuer lists is
/// refused.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "crl")]
pub struct CrlArgs {
    #[argh(subcommand)]
    command: CrlCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum CrlCommand {
    Add(CrlAdd),
    List(CrlList),
    Remove(CrlRemove),
}

/// Store a CRL (PEM or DER), in place of its issuer's older one.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "add")]
struct CrlAdd {
    /// print the stored CRL as JSON
    #[argh(switch)]
    json: bool,
    /// the CRL file, or - for stdin
    #[argh(positional)]
    file: String,
}

/// List the stored CRLs.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
struct CrlList {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Remove a stored CRL.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "remove")]
struct CrlRemove {
    /// the CRL's id, as crl list shows it
    #[argh(positional)]
    id: i64,
}

/// Make a demo (a database, a CA, a client certificate, an echo API) and serve it.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "quickstart")]
pub struct QuickstartArgs {
    /// the demo's directory (default ./certgate-demo; reused when it holds a demo)
    #[argh(option, default = "PathBuf::from(\"certgate-demo\")")]
    dir: PathBuf,
    /// address to listen on (default 127.0.0.1:8443)
    #[argh(option, default = "String::from(\"127.0.0.1:8443\")")]
    listen: String,
}

/// Create the database with the default tiers and a server certificate.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "init")]
pub struct InitArgs {
    /// a name or address for the generated server certificate (repeatable)
    #[argh(option)]
    hostname: Vec<String>,
    /// PEM file of the server certificate (chain) to use instead of a generated one
    #[argh(option)]
    server_cert: Option<PathBuf>,
    /// PEM file of the server certificate's private key
    #[argh(option)]
    server_key: Option<PathBuf>,
}

/// The gateway's own TLS certificate.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "server-cert")]
pub struct ServerCertArgs {
    #[argh(subcommand)]
    command: ServerCertCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum ServerCertCommand {
    Show(ServerCertShow),
    Set(ServerCertSet),
}

/// Show the server certificate, for clients to trust.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "show")]
struct ServerCertShow {
    /// print the certificate as PEM only (e.g. for curl --cacert)
    #[argh(switch)]
    pem: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Replace the server certificate and key; a running gateway picks them up on reload.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "set")]
struct ServerCertSet {
    /// PEM file of the certificate (chain)
    #[argh(option)]
    cert: PathBuf,
    /// PEM file of its private key
    #[argh(option)]
    key: PathBuf,
}

/// Run the gateway (creates the database when it is missing).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "serve")]
pub struct ServeArgs {
    /// address to listen on (repeatable; default 0.0.0.0:8443)
    #[argh(option)]
    listen: Vec<String>,
    /// refuse TLS handshakes without a client certificate
    #[argh(switch)]
    require_client_cert: bool,
    /// serve /healthz and /metrics over plain HTTP on this address (meant for loopback)
    #[argh(option)]
    admin: Option<String>,
    /// the largest request head in bytes (default 16384; larger gets 431)
    #[argh(option)]
    max_head: Option<String>,
    /// the largest request body in bytes (default 10485760; larger gets 413)
    #[argh(option)]
    max_body: Option<String>,
    /// seconds a TLS handshake may take (default 10)
    #[argh(option)]
    handshake_timeout: Option<String>,
    /// seconds for a request head to arrive, and between parts of its body (default 10; 408)
    #[argh(option)]
    request_timeout: Option<String>,
    /// seconds a kept-alive connection may wait for its next request (default 60)
    #[argh(option)]
    idle_timeout: Option<String>,
    /// seconds to connect to a backend (default 5; 502 after)
    #[argh(option)]
    connect_timeout: Option<String>,
    /// seconds a backend may take to answer or go on answering (default 30; 504 after)
    #[argh(option)]
    backend_timeout: Option<String>,
    /// the most client connections served at once (default 10000; more wait to be accepted)
    #[argh(option)]
    max_connections: Option<String>,
    /// seconds to finish requests in flight on SIGTERM (default 30)
    #[argh(option)]
    drain_timeout: Option<String>,
    /// the access log on stderr: logfmt (default), json or off
    #[argh(option, default = "String::from(\"logfmt\")")]
    log_format: String,
}

/// APIs, their resources and backends.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "api")]
pub struct ApiArgs {
    #[argh(subcommand)]
    command: ApiCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum ApiCommand {
    Add(ApiAdd),
    Update(ApiUpdate),
    List(ApiList),
    Show(ApiShow),
    Remove(ApiRemove),
    Resource(ResourceArgs),
}

/// Add an API served under CONTEXT[/VERSION].
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "add")]
struct ApiAdd {
    /// the API's name
    #[argh(positional)]
    name: String,
    /// the path the API is served under, e.g. /pizzashack
    #[argh(option)]
    context: String,
    /// the backend, http://HOST[:PORT][/PATH]
    #[argh(option)]
    backend: String,
    /// a version segment appended to the context
    #[argh(option)]
    version: Option<String>,
    /// client certificates: mandatory (default), optional or off
    #[argh(option)]
    mtls: Option<String>,
    /// bearer tokens: off (default); OAuth2 is not available yet
    #[argh(option)]
    oauth2: Option<String>,
    /// a tier throttling the whole API (default: none)
    #[argh(option)]
    tier: Option<String>,
}

/// Change an API; options not given keep their value.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "update")]
struct ApiUpdate {
    /// the API's name
    #[argh(positional)]
    name: String,
    /// the path the API is served under
    #[argh(option)]
    context: Option<String>,
    /// the backend, http://HOST[:PORT][/PATH] (resolved again)
    #[argh(option)]
    backend: Option<String>,
    /// a version segment appended to the context
    #[argh(option)]
    version: Option<String>,
    /// client certificates: mandatory, optional or off
    #[argh(option)]
    mtls: Option<String>,
    /// bearer tokens: off; OAuth2 is not available yet
    #[argh(option)]
    oauth2: Option<String>,
    /// a tier throttling the whole API
    #[argh(option)]
    tier: Option<String>,
}

/// List the APIs.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
struct ApiList {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Show one API with its resources.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "show")]
struct ApiShow {
    /// the API's name
    #[argh(positional)]
    name: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Remove an API with its resources and certificates.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "remove")]
struct ApiRemove {
    /// the API's name
    #[argh(positional)]
    name: String,
}

/// The resources (method + path template) an API is limited to.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "resource")]
struct ResourceArgs {
    #[argh(subcommand)]
    command: ResourceCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum ResourceCommand {
    Add(ResourceAdd),
    List(ResourceList),
    Remove(ResourceRemove),
}

/// Add a resource to an API.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "add")]
struct ResourceAdd {
    /// the API's name
    #[argh(positional)]
    api: String,
    /// the HTTP method, e.g. GET
    #[argh(option)]
    method: String,
    /// the path template below the base path, e.g. /order/{id} or /menu/*
    #[argh(option)]
    path: String,
    /// a tier throttling each caller of this resource
    #[argh(option)]
    tier: Option<String>,
    /// a scope the caller must hold (repeatable)
    #[argh(option)]
    scope: Vec<String>,
    /// serve this resource without authentication
    #[argh(switch)]
    no_auth: bool,
}

/// List the resources of an API.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
struct ResourceList {
    /// the API's name
    #[argh(positional)]
    api: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Remove a resource from an API.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "remove")]
struct ResourceRemove {
    /// the API's name
    #[argh(positional)]
    api: String,
    /// the HTTP method
    #[argh(option)]
    method: String,
    /// the path template, as added
    #[argh(option)]
    path: String,
}

/// Client certificates allowed to call an API.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "cert")]
pub struct CertArgs {
    #[argh(subcommand)]
    command: CertCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum CertCommand {
    Add(CertAdd),
    List(CertList),
    Show(CertShow),
    Update(CertUpdate),
    Remove(CertRemove),
}

/// Pin a client certificate (PEM or DER file, - for stdin) on an API.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "add")]
struct CertAdd {
    /// the API the certificate may call
    #[argh(option)]
    api: String,
    /// a name for the entry, unique in the gateway
    #[argh(option)]
    alias: String,
    /// the caller's tier (default Unlimited)
    #[argh(option)]
    tier: Option<String>,
    /// a scope the caller holds (repeatable)
    #[argh(option)]
    scope: Vec<String>,
    /// the file holds a CA certificate: every client certificate it issues may call the API
    #[argh(switch)]
    ca: bool,
    /// print the stored entry as JSON
    #[argh(switch)]
    json: bool,
    /// the certificate file, or - for stdin
    #[argh(positional)]
    file: String,
}

/// List certificate entries.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
struct CertList {
    /// only the entries of this API
    #[argh(option)]
    api: Option<String>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Show one certificate entry.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "show")]
struct CertShow {
    /// the entry's alias
    #[argh(positional)]
    alias: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
    /// print the certificate (and its chain) as PEM
    #[argh(switch)]
    pem: bool,
}

/// Change the tier or the scopes of a certificate entry.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "update")]
struct CertUpdate {
    /// the entry's alias
    #[argh(positional)]
    alias: String,
    /// the caller's tier
    #[argh(option)]
    tier: Option<String>,
    /// scopes replacing the old ones (repeatable)
    #[argh(option)]
    scope: Vec<String>,
    /// print the stored entry as JSON
    #[argh(switch)]
    json: bool,
}

/// Remove a certificate entry.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "remove")]
struct CertRemove {
    /// the entry's alias
    #[argh(positional)]
    alias: String,
}

/// Throttling tiers.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "tier")]
pub struct TierArgs {
    #[argh(subcommand)]
    command: TierCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum TierCommand {
    Add(TierAdd),
    List(TierList),
    Update(TierUpdate),
    Remove(TierRemove),
}

/// Add a tier: N requests per second, minute, hour or day, with an optional burst.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "add")]
struct TierAdd {
    /// the tier's name
    #[argh(positional)]
    name: String,
    /// requests per period
    #[argh(option)]
    requests: u64,
    /// the period: second, minute, hour or day
    #[argh(option)]
    per: String,
    /// how many requests a caller may make at once (default: the requests per period)
    #[argh(option)]
    burst: Option<u64>,
    /// print the tier as JSON
    #[argh(switch)]
    json: bool,
}

/// Change a tier's numbers; applies to a running gateway, keeping what callers used.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "update")]
struct TierUpdate {
    /// the tier's name
    #[argh(positional)]
    name: String,
    /// requests per period
    #[argh(option)]
    requests: Option<u64>,
    /// the period: second, minute, hour or day
    #[argh(option)]
    per: Option<String>,
    /// the burst (when not given and it was the requests per period, it follows them)
    #[argh(option)]
    burst: Option<u64>,
    /// print the tier as JSON
    #[argh(switch)]
    json: bool,
}

/// Remove a tier that no certificate, API or resource uses.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "remove")]
struct TierRemove {
    /// the tier's name
    #[argh(positional)]
    name: String,
}

/// List the tiers.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
struct TierList {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Requests allowed and throttled per API and caller, in the gateway's run and in all.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub struct StatusArgs {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Check the store and its certificates: exit 0 when all is well, 1 when certificates have
/// expired or expire soon, 2 when the store is unusable.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "check")]
pub struct CheckArgs {
    /// warn about certificates that expire within this many days (default 30)
    #[argh(option, default = "30")]
    warn_days: i64,
    /// check only that the store is usable (for ExecStartPre)
    #[argh(switch)]
    store_only: bool,
}

/// Write a consistent copy of the live database to FILE (never overwrites).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "backup")]
pub struct BackupArgs {
    /// the file to create
    #[argh(positional)]
    file: PathBuf,
}

/// Parses the process arguments and runs the command: exit 0 on success, 1 when the command
/// fails, 2 when the arguments do not parse.
pub fn main() -> ExitCode {
    let args = match parse(env::args_os()) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let stdout = io::stdout();
    match run(args, &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // Output cut short by a closed pipe (`| head`) is not worth a message.
        Err(CliError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
        Err(CliError::Unusable(e)) => {
            eprintln!("error: the store is unusable: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// argh's parse, with its errors folded into one `error:` line and exit code 2.
fn parse(raw: impl Iterator<Item = OsString>) -> Result<Args, ExitCode> {
    let mut strings = Vec::new();
    for arg in raw {
        match arg.into_string() {
            Ok(s) => strings.push(s),
            Err(bad) => {
                eprintln!("error: {}", CliError::Utf8(bad));
                return Err(ExitCode::from(2));
            }
        }
    }
    let name = strings
        .first()
        .and_then(|argv0| Path::new(argv0).file_name())
        .map_or("certgate".to_owned(), |n| n.to_string_lossy().into_owned());
    let mut rest: Vec<&str> = strings.iter().skip(1).map(String::as_str).collect();
    // argh takes every `-...` for an option; a final `-` (stdin as FILE) is a positional.
    if rest.last() == Some(&"-") {
        rest.insert(rest.len() - 1, "--");
    }
    Args::from_args(&[&name], &rest).map_err(|early| match early.status {
        Ok(()) => {
            print!("{}", early.output);
            ExitCode::SUCCESS
        }
        Err(()) => {
            let reason: Vec<&str> = early.output.split_whitespace().collect();
            eprintln!("error: {} (see {name} --help)", reason.join(" "));
            ExitCode::from(2)
        }
    })
}

/// Runs one parsed command, writing its output to `out`.
pub fn run(args: Args, out: &mut dyn Write) -> Result<(), CliError> {
    let db = database_path(args.db);
    match args.command {
        Command::Init(init) => run_init(&db, init, out),
        Command::Serve(serve) => run_serve(&db, serve),
        Command::ServerCert(args) => match args.command {
            ServerCertCommand::Show(show) => server_cert_show(&Store::open(&db)?, &show, out),
            ServerCertCommand::Set(set) => server_cert_set(&mut Store::open(&db)?, &set, out),
        },
        Command::Api(args) => run_api(&mut Store::open(&db)?, args.command, out),
        Command::Cert(args) => run_cert(&mut Store::open(&db)?, args.command, out),
        Command::Tier(args) => match args.command {
            TierCommand::List(list) => tier_list(&Store::open(&db)?, list.json, out),
            TierCommand::Add(add) => {
                let name = parse_name("tier name", &add.name)?;
                let rate = Rate {
                    requests: positive("requests", add.requests)?,
                    per: add.per.parse()?,
                    burst: positive("burst", add.burst.unwrap_or(add.requests))?,
                };
                let tier = Store::open(&db)?.add_tier(&name, rate)?;
                print_tier(out, &tier, add.json)
            }
            TierCommand::Update(update) => {
                let requests = update
                    .requests
                    .map(|n| positive("requests", n))
                    .transpose()?;
                let burst = update.burst.map(|n| positive("burst", n)).transpose()?;
                let per: Option<Period> = update.per.as_deref().map(str::parse).transpose()?;
                let tier = Store::open(&db)?.update_tier(&update.name, |old| {
                    let new_requests = requests.unwrap_or(old.requests);
                    Rate {
                        requests: new_requests,
                        per: per.unwrap_or(old.per),
                        burst: burst.unwrap_or(if old.burst == old.requests {
                            new_requests
                        } else {
                            old.burst
                        }),
                    }
                })?;
                print_tier(out, &tier, update.json)
            }
            TierCommand::Remove(remove) => {
                let tier = Store::open(&db)?.remove_tier(&remove.name)?;
                writeln!(out, "removed tier {}", tier.name)?;
                Ok(())
            }
        },
        Command::Check(args) => run_check(&db, &args, out),
        Command::Status(args) => run_status(&Store::open(&db)?, args.json, out),
        Command::Crl(args) => run_crl(&mut Store::open(&db)?, args.command, out),
        Command::Quickstart(args) => {
            let listen = args
                .listen
                .parse()
                .map_err(|_| CliError::Listen(args.listen.clone()))?;
            crate::log::init(crate::log::LogFormat::Logfmt);
            quickstart::run(&args.dir, listen, ServeOptions::default(), unix_now(), out)?;
            Ok(())
        }
        Command::Backup(backup) => {
            Store::open(&db)?.backup(&backup.file)?;
            writeln!(out, "wrote {}", backup.file.display())?;
            Ok(())
        }
    }
}

/// `--db`, else `$CERTGATE_DB`, else `./certgate.db`.
fn database_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        env::var_os("CERTGATE_DB")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from("certgate.db"))
}

fn run_init(db: &Path, args: InitArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let (server_cert_pem, server_key_pem) = match (&args.server_cert, &args.server_key) {
        (Some(cert), Some(key)) => (Some(read_text(cert)?), Some(read_text(key)?)),
        (None, None) => (None, None),
        _ => return Err(CliError::ServerPair),
    };
    let init = InitOptions {
        hostnames: args.hostname,
        server_cert_pem,
        server_key_pem,
    };
    let store = Store::create(db, &init)?;
    let info = server_cert_info(&store)?;
    writeln!(out, "created {}", db.display())?;
    writeln!(
        out,
        "server certificate: {} ({}), sha256 {}",
        info.subject,
        info.sans.join(", "),
        certs::hex(&info.sha256)
    )?;
    writeln!(
        out,
        "for clients to trust it: certgate --db {} server-cert show --pem > server.pem",
        db.display()
    )?;
    Ok(())
}

fn run_serve(db: &Path, args: ServeArgs) -> Result<(), CliError> {
    let options = serve_options(&args)?;
    let format = args.log_format.parse().map_err(CliError::LogFormat)?;
    crate::log::init(format);
    let existed = db.exists();
    let store = Store::open_or_create(db, &InitOptions::default())?;
    if !existed {
        eprintln!(
            "created {} with a self-signed server certificate",
            db.display()
        );
    }
    // Sockets from systemd's socket activation, unless --listen says otherwise.
    let inherited = if args.listen.is_empty() {
        crate::systemd::listen_fds().map_err(|e| CliError::Serve(e.into()))?
    } else {
        Vec::new()
    };
    let listeners = if inherited.is_empty() {
        server::bind(&options.listen)?
    } else {
        inherited
    };
    server::run(store, listeners, options)?;
    Ok(())
}

/// Turns the `serve` arguments into options, defaults filled in; seconds may be fractional.
fn serve_options(args: &ServeArgs) -> Result<ServeOptions, CliError> {
    let mut options = ServeOptions {
        require_client_cert: args.require_client_cert,
        ..ServeOptions::default()
    };
    if let Some(admin) = &args.admin {
        options.admin = Some(admin.parse().map_err(|_| CliError::Listen(admin.clone()))?);
    }
    if !args.listen.is_empty() {
        options.listen = args
            .listen
            .iter()
            .map(|addr| {
                addr.parse::<SocketAddr>()
                    .map_err(|_| CliError::Listen(addr.clone()))
            })
            .collect::<Result<_, _>>()?;
    }
    let limits = &mut options.limits;
    let seconds = [
        (
            "handshake-timeout",
            &args.handshake_timeout,
            &mut limits.handshake_timeout,
        ),
        (
            "request-timeout",
            &args.request_timeout,
            &mut limits.request_timeout,
        ),
        ("idle-timeout", &args.idle_timeout, &mut limits.idle_timeout),
        (
            "connect-timeout",
            &args.connect_timeout,
            &mut limits.connect_timeout,
        ),
        (
            "backend-timeout",
            &args.backend_timeout,
            &mut limits.backend_timeout,
        ),
        (
            "drain-timeout",
            &args.drain_timeout,
            &mut options.drain_timeout,
        ),
    ];
    for (option, text, value) in seconds {
        if let Some(text) = text {
            *value = parse_seconds(option, text)?;
        }
    }
    if let Some(text) = &args.max_head {
        limits.max_head = parse_count("max-head", text)? as usize;
    }
    if let Some(text) = &args.max_body {
        limits.max_body = parse_count("max-body", text)?;
    }
    if let Some(text) = &args.max_connections {
        options.max_connections = parse_count("max-connections", text)? as usize;
    }
    Ok(options)
}

/// A positive number of seconds, fractions allowed.
fn parse_seconds(option: &'static str, text: &str) -> Result<Duration, CliError> {
    text.parse::<f64>()
        .ok()
        .filter(|secs| *secs > 0.0)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| CliError::Seconds {
            option,
            value: text.to_owned(),
        })
}

/// A whole number from 1 up (that also fits the address space).
fn parse_count(option: &'static str, text: &str) -> Result<u64, CliError> {
    text.parse::<u64>()
        .ok()
        .filter(|n| *n >= 1 && usize::try_from(*n).is_ok())
        .ok_or_else(|| CliError::Count {
            option,
            value: text.to_owned(),
        })
}

fn server_cert_info(store: &Store) -> Result<CertInfo, CliError> {
    let pem = store.server_cert_pem()?;
    let leaf = certs::pem_certificates(pem.as_bytes())
        .and_then(|chain| chain.into_iter().next().ok_or(CertError::NoCertificate))
        .and_then(|der| certs::inspect(&der))
        .map_err(|source| CliError::Cert {
            file: "the stored server certificate".into(),
            source,
        })?;
    Ok(leaf)
}

fn server_cert_show(
    store: &Store,
    args: &ServerCertShow,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if args.pem {
        write!(out, "{}", store.server_cert_pem()?)?;
        return Ok(());
    }
    let info = server_cert_info(store)?;
    let now = unix_now();
    let json = ServerCertJson {
        subject: &info.subject,
        issuer: &info.issuer,
        sans: &info.sans,
        serial: &info.serial,
        not_before: certs::rfc3339(info.not_before),
        not_after: certs::rfc3339(info.not_after),
        days_left: certs::days_left(info.not_after, now),
        status: Validity::at(info.not_before, info.not_after, now).as_str(),
        sha256: certs::hex(&info.sha256),
    };
    if args.json {
        return print_json(out, &json);
    }
    key_values(
        out,
        &[
            ("subject", json.subject.to_owned()),
            ("issuer", json.issuer.to_owned()),
            ("sans", json.sans.join(", ")),
            ("serial", json.serial.to_owned()),
            ("not_before", json.not_before.clone()),
            ("not_after", json.not_after.clone()),
            ("days_left", json.days_left.to_string()),
            ("status", json.status.to_owned()),
            ("sha256", json.sha256.clone()),
        ],
    )
}

fn server_cert_set(
    store: &mut Store,
    args: &ServerCertSet,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let cert = read_text(&args.cert)?;
    let key = read_text(&args.key)?;
    let info = store.set_server_cert(&cert, &key)?;
    writeln!(
        out,
        "server certificate set: {}, valid until {}, sha256 {}",
        info.subject,
        certs::rfc3339(info.not_after),
        certs::hex(&info.sha256)
    )?;
    writeln!(
        out,
        "a running gateway uses it for new connections after its next reload"
    )?;
    if info.is_ca {
        eprintln!(
            "warning: this certificate says CA:TRUE; webpki-based clients such as rustls \
             refuse a CA certificate as a server certificate: make it with \
             -addext basicConstraints=critical,CA:FALSE"
        );
    }
    Ok(())
}

fn run_api(store: &mut Store, command: ApiCommand, out: &mut dyn Write) -> Result<(), CliError> {
    match command {
        ApiCommand::Add(add) => {
            let name = parse_name("API name", &add.name)?;
            let mtls = add
                .mtls
                .as_deref()
                .map_or(Ok(AuthMode::Mandatory), str::parse)?;
            let oauth2 = parse_oauth2(add.oauth2.as_deref())?.unwrap_or(AuthMode::Off);
            let context = model::parse_context(&add.context)?;
            let version = add
                .version
                .as_deref()
                .map(model::parse_version)
                .transpose()?;
            let backend = resolve_backend(&add.backend)?;
            let api = Api {
                name,
                context,
                version,
                backend,
                mtls,
                oauth2,
                tier: add.tier,
            };
            store.add_api(&api)?;
            print_api(out, &store.api(&api.name)?)
        }
        ApiCommand::Update(update) => {
            let change = ApiChange {
                context: update
                    .context
                    .as_deref()
                    .map(model::parse_context)
                    .transpose()?,
                version: update
                    .version
                    .as_deref()
                    .map(model::parse_version)
                    .transpose()?,
                backend: update.backend.as_deref().map(resolve_backend).transpose()?,
                mtls: update.mtls.as_deref().map(str::parse).transpose()?,
                oauth2: parse_oauth2(update.oauth2.as_deref())?,
                tier: update.tier,
            };
            let api = store.update_api(&update.name, &change)?;
            print_api(out, &store.api(&api.name)?)
        }
        ApiCommand::List(list) => {
            let apis = store.apis()?;
            if list.json {
                let json: Vec<ApiJson<'_>> = apis.iter().map(ApiJson::new).collect();
                return print_json(out, &json);
            }
            if apis.is_empty() {
                writeln!(out, "no APIs")?;
                return Ok(());
            }
            let rows = apis
                .iter()
                .map(|d| {
                    vec![
                        d.api.name.clone(),
                        d.api.base_path(),
                        d.api.backend.url.clone(),
                        d.api.mtls.to_string(),
                        d.api.oauth2.to_string(),
                        d.api.tier.clone().unwrap_or_else(|| "-".into()),
                        d.resources.len().to_string(),
                        d.certificates.to_string(),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "NAME",
                    "BASE_PATH",
                    "BACKEND",
                    "MTLS",
                    "OAUTH2",
                    "TIER",
                    "RESOURCES",
                    "CERTS",
                ],
                rows,
            )
        }
        ApiCommand::Show(show) => {
            let details = store.api(&show.name)?;
            if show.json {
                return print_json(out, &ApiJson::new(&details));
            }
            print_api(out, &details)
        }
        ApiCommand::Remove(remove) => {
            let removed = store.remove_api(&remove.name)?;
            writeln!(
                out,
                "removed API {} with {} resource(s) and {} certificate(s)",
                remove.name, removed.resources, removed.certificates
            )?;
            Ok(())
        }
        ApiCommand::Resource(args) => run_resource(store, args.command, out),
    }
}

/// OAuth2 comes in a later version: anything but `off` is refused for now.
fn parse_oauth2(value: Option<&str>) -> Result<Option<AuthMode>, CliError> {
    match value.map(str::parse::<AuthMode>).transpose()? {
        Some(AuthMode::Mandatory | AuthMode::Optional) => Err(CliError::OAuth2Unavailable),
        other => Ok(other),
    }
}

/// Parses and resolves a backend URL (blocking DNS: fine in a command, never in the loop).
fn resolve_backend(url: &str) -> Result<Backend, CliError> {
    let mut backend = Backend::parse(url)?;
    backend.resolve()?;
    Ok(backend)
}

fn print_api(out: &mut dyn Write, details: &ApiDetails) -> Result<(), CliError> {
    let api = &details.api;
    let addrs: Vec<String> = api.backend.addrs.iter().map(ToString::to_string).collect();
    key_values(
        out,
        &[
            ("name", api.name.clone()),
            ("base_path", api.base_path()),
            ("context", api.context.clone()),
            ("version", api.version.clone().unwrap_or_else(|| "-".into())),
            (
                "backend",
                if addrs.is_empty() {
                    api.backend.url.clone()
                } else {
                    format!("{} ({})", api.backend.url, addrs.join(", "))
                },
            ),
            ("mtls", api.mtls.to_string()),
            ("oauth2", api.oauth2.to_string()),
            ("tier", api.tier.clone().unwrap_or_else(|| "-".into())),
            ("certificates", details.certificates.to_string()),
            ("resources", details.resources.len().to_string()),
        ],
    )?;
    if !details.resources.is_empty() {
        writeln!(out)?;
        resource_table(out, &details.resources)?;
    }
    Ok(())
}

fn run_resource(
    store: &mut Store,
    command: ResourceCommand,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match command {
        ResourceCommand::Add(add) => {
            let resource = Resource {
                api: add.api,
                method: model::parse_method(&add.method)?,
                template: add.path.parse()?,
                tier: add.tier,
                scopes: parse_scopes(&add.scope)?,
                no_auth: add.no_auth,
            };
            store.add_resource(&resource)?;
            writeln!(
                out,
                "added resource {} {} to API {}",
                resource.method, resource.template.text, resource.api
            )?;
            Ok(())
        }
        ResourceCommand::List(list) => {
            let resources = store.resources(&list.api)?;
            if list.json {
                let json: Vec<ResourceJson<'_>> = resources.iter().map(ResourceJson::new).collect();
                return print_json(out, &json);
            }
            if resources.is_empty() {
                writeln!(
                    out,
                    "API {} has no resources: it passes every path",
                    list.api
                )?;
                return Ok(());
            }
            resource_table(out, &resources)
        }
        ResourceCommand::Remove(remove) => {
            let method = model::parse_method(&remove.method)?;
            store.remove_resource(&remove.api, &method, &remove.path)?;
            writeln!(
                out,
                "removed resource {method} {} from API {}",
                remove.path, remove.api
            )?;
            Ok(())
        }
    }
}

fn resource_table(out: &mut dyn Write, resources: &[Resource]) -> Result<(), CliError> {
    let rows = resources
        .iter()
        .map(|r| {
            vec![
                r.method.clone(),
                r.template.text.clone(),
                r.tier.clone().unwrap_or_else(|| "-".into()),
                if r.no_auth { "yes" } else { "no" }.to_owned(),
                or_dash(&r.scopes.join(" ")),
            ]
        })
        .collect();
    table(out, &["METHOD", "PATH", "TIER", "NO_AUTH", "SCOPES"], rows)
}

fn run_cert(store: &mut Store, command: CertCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let now = unix_now();
    match command {
        CertCommand::Add(add) => {
            let alias = parse_name("alias", &add.alias)?;
            let scopes = parse_scopes(&add.scope)?;
            let (label, bytes) = read_input(&add.file)?;
            let cert = certs::read_client_cert(&bytes).map_err(|source| CliError::Cert {
                file: label.clone(),
                source,
            })?;
            let info = cert.info;
            if Validity::at(info.not_before, info.not_after, now) == Validity::Expired {
                return Err(CliError::Expired {
                    file: label,
                    date: certs::rfc3339(info.not_after),
                });
            }
            let kind = if add.ca {
                check_ca(&label, &info, &cert.der)?;
                CertKind::Ca
            } else {
                CertKind::Pinned
            };
            let entry = CertEntry::new(alias, add.api, add.tier, kind, info, cert.der, scopes);
            store.add_cert(&entry, &cert.chain)?;
            print_cert(out, &store.cert(&entry.alias)?, add.json, now)
        }
        CertCommand::List(list) => {
            let entries = store.certs(list.api.as_deref())?;
            if list.json {
                let json: Vec<CertJson<'_>> =
                    entries.iter().map(|e| CertJson::new(e, now)).collect();
                return print_json(out, &json);
            }
            if entries.is_empty() {
                writeln!(out, "no certificates")?;
                return Ok(());
            }
            let rows = entries
                .iter()
                .map(|e| {
                    let json = CertJson::new(e, now);
                    vec![
                        e.alias.clone(),
                        e.api.clone(),
                        e.tier.clone(),
                        json.status.to_owned(),
                        json.days_left.to_string(),
                        json.not_after,
                        e.subject.clone(),
                    ]
                })
                .collect();
            table(
                out,
                &[
                    "ALIAS",
                    "API",
                    "TIER",
                    "STATUS",
                    "DAYS_LEFT",
                    "NOT_AFTER",
                    "SUBJECT",
                ],
                rows,
            )
        }
        CertCommand::Show(show) => {
            if show.pem {
                write!(out, "{}", store.cert_pem(&show.alias)?)?;
                return Ok(());
            }
            print_cert(out, &store.cert(&show.alias)?, show.json, now)
        }
        CertCommand::Update(update) => {
            let scopes = if update.scope.is_empty() {
                None
            } else {
                Some(parse_scopes(&update.scope)?)
            };
            let entry =
                store.update_cert(&update.alias, update.tier.as_deref(), scopes.as_deref())?;
            print_cert(out, &entry, update.json, now)
        }
        CertCommand::Remove(remove) => {
            let entry = store.remove_cert(&remove.alias)?;
            writeln!(
                out,
                "removed certificate {} from API {}",
                entry.alias, entry.api
            )?;
            Ok(())
        }
    }
}

fn run_status(store: &Store, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let (started, rows) = store.counts()?;
    if json {
        let rows: Vec<StatusJson> = rows
            .iter()
            .map(|r| StatusJson {
                api: &r.api,
                alias: &r.alias,
                caller_sha256: &r.caller,
                subject: &r.subject,
                allowed: r.allowed,
                throttled: r.throttled,
                allowed_total: r.allowed_total,
                throttled_total: r.throttled_total,
                run_started: started.map(certs::rfc3339),
            })
            .collect();
        return print_json(out, &rows);
    }
    match started {
        Some(t) => writeln!(
            out,
            "counts since the gateway started at {}, and in all",
            certs::rfc3339(t)
        )?,
        None => writeln!(out, "the gateway has not served this database yet")?,
    }
    let rows = rows
        .iter()
        .map(|r| {
            vec![
                r.api.clone(),
                r.alias.clone(),
                or_dash(&r.subject),
                r.allowed.to_string(),
                r.throttled.to_string(),
                r.allowed_total.to_string(),
                r.throttled_total.to_string(),
            ]
        })
        .collect();
    table(
        out,
        &[
            "API",
            "CALLER",
            "SUBJECT",
            "ALLOWED",
            "THROTTLED",
            "ALLOWED_TOTAL",
            "THROTTLED_TOTAL",
        ],
        rows,
    )
}

/// `check`: the store first (exit 2 when unusable), then the certificates (exit 1 when any
/// has expired or expires within `--warn-days`).
fn run_check(db: &Path, args: &CheckArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let unusable = |e: CliError| CliError::Unusable(Box::new(e));
    let store = Store::open(db).map_err(|e| unusable(e.into()))?;
    store.quick_check().map_err(|e| unusable(e.into()))?;
    let config = store.load_config().map_err(|e| unusable(e.into()))?;
    crate::tls::SessionState::new()
        .and_then(|s| s.server_config(&config.server_cert_pem, &config.server_key_pem, false))
        .map_err(|e| unusable(CliError::Serve(e.into())))?;
    let server = server_cert_info(&store).map_err(unusable)?;
    writeln!(
        out,
        "store {}: usable, {} APIs, {} certificates, {} CRLs",
        db.display(),
        config.apis.len(),
        config.certs.len(),
        config.crls.len()
    )?;
    if args.store_only {
        return Ok(());
    }
    let lines = crate::check::report(&server, &config.certs, unix_now(), args.warn_days);
    for line in &lines {
        writeln!(
            out,
            "{:<13} {}: {}",
            line.health.as_str(),
            line.what,
            line.detail
        )?;
    }
    match lines.iter().filter(|l| l.health.needs_attention()).count() {
        0 => Ok(()),
        n => Err(CliError::Attention(n, args.warn_days)),
    }
}

/// A `--ca` entry must be a CA certificate that webpki takes as a trust anchor.
fn check_ca(label: &str, info: &CertInfo, der: &[u8]) -> Result<(), CliError> {
    if !info.is_ca {
        return Err(CliError::NotCa(label.to_owned()));
    }
    let der = rustls::pki_types::CertificateDer::from(der);
    webpki::anchor_from_trusted_cert(&der).map_err(|e| CliError::BadCa {
        file: label.to_owned(),
        reason: format!("{e:?}"),
    })?;
    Ok(())
}

fn run_crl(store: &mut Store, command: CrlCommand, out: &mut dyn Write) -> Result<(), CliError> {
    match command {
        CrlCommand::Add(add) => {
            let (label, bytes) = read_input(&add.file)?;
            let crl = certs::read_crl(&bytes).map_err(|source| CliError::Cert {
                file: label,
                source,
            })?;
            let (entry, added) = store.add_crl(&crl)?;
            let what = match added {
                CrlAdded::New => "stored",
                CrlAdded::Replaced => "stored, replacing the older CRL of its issuer",
                CrlAdded::Unchanged => "already stored; nothing changed",
            };
            if add.json {
                return print_json(out, &CrlJson::new(&entry));
            }
            writeln!(out, "CRL {} of {}: {what}", entry.id, entry.issuer)?;
            crl_table(out, &[entry])
        }
        CrlCommand::List(list) => {
            let crls = store.crls()?;
            if list.json {
                let rows: Vec<CrlJson> = crls.iter().map(CrlJson::new).collect();
                return print_json(out, &rows);
            }
            crl_table(out, &crls)
        }
        CrlCommand::Remove(remove) => {
            let entry = store.remove_crl(remove.id)?;
            writeln!(out, "removed CRL {} of {}", entry.id, entry.issuer)?;
            Ok(())
        }
    }
}

fn crl_table(out: &mut dyn Write, crls: &[CrlEntry]) -> Result<(), CliError> {
    let rows = crls
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                c.issuer.clone(),
                c.number.clone().unwrap_or_else(|| "-".into()),
                certs::rfc3339(c.this_update),
                c.next_update.map_or_else(|| "-".into(), certs::rfc3339),
                c.revoked.to_string(),
            ]
        })
        .collect();
    table(
        out,
        &[
            "ID",
            "ISSUER",
            "NUMBER",
            "THIS_UPDATE",
            "NEXT_UPDATE",
            "REVOKED",
        ],
        rows,
    )
}

fn print_cert(
    out: &mut dyn Write,
    entry: &CertEntry,
    json: bool,
    now: i64,
) -> Result<(), CliError> {
    let cert = CertJson::new(entry, now);
    if json {
        return print_json(out, &cert);
    }
    key_values(
        out,
        &[
            ("alias", cert.alias.to_owned()),
            ("api", cert.api.to_owned()),
            ("tier", cert.tier.to_owned()),
            ("kind", cert.kind.to_owned()),
            ("subject", cert.subject.to_owned()),
            ("issuer", cert.issuer.to_owned()),
            ("serial", cert.serial.to_owned()),
            ("sha256", cert.sha256.clone()),
            ("not_before", cert.not_before.clone()),
            ("not_after", cert.not_after.clone()),
            ("days_left", cert.days_left.to_string()),
            ("status", cert.status.to_owned()),
            ("scopes", or_dash(&cert.scopes.join(" "))),
        ],
    )
}

/// A count from 1 up to what SQLite stores.
fn positive(option: &'static str, n: u64) -> Result<u64, CliError> {
    if n == 0 || i64::try_from(n).is_err() {
        return Err(CliError::Count {
            option,
            value: n.to_string(),
        });
    }
    Ok(n)
}

fn print_tier(out: &mut dyn Write, tier: &Tier, json: bool) -> Result<(), CliError> {
    if json {
        return print_json(out, &TierJson::new(tier));
    }
    tier_table(out, &[TierJson::new(tier)])
}

fn tier_list(store: &Store, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let tiers: Vec<TierJson> = store.tiers()?.iter().map(TierJson::new).collect();
    if json {
        return print_json(out, &tiers);
    }
    tier_table(out, &tiers)
}

fn tier_table(out: &mut dyn Write, tiers: &[TierJson]) -> Result<(), CliError> {
    let show = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
    let rows = tiers
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                show(t.requests),
                t.per.unwrap_or("-").to_owned(),
                show(t.burst),
            ]
        })
        .collect();
    table(out, &["NAME", "REQUESTS", "PER", "BURST"], rows)
}

/// API names and certificate aliases: short, and safe in logs, metrics labels and shells.
fn parse_name(what: &'static str, name: &str) -> Result<String, CliError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._@".contains(&b));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(CliError::Name {
            what,
            name: name.to_owned(),
        })
    }
}

/// Scope tokens as RFC 6749 3.3 has them; duplicates dropped, order kept.
fn parse_scopes(scopes: &[String]) -> Result<Vec<String>, CliError> {
    let mut out: Vec<String> = Vec::new();
    for scope in scopes {
        let ok = !scope.is_empty()
            && scope
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\');
        if !ok {
            return Err(CliError::Scope(scope.clone()));
        }
        if !out.contains(scope) {
            out.push(scope.clone());
        }
    }
    Ok(out)
}

fn read_text(path: &Path) -> Result<String, CliError> {
    fs::read_to_string(path).map_err(|source| CliError::Read {
        file: path.display().to_string(),
        source,
    })
}

/// The bytes of FILE, or of stdin for `-`, with the name to use in messages.
fn read_input(file: &str) -> Result<(String, Vec<u8>), CliError> {
    let mut bytes = Vec::new();
    let (label, result) = if file == "-" {
        (
            "stdin".to_owned(),
            io::stdin().read_to_end(&mut bytes).map(drop),
        )
    } else {
        (file.to_owned(), fs::read(file).map(|b| bytes = b))
    };
    result.map_err(|source| CliError::Read {
        file: label.clone(),
        source,
    })?;
    Ok((label, bytes))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_owned()
    }
}

fn print_json(out: &mut dyn Write, value: &impl Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)?;
    writeln!(out, "{text}")?;
    Ok(())
}

/// `key: value` lines with the values aligned.
fn key_values(out: &mut dyn Write, pairs: &[(&str, String)]) -> Result<(), CliError> {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (key, value) in pairs {
        writeln!(out, "{:width$} {value}", format!("{key}:"))?;
    }
    Ok(())
}

/// A table with a header row and columns padded to their widest cell; the last column is not
/// padded.
fn table(out: &mut dyn Write, header: &[&str], rows: Vec<Vec<String>>) -> Result<(), CliError> {
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:width$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

#[derive(Serialize)]
struct ServerCertJson<'a> {
    subject: &'a str,
    issuer: &'a str,
    sans: &'a [String],
    serial: &'a str,
    not_before: String,
    not_after: String,
    days_left: i64,
    status: &'static str,
    sha256: String,
}

/// An API as `api list --json` and `api show --json` print it: `resources` is the list of its
/// resources, `certificates` the number of its certificate entries.
#[derive(Serialize)]
struct ApiJson<'a> {
    name: &'a str,
    context: &'a str,
    version: Option<&'a str>,
    base_path: String,
    backend: &'a str,
    backend_addrs: Vec<String>,
    mtls: &'static str,
    oauth2: &'static str,
    tier: Option<&'a str>,
    resources: Vec<ResourceJson<'a>>,
    certificates: u64,
}

impl<'a> ApiJson<'a> {
    fn new(details: &'a ApiDetails) -> Self {
        let api = &details.api;
        Self {
            name: &api.name,
            context: &api.context,
            version: api.version.as_deref(),
            base_path: api.base_path(),
            backend: &api.backend.url,
            backend_addrs: api.backend.addrs.iter().map(ToString::to_string).collect(),
            mtls: api.mtls.as_str(),
            oauth2: api.oauth2.as_str(),
            tier: api.tier.as_deref(),
            resources: details.resources.iter().map(ResourceJson::new).collect(),
            certificates: details.certificates,
        }
    }
}

#[derive(Serialize)]
struct ResourceJson<'a> {
    api: &'a str,
    method: &'a str,
    path: &'a str,
    tier: Option<&'a str>,
    scopes: &'a [String],
    no_auth: bool,
}

impl<'a> ResourceJson<'a> {
    fn new(r: &'a Resource) -> Self {
        Self {
            api: &r.api,
            method: &r.method,
            path: &r.template.text,
            tier: r.tier.as_deref(),
            scopes: &r.scopes,
            no_auth: r.no_auth,
        }
    }
}

/// A certificate entry with the fields SPEC 2 names, in its order.
#[derive(Serialize)]
struct CertJson<'a> {
    alias: &'a str,
    api: &'a str,
    tier: &'a str,
    kind: &'static str,
    subject: &'a str,
    issuer: &'a str,
    serial: &'a str,
    sha256: String,
    not_before: String,
    not_after: String,
    days_left: i64,
    status: &'static str,
    scopes: &'a [String],
}

impl<'a> CertJson<'a> {
    fn new(e: &'a CertEntry, now: i64) -> Self {
        Self {
            alias: &e.alias,
            api: &e.api,
            tier: &e.tier,
            kind: e.kind.as_str(),
            subject: &e.subject,
            issuer: &e.issuer,
            serial: &e.serial,
            sha256: certs::hex(&e.sha256),
            not_before: certs::rfc3339(e.not_before),
            not_after: certs::rfc3339(e.not_after),
            days_left: certs::days_left(e.not_after, now),
            status: if e.revoked {
                "revoked"
            } else {
                Validity::at(e.not_before, e.not_after, now).as_str()
            },
            scopes: &e.scopes,
        }
    }
}

#[derive(Serialize)]
struct StatusJson<'a> {
    api: &'a str,
    alias: &'a str,
    caller_sha256: &'a str,
    subject: &'a str,
    allowed: i64,
    throttled: i64,
    allowed_total: i64,
    throttled_total: i64,
    run_started: Option<String>,
}

#[derive(Serialize)]
struct CrlJson<'a> {
    id: i64,
    issuer: &'a str,
    number: Option<&'a str>,
    this_update: String,
    next_update: Option<String>,
    revoked: usize,
}

impl<'a> CrlJson<'a> {
    fn new(c: &'a CrlEntry) -> Self {
        Self {
            id: c.id,
            issuer: &c.issuer,
            number: c.number.as_deref(),
            this_update: certs::rfc3339(c.this_update),
            next_update: c.next_update.map(certs::rfc3339),
            revoked: c.revoked,
        }
    }
}

/// A tier; `requests`, `per` and `burst` are null for a tier without a rate (Unlimited).
#[derive(Serialize)]
struct TierJson {
    name: String,
    requests: Option<u64>,
    per: Option<&'static str>,
    burst: Option<u64>,
}

impl TierJson {
    fn new(t: &Tier) -> Self {
        Self {
            name: t.name.clone(),
            requests: t.rate.map(|r| r.requests),
            per: t.rate.map(|r| r.per.as_str()),
            burst: t.rate.map(|r| r.burst),
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair};
    use time::OffsetDateTime;

    use super::*;

    fn certgate(db: &Path, args: &[&str]) -> Result<String, CliError> {
        let mut argv = vec!["--db", db.to_str().unwrap()];
        argv.extend(args);
        let args = Args::from_args(&["certgate"], &argv).unwrap();
        let mut out = Vec::new();
        run(args, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    fn dump(db: &Path) -> String {
        format!("{:?}", Store::open(db).unwrap().load_config().unwrap())
    }

    /// A database with API `pizza` and a client certificate file `client.pem` (and its key).
    fn setup(dir: &tempfile::TempDir) -> PathBuf {
        let db = dir.path().join("certgate.db");
        certgate(&db, &["init"]).unwrap();
        certgate(
            &db,
            &[
                "api",
                "add",
                "pizza",
                "--context",
                "/pizzashack",
                "--backend",
                "http://127.0.0.1:9000",
            ],
        )
        .unwrap();
        let (cert, key) = client_cert(unix_now() - 86_400, unix_now() + 86_400 * 10 - 100);
        fs::write(dir.path().join("client.pem"), cert).unwrap();
        fs::write(dir.path().join("client.key"), key).unwrap();
        db
    }

    fn client_cert(not_before: i64, not_after: i64) -> (String, String) {
        let mut params = CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "client");
        params.not_before = OffsetDateTime::from_unix_timestamp(not_before).unwrap();
        params.not_after = OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let key = KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn path(dir: &tempfile::TempDir, name: &str) -> String {
        dir.path().join(name).to_str().unwrap().to_owned()
    }

    #[test]
    fn a_missing_database_is_refused_and_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("typo.db");
        for args in [&["api", "list"][..], &["tier", "list"], &["cert", "list"]] {
            let err = certgate(&db, args).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("no database at {}; run certgate init", db.display())
            );
        }
        assert!(!db.exists());
    }

    #[test]
    fn cert_add_prints_the_entry_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let db = setup(&dir);
        let file = path(&dir, "client.pem");
        let out = certgate(
            &db,
            &[
                "cert", "add", "--api", "pizza", "--alias", "c1", "--scope", "read", "--json",
                &file,
            ],
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        // serde_json::Value sorts its keys: check the printed order on the text itself.
        let fields = [
            "alias",
            "api",
            "tier",
            "kind",
            "subject",
            "issuer",
            "serial",
            "sha256",
            "not_before",
            "not_after",
            "days_left",
            "status",
            "scopes",
        ];
        let positions: Vec<usize> = fields
            .iter()
            .map(|f| out.find(&format!("\"{f}\":")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{out}");
        assert_eq!(json.as_object().unwrap().len(), fields.len());
        assert_eq!(json["tier"], "Unlimited");
        assert_eq!(json["kind"], "pinned");
        assert_eq!(json["status"], "valid");
        assert_eq!(json["days_left"], 9);
        assert_eq!(json["subject"], "CN=client");
        assert_eq!(json["scopes"], serde_json::json!(["read"]));
        assert_eq!(json["sha256"].as_str().unwrap().len(), 64);
        assert!(json["not_after"].as_str().unwrap().ends_with('Z'));

        let list = certgate(&db, &["cert", "list", "--json"]).unwrap();
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        assert_eq!(list, serde_json::json!([json]));
        let api = certgate(&db, &["api", "show", "pizza", "--json"]).unwrap();
        let api: serde_json::Value = serde_json::from_str(&api).unwrap();
        assert_eq!(api["certificates"], 1);
        assert_eq!(api["version"], serde_json::Value::Null);
        assert_eq!(api["base_path"], "/pizzashack");
    }

    #[test]
    fn refused_cert_adds_leave_the_store_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let db = setup(&dir);
        let file = path(&dir, "client.pem");
        certgate(
            &db,
            &["cert", "add", "--api", "pizza", "--alias", "c1", &file],
        )
        .unwrap();
        let before = dump(&db);

        let (expired, _) = client_cert(unix_now() - 86_400 * 10, unix_now() - 86_400);
        fs::write(dir.path().join("expired.pem"), expired).unwrap();
        let cert = fs::read_to_string(&file).unwrap();
        let key = fs::read_to_string(dir.path().join("client.key")).unwrap();
        fs::write(dir.path().join("both.pem"), cert + &key).unwrap();
        fs::write(dir.path().join("junk.txt"), "not a certificate").unwrap();

        let refusals = [
            (
                vec!["--api", "nope", "--alias", "c2", &file],
                "unknown API \"nope\"",
            ),
            (
                vec![
                    "--api", "pizza", "--alias", "c2", "--tier", "Platinum", &file,
                ],
                "unknown tier \"Platinum\"",
            ),
            (
                vec!["--api", "pizza", "--alias", "c1", &file],
                "alias \"c1\" is already in use",
            ),
            (
                vec!["--api", "pizza", "--alias", "c2", &file],
                "already registered on API \"pizza\" as \"c1\"",
            ),
            (
                vec!["--api", "pizza", "--alias", "c2", "--scope", "a b", &file],
                "scope \"a b\"",
            ),
            (
                vec!["--api", "pizza", "--alias", "bad alias", &file],
                "alias \"bad alias\"",
            ),
        ];
        for (args, reason) in refusals {
            let mut argv = vec!["cert", "add"];
            argv.extend(args);
            let err = certgate(&db, &argv).unwrap_err().to_string();
            assert!(err.contains(reason), "{err}");
        }
        let files = [
            ("expired.pem", "expired on"),
            ("both.pem", "holds a private key; give only the certificate"),
            (
                "client.key",
                "holds a private key; give only the certificate",
            ),
            ("junk.txt", "is not a certificate"),
            ("absent.pem", "cannot read"),
        ];
        for (name, reason) in files {
            let file = path(&dir, name);
            let err = certgate(
                &db,
                &["cert", "add", "--api", "pizza", "--alias", "c2", &file],
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(reason), "{err}");
        }
        assert_eq!(dump(&db), before);
    }

    #[test]
    fn refused_api_changes_leave_the_store_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let db = setup(&dir);
        let before = dump(&db);
        let add = |extra: &[&str]| {
            let mut argv = vec!["api", "add", "menu", "--context", "/menu"];
            argv.extend(extra);
            if !extra.contains(&"--backend") {
                argv.extend(["--backend", "http://127.0.0.1:9001"]);
            }
            certgate(&db, &argv).unwrap_err().to_string()
        };
        assert!(add(&["--oauth2", "mandatory"]).contains("OAuth2 is not available yet"));
        assert!(add(&["--mtls", "optional"]).contains("at least one of mtls and oauth2"));
        assert!(add(&["--mtls", "sometimes"]).contains("not one of mandatory, optional, off"));
        assert!(add(&["--tier", "Platinum"]).contains("unknown tier"));
        assert!(add(&["--version", "a/b"]).contains("version"));
        assert!(add(&["--backend", "https://x"]).contains("must look like http://"));
        let err = certgate(
            &db,
            &[
                "api",
                "add",
                "copy",
                "--context",
                "/pizzashack",
                "--backend",
                "http://127.0.0.1",
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("already served by API \"pizza\""));
        let err = certgate(&db, &["api", "update", "pizza", "--mtls", "off"]).unwrap_err();
        assert!(err.to_string().contains("at least one of mtls and oauth2"));
        let err = certgate(
            &db,
            &[
                "api", "resource", "add", "pizza", "--method", "GET", "--path", "menu",
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("path template"));
        assert_eq!(dump(&db), before);
    }

    #[test]
    fn api_remove_says_what_went_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = setup(&dir);
        let file = path(&dir, "client.pem");
        certgate(
            &db,
            &["cert", "add", "--api", "pizza", "--alias", "c1", &file],
        )
        .unwrap();
        certgate(
            &db,
            &[
                "api", "resource", "add", "pizza", "--method", "get", "--path", "/menu/*",
            ],
        )
        .unwrap();
        let out = certgate(&db, &["api", "remove", "pizza"]).unwrap();
        assert_eq!(
            out,
            "removed API pizza with 1 resource(s) and 1 certificate(s)\n"
        );
        assert_eq!(
            certgate(&db, &["cert", "list"]).unwrap(),
            "no certificates\n"
        );
    }

    #[test]
    fn argument_checks() {
        assert_eq!(
            parse_scopes(&["a".into(), "b:c".into(), "a".into()]).unwrap(),
            ["a", "b:c"]
        );
        assert!(parse_scopes(&["".into()]).is_err());
        assert!(parse_scopes(&["a\"".into()]).is_err());
        assert!(parse_name("alias", "client-1.example@acme").is_ok());
        assert!(parse_name("alias", "").is_err());
        assert!(parse_name("alias", &"x".repeat(65)).is_err());
        assert_eq!(
            parse_seconds("idle-timeout", "1.5").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_seconds("idle-timeout", "-1").is_err());
        assert!(parse_seconds("idle-timeout", "0").is_err());
        assert!(parse_seconds("idle-timeout", "soon").is_err());
        assert_eq!(parse_count("max-body", "1024").unwrap(), 1024);
        assert!(parse_count("max-body", "0").is_err());
        assert!(parse_count("max-body", "-5").is_err());
        assert!(parse_count("max-body", "1e6").is_err());
        assert_eq!(parse_oauth2(Some("off")).unwrap(), Some(AuthMode::Off));
        assert!(parse_oauth2(Some("optional")).is_err());
    }
}
