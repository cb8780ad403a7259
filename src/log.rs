//! The access log (SPEC 7): one line per request on stderr, in logfmt or JSON, each written
//! with one system call from a buffer reused from line to line. journald takes stderr as it is.
//! What goes in a line is the connection's business ([`crate::conn`]); this module owns the
//! format, set once for the process, as a logger is.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `key=value` pairs, as logfmt has them.
    #[default]
    Logfmt,
    /// One JSON object a line.
    Json,
    /// No access log.
    Off,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "logfmt" => Ok(Self::Logfmt),
            "json" => Ok(Self::Json),
            "off" => Ok(Self::Off),
            _ => Err(format!(
                "--log-format {s:?} is not one of logfmt, json, off"
            )),
        }
    }
}

/// One request, as the access log tells it.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    /// The connection's number, as in the other lines about it.
    pub conn: u64,
    pub id: &'a str,
    pub peer: SocketAddr,
    /// The API, or `-` when none matched.
    pub api: &'a str,
    /// The certificate entry's alias, or `-` for none.
    pub caller: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Bytes of the answer's body sent to the client.
    pub bytes: u64,
    pub duration: Duration,
    /// From the request leaving for the backend to its answer's end; none for the gateway's
    /// own answers.
    pub upstream: Option<Duration>,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

thread_local! {
    /// The line being written, reused from line to line.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(256));
}

/// Sets the format for the process, once (`serve` does, from `--log-format`).
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
}

/// Writes one access-log line; nothing when the log is off or was never set up.
pub fn request(entry: &Entry<'_>) {
    let format = FORMAT.get().copied().unwrap_or(LogFormat::Off);
    if format != LogFormat::Off {
        write_line(|line| format_entry(format, entry, SystemTime::now(), line));
    }
}

/// Writes one line about a connection that is not a request (a failed handshake, say), in
/// the access log's format: `msg`, the connection's number, its peer, and a short `reason`.
pub fn event(msg: &str, conn: u64, peer: SocketAddr, reason: &str) {
    let format = FORMAT.get().copied().unwrap_or(LogFormat::Off);
    if format == LogFormat::Off {
        return;
    }
    write_line(|out| {
        let mut line = Line::start(format, SystemTime::now(), out);
        line.text("msg", msg);
        line.number("conn", conn);
        line.text_display("peer", peer);
        line.text("reason", reason);
        line.end();
    });
}

/// Writes an operational line (a reload, a drain, a store failure) in the log's format: as
/// `msg` of a logfmt line, or of a JSON object. Written whatever the access log's setting.
pub fn notice(msg: std::fmt::Arguments<'_>) {
    let format = match FORMAT.get() {
        Some(LogFormat::Json) => LogFormat::Json,
        _ => LogFormat::Logfmt,
    };
    let text = msg.to_string();
    write_line(|out| {
        let mut line = Line::start(format, SystemTime::now(), out);
        line.text("msg", &text);
        line.end();
    });
}

/// Fills the reused line buffer with `fill` and writes it with one system call, so that lines
/// never interleave with other output; a failing stderr loses the line, nothing else.
fn write_line(fill: impl FnOnce(&mut Vec<u8>)) {
    LINE.with_borrow_mut(|line| {
        line.clear();
        fill(line);
        let _ = std::io::stderr().lock().write_all(line);
    });
}

/// Appends `entry`'s line, newline included, to `out`.
pub fn format_entry(format: LogFormat, entry: &Entry<'_>, now: SystemTime, out: &mut Vec<u8>) {
    if format == LogFormat::Off {
        return;
    }
    let millis = |d: Duration| d.as_secs_f64() * 1_000.0;
    let mut line = Line::start(format, now, out);
    line.text("msg", "request");
    line.number("conn", entry.conn);
    line.text("id", entry.id);
    line.text_display("peer", entry.peer);
    line.text("api", entry.api);
    line.text("caller", entry.caller);
    line.text("method", entry.method);
    line.text("path", entry.path);
    line.number("status", entry.status);
    line.number("bytes", entry.bytes);
    line.number("duration_ms", format_args!("{:.3}", millis(entry.duration)));
    match entry.upstream {
        Some(d) => line.number("upstream_ms", format_args!("{:.3}", millis(d))),
        None => line.none("upstream_ms"),
    }
    line.end();
}

/// One line being written field by field: `key=value` pairs for logfmt, or a JSON object.
struct Line<'a> {
    json: bool,
    out: &'a mut Vec<u8>,
}

impl<'a> Line<'a> {
    /// Begins the line with its `time` (RFC 3339, UTC).
    fn start(format: LogFormat, now: SystemTime, out: &'a mut Vec<u8>) -> Self {
        let json = format == LogFormat::Json;
        out.extend_from_slice(if json { b"{\"time\":\"" } else { b"time=" });
        let _ = OffsetDateTime::from(now).format_into(out, &Rfc3339);
        if json {
            out.push(b'"');
        }
        Self { json, out }
    }

    fn key(&mut self, key: &str) {
        if self.json {
            let _ = write!(self.out, ",\"{key}\":");
        } else {
            let _ = write!(self.out, " {key}=");
        }
    }

    /// A string value: quoted in JSON, and in logfmt where it needs to be.
    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        if self.json {
            json_string(value, self.out);
        } else {
            logfmt_value(value, self.out);
        }
    }

    /// A value whose text needs no escaping (an address), as a string.
    fn text_display(&mut self, key: &str, value: impl std::fmt::Display) {
        self.key(key);
        if self.json {
            let _ = write!(self.out, "\"{value}\"");
        } else {
            let _ = write!(self.out, "{value}");
        }
    }

    /// A number, bare in both formats.
    fn number(&mut self, key: &str, value: impl std::fmt::Display) {
        self.key(key);
        let _ = write!(self.out, "{value}");
    }

    /// No value: `null` in JSON, `-` in logfmt.
    fn none(&mut self, key: &str) {
        self.key(key);
        self.out
            .extend_from_slice(if self.json { b"null" } else { b"-" });
    }

    fn end(self) {
        self.out
            .extend_from_slice(if self.json { b"}\n" } else { b"\n" });
    }
}

/// A logfmt value: bare when it holds no space, quote, backslash or `=`, else quoted.
fn logfmt_value(value: &str, out: &mut Vec<u8>) {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'='));
    if plain {
        out.extend_from_slice(value.as_bytes());
    } else {
        json_string(value, out);
    }
}

/// A JSON string literal (logfmt's quoted values use the same escapes).
fn json_string(value: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in value.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let mut utf8 = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            conn: 7,
            id: "abc1",
            peer: "127.0.0.1:5000".parse().unwrap(),
            api: "pizzashack",
            caller: "a-pizza",
            method: "GET",
            path: "/pizzashack/1.0.0/menu?q=\"x\"",
            status: 200,
            bytes: 42,
            duration: Duration::from_micros(1_500),
            upstream: Some(Duration::from_micros(1_000)),
        }
    }

    #[test]
    fn logfmt_lines() {
        let mut out = Vec::new();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        format_entry(LogFormat::Logfmt, &entry(), at, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "time=2025-06-15T15:06:40Z msg=request conn=7 id=abc1 peer=127.0.0.1:5000 api=pizzashack \
             caller=a-pizza method=GET path=\"/pizzashack/1.0.0/menu?q=\\\"x\\\"\" status=200 \
             bytes=42 duration_ms=1.500 upstream_ms=1.000\n"
        );
    }

    #[test]
    fn json_lines_parse() {
        let mut out = Vec::new();
        let mut e = entry();
        e.upstream = None;
        format_entry(LogFormat::Json, &e, SystemTime::now(), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/pizzashack/1.0.0/menu?q=\"x\"");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream_ms"], serde_json::Value::Null);
        assert_eq!(v["duration_ms"], 1.5);
        assert!(out.ends_with(b"}\n"));
    }
}
