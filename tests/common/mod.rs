//! The integration-test harness: runs the real `certgate` binary against a database in a temp
//! directory, talks to it with a real rustls client, and stands up a real HTTP/1.1 backend.
//!
//! - [`Db`]: a fresh, initialised database and the CLI run against it; [`Db::serve`] starts the
//!   gateway on `127.0.0.1:0` and gives a [`Gateway`], which stops it on drop.
//! - [`Client`]: one blocking TLS connection to the gateway, optionally with a fixture's client
//!   certificate; sends raw request bytes and reads whole responses, connection kept open.
//! - [`HttpStream`]: the small HTTP/1.1 reader both sides use (heads with httparse, bodies by
//!   Content-Length, chunked or close-delimited).
//! - [`Backend`]: a thread-per-connection keep-alive backend that answers with an [`Echo`] of
//!   what it received, or with the special answers listed on [`Backend`].
//!
//! Every read has a timeout, so a gateway that hangs fails a test instead of stalling the run.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{json, Value};
use tempfile::TempDir;

/// How long any single read or write on a test socket may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`eventually`] keeps trying (the SPEC promises changes within 2 s).
pub const EVENTUALLY: Duration = Duration::from_secs(10);
/// How long the gateway may take to print `listening on`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response or request head the test reader accepts.
const MAX_HEAD: usize = 64 * 1024;

pub const BIN: &str = env!("CARGO_BIN_EXE_certgate");

/// The path of a file in `fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A TCP port on 127.0.0.1 that nothing listens on (at the moment of the call).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// `http://127.0.0.1:PORT` of a port nothing listens on: a backend that is down.
pub fn dead_backend_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// Calls `attempt` every 100 ms until it returns `Some`, for up to [`EVENTUALLY`]; panics naming
/// `what` otherwise. For effects the gateway promises "within 2 seconds"; never assert timings.
pub fn eventually<T>(what: &str, mut attempt: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        if let Some(value) = attempt() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("gave up after {EVENTUALLY:?} waiting until {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The deterministic body of the backend's `/big?bytes=N` and `/chunked?bytes=N` answers.
/// 251 is prime, so a dropped, doubled or shifted buffer shows up as a mismatch.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// A value of `/proc/PID/status` in KiB, e.g. `VmHWM` (peak resident set) or `VmRSS`.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 with padding (RFC 4648), for RFC 9440 `Client-Cert` values.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The DER of the first certificate in a fixture PEM file.
pub fn fixture_cert_der(name: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(fixture(&format!("{name}.pem")))
        .unwrap_or_else(|e| panic!("reading fixture {name}.pem: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The database and the CLI
// ---------------------------------------------------------------------------------------------

/// A temp directory holding a database made by `certgate init`.
pub struct Db {
    dir: TempDir,
    path: PathBuf,
}

impl Db {
    /// `certgate --db DIR/certgate.db init`.
    pub fn init() -> Db {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("certgate.db");
        let db = Db { dir, path };
        db.cli(&["init"]);
        db
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `certgate --db DB ARGS...`, whatever its outcome.
    pub fn try_cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--db")
            .arg(&self.path)
            .args(args)
            .env_remove("CERTGATE_DB")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {BIN}: {e}"))
    }

    /// Runs `certgate --db DB ARGS...` and panics, showing its output, unless it succeeds.
    pub fn cli(&self, args: &[&str]) -> Output {
        let output = self.try_cli(args);
        assert!(
            output.status.success(),
            "certgate {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        output
    }

    /// `api add NAME --context CONTEXT --backend BACKEND [--version VERSION]`.
    pub fn api_add(&self, name: &str, context: &str, version: Option<&str>, backend: &str) {
        let mut args = vec![
            "api",
            "add",
            name,
            "--context",
            context,
            "--backend",
            backend,
        ];
        if let Some(version) = version {
            args.extend(["--version", version]);
        }
        self.cli(&args);
    }

    /// `api resource add API --method METHOD --path TEMPLATE`.
    pub fn resource_add(&self, api: &str, method: &str, template: &str) {
        self.cli(&[
            "api", "resource", "add", api, "--method", method, "--path", template,
        ]);
    }

    /// `cert add --api API --alias ALIAS fixtures/FIXTURE.pem`.
    pub fn cert_add(&self, api: &str, alias: &str, fixture_name: &str) {
        let file = fixture(&format!("{fixture_name}.pem"));
        let file = file.to_str().expect("fixture path is UTF-8");
        self.cli(&["cert", "add", "--api", api, "--alias", alias, file]);
    }

    /// `cert add --api API --alias ALIAS --ca fixtures/FIXTURE.pem`: a CA entry.
    pub fn ca_add(&self, api: &str, alias: &str, fixture_name: &str) {
        let file = fixture(&format!("{fixture_name}.pem"));
        let file = file.to_str().expect("fixture path is UTF-8");
        self.cli(&["cert", "add", "--api", api, "--alias", alias, "--ca", file]);
    }

    /// `cert remove ALIAS`.
    pub fn cert_remove(&self, alias: &str) {
        self.cli(&["cert", "remove", alias]);
    }

    /// The gateway's server certificate, from `server-cert show --pem`.
    pub fn server_cert_pem(&self) -> String {
        let output = self.cli(&["server-cert", "show", "--pem"]);
        String::from_utf8(output.stdout).expect("server-cert show --pem prints UTF-8")
    }

    /// Starts `certgate --db DB serve --listen 127.0.0.1:0` and waits for `listening on`.
    pub fn serve(self) -> Gateway {
        self.serve_with(&[])
    }

    /// Like [`Db::serve`] with extra `serve` options.
    pub fn serve_with(self, extra: &[&str]) -> Gateway {
        self.serve_with_env(extra, &[])
    }

    /// Like [`Db::serve_with`], with environment variables set for the gateway.
    pub fn serve_with_env(self, extra: &[&str], env: &[(&str, &str)]) -> Gateway {
        let pem = self.server_cert_pem();
        let server_cert = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .expect("server-cert show --pem prints a certificate")
            .expect("server-cert show --pem prints valid PEM");
        let mut roots = RootCertStore::empty();
        roots
            .add(server_cert.clone())
            .expect("the server certificate is usable as a trust anchor");

        let mut child = Command::new(BIN)
            .arg("--db")
            .arg(&self.path)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("CERTGATE_DB")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {BIN} serve: {e}"));

        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr is piped");
        {
            let log = Arc::clone(&log);
            // Drains stderr for the gateway's whole life, so the pipe never fills.
            thread::spawn(move || {
                let mut announced = false;
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if !announced {
                        if let Some(addr) = listening_addr(&line) {
                            announced = true;
                            let _ = tx.send(addr);
                        }
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }

        let mut gateway = Gateway {
            db: Some(self),
            child: Some(child),
            exit: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            roots: Arc::new(roots),
            server_pem: pem,
            server_cert,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => {
                    gateway.addr = addr;
                    return gateway;
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {}
            }
            let exited = gateway
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                thread::sleep(Duration::from_millis(100)); // let the drain thread catch up
                panic!(
                    "certgate serve exited ({status}) before listening; stderr:\n{}",
                    gateway.log_text()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "certgate serve printed no `listening on` within {START_TIMEOUT:?}; stderr:\n{}",
                    gateway.log_text()
                );
            }
        }
    }
}

/// The address in a `listening on ADDR` line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The running gateway
// ---------------------------------------------------------------------------------------------

/// A running `certgate serve`; SIGTERM (then SIGKILL) on drop. On a failing test the gateway's
/// stderr is printed, so the failure shows what the gateway logged.
pub struct Gateway {
    /// Taken back by [`Gateway::stop`].
    db: Option<Db>,
    child: Option<Child>,
    /// Set by [`Gateway::wait_exit`] once the process has ended (and `child` is gone).
    exit: Option<ExitStatus>,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    roots: Arc<RootCertStore>,
    server_pem: String,
    server_cert: CertificateDer<'static>,
}

impl Gateway {
    /// Initialises a database, lets `configure` set it up through the CLI, and serves it.
    pub fn start(configure: impl FnOnce(&Db)) -> Gateway {
        let db = Db::init();
        configure(&db);
        db.serve()
    }

    /// The usual setup: API `pizzashack` at `/pizzashack/1.0.0` in front of `backend`, with
    /// client-a pinned on it as `a-pizza`, served with the `serve` options `extra`.
    pub fn pizzashack(backend: &Backend, extra: &[&str]) -> Gateway {
        let db = Db::init();
        db.api_add("pizzashack", "/pizzashack", Some("1.0.0"), &backend.url());
        db.cert_add("pizzashack", "a-pizza", "client-a");
        db.serve_with(extra)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn db(&self) -> &Db {
        self.db.as_ref().expect("the gateway's database")
    }

    /// Runs the CLI against the served database; panics unless it succeeds.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.db().cli(args)
    }

    pub fn server_pem(&self) -> &str {
        &self.server_pem
    }

    /// Writes the server certificate to DIR/server.pem (for curl) and returns the path.
    pub fn server_pem_file(&self) -> PathBuf {
        let path = self.db().dir().join("server.pem");
        std::fs::write(&path, &self.server_pem).expect("write server.pem");
        path
    }

    /// Everything the gateway wrote to stderr so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// How many stderr lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Waits (see [`eventually`]) until more than `count` stderr lines contain `needle`.
    pub fn wait_for_log(&self, needle: &str, count: usize) {
        eventually(
            &format!("the gateway logs a new line with {needle:?}"),
            || (self.log_count(needle) > count).then_some(()),
        );
    }

    /// The gateway's process id (only while it runs: its exit has not been collected).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("the gateway's exit was already collected")
            .id()
    }

    /// Sends `signal` (`"TERM"`, `"INT"`, `"HUP"`, ...) to the gateway with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap_or_else(|e| panic!("running kill -{signal}: {e}"));
        assert!(
            status.success(),
            "kill -{signal} {} failed: {status}",
            self.pid()
        );
    }

    /// Waits up to `limit` for the gateway to exit and returns its status; panics, with its
    /// stderr, if it is still running then. The process is left running for [`Drop`] to stop.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().expect("gateway child");
            if let Some(status) = child.try_wait().expect("try_wait") {
                // Reaped: the pid may be reused now, so the child must never be signalled again.
                self.child = None;
                self.exit = Some(status);
                thread::sleep(Duration::from_millis(100)); // let the drain thread catch up
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the gateway did not exit within {limit:?}; stderr:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the gateway with SIGTERM, checks that it exits 0, and gives its database back
    /// (to serve it again, say).
    pub fn stop(mut self) -> Db {
        self.signal("TERM");
        let status = self.wait_exit(EVENTUALLY);
        assert!(status.success(), "the gateway exited with {status}");
        self.db.take().expect("the gateway's database")
    }

    /// The database of a gateway that has exited (see [`Gateway::wait_exit`]), to serve it again.
    pub fn into_db(mut self) -> Db {
        assert!(self.exit.is_some(), "the gateway is still running");
        self.db.take().expect("the gateway's database")
    }

    /// Panics if the gateway process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exit {
            panic!(
                "the gateway exited ({status}); stderr:\n{}",
                self.log_text()
            );
        }
        let child = self.child.as_mut().expect("gateway child");
        if let Some(status) = child.try_wait().expect("try_wait") {
            thread::sleep(Duration::from_millis(100));
            panic!(
                "the gateway exited ({status}); stderr:\n{}",
                self.log_text()
            );
        }
    }

    /// A TLS connection presenting fixture `cert` (e.g. `"client-a"`), or no certificate.
    /// The handshake is completed before returning.
    pub fn client(&self, cert: Option<&str>) -> Client {
        self.try_client(cert)
            .unwrap_or_else(|e| panic!("TLS connection to the gateway failed: {e}"))
    }

    pub fn try_client(&self, cert: Option<&str>) -> io::Result<Client> {
        Client::connect(self.addr, self.client_config(cert))
    }

    /// The rustls client configuration: trusts only this gateway's certificate.
    pub fn client_config(&self, cert: Option<&str>) -> Arc<ClientConfig> {
        client_config_with_roots(Arc::clone(&self.roots), cert)
    }
}

/// Trust anchors holding exactly the certificates in `pem` (e.g. a new server certificate).
pub fn roots_from_pem(pem: &str) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(cert.expect("valid PEM certificate"))
            .expect("the certificate is usable as a trust anchor");
    }
    assert!(!roots.is_empty(), "no certificate in PEM:\n{pem}");
    Arc::new(roots)
}

/// A rustls client configuration trusting only `roots`, presenting fixture `cert` or nothing.
pub fn client_config_with_roots(
    roots: Arc<RootCertStore>,
    cert: Option<&str>,
) -> Arc<ClientConfig> {
    client_config_with_versions(roots, cert, rustls::DEFAULT_VERSIONS)
}

/// [`client_config_with_roots`] limited to some TLS versions.
pub fn client_config_with_versions(
    roots: Arc<RootCertStore>,
    cert: Option<&str>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("ring supports these protocol versions")
            .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(fixture(&format!("{name}.pem")))
                    .expect("open fixture certificate")
                    .collect::<Result<_, _>>()
                    .expect("parse fixture certificate");
            let key = PrivateKeyDer::from_pem_file(fixture(&format!("{name}.key")))
                .expect("parse fixture key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("fixture key matches its certificate")
        }
    };
    Arc::new(config)
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
        if thread::panicking() {
            thread::sleep(Duration::from_millis(50)); // let the drain thread catch up
            eprintln!(
                "---- gateway stderr ----\n{}\n---- end of gateway stderr ----",
                self.log_text()
            );
        }
    }
}

/// SIGTERM, then SIGKILL after 5 s. Never signals a child whose exit was already collected
/// (its pid may belong to another process by then).
pub fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------------
// The TLS client
// ---------------------------------------------------------------------------------------------

/// One TLS connection to the gateway, kept open across requests.
pub struct Client {
    http: HttpStream<StreamOwned<ClientConnection, TcpStream>>,
}

impl Client {
    pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<Client> {
        let sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.set_write_timeout(Some(IO_TIMEOUT))?;
        sock.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").expect("valid server name");
        let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut stream = StreamOwned::new(conn, sock);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(Client {
            http: HttpStream::new(stream),
        })
    }

    /// The rustls connection (protocol version, resumption, peer certificates), for later tests.
    pub fn tls(&self) -> &ClientConnection {
        &self.http.inner.conn
    }

    /// Sends raw bytes (one or more requests, or garbage).
    pub fn send(&mut self, raw: &[u8]) -> io::Result<()> {
        self.http.inner.write_all(raw)?;
        self.http.inner.flush()
    }

    /// Reads one response; `head` says whether it answers a HEAD request (no body).
    pub fn read_response(&mut self, head: bool) -> io::Result<Response> {
        self.http.read_response(head)
    }

    /// Sends one raw request and reads its response (skipping no 1xx: they are returned).
    pub fn try_request(&mut self, raw: &[u8]) -> io::Result<Response> {
        self.send(raw)?;
        self.read_response(raw.starts_with(b"HEAD "))
    }

    /// Like [`Client::try_request`], panicking on I/O errors.
    pub fn request(&mut self, raw: &[u8]) -> Response {
        self.try_request(raw).unwrap_or_else(|e| {
            panic!(
                "request {:?} failed: {e}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            )
        })
    }

    /// `GET PATH` with `Host: localhost`.
    pub fn get(&mut self, path: &str) -> Response {
        self.request(get(path).as_bytes())
    }

    pub fn try_get(&mut self, path: &str) -> io::Result<Response> {
        self.try_request(get(path).as_bytes())
    }

    /// True when the gateway closes the connection (EOF or reset) within the read timeout.
    pub fn is_closed_by_peer(&mut self) -> bool {
        self.http.at_eof()
    }
}

/// A minimal `GET PATH HTTP/1.1` request with `Host: localhost`.
pub fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
}

/// A request with a Content-Length body.
pub fn request_with_body(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// A request with a chunked body split into `chunk`-byte pieces.
pub fn request_chunked(method: &str, path: &str, body: &[u8], chunk: usize) -> Vec<u8> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for piece in body.chunks(chunk) {
        raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    raw
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 messages
// ---------------------------------------------------------------------------------------------

/// A whole response as the client received it. Header names are lowercased.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body came with `Transfer-Encoding: chunked`.
    pub chunked: bool,
}

impl Response {
    /// True when the response announces that the connection closes after it.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn header_values(&self, name: &str) -> Vec<&str> {
        header_values(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): {} {}\n{:?}\n{}",
                self.status,
                self.reason,
                self.headers,
                self.text()
            )
        })
    }

    /// Asserts a 200 from the test backend and returns what the backend received.
    pub fn echo(&self) -> Echo {
        assert_eq!(
            self.status,
            200,
            "expected the backend's 200, got {} {}: {:?}\n{}",
            self.status,
            self.reason,
            self.headers,
            self.text()
        );
        Echo::from_json(&self.json())
    }

    /// Asserts an RFC 9457 problem with `status` and `code` (SPEC 4) and returns its JSON.
    pub fn assert_problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "expected {status} {code}, got {} {}: {:?}\n{}",
            self.status,
            self.reason,
            self.headers,
            self.text()
        );
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/problem+json"),
            "content-type of a refusal is {content_type:?}, not application/problem+json"
        );
        let problem = self.json();
        assert_eq!(problem["code"], json!(code), "problem: {problem}");
        assert_eq!(problem["status"], json!(status), "problem: {problem}");
        for field in ["type", "title", "detail"] {
            let value = problem[field].as_str().unwrap_or_default();
            assert!(
                !value.is_empty(),
                "problem has no non-empty {field:?}: {problem}"
            );
        }
        problem
    }
}

/// What the test backend received, from its JSON answer.
#[derive(Clone, Debug)]
pub struct Echo {
    pub method: String,
    /// The request target: path and query.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    pub body_sha256: String,
    pub body_chunked: bool,
    /// Which backend connection (numbered from 1 in accept order) carried the request.
    pub connection: usize,
}

impl Echo {
    fn from_json(value: &Value) -> Echo {
        let text = |field: &str| {
            value[field]
                .as_str()
                .unwrap_or_else(|| panic!("backend echo has no {field}: {value}"))
                .to_owned()
        };
        let number = |field: &str| {
            value[field]
                .as_u64()
                .unwrap_or_else(|| panic!("backend echo has no {field}: {value}"))
                as usize
        };
        let headers = value["headers"]
            .as_array()
            .expect("backend echo has headers")
            .iter()
            .map(|pair| {
                (
                    pair[0].as_str().unwrap_or_default().to_owned(),
                    pair[1].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        Echo {
            method: text("method"),
            path: text("path"),
            headers,
            body_len: number("body_len"),
            body_sha256: text("body_sha256"),
            body_chunked: value["body_chunked"].as_bool().unwrap_or(false),
            connection: number("connection"),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn header_values(&self, name: &str) -> Vec<&str> {
        header_values(&self.headers, name)
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn header_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A request head as the backend received it. Header names are lowercased.
#[derive(Clone, Debug)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    fn is_chunked(&self) -> bool {
        is_chunked(&self.headers)
    }

    fn content_length(&self) -> io::Result<usize> {
        content_length(&self.headers).map(|n| n.unwrap_or(0))
    }

    fn wants_close(&self) -> bool {
        let connection = self.header("connection").unwrap_or_default();
        let close = connection
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("close"));
        close || self.minor_version == 0
    }
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    header_values(headers, "transfer-encoding")
        .iter()
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("chunked"))
}

fn content_length(headers: &[(String, String)]) -> io::Result<Option<usize>> {
    match header(headers, "content-length") {
        None => Ok(None),
        Some(value) => value
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| invalid(format!("bad Content-Length {value:?}"))),
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn closed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("connection closed while reading {what}"),
    )
}

fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// A byte stream with a read buffer, reading HTTP/1.1 messages one at a time (so keep-alive and
/// pipelined messages work).
pub struct HttpStream<S> {
    pub inner: S,
    buf: Vec<u8>,
}

impl<S: Read + Write> HttpStream<S> {
    pub fn new(inner: S) -> Self {
        HttpStream {
            inner,
            buf: Vec::new(),
        }
    }

    /// Reads more bytes into the buffer; 0 at EOF. A TLS peer that closes without close_notify
    /// counts as EOF too: the message framing decides whether that was too early.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 64 * 1024];
        let n = match self.inner.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && self.buf.is_empty() => 0,
            Err(e) => return Err(e),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// True when the peer closes (or resets) the connection before sending anything more.
    pub fn at_eof(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        match self.fill() {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    /// Reads one response; 1xx responses are returned as they are (callers skip them).
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Response> {
        let (status, reason, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 128];
            let mut parsed = httparse::Response::new(&mut slots);
            match parsed
                .parse(&self.buf)
                .map_err(|e| invalid(format!("bad response head: {e}")))?
            {
                httparse::Status::Complete(len) => {
                    let head = (
                        parsed.code.unwrap_or(0),
                        parsed.reason.unwrap_or("").to_owned(),
                        owned_headers(parsed.headers),
                    );
                    self.buf.drain(..len);
                    break head;
                }
                httparse::Status::Partial => {
                    if self.buf.len() > MAX_HEAD {
                        return Err(invalid("response head too large".into()));
                    }
                    if self.fill()? == 0 {
                        return Err(closed("a response head"));
                    }
                }
            }
        };
        let chunked = is_chunked(&headers);
        let body = if head_request || (100..200).contains(&status) || status == 204 || status == 304
        {
            Vec::new()
        } else if chunked {
            self.read_chunked()?
        } else if let Some(len) = content_length(&headers)? {
            self.read_exact_body(len)?
        } else {
            self.read_to_eof()?
        };
        Ok(Response {
            status,
            reason,
            headers,
            body,
            chunked: chunked && !head_request,
        })
    }

    /// Reads one request head; `None` when the peer closed cleanly between requests.
    pub fn read_request_head(&mut self) -> io::Result<Option<RequestHead>> {
        loop {
            let mut slots = [httparse::EMPTY_HEADER; 128];
            let mut parsed = httparse::Request::new(&mut slots);
            match parsed
                .parse(&self.buf)
                .map_err(|e| invalid(format!("bad request head: {e}")))?
            {
                httparse::Status::Complete(len) => {
                    let head = RequestHead {
                        method: parsed.method.unwrap_or("").to_owned(),
                        target: parsed.path.unwrap_or("").to_owned(),
                        minor_version: parsed.version.unwrap_or(1),
                        headers: owned_headers(parsed.headers),
                    };
                    self.buf.drain(..len);
                    return Ok(Some(head));
                }
                httparse::Status::Partial => {
                    if self.buf.len() > MAX_HEAD {
                        return Err(invalid("request head too large".into()));
                    }
                    if self.fill()? == 0 {
                        return if self.buf.is_empty() {
                            Ok(None)
                        } else {
                            Err(closed("a request head"))
                        };
                    }
                }
            }
        }
    }

    /// Reads the body that `head` announces.
    pub fn read_request_body(&mut self, head: &RequestHead) -> io::Result<Vec<u8>> {
        if head.is_chunked() {
            self.read_chunked()
        } else {
            let len = head.content_length()?;
            self.read_exact_body(len)
        }
    }

    fn read_exact_body(&mut self, len: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < len {
            if self.fill()? == 0 {
                return Err(closed(&format!(
                    "a {len}-byte body (got {})",
                    self.buf.len()
                )));
            }
        }
        Ok(self.buf.drain(..len).collect())
    }

    fn read_to_eof(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// One CRLF-terminated line, without the CRLF.
    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.drain(..pos + 2).take(pos).collect();
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("chunk line too long".into()));
            }
            if self.fill()? == 0 {
                return Err(closed("a chunk line"));
            }
        }
    }

    /// A chunked body, decoded; trailers are read and dropped.
    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let line = String::from_utf8_lossy(&line);
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.read_exact_body(size)?);
            if !self.read_line()?.is_empty() {
                return Err(invalid("chunk data not followed by CRLF".into()));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test backend
// ---------------------------------------------------------------------------------------------

/// A real HTTP/1.1 backend on 127.0.0.1:0, one thread per connection, keep-alive.
///
/// It answers every request with JSON describing it ([`Echo`]): method, path with query, all
/// headers in order (lowercased names), body length and SHA-256, and its connection number.
/// Special paths (matched on the end of the path, so a backend URL path prefix does not matter):
///
/// - `.../big?bytes=N`: N bytes of [`pattern`] with Content-Length.
/// - `.../chunked?bytes=N`: N bytes of [`pattern`] in chunks of varied sizes (default 100000).
/// - `.../status/N`: status N with an echo body (no body for 1xx, 204, 304).
/// - `.../slow?ms=N`: an echo, sent N ms after the request arrived (an exchange in flight).
/// - `.../hop`: an echo whose response carries hop-by-hop headers (`Connection: x-hop`,
///   `X-Hop`, `Keep-Alive`, `Proxy-Connection`, `Upgrade`) plus `X-End-To-End: kept`.
///
/// HEAD gets the head of the GET answer. `Expect: 100-continue` gets an interim 100 first.
pub struct Backend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    pub fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().expect("backend local_addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let connections = Arc::clone(&connections);
            let requests = Arc::clone(&requests);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let id = connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let requests = Arc::clone(&requests);
                    thread::spawn(move || serve_backend_connection(stream, id, &requests));
                }
            });
        }
        Backend {
            addr,
            connections,
            requests,
            stop,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, what the gateway must send as `Host`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests received so far (heads read).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag; connection threads end with their sockets.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve_backend_connection(stream: TcpStream, id: usize, requests: &AtomicUsize) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let _ = stream.set_nodelay(true);
    let mut http = HttpStream::new(stream);
    while let Ok(Some(head)) = http.read_request_head() {
        requests.fetch_add(1, Ordering::SeqCst);
        let expects_continue = head
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects_continue
            && http
                .inner
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .is_err()
        {
            break;
        }
        let Ok(body) = http.read_request_body(&head) else {
            break;
        };
        let answer = backend_answer(&head, &body, id);
        if http.inner.write_all(&answer).is_err() || http.inner.flush().is_err() {
            break;
        }
        if head.wants_close() {
            break;
        }
    }
    let _ = http.inner.shutdown(Shutdown::Both);
}

fn backend_answer(head: &RequestHead, body: &[u8], connection: usize) -> Vec<u8> {
    let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
    let bytes_param = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("bytes="))
        .and_then(|n| n.parse::<usize>().ok());
    let is_head = head.method == "HEAD";

    // HTTP/1.0 has no chunked encoding (RFC 9112 7.1): `/chunked` answers it with Content-Length.
    if path.ends_with("/big") || (path.ends_with("/chunked") && head.minor_version == 0) {
        let payload =
            pattern(bytes_param.unwrap_or(if path.ends_with("/big") { 0 } else { 100_000 }));
        return response_bytes(
            200,
            &[("Content-Type", "application/octet-stream".into())],
            &payload,
            is_head,
        );
    }
    if path.ends_with("/chunked") {
        let payload = pattern(bytes_param.unwrap_or(100_000));
        let mut out =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        if is_head {
            return out;
        }
        let sizes = [1usize, 10, 100, 1000, 4096, 8192, 16385, 333];
        let mut rest = &payload[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            // One chunk extension, which RFC 9112 allows and a proxy must cope with.
            let ext = if i == 0 { ";ext=1" } else { "" };
            out.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        out.extend_from_slice(b"0\r\n\r\n");
        return out;
    }

    if path.ends_with("/slow") {
        let ms = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("ms="))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(1000);
        thread::sleep(Duration::from_millis(ms));
    }

    let echo = json!({
        "method": head.method,
        "path": head.target,
        "headers": head.headers.iter().map(|(n, v)| json!([n, v])).collect::<Vec<_>>(),
        "body_len": body.len(),
        "body_sha256": sha256_hex(body),
        "body_chunked": head.is_chunked(),
        "connection": connection,
    });
    let echo = serde_json::to_vec(&echo).expect("serialise echo");
    let json_type = ("Content-Type", "application/json".to_owned());

    if let Some(code) = path
        .rsplit_once("/status/")
        .and_then(|(_, n)| n.parse::<u16>().ok())
    {
        return response_bytes(code, &[json_type], &echo, is_head);
    }
    if path.ends_with("/hop") {
        let headers = [
            json_type,
            ("Connection", "x-hop".into()),
            ("X-Hop", "must-not-pass".into()),
            ("Keep-Alive", "timeout=5".into()),
            ("Proxy-Connection", "keep-alive".into()),
            ("Upgrade", "h2c".into()),
            ("X-End-To-End", "kept".into()),
        ];
        return response_bytes(200, &headers, &echo, is_head);
    }
    response_bytes(200, &[json_type], &echo, is_head)
}

fn response_bytes(status: u16, headers: &[(&str, String)], body: &[u8], head: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    let bodyless = (100..200).contains(&status) || status == 204 || status == 304;
    if !bodyless {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if !head && !bodyless {
        out.extend_from_slice(body);
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}
