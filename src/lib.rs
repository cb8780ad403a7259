//! certgate: an API gateway for edge devices that secures HTTP APIs with mutual TLS.
//!
//! # Layout
//!
//! - [`admin`]: the admin endpoint (`/healthz`, `/metrics`), plain HTTP in the same loop.
//! - [`buf`]: the buffer connections read into, zeroed once rather than before every read.
//! - [`metrics`]: the counters and their Prometheus text exposition.
//! - [`model`]: the configuration as plain values (APIs, resources, certificate entries, tiers)
//!   and the parsing of user-facing strings such as backend URLs and path templates.
//! - [`store`]: the SQLite file; the only module that touches rusqlite.
//! - [`certs`]: reading client certificates (PEM, DER) and their fields with x509-parser.
//! - [`check`]: `certgate check`, the health of the store and of its certificates (pure).
//! - [`cli`]: the subcommands, their arguments and their output.
//! - [`snapshot`]: the in-memory, immutable view of the store that the loop serves from.
//! - [`route`]: routing a request path to an API and a resource (pure).
//! - [`plain`]: accepting and writing the plain TCP connections of the services above.
//! - [`policy`]: the security decision for one request (pure).
//! - [`systemd`]: notifications, the watchdog and socket activation, by their protocols.
//! - [`throttle`]: token buckets as one number each (GCRA), pure integer arithmetic.
//! - [`tls`]: the rustls server configuration and the client-certificate verifier.
//! - [`http`]: HTTP/1.1 heads and body framing, and the gateway's own answers.
//! - [`log`]: the access log's lines, in logfmt or JSON.
//! - [`conn`]: one client connection and its backend connection, as a state machine.
//! - [`echo`]: the built-in echo backend (`builtin:echo`), served by the same loop.
//! - [`pool`]: idle backend connections shared by all client connections, and the tokens.
//! - [`quickstart`]: `certgate quickstart`, a demo API with its certificates, served.
//! - [`server`]: the mio event loop: listeners, tokens, signals, snapshot reloads.
//!
//! `ARCHITECTURE.md` traces a request's life through these modules.

pub mod admin;
pub mod buf;
pub mod certs;
pub mod check;
pub mod cli;
pub mod conn;
pub mod echo;
pub mod http;
pub mod log;
pub mod metrics;
pub mod model;
pub mod plain;
pub mod policy;
pub mod pool;
pub mod quickstart;
pub mod route;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod systemd;
pub mod throttle;
pub mod tls;
