//! The admin endpoint, `serve --admin ADDR` (SPEC 2 and 7): plain HTTP, meant for loopback,
//! served by the gateway's own loop. `GET /healthz` is 200 while serving and 503 while
//! draining; `GET /metrics` is the Prometheus text exposition of [`crate::metrics`]. Each
//! connection gets one answer and is closed, as a scraper expects nothing more.
//!
//! This module owns the listener and its connections; what the answers say is the loop's
//! ([`crate::server`]), through the `answer` function it passes in.

use std::io::{self, Read};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::{http, plain};

/// The most an admin request head may be.
const MAX_HEAD: usize = 8 * 1024;

/// An answer of the endpoint.
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

pub struct Admin {
    listener: TcpListener,
    conns: Slab<AdminConn>,
    base: usize,
}

struct AdminConn {
    sock: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// The answer is in `output`: write it, then close.
    answered: bool,
}

impl Admin {
    /// Listens on `addr`; the listener has `Token(base)`, connection `i` `Token(base + 1 + i)`.
    pub fn start(
        listener: std::net::TcpListener,
        registry: &Registry,
        base: usize,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        registry.register(&mut listener, Token(base), Interest::READABLE)?;
        Ok(Self {
            listener,
            conns: Slab::new(),
            base,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Handles an event for one of the endpoint's tokens; `answer` maps a request path to
    /// its answer.
    pub fn ready(&mut self, token: Token, registry: &Registry, answer: &dyn Fn(&str) -> Answer) {
        if token.0 == self.base {
            self.accept(registry);
            return;
        }
        let key = token.0 - self.base - 1;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if !conn.pump(answer) {
            // As for the echo service: a later event of this batch for the token can only
            // wake a new connection under it for nothing.
            let mut conn = self.conns.remove(key);
            let _ = registry.deregister(&mut conn.sock);
        }
    }

    fn accept(&mut self, registry: &Registry) {
        plain::accept_all(
            &self.listener,
            &mut self.conns,
            self.base,
            registry,
            |sock| AdminConn {
                sock,
                input: Vec::new(),
                output: Vec::new(),
                answered: false,
            },
        );
    }
}

impl AdminConn {
    /// Reads the request, answers, writes; false once the connection is done.
    fn pump(&mut self, answer: &dyn Fn(&str) -> Answer) -> bool {
        if !self.answered {
            let mut buf = [0u8; 4096];
            loop {
                match self.sock.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(n) => self.input.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
                if self.input.len() > MAX_HEAD {
                    break;
                }
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            let reply = match request.parse(&self.input) {
                Ok(httparse::Status::Complete(_)) => match (request.method, request.path) {
                    (Some("GET" | "HEAD"), Some(path)) => answer(path),
                    _ => text(405, "only GET\n"),
                },
                Ok(httparse::Status::Partial) if self.input.len() <= MAX_HEAD => return true,
                _ => text(400, "bad request\n"),
            };
            let head_only = request.method == Some("HEAD");
            let (status, content_type, body) = (reply.status, reply.content_type, reply.body);
            let out = &mut self.output;
            http::write_simple_answer(status, content_type, body.as_bytes(), false, head_only, out);
            self.answered = true;
        }
        // Once all is written, the connection is done.
        if !plain::flush(&mut self.sock, &mut self.output) {
            return false;
        }
        !self.output.is_empty()
    }
}

/// A plain-text answer.
pub fn text(status: u16, body: &str) -> Answer {
    Answer {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.to_owned(),
    }
}
