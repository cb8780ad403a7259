//! Plain TCP connections of the loop's own small services, the echo backend
//! ([`crate::echo`]) and the admin endpoint ([`crate::admin`]): accepting them under their
//! tokens, and writing out what they have to say. Each service keeps its own protocol.

use std::io::{self, Write};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

/// Accepts every waiting connection of `listener` into `conns`, connection `i` registered
/// under `Token(base + 1 + i)`, made into a connection by `make`. A failed accept (EMFILE and
/// the like) leaves the rest waiting, and their clients time out.
pub fn accept_all<T>(
    listener: &TcpListener,
    conns: &mut Slab<T>,
    base: usize,
    registry: &Registry,
    make: impl Fn(TcpStream) -> T,
) {
    loop {
        let mut sock = match listener.accept() {
            Ok((sock, _)) => sock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let entry = conns.vacant_entry();
        let token = Token(base + 1 + entry.key());
        if registry
            .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            continue;
        }
        entry.insert(make(sock));
    }
}

/// Writes `output` to `sock` until it is empty or the socket would block (what is left waits
/// for the next writable event); false when the socket failed.
pub fn flush(sock: &mut TcpStream, output: &mut Vec<u8>) -> bool {
    while !output.is_empty() {
        match sock.write(output) {
            Ok(0) => return false,
            Ok(n) => {
                output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}
