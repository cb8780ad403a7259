//! The mio event loop: one thread, listeners, client and backend sockets, signals, timers and
//! snapshot reloads.
//!
//! Tokens: client connection `k` of the slab has `Token(2k)`, backend connection `b` of the pool
//! `Token(2b + 1)` whichever client connection leases it ([`crate::pool`]); listeners and the
//! signal pipe use tokens from the top of the range, the built-in echo service ([`crate::echo`])
//! those from the middle up.
//! A closed connection leaves the slab only after the batch of events it was closed in, so a
//! token is never reused while events for its old owner may still be pending.
//!
//! At `max_connections` the loop stops accepting; further connections wait in the kernel's
//! backlog until one closes.

use std::collections::HashMap;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use ring::rand::SecureRandom;
use rustls::ServerConnection;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use thiserror::Error;

use crate::admin::{self, Admin};
use crate::conn::{Conn, Context, Limits, Readiness, RequestIds};
use crate::echo::Echo;
use crate::metrics;
use crate::model::{Config, ECHO_BACKEND};
use crate::pool::{self, Owner, Pool, Use};
use crate::snapshot::Snapshot;
use crate::store::Store;
use crate::systemd::{self, Notifier};
use crate::throttle::{Buckets, Counters, Monotonic};
use crate::tls::{SessionState, TlsError};

const SIGNALS: Token = Token(usize::MAX);
/// Listener `i` has `Token(LISTENERS - i)`.
const LISTENERS: usize = usize::MAX - 1;
/// The echo service's listener; its connections follow. Client and backend tokens stay far
/// below, since the slabs they index are bounded by `max_connections`.
const ECHO: usize = usize::MAX / 2;
/// The admin endpoint's listener; its connections follow.
const ADMIN: usize = usize::MAX / 4;
/// How often the store is asked whether it changed (SPEC 5 allows 2 s).
const RELOAD_INTERVAL: Duration = Duration::from_millis(500);
/// How often deadlines are checked.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// How often throttling buckets that changed are saved (and full ones dropped).
const PERSIST_INTERVAL: Duration = Duration::from_secs(1);
/// The most buckets saved at one tick; more wait for the next.
const PERSIST_BATCH: usize = 500;

/// What `certgate serve` was asked to do, validated.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: Vec<SocketAddr>,
    pub require_client_cert: bool,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub limits: Limits,
    /// Where `/healthz` and `/metrics` are served, plain HTTP.
    pub admin: Option<SocketAddr>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 8443))],
            require_client_cert: false,
            drain_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            limits: Limits::default(),
            admin: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Binds the listeners of `addrs`; [`run`] says `listening on ADDR` once it serves them.
pub fn bind(addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>, ServeError> {
    addrs
        .iter()
        .map(|&addr| {
            std::net::TcpListener::bind(addr).map_err(|source| ServeError::Listen { addr, source })
        })
        .collect()
}

/// Serves on `listeners` until SIGTERM or SIGINT; returns once requests in flight are done or
/// the drain deadline has passed.
pub fn run(
    mut store: Store,
    listeners: Vec<std::net::TcpListener>,
    options: ServeOptions,
) -> Result<(), ServeError> {
    let session = SessionState::new()?;
    let poll = Poll::new()?;
    let config = store.load_config()?;
    let mut resolved = resolve_backends(&config);
    let mut echo = None;
    start_echo(&mut echo, &config, poll.registry(), &mut resolved)?;
    let snapshot = Snapshot::build(
        config,
        1,
        &session,
        options.require_client_cert,
        &resolved,
        None,
    )?;
    let mut clock = Monotonic::default();
    let mut buckets = store.load_buckets().unwrap_or_else(|e| {
        crate::log::notice(format_args!(
            "throttling: cannot read the saved buckets, starting with full ones: {e}"
        ));
        Buckets::default()
    });
    buckets.retain(clock.now(unix_nanos()), |key| {
        snapshot.has_bucket_owner(key)
    });
    if let Err(e) = store.start_run(unix_now()) {
        crate::log::notice(format_args!(
            "status: cannot reset the counts of this run: {e}"
        ));
    }
    store.set_nonblocking()?;
    let data_version = store.data_version()?;

    let listeners = listeners
        .into_iter()
        .enumerate()
        .map(|(i, listener)| {
            listener.set_nonblocking(true)?;
            let mut listener = TcpListener::from_std(listener);
            poll.registry()
                .register(&mut listener, Token(LISTENERS - i), Interest::READABLE)?;
            Ok(listener)
        })
        .collect::<Result<Vec<_>, std::io::Error>>()?;
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    // Everything is set up: what a client does from now on is served.
    for listener in &listeners {
        eprintln!("listening on {}", listener.local_addr()?);
    }
    let admin = match options.admin {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|source| ServeError::Listen { addr, source })?;
            let admin = Admin::start(listener, poll.registry(), ADMIN)?;
            eprintln!("admin endpoint on http://{}", admin.local_addr()?);
            Some(admin)
        }
        None => None,
    };
    let notifier = Notifier::from_env();
    notifier.notify(&format!(
        "READY=1\nSTATUS=serving {} APIs",
        snapshot.apis.len()
    ));

    let mut server = Server {
        poll,
        listeners,
        signals,
        conns: Slab::new(),
        echo,
        store,
        session,
        resolved,
        snapshot,
        data_version,
        options,
        pool: Pool::default(),
        request_ids: RequestIds::new(random_u64()),
        buckets,
        clock,
        counters: Counters::default(),
        drain_deadline: None,
        again: Vec::new(),
        accept_failed: false,
        accept_paused: false,
        notifier,
        watchdog: systemd::watchdog_interval(),
        admin,
        persist_failing: false,
        reload_failing: false,
        conn_ids: 0,
    };
    server.run()
}

struct Server {
    poll: Poll,
    listeners: Vec<TcpListener>,
    signals: Signals,
    conns: Slab<Conn>,
    /// The built-in echo backend, started once an API uses it.
    echo: Option<Echo>,
    store: Store,
    session: SessionState,
    resolved: HashMap<String, Vec<SocketAddr>>,
    snapshot: Snapshot,
    data_version: i64,
    options: ServeOptions,
    pool: Pool,
    request_ids: RequestIds,
    buckets: Buckets,
    clock: Monotonic,
    counters: Counters,
    /// Set once SIGTERM or SIGINT arrived.
    drain_deadline: Option<Instant>,
    /// Connections that stopped for their round budget, to pump again before sleeping.
    again: Vec<usize>,
    /// An accept failed (EMFILE and the like): try again at the next sweep, since the
    /// edge-triggered listener will not report the connections already waiting.
    accept_failed: bool,
    /// Accepting stopped at `max_connections`: resume once a connection closes.
    accept_paused: bool,
    notifier: Notifier,
    /// How often systemd's watchdog wants to hear from the loop.
    watchdog: Option<Duration>,
    admin: Option<Admin>,
    /// Saving throttling state failed at the last try (said once, until it works again).
    persist_failing: bool,
    /// Reading the store for a reload failed at the last try (said once, until it works).
    reload_failing: bool,
    /// Connections accepted since start: the last one's number in the logs.
    conn_ids: u64,
}

impl Server {
    fn run(&mut self) -> Result<(), ServeError> {
        let mut events = Events::with_capacity(1024);
        let mut closed = Vec::new();
        let mut next_reload = Instant::now() + RELOAD_INTERVAL;
        let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
        let mut next_persist = Instant::now() + PERSIST_INTERVAL;
        let far = Instant::now() + Duration::from_secs(3_600);
        let mut next_watchdog = self.watchdog.map_or(far, |_| Instant::now());
        loop {
            let now = Instant::now();
            let wake = next_reload
                .min(next_sweep)
                .min(next_persist)
                .min(next_watchdog);
            let timeout = if self.again.is_empty() {
                wake.saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
            let mut reload_now = false;
            for event in events.iter() {
                match event.token() {
                    SIGNALS => reload_now |= self.on_signals(),
                    Token(t) if t > LISTENERS - self.listeners.len() && t <= LISTENERS => {
                        self.accept(LISTENERS - t);
                    }
                    Token(t) if (ADMIN..ECHO).contains(&t) => self.on_admin(event.token()),
                    Token(t) if t >= ECHO => {
                        if let Some(echo) = &mut self.echo {
                            echo.ready(
                                event.token(),
                                readiness(event).readable,
                                self.poll.registry(),
                            );
                        }
                    }
                    token => match pool::owner(token) {
                        Owner::Client(key) => {
                            if let Some(conn) = self.conns.get_mut(key) {
                                conn.client_ready(readiness(event));
                            }
                            self.service(key, false, &mut closed);
                        }
                        Owner::Backend(backend) => match self.pool.used(backend) {
                            Some(Use::Leased(key)) => {
                                if let Some(conn) = self.conns.get_mut(key) {
                                    conn.backend_ready(readiness(event));
                                }
                                self.service(key, false, &mut closed);
                            }
                            Some(Use::Parked(_)) => {
                                self.pool.on_parked_event(backend, self.poll.registry());
                            }
                            None => {}
                        },
                    },
                }
            }
            for key in mem::take(&mut self.again) {
                self.service(key, false, &mut closed);
            }
            for key in closed.drain(..) {
                self.conns.try_remove(key);
            }
            self.resume_accepting();
            let now = Instant::now();
            if reload_now || now >= next_reload {
                if reload_now {
                    self.notifier.notify("RELOADING=1");
                }
                self.reload(reload_now);
                if reload_now {
                    self.notifier.notify(&format!(
                        "READY=1\nSTATUS=serving {} APIs, configuration generation {}",
                        self.snapshot.apis.len(),
                        self.snapshot.generation
                    ));
                }
                next_reload = now + RELOAD_INTERVAL;
            }
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + SWEEP_INTERVAL;
            }
            if now >= next_persist {
                self.persist(false);
                next_persist = now + PERSIST_INTERVAL;
            }
            if let Some(interval) = self.watchdog {
                if now >= next_watchdog {
                    // The loop came round: it is alive.
                    self.notifier.notify("WATCHDOG=1");
                    next_watchdog = now + interval;
                }
            }
            if let Some(deadline) = self.drain_deadline {
                if self.conns.is_empty() {
                    self.persist(true);
                    crate::log::notice(format_args!("drained; exiting"));
                    return Ok(());
                }
                if now >= deadline {
                    self.persist(true);
                    crate::log::notice(format_args!(
                        "drain deadline passed; closing {} connections",
                        self.conns.len()
                    ));
                    return Ok(());
                }
            }
        }
    }

    /// Serves connection `key`: expires it when `expire_due` and its deadline has passed, else
    /// pumps it; notes whether it closed or wants another turn.
    fn service(&mut self, key: usize, expire_due: bool, closed: &mut Vec<usize>) {
        let now = Instant::now();
        let mut cx = Context {
            registry: self.poll.registry(),
            snapshot: &self.snapshot,
            limits: &self.options.limits,
            now,
            unix_now: unix_now(),
            draining: self.drain_deadline.is_some(),
            request_ids: &mut self.request_ids,
            pool: &mut self.pool,
            buckets: &mut self.buckets,
            bucket_now: self.clock.now(unix_nanos()),
            counters: &mut self.counters,
        };
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let again = if expire_due && conn.deadline() <= now {
            conn.expire(&mut cx)
        } else {
            conn.pump(&mut cx)
        };
        if again {
            self.again.push(key);
        }
        if conn.is_closed() {
            closed.push(key);
        }
    }

    /// Serves an event of the admin endpoint: `/healthz` and `/metrics`.
    fn on_admin(&mut self, token: Token) {
        let Some(admin) = &mut self.admin else {
            return;
        };
        let draining = self.drain_deadline.is_some();
        let open = self.conns.len();
        let snapshot = &self.snapshot;
        let answer = |path: &str| match path {
            "/healthz" if draining => admin::text(503, "draining\n"),
            "/healthz" => admin::text(200, "ok\n"),
            "/metrics" => {
                let now = unix_now();
                let days: Vec<(String, i64)> = snapshot
                    .apis
                    .iter()
                    .flat_map(|v| &v.certs)
                    .map(|c| (c.alias.clone(), crate::certs::days_left(c.not_after, now)))
                    .collect();
                admin::Answer {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: metrics::render(&metrics::Gauges {
                        open_connections: open,
                        certificate_days_left: &days,
                    }),
                }
            }
            _ => admin::text(404, "not found; try /healthz or /metrics\n"),
        };
        admin.ready(token, self.poll.registry(), &answer);
    }

    /// Handles pending signals; true when a reload was asked for.
    fn on_signals(&mut self) -> bool {
        let mut reload = false;
        let mut stop = false;
        for signal in self.signals.pending() {
            match signal {
                SIGHUP => reload = true,
                _ => stop = true,
            }
        }
        if stop && self.drain_deadline.is_none() {
            self.notifier
                .notify("STOPPING=1\nSTATUS=draining: finishing requests in flight");
            crate::log::notice(format_args!(
                "stopping: no new connections; draining {} connections",
                self.conns.len()
            ));
            for mut listener in self.listeners.drain(..) {
                let _ = self.poll.registry().deregister(&mut listener);
            }
            self.drain_deadline = Some(Instant::now() + self.options.drain_timeout);
            // Idle connections go now; busy ones once their exchange is done.
            self.pump_all(|conn| conn.is_idle());
        }
        reload
    }

    fn accept(&mut self, index: usize) {
        let Some(listener) = self.listeners.get(index) else {
            return;
        };
        loop {
            if self.conns.len() >= self.options.max_connections {
                self.accept_paused = true;
                return;
            }
            let (mut sock, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: the connection waits in the backlog.
                    crate::log::notice(format_args!("accept failed: {e}"));
                    self.accept_failed = true;
                    return;
                }
            };
            let _ = sock.set_nodelay(true);
            let Ok(tls) = ServerConnection::new(self.snapshot.tls.clone()) else {
                continue;
            };
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            let registered = self.poll.registry().register(
                &mut sock,
                pool::client_token(key),
                Interest::READABLE | Interest::WRITABLE,
            );
            if registered.is_err() {
                continue;
            }
            let deadline = Instant::now() + self.options.limits.handshake_timeout;
            self.conn_ids += 1;
            entry.insert(Conn::new(sock, tls, peer, (key, self.conn_ids), deadline));
        }
    }

    /// Accepts again once connections have closed below `max_connections`.
    fn resume_accepting(&mut self) {
        if self.accept_paused && self.conns.len() < self.options.max_connections {
            self.accept_paused = false;
            for index in 0..self.listeners.len() {
                self.accept(index);
            }
        }
    }

    /// Rebuilds the snapshot when the store changed (or at once when `forced`). A store that
    /// cannot be read keeps the last good snapshot serving.
    fn reload(&mut self, forced: bool) {
        let version = match self.store.data_version() {
            Ok(v) => v,
            Err(e) => {
                // Said once (and at every SIGHUP) until the store can be read again.
                if !mem::replace(&mut self.reload_failing, true) || forced {
                    crate::log::notice(format_args!(
                        "reload: cannot read the store, serving on as configured: {e}"
                    ));
                }
                return;
            }
        };
        if version == self.data_version && !forced {
            return;
        }
        let config = match self.store.load_config() {
            Ok(config) => config,
            Err(e) => {
                // Busy or broken: try again on the next tick, saying so once.
                if !mem::replace(&mut self.reload_failing, true) || forced {
                    crate::log::notice(format_args!(
                        "reload: keeping the current configuration: {e}"
                    ));
                }
                metrics::reload(false);
                return;
            }
        };
        if mem::take(&mut self.reload_failing) {
            crate::log::notice(format_args!("reload: the store can be read again"));
        }
        if let Err(e) = start_echo(
            &mut self.echo,
            &config,
            self.poll.registry(),
            &mut self.resolved,
        ) {
            crate::log::notice(format_args!(
                "reload: cannot start the built-in echo backend: {e}"
            ));
        }
        let generation = self.snapshot.generation + 1;
        match Snapshot::build(
            config,
            generation,
            &self.session,
            self.options.require_client_cert,
            &self.resolved,
            Some(&self.snapshot),
        ) {
            Ok(snapshot) => {
                let certs: usize = snapshot.apis.iter().map(|a| a.certs.len()).sum();
                crate::log::notice(format_args!(
                    "configuration reloaded: generation {generation}, {} APIs, {certs} certificates",
                    snapshot.apis.len()
                ));
                self.snapshot = snapshot;
                self.data_version = version;
                metrics::reload(true);
                let now = self.clock.now(unix_nanos());
                let snapshot = &self.snapshot;
                self.buckets
                    .retain(now, |key| snapshot.has_bucket_owner(key));
            }
            Err(e) => {
                crate::log::notice(format_args!(
                    "reload: keeping the current configuration: {e}"
                ));
                self.data_version = version;
                metrics::reload(false);
            }
        }
    }

    /// Saves the throttling buckets that changed (at most [`PERSIST_BATCH`] a tick, so that
    /// the loop never waits long on SQLite; all of them at the end, `last`) and the counts,
    /// dropping full buckets first. A busy store is tried again at the next tick.
    fn persist(&mut self, last: bool) {
        let now = self.clock.now(unix_nanos());
        self.buckets.retain(now, |_| true);
        if last {
            let _ = self.store.set_busy_timeout(Duration::from_secs(1));
        }
        let batch = self
            .buckets
            .unsaved(if last { usize::MAX } else { PERSIST_BATCH });
        if batch.is_empty() && self.counters.is_empty() && !last {
            return;
        }
        let counts = self.counters.take();
        match self.store.save_throttling(&batch, &counts, now) {
            Ok(()) => {
                self.buckets.mark_saved(&batch);
                if mem::take(&mut self.persist_failing) {
                    crate::log::notice(format_args!(
                        "throttling: buckets and counts are saved again"
                    ));
                }
            }
            Err(e) => {
                // Said once; tried again every second until it works.
                if !mem::replace(&mut self.persist_failing, true) || last {
                    crate::log::notice(format_args!("throttling: cannot save buckets and counts: {e}; trying again every second"));
                }
                self.counters.restore(counts);
            }
        }
    }

    /// Expires connections whose deadline has passed.
    fn sweep(&mut self, now: Instant) {
        self.pump_all(|conn| conn.deadline() <= now);

        self.pool
            .expire(now, self.options.limits.idle_timeout, self.poll.registry());
        if mem::take(&mut self.accept_failed) {
            for index in 0..self.listeners.len() {
                self.accept(index);
            }
        }
    }

    /// Serves the connections `pick` selects, expiring those whose deadline has passed; drops
    /// the ones that close (this runs between batches of events, or while the listeners are
    /// gone, so no token of theirs can still be pending).
    fn pump_all(&mut self, pick: impl Fn(&Conn) -> bool) {
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, conn)| pick(conn))
            .map(|(key, _)| key)
            .collect();
        let mut closed = Vec::new();
        for key in keys {
            self.service(key, true, &mut closed);
        }
        for key in closed {
            self.conns.try_remove(key);
        }
        self.resume_accepting();
    }
}

/// Starts the built-in echo backend the first time an API of `config` uses it, and has
/// `resolved` send that API's requests to it.
fn start_echo(
    echo: &mut Option<Echo>,
    config: &Config,
    registry: &mio::Registry,
    resolved: &mut HashMap<String, Vec<SocketAddr>>,
) -> std::io::Result<()> {
    if echo.is_some() || !config.apis.iter().any(|a| a.backend.is_builtin()) {
        return Ok(());
    }
    let started = Echo::start(registry, ECHO)?;
    resolved.insert(ECHO_BACKEND.to_owned(), vec![started.addr()]);
    *echo = Some(started);
    Ok(())
}

/// Looks up every backend host name once, before the loop starts; addresses stored by the
/// commands serve where a lookup fails.
fn resolve_backends(config: &Config) -> HashMap<String, Vec<SocketAddr>> {
    let mut resolved = HashMap::new();
    for api in &config.apis {
        let mut backend = api.backend.clone();
        if backend.is_builtin()
            || backend
                .host
                .trim_matches(['[', ']'])
                .parse::<IpAddr>()
                .is_ok()
            || resolved.contains_key(&backend.authority)
        {
            continue;
        }
        match backend.resolve() {
            Ok(()) => {
                resolved.insert(backend.authority.clone(), backend.addrs);
            }
            Err(e) => crate::log::notice(format_args!(
                "API {}: {e}; using the addresses stored at api add",
                api.name
            )),
        }
    }
    resolved
}

fn readiness(event: &mio::event::Event) -> Readiness {
    let failed = event.is_error();
    let read_closed = event.is_read_closed() || failed;
    Readiness {
        readable: event.is_readable() || read_closed,
        writable: event.is_writable() || event.is_write_closed() || failed,
        read_closed,
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // A failing system RNG only makes request ids predictable, not wrong.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u64::from_le_bytes(bytes)
}
