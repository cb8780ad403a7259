//! The built-in echo backend, `builtin:echo`: a plain HTTP/1.1 service on a loopback port of its
//! own, served by the gateway's loop, that answers every request with a JSON document of what
//! it received (method, target, headers, body). It lets `certgate quickstart` serve an API
//! with no other process, and shows the operator exactly what a backend gets from the gateway,
//! `X-Forwarded-*` and `Client-Cert` included.
//!
//! The gateway reaches it like any backend, through [`crate::pool`], so every request to it
//! takes the same path as one to a real backend. This module owns the listener and its
//! connections; the loop ([`crate::server`]) owns their tokens and hands it their events.
//!
//! It is a demonstration service, bounded like the rest: a head of at most 16 KiB, the first
//! 16 KiB of a body shown (the rest counted), one answer pending per connection. A HEAD
//! request gets the head of the answer a GET would get.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use serde_json::{Map, Value};
use slab::Slab;

use crate::http::{self, Body, Framing, RequestHead};
use crate::plain;

const MAX_HEAD: usize = 16 * 1024;
/// Escaped as JSON, control bytes take up to six times their size in the answer.
const MAX_SHOWN_BODY: usize = 16 * 1024;

/// The echo service: its listener and connections. `token(i)` names connection `i`.
pub struct Echo {
    listener: TcpListener,
    addr: SocketAddr,
    conns: Slab<EchoConn>,
    base: usize,
}

struct EchoConn {
    sock: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    head: RequestHead,
    readable: bool,
    phase: Phase,
}

enum Phase {
    Head,
    /// The head is parsed; the body is still arriving. `answer` holds the echo so far.
    Body {
        body: Body,
        answer: Map<String, Value>,
        shown: Vec<u8>,
        bytes: u64,
        keep_alive: bool,
        head_only: bool,
    },
    /// The answer goes out, then the connection closes.
    Closing,
}

impl Echo {
    /// Listens on a free loopback port. The listener has `Token(base)`, connection `i`
    /// `Token(base + 1 + i)`.
    pub fn start(registry: &Registry, base: usize) -> io::Result<Self> {
        let mut listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        registry.register(&mut listener, Token(base), Interest::READABLE)?;
        Ok(Self {
            addr: listener.local_addr()?,
            listener,
            conns: Slab::new(),
            base,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether `token` is the echo service's.
    /// Handles an event for one of the service's tokens.
    pub fn ready(&mut self, token: Token, readable: bool, registry: &Registry) {
        if token.0 == self.base {
            self.accept(registry);
            return;
        }
        // A connection that ends leaves the slab at once: a later event of this batch for its
        // token can only find a new connection under it and mark it readable, which costs
        // that one a read that would block, nothing more.
        let key = token.0 - self.base - 1;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.readable |= readable;
        if !conn.pump() {
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
            |sock| EchoConn {
                sock,
                input: Vec::new(),
                output: Vec::new(),
                head: RequestHead::default(),
                readable: true,
                phase: Phase::Head,
            },
        );
    }
}

impl EchoConn {
    /// Moves what can be moved; false once the connection is done.
    fn pump(&mut self) -> bool {
        loop {
            if !plain::flush(&mut self.sock, &mut self.output) {
                return false;
            }
            if !self.output.is_empty() {
                // Blocked on writing: read on only once the answer is out.
                return true;
            }
            if matches!(self.phase, Phase::Closing) {
                return false;
            }
            if !self.input.is_empty() && self.advance() {
                continue;
            }
            if !self.readable {
                return true;
            }
            let mut buf = [0u8; 16 * 1024];
            match self.sock.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Consumes input for the current phase; true when it made progress.
    fn advance(&mut self) -> bool {
        match &mut self.phase {
            Phase::Head => match http::parse_request(&self.input, &mut self.head) {
                Ok(true) => {
                    let (answer, framing, keep_alive) = describe(&self.input, &self.head);
                    let head_only = &self.input[self.head.method.clone()] == b"HEAD";
                    self.input.drain(..self.head.len);
                    self.phase = Phase::Body {
                        body: Body::new(framing),
                        answer,
                        shown: Vec::new(),
                        bytes: 0,
                        keep_alive,
                        head_only,
                    };
                    if framing == Framing::None {
                        self.answer();
                    }
                    true
                }
                Ok(false) if self.input.len() <= MAX_HEAD => false,
                Ok(false) => self.refuse(431, "request head too large"),
                Err(e) => self.refuse(400, &e.to_string()),
            },
            Phase::Body {
                body, shown, bytes, ..
            } => {
                let consumed = body.advance_with(&self.input, |content| {
                    *bytes += content.len() as u64;
                    let room = MAX_SHOWN_BODY.saturating_sub(shown.len());
                    shown.extend_from_slice(&content[..content.len().min(room)]);
                });
                let Ok(consumed) = consumed else {
                    return self.refuse(400, "malformed chunked body");
                };
                self.input.drain(..consumed);
                if body.is_done() {
                    self.answer();
                    return true;
                }
                consumed > 0
            }
            Phase::Closing => false,
        }
    }

    /// The whole request is in: writes its echo.
    fn answer(&mut self) {
        let Phase::Body {
            mut answer,
            shown,
            bytes,
            keep_alive,
            head_only,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Head)
        else {
            return;
        };
        answer.insert(
            "body".into(),
            Value::String(String::from_utf8_lossy(&shown).into_owned()),
        );
        answer.insert("body_bytes".into(), Value::from(bytes));
        let mut json = serde_json::to_vec_pretty(&Value::Object(answer)).unwrap_or_default();
        json.push(b'\n');
        let out = &mut self.output;
        http::write_simple_answer(200, "application/json", &json, keep_alive, head_only, out);
        if !keep_alive {
            self.phase = Phase::Closing;
        }
    }

    fn refuse(&mut self, status: u16, detail: &str) -> bool {
        let text = format!("{detail}\n");
        let out = &mut self.output;
        http::write_simple_answer(status, "text/plain", text.as_bytes(), false, false, out);
        self.input.clear();
        self.phase = Phase::Closing;
        true
    }
}

/// The echo of a request head: method, target and headers (names in lower case; repeated ones
/// joined with ", "), with the head's framing and whether the connection stays open.
fn describe(input: &[u8], head: &RequestHead) -> (Map<String, Value>, Framing, bool) {
    let text = |range: std::ops::Range<usize>| String::from_utf8_lossy(&input[range]).into_owned();
    let mut headers = Map::new();
    for h in &head.headers {
        let name = text(h.name.clone()).to_ascii_lowercase();
        let value = text(h.value.clone());
        match headers.get_mut(&name) {
            Some(Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                headers.insert(name, Value::String(value));
            }
        }
    }
    let mut answer = Map::new();
    answer.insert("method".into(), Value::String(text(head.method.clone())));
    answer.insert(
        "path".into(),
        Value::String(text(head.path.start..head.query.end)),
    );
    answer.insert("headers".into(), Value::Object(headers));
    let framing = head.framing.unwrap_or(Framing::None);
    (answer, framing, head.keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_a_head() {
        let raw =
            b"POST /menu?x=1 HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 3\r\n\r\n";
        let mut head = RequestHead::default();
        assert!(http::parse_request(raw, &mut head).unwrap());
        let (answer, framing, keep_alive) = describe(raw, &head);
        assert_eq!(answer["method"], "POST");
        assert_eq!(answer["path"], "/menu?x=1");
        assert_eq!(answer["headers"]["x-a"], "1, 2");
        assert_eq!(answer["headers"]["host"], "a");
        assert_eq!((framing, keep_alive), (Framing::Length(3), true));
    }
}
