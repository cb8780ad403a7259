//! systemd glue, by its documented protocols rather than libsystemd: the notify datagrams to
//! `$NOTIFY_SOCKET` (`READY=1`, `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`, `STATUS=...`), the
//! watchdog interval from `$WATCHDOG_USEC`, and listening sockets handed over by socket
//! activation (`$LISTEN_FDS`, `$LISTEN_PID`). Outside systemd every function here does
//! nothing. What the loop does with them is [`crate::server`]'s business.

use std::env;
use std::io;
use std::net::TcpListener;
use std::os::fd::FromRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The first file descriptor socket activation passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// Where notifications go: the socket systemd named, if any.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
    pub fn from_env() -> Self {
        let target = env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_str()?.to_owned();
            let addr = match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        Self { target }
    }

    /// Sends one notification; a failure is reported once per call and otherwise ignored
    /// (a gateway serves on whether or not systemd hears it).
    pub fn notify(&self, state: &str) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
            crate::log::notice(format_args!("systemd: cannot notify {state:?}: {e}"));
        }
    }

    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }
}

/// How often to send `WATCHDOG=1`: half the interval systemd asked for, when it asked this
/// process (`$WATCHDOG_PID`, when set, names it).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// The listening sockets socket activation handed to this process, in order; none when it
/// was not started that way. The variables are removed, so that no child inherits them.
pub fn listen_fds() -> io::Result<Vec<TcpListener>> {
    let pid = env::var("LISTEN_PID").ok();
    let fds = env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let count: i32 = fds
        .parse()
        .map_err(|_| io::Error::other(format!("LISTEN_FDS={fds:?} is not a number")))?;
    // Called before the loop starts, while no other thread reads the environment.
    env::remove_var("LISTEN_PID");
    env::remove_var("LISTEN_FDS");
    env::remove_var("LISTEN_FDNAMES");
    (LISTEN_FDS_START..LISTEN_FDS_START + count.max(0))
        .map(|fd| {
            // SAFETY: by the socket activation protocol, descriptors 3 to 3 + LISTEN_FDS - 1
            // are open sockets passed to this process, which owns them from now on; nothing
            // else in the process uses them.
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            // A descriptor that is not a TCP socket fails here rather than later.
            listener.local_addr()?;
            Ok(listener)
        })
        .collect()
}
