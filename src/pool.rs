//! Idle backend connections, shared by every client connection and kept per backend address.
//!
//! After a keep-alive exchange the client connection parks its backend connection here; the next
//! request to the same address, from any client, takes the most recently parked one (the one most
//! likely still open). A parked connection stays registered with the loop under a pool token, so
//! a backend that closes it, or sends something unasked, is noticed at once and the connection
//! is dropped; connections idle longer than the idle timeout are closed by [`Pool::expire`].
//!
//! What the pool does not do: connect (the client connection does, so that it can try each
//! address in turn and answer 502 itself) or decide whether a connection may be reused
//! ([`crate::conn`] knows whether the exchange left it clean).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;

/// Idle connections kept per backend address; more are closed as they come back.
const MAX_IDLE_PER_ADDR: usize = 256;

/// Tokens: client connection `k` owns `Token(3k)` (client) and `Token(3k + 1)` (backend); a parked
/// connection `p` has `Token(3p + 2)`.
pub fn client_token(key: usize) -> Token {
    Token(3 * key)
}

pub fn backend_token(key: usize) -> Token {
    Token(3 * key + 1)
}

fn parked_token(key: usize) -> Token {
    Token(3 * key + 2)
}

/// Who an event's token belongs to.
pub enum Owner {
    Conn(usize),
    Parked(usize),
}

pub fn owner(token: Token) -> Owner {
    match token.0 % 3 {
        2 => Owner::Parked(token.0 / 3),
        _ => Owner::Conn(token.0 / 3),
    }
}

struct Parked {
    sock: TcpStream,
    addr: SocketAddr,
    since: Instant,
}

#[derive(Default)]
pub struct Pool {
    parked: Slab<Parked>,
    /// Keys into `parked` per address, oldest first.
    by_addr: HashMap<SocketAddr, VecDeque<usize>>,
}

impl Pool {
    /// Takes the most recently parked open connection to one of `addrs`, registered under
    /// `token`; also says which of `addrs` it goes to. Dead ones met on the way are closed.
    pub fn checkout(
        &mut self,
        addrs: &[SocketAddr],
        registry: &Registry,
        token: Token,
    ) -> Option<(TcpStream, usize)> {
        for (i, addr) in addrs.iter().enumerate() {
            let Some(keys) = self.by_addr.get_mut(addr) else {
                continue;
            };
            while let Some(key) = keys.pop_back() {
                let Parked { mut sock, .. } = self.parked.remove(key);
                let reregistered =
                    registry.reregister(&mut sock, token, Interest::READABLE | Interest::WRITABLE);
                if still_open(&sock) && reregistered.is_ok() {
                    return Some((sock, i));
                }
                let _ = registry.deregister(&mut sock);
            }
        }
        None
    }

    /// Keeps `sock`, a clean keep-alive connection to `addr`, for the next request to it.
    pub fn park(
        &mut self,
        mut sock: TcpStream,
        addr: SocketAddr,
        now: Instant,
        registry: &Registry,
    ) {
        let keys = self.by_addr.entry(addr).or_default();
        if keys.len() >= MAX_IDLE_PER_ADDR {
            let _ = registry.deregister(&mut sock);
            return;
        }
        let entry = self.parked.vacant_entry();
        let token = parked_token(entry.key());
        // Only reading matters while parked: the backend closing, or sending out of turn.
        if registry
            .reregister(&mut sock, token, Interest::READABLE)
            .is_err()
        {
            let _ = registry.deregister(&mut sock);
            return;
        }
        keys.push_back(entry.key());
        entry.insert(Parked {
            sock,
            addr,
            since: now,
        });
    }

    /// An event on a parked connection: the backend closed it or sent something nobody asked
    /// for; either way it cannot carry another request. (A stale event for a key that has
    /// been reused finds an open connection and leaves it.)
    pub fn on_event(&mut self, key: usize, registry: &Registry) {
        let Some(parked) = self.parked.get(key) else {
            return;
        };
        if !still_open(&parked.sock) {
            self.close(key, registry);
        }
    }

    /// Closes connections parked for longer than `idle`.
    pub fn expire(&mut self, now: Instant, idle: Duration, registry: &Registry) {
        let mut stale = Vec::new();
        for keys in self.by_addr.values() {
            stale.extend(
                keys.iter()
                    .take_while(|&&key| self.parked[key].since + idle <= now)
                    .copied(),
            );
        }
        for key in stale {
            self.close(key, registry);
        }
    }

    pub fn len(&self) -> usize {
        self.parked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }

    fn close(&mut self, key: usize, registry: &Registry) {
        let mut parked = self.parked.remove(key);
        if let Some(keys) = self.by_addr.get_mut(&parked.addr) {
            keys.retain(|&k| k != key);
        }
        let _ = registry.deregister(&mut parked.sock);
    }
}

/// Whether an idle connection is still open: nothing to read and no end of stream.
pub fn still_open(sock: &TcpStream) -> bool {
    matches!(sock.peek(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}
