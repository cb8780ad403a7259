//! Backend connections: every one the loop holds, leased to the client connection whose request
//! it carries or parked between requests, and shared by all client connections per backend
//! address.
//!
//! Each backend connection keeps the token it was registered with for its whole life, whoever
//! uses it, so handing one from client to client costs no system call. After a keep-alive
//! exchange the client connection parks it; the next request to the same address, from any
//! client, takes the one parked last (the one most likely still open). A parked connection the
//! backend closes, or sends something unasked on, is noticed by its event and dropped; one idle
//! longer than the idle timeout is closed by [`Pool::expire`].
//!
//! What the pool does not do: decide whether a connection may be reused ([`crate::conn`] knows
//! whether the exchange left it clean) or answer for a failed connect (the client connection
//! tries the next address and answers 502 itself).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;

/// Connections kept parked per backend address; more are closed as they come back.
const MAX_PARKED_PER_ADDR: usize = 256;

/// Tokens: client connection `k` has `Token(2k)`, backend connection `b` `Token(2b + 1)`.
pub fn client_token(key: usize) -> Token {
    Token(2 * key)
}

fn backend_token(key: usize) -> Token {
    Token(2 * key + 1)
}

/// Whose socket an event's token names.
pub enum Owner {
    Client(usize),
    Backend(usize),
}

pub fn owner(token: Token) -> Owner {
    match token.0 % 2 {
        0 => Owner::Client(token.0 / 2),
        _ => Owner::Backend(token.0 / 2),
    }
}

/// What a backend connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Carrying a request of client connection `k`.
    Leased(usize),
    /// Waiting for the next request to its address, since then.
    Parked(Instant),
}

struct Backend {
    sock: TcpStream,
    addr: SocketAddr,
    used: Use,
}

#[derive(Default)]
pub struct Pool {
    backends: Slab<Backend>,
    /// Parked connections per address, oldest first.
    parked: HashMap<SocketAddr, VecDeque<usize>>,
}

impl Pool {
    /// Starts a non-blocking connect to `addr` for client connection `owner`.
    pub fn connect(
        &mut self,
        addr: SocketAddr,
        owner: usize,
        registry: &Registry,
    ) -> io::Result<usize> {
        let mut sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        let entry = self.backends.vacant_entry();
        registry.register(
            &mut sock,
            backend_token(entry.key()),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let key = entry.key();
        entry.insert(Backend {
            sock,
            addr,
            used: Use::Leased(owner),
        });
        Ok(key)
    }

    /// Leases to `owner` the connection parked last for one of `addrs`, and says which of
    /// `addrs` it goes to. Dead ones met on the way are closed.
    pub fn checkout(
        &mut self,
        addrs: &[SocketAddr],
        owner: usize,
        registry: &Registry,
    ) -> Option<(usize, usize)> {
        for (i, addr) in addrs.iter().enumerate() {
            while let Some(key) = self.parked.get_mut(addr).and_then(VecDeque::pop_back) {
                let Some(backend) = self.backends.get_mut(key) else {
                    continue;
                };
                if !matches!(backend.used, Use::Parked(_)) {
                    continue;
                }
                if still_open(&backend.sock) {
                    backend.used = Use::Leased(owner);
                    return Some((key, i));
                }
                self.remove(key, registry);
            }
        }
        None
    }

    /// Parks a leased connection, left clean by a keep-alive exchange, for the next request
    /// to its address.
    pub fn park(&mut self, key: usize, now: Instant, registry: &Registry) {
        let Some(backend) = self.backends.get_mut(key) else {
            return;
        };
        let parked = self.parked.entry(backend.addr).or_default();
        if parked.len() >= MAX_PARKED_PER_ADDR {
            self.close(key, registry);
            return;
        }
        backend.used = Use::Parked(now);
        parked.push_back(key);
    }

    /// Closes a connection, leased or parked.
    pub fn close(&mut self, key: usize, registry: &Registry) {
        if let Some(Use::Parked(_)) = self.used(key) {
            let addr = self.backends[key].addr;
            if let Some(parked) = self.parked.get_mut(&addr) {
                parked.retain(|&k| k != key);
            }
        }
        self.remove(key, registry);
    }

    pub fn used(&self, key: usize) -> Option<Use> {
        self.backends.get(key).map(|b| b.used)
    }

    pub fn sock(&mut self, key: usize) -> Option<&mut TcpStream> {
        self.backends.get_mut(key).map(|b| &mut b.sock)
    }

    pub fn addr(&self, key: usize) -> Option<SocketAddr> {
        self.backends.get(key).map(|b| b.addr)
    }

    /// An event on a parked connection: the backend closed it or sent something nobody asked
    /// for; either way it cannot carry another request.
    pub fn on_parked_event(&mut self, key: usize, registry: &Registry) {
        let open = self.backends.get(key).is_some_and(|b| still_open(&b.sock));
        if !open {
            self.close(key, registry);
        }
    }

    /// Closes connections parked for longer than `idle`.
    pub fn expire(&mut self, now: Instant, idle: Duration, registry: &Registry) {
        for parked in self.parked.values_mut() {
            while let Some(&key) = parked.front() {
                match self.backends.get(key).map(|b| b.used) {
                    Some(Use::Parked(since)) if since + idle > now => break,
                    Some(Use::Parked(_)) => {
                        parked.pop_front();
                        let mut backend = self.backends.remove(key);
                        let _ = registry.deregister(&mut backend.sock);
                    }
                    // Stale: leased again or gone.
                    _ => {
                        parked.pop_front();
                    }
                }
            }
        }
    }

    /// Connections held: leased and parked.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    fn remove(&mut self, key: usize, registry: &Registry) {
        if let Some(mut backend) = self.backends.try_remove(key) {
            let _ = registry.deregister(&mut backend.sock);
        }
    }
}

/// Whether an idle connection is still open: nothing to read and no end of stream.
fn still_open(sock: &TcpStream) -> bool {
    matches!(sock.peek(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}
