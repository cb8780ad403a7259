//! HTTP/1.1 on the wire: request and response heads (parsed with httparse into offsets of the
//! connection's own buffer), the heads certgate writes to the backend and to the client, body
//! framing, and the gateway's own problem+json answers.
//!
//! Nothing here does I/O; [`crate::conn`] moves the bytes.

use std::fmt::Write as _;
use std::ops::Range;

use thiserror::Error;

use crate::throttle::RateHeaders;

/// The most header lines a request or response head may have.
pub const MAX_HEADERS: usize = 100;

/// Why a head could not be accepted; each ends as a 400 (requests) or 502 (responses).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("malformed head: {0}")]
    Syntax(httparse::Error),
    #[error("conflicting Content-Length and Transfer-Encoding")]
    ConflictingFraming,
    #[error("invalid Content-Length")]
    BadContentLength,
    #[error("unsupported Transfer-Encoding (only chunked is accepted)")]
    BadTransferEncoding,
    #[error("request target must be an absolute path")]
    BadTarget,
    #[error("request path holds a dot segment")]
    DotSegment,
    #[error("an HTTP/1.1 request needs exactly one Host header")]
    Host,
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Responses only: the body ends when the backend closes.
    UntilClose,
}

/// A header line as offsets into the buffer that holds the head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: Range<usize>,
    pub value: Range<usize>,
}

/// A parsed request head. Ranges index the buffer it was parsed from; `headers` is reused from
/// request to request.
#[derive(Debug, Default)]
pub struct RequestHead {
    pub len: usize,
    pub method: Range<usize>,
    pub path: Range<usize>,
    /// The query including its `?`, or empty.
    pub query: Range<usize>,
    pub minor_version: u8,
    pub headers: Vec<Header>,
    pub framing: Option<Framing>,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub host: Option<Range<usize>>,
}

/// Parses a request head at the start of `buf`. `Ok(false)` means more bytes are needed.
pub fn parse_request(buf: &[u8], head: &mut RequestHead) -> Result<bool, HeadError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let len = match req.parse(buf).map_err(HeadError::Syntax)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(false),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Syntax(httparse::Error::Token));
    };
    if !target.starts_with('/') {
        return Err(HeadError::BadTarget);
    }
    let path_end = target.find(['?', '#']).unwrap_or(target.len());
    let fragment = target.find('#').unwrap_or(target.len());
    if has_dot_segment(&target[..path_end]) {
        return Err(HeadError::DotSegment);
    }
    let target_start = range(buf, target.as_bytes()).start;
    head.len = len;
    head.method = range(buf, method.as_bytes());
    head.path = target_start..target_start + path_end;
    head.query = target_start + path_end..target_start + fragment;
    head.minor_version = minor;
    head.headers.clear();
    head.host = None;
    head.expect_continue = false;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = minor == 0;
    let mut hosts = 0;
    for h in req.headers.iter() {
        let value = trim(h.value);
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(value)?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::BadContentLength);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            chunked = last_coding_is_chunked(value)?;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && minor == 0 {
                    close = false;
                }
            }
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            head.host = Some(range(buf, value));
        } else if name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case(b"100-continue")
        {
            head.expect_continue = minor == 1;
        }
        head.headers.push(Header {
            name: range(buf, name.as_bytes()),
            value: range(buf, value),
        });
    }
    head.framing = Some(match (length, transfer_encoding) {
        (Some(_), true) => return Err(HeadError::ConflictingFraming),
        (_, true) if !chunked || minor == 0 => return Err(HeadError::BadTransferEncoding),
        (_, true) => Framing::Chunked,
        (Some(0), false) | (None, false) => Framing::None,
        (Some(n), false) => Framing::Length(n),
    });
    // RFC 9112 3.2: exactly one Host in HTTP/1.1, at most one in 1.0.
    if hosts > 1 || (hosts == 0 && minor == 1) {
        return Err(HeadError::Host);
    }
    head.keep_alive = !close;
    Ok(true)
}

/// A parsed response head; ranges index the backend buffer it came from.
#[derive(Debug, Default)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub reason: Range<usize>,
    pub headers: Vec<Header>,
    pub framing: Option<Framing>,
    pub keep_alive: bool,
}

/// Parses a backend's response head. `request_was_head` matters for the body framing.
pub fn parse_response(
    buf: &[u8],
    request_was_head: bool,
    head: &mut ResponseHead,
) -> Result<bool, HeadError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut raw);
    let len = match res.parse(buf).map_err(HeadError::Syntax)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(false),
    };
    let (Some(status), Some(minor)) = (res.code, res.version) else {
        return Err(HeadError::Syntax(httparse::Error::Status));
    };
    head.len = len;
    head.status = status;
    head.reason = res.reason.map_or(0..0, |r| range(buf, r.as_bytes()));
    head.headers.clear();
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut close = minor == 0;
    for h in res.headers.iter() {
        let value = trim(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(value)?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::BadContentLength);
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            chunked = last_coding_is_chunked(value).unwrap_or(false);
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
        head.headers.push(Header {
            name: range(buf, h.name.as_bytes()),
            value: range(buf, value),
        });
    }
    head.framing = Some(
        if request_was_head || (100..200).contains(&status) || status == 204 || status == 304 {
            Framing::None
        } else if chunked {
            // RFC 9112 6.3: chunked wins over Content-Length, and the connection is suspect.
            close = close || length.is_some();
            Framing::Chunked
        } else if transfer_encoding {
            // A coding other than chunked last: the body ends when the backend closes.
            close = true;
            Framing::UntilClose
        } else {
            match length {
                Some(0) => Framing::None,
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        },
    );
    head.keep_alive = !close;
    Ok(true)
}

/// Methods whose request may be sent twice with the effect of once (RFC 9110 9.2.2).
pub fn is_idempotent(method: &[u8]) -> bool {
    const IDEMPOTENT: [&[u8]; 6] = [b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"];
    IDEMPOTENT.contains(&method)
}

/// Headers that describe one connection and never travel past it (RFC 9110 7.6.1), plus the
/// identity headers only the gateway may set (SPEC 3).
fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 7] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

fn is_identity_header(name: &[u8]) -> bool {
    const IDENTITY: [&[u8]; 6] = [
        b"host",
        b"forwarded",
        b"x-real-ip",
        b"x-request-id",
        b"client-cert",
        b"client-cert-chain",
    ];
    IDENTITY.iter().any(|h| name.eq_ignore_ascii_case(h))
        || (name.len() > 12 && name[..12].eq_ignore_ascii_case(b"x-forwarded-"))
}

/// True when `name` is listed in any `Connection` header of the head.
/// Never true for the headers that frame the message or name its host: a peer must not make the
/// gateway forward a body without the header that delimits it.
fn named_in_connection(buf: &[u8], headers: &[Header], name: &[u8]) -> bool {
    const KEPT: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"host"];
    if KEPT.iter().any(|k| name.eq_ignore_ascii_case(k)) {
        return false;
    }
    headers
        .iter()
        .filter(|h| buf[h.name.clone()].eq_ignore_ascii_case(b"connection"))
        .any(|h| tokens(&buf[h.value.clone()]).any(|t| t.eq_ignore_ascii_case(name)))
}

/// What the gateway adds to a forwarded request.
pub struct Forwarding<'a> {
    /// The backend path prefix and the rest of the client's path, joined.
    pub backend_path: &'a str,
    pub rest: &'a [u8],
    pub backend_authority: &'a str,
    pub client_ip: std::net::IpAddr,
    pub request_id: &'a str,
    /// `:base64:` of the client certificate, and of its chain, when one passed.
    pub client_cert: Option<&'a str>,
    pub client_cert_chain: Option<&'a str>,
}

/// Writes the head the backend gets into `out` (cleared first).
pub fn write_upstream_head(
    buf: &[u8],
    head: &RequestHead,
    fwd: &Forwarding<'_>,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(&buf[head.method.clone()]);
    out.push(b' ');
    out.extend_from_slice(fwd.backend_path.as_bytes());
    if fwd.rest.is_empty() && fwd.backend_path.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(fwd.rest);
    out.extend_from_slice(&buf[head.query.clone()]);
    // An HTTP/1.0 client's request goes as 1.0, so that the answer is not chunked.
    out.extend_from_slice(if head.minor_version == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for h in &head.headers {
        let name = &buf[h.name.clone()];
        if is_hop_by_hop(name)
            || is_identity_header(name)
            || name.eq_ignore_ascii_case(b"expect")
            || named_in_connection(buf, &head.headers, name)
        {
            continue;
        }
        push_header(out, name, &buf[h.value.clone()]);
    }
    push_header(out, b"Host", fwd.backend_authority.as_bytes());
    let _ = write!(Latin1(out), "X-Forwarded-For: {}\r\n", fwd.client_ip);
    out.extend_from_slice(b"X-Forwarded-Proto: https\r\n");
    if let Some(host) = &head.host {
        push_header(out, b"X-Forwarded-Host", &buf[host.clone()]);
    }
    push_header(out, b"X-Request-Id", fwd.request_id.as_bytes());
    if let Some(cert) = fwd.client_cert {
        push_header(out, b"Client-Cert", cert.as_bytes());
    }
    if let Some(chain) = fwd.client_cert_chain {
        push_header(out, b"Client-Cert-Chain", chain.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the head the client gets for a backend response into `out` (appended). For an
/// HTTP/1.0 client (`http10`) a chunked body is decoded by the caller and ends with the
/// connection, so its framing headers go; a 1.0 connection that stays open says so.
pub fn write_client_head(
    buf: &[u8],
    head: &ResponseHead,
    close: bool,
    http10: bool,
    rate: Option<&RateHeaders>,
    out: &mut Vec<u8>,
) {
    let _ = write!(Latin1(out), "HTTP/1.1 {} ", head.status);
    out.extend_from_slice(&buf[head.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    let chunked = head.framing == Some(Framing::Chunked);
    let drop_length = chunked || head.framing == Some(Framing::UntilClose);
    for h in &head.headers {
        let name = &buf[h.name.clone()];
        if is_hop_by_hop(name)
            || named_in_connection(buf, &head.headers, name)
            || (drop_length && name.eq_ignore_ascii_case(b"content-length"))
            || (http10 && chunked && name.eq_ignore_ascii_case(b"transfer-encoding"))
            || (rate.is_some() && is_rate_limit_header(name))
        {
            continue;
        }
        push_header(out, name, &buf[h.value.clone()]);
    }
    if let Some(rate) = rate {
        write_rate_headers(rate, out);
    }
    out.extend_from_slice(connection_header(close, http10));
    out.extend_from_slice(b"\r\n");
}

/// Appends a whole answer of the loop's own plain services (the echo backend, the admin
/// endpoint): status, content type and length, `Connection`, and the body unless the request
/// was HEAD.
pub fn write_simple_answer(
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    head_only: bool,
    out: &mut Vec<u8>,
) {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let _ = write!(
        Latin1(out),
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: {connection}\r\n\r\n",
        reason_phrase(status),
        body.len()
    );
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// `RateLimit-Limit`, `-Remaining` and `-Reset` lines for the tightest bucket.
pub fn write_rate_headers(rate: &RateHeaders, out: &mut Vec<u8>) {
    let _ = write!(
        Latin1(out),
        "RateLimit-Limit: {}\r\nRateLimit-Remaining: {}\r\nRateLimit-Reset: {}\r\n",
        rate.limit,
        rate.remaining,
        rate.reset
    );
}

/// The backend's own rate-limit headers, which the gateway's replace where it throttles.
fn is_rate_limit_header(name: &[u8]) -> bool {
    name.len() > 10 && name[..10].eq_ignore_ascii_case(b"ratelimit-")
        || name.eq_ignore_ascii_case(b"retry-after")
}

/// The `Connection` line of an answer: `close` when the connection ends after it; `keep-alive`
/// for an HTTP/1.0 client whose connection stays, which it otherwise would not know (RFC 9112
/// 9.3); nothing for an HTTP/1.1 client that stays.
fn connection_header(close: bool, http10: bool) -> &'static [u8] {
    match (close, http10) {
        (true, _) => b"Connection: close\r\n",
        (false, true) => b"Connection: keep-alive\r\n",
        (false, false) => b"",
    }
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `fmt::Write` into a byte buffer, for numbers and addresses.
struct Latin1<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Latin1<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A refusal by the gateway itself (SPEC 4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Extra header lines, each ending in CRLF (`Allow`, `WWW-Authenticate`, ...).
    pub headers: String,
}

impl Problem {
    pub fn new(status: u16, code: &'static str, title: &'static str, detail: String) -> Self {
        Self {
            status,
            code,
            title,
            detail,
            headers: String::new(),
        }
    }

    pub fn bad_request(detail: String) -> Self {
        Self::new(400, "bad-request", "Bad request", detail)
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            404,
            "not-found",
            "Not found",
            format!("no API or resource matches {path}"),
        )
    }

    pub fn backend_unavailable(detail: String) -> Self {
        Self::new(502, "backend-unavailable", "Backend unavailable", detail)
    }

    /// Appends the whole answer to `out`; to a HEAD request (`head`), all but the body.
    /// Returns the length of the body it wrote.
    pub fn write(
        &self,
        request_id: &str,
        close: bool,
        http10: bool,
        head: bool,
        out: &mut Vec<u8>,
    ) -> usize {
        let body = serde_json::json!({
            "type": format!("urn:certgate:problem:{}", self.code),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            "instance": format!("urn:certgate:request:{request_id}"),
        })
        .to_string();
        let _ = write!(
            Latin1(out),
            "HTTP/1.1 {} {}\r\nContent-Type: application/problem+json\r\nContent-Length: {}\r\nX-Request-Id: {}\r\n{}",
            self.status,
            reason_phrase(self.status),
            body.len(),
            request_id,
            self.headers,
        );
        out.extend_from_slice(connection_header(close, http10));
        out.extend_from_slice(b"\r\n");
        if head {
            return 0;
        }
        out.extend_from_slice(body.as_bytes());
        body.len()
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Tracks where a body ends while its bytes stream through unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    Done,
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

/// Where a chunked decoder stands (RFC 9112 7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Reading hex digits of a chunk size; `digits` counts them.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: an extension, up to CR.
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed chunked body")]
pub struct ChunkError;

impl Body {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::None | Framing::Length(0) => Self::Done,
            Framing::Length(n) => Self::Length(n),
            Framing::Chunked => Self::Chunked(Chunk::Size { size: 0, digits: 0 }),
            Framing::UntilClose => Self::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        *self == Self::Done
    }

    /// Consumes body bytes from the front of `input`; returns how many belong to the body.
    /// Bytes after the end (a pipelined request) are left alone.
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        self.advance_with(input, |_| {})
    }

    /// As [`Body::advance`], and also says how many of the consumed bytes are content, which
    /// for a chunked body leaves out the framing (the measure of a body size limit).
    pub fn advance_counting(&mut self, input: &[u8]) -> Result<(usize, u64), ChunkError> {
        let mut content = 0;
        let consumed = self.advance_with(input, |bytes| content += bytes.len() as u64)?;
        Ok((consumed, content))
    }

    /// As [`Body::advance`], handing each run of content (a chunked body without its framing)
    /// to `on_content`.
    pub fn advance_with(
        &mut self,
        input: &[u8],
        mut on_content: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkError> {
        match self {
            Self::Done => Ok(0),
            Self::UntilClose => {
                on_content(input);
                Ok(input.len())
            }
            Self::Length(left) => {
                let n = (*left).min(input.len() as u64);
                *left -= n;
                if *left == 0 {
                    *self = Self::Done;
                }
                on_content(&input[..n as usize]);
                Ok(n as usize)
            }
            Self::Chunked(state) => {
                let mut i = 0;
                while i < input.len() {
                    if let Chunk::Data(left) = state {
                        let n = (*left).min((input.len() - i) as u64);
                        *left -= n;
                        on_content(&input[i..i + n as usize]);
                        i += n as usize;
                        if *left == 0 {
                            *state = Chunk::DataCr;
                        }
                        continue;
                    }
                    let b = input[i];
                    i += 1;
                    match chunk_step(*state, b)? {
                        Some(next) => *state = next,
                        None => {
                            *self = Self::Done;
                            return Ok(i);
                        }
                    }
                }
                Ok(i)
            }
        }
    }
}

/// One byte of chunked framing outside chunk data; `None` once the body has ended.
fn chunk_step(state: Chunk, b: u8) -> Result<Option<Chunk>, ChunkError> {
    Ok(Some(match state {
        Chunk::Size { size, digits } => match (b as char).to_digit(16) {
            Some(d) if digits < 16 => Chunk::Size {
                size: size << 4 | u64::from(d),
                digits: digits + 1,
            },
            Some(_) => return Err(ChunkError),
            None if digits == 0 => return Err(ChunkError),
            None if b == b'\r' => Chunk::SizeLf { size },
            None if b == b';' || b == b' ' || b == b'\t' => Chunk::Extension { size },
            None => return Err(ChunkError),
        },
        Chunk::Extension { size } => match b {
            b'\r' => Chunk::SizeLf { size },
            b'\n' => return Err(ChunkError),
            _ => Chunk::Extension { size },
        },
        Chunk::SizeLf { size } if b == b'\n' => {
            if size == 0 {
                Chunk::TrailerStart
            } else {
                Chunk::Data(size)
            }
        }
        Chunk::DataCr if b == b'\r' => Chunk::DataLf,
        Chunk::DataLf if b == b'\n' => Chunk::Size { size: 0, digits: 0 },
        Chunk::TrailerStart if b == b'\r' => Chunk::EndLf,
        Chunk::TrailerStart | Chunk::TrailerLine if b != b'\r' && b != b'\n' => Chunk::TrailerLine,
        Chunk::TrailerLine if b == b'\r' => Chunk::TrailerLf,
        Chunk::TrailerLf if b == b'\n' => Chunk::TrailerStart,
        Chunk::EndLf if b == b'\n' => return Ok(None),
        _ => return Err(ChunkError),
    }))
}

/// Where `part`, a slice httparse took from `buf`, lies in it. httparse hands out static empty
/// slices for some absent parts (a missing reason phrase), which lie elsewhere: those are empty.
fn range(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= buf.len() => start..end,
        _ => 0..0,
    }
}

fn trim(value: &[u8]) -> &[u8] {
    value.trim_ascii()
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn parse_length(value: &[u8]) -> Result<u64, HeadError> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::BadContentLength);
    }
    value
        .iter()
        .try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(HeadError::BadContentLength)
}

fn last_coding_is_chunked(value: &[u8]) -> Result<bool, HeadError> {
    match tokens(value).last() {
        Some(t) if t.eq_ignore_ascii_case(b"chunked") => Ok(true),
        _ => Err(HeadError::BadTransferEncoding),
    }
}

/// `.` or `..` segments, also percent-encoded, would let a client reach backend paths outside the
/// API's prefix; nginx normalises them, certgate refuses them.
fn has_dot_segment(path: &str) -> bool {
    const DOT_SEGMENTS: [&str; 6] = [".", "..", "%2e", "%2e%2e", ".%2e", "%2e."];
    path.split('/').any(|segment| {
        DOT_SEGMENTS
            .iter()
            .any(|dots| segment.eq_ignore_ascii_case(dots))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_also_percent_encoded() {
        for path in [
            "/a/./b",
            "/a/..",
            "/%2E%2e/x",
            "/a/.%2E",
            "/%2e./b",
            "/a/%2e",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in ["/a/b", "/a/.b", "/a/...", "/a/%2ex", "/.well-known/x"] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    fn forwarding(rest: &[u8]) -> Forwarding<'_> {
        Forwarding {
            backend_path: "",
            rest,
            backend_authority: "b:1",
            client_ip: "127.0.0.1".parse().unwrap(),
            request_id: "id",
            client_cert: None,
            client_cert_chain: None,
        }
    }

    fn parse(raw: &str) -> Result<RequestHead, HeadError> {
        let mut head = RequestHead::default();
        assert!(parse_request(raw.as_bytes(), &mut head)?);
        Ok(head)
    }

    #[test]
    fn request_heads() {
        let raw = "GET /a/b?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello";
        let head = parse(raw).unwrap();
        assert_eq!(&raw[head.path.clone()], "/a/b");
        assert_eq!(&raw[head.query.clone()], "?x=1");
        assert_eq!(head.framing, Some(Framing::Length(5)));
        assert!(head.keep_alive);
        assert_eq!(head.len, raw.len() - 5);
        let head = parse("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap();
        assert_eq!(head.framing, Some(Framing::Chunked));
        let head = parse("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!head.keep_alive);
        let head = parse("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").unwrap();
        assert!(!head.keep_alive);
    }

    #[test]
    fn refuses_ambiguous_framing() {
        for raw in [
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "GET /a/../b HTTP/1.1\r\n\r\n",
            "GET /a/%2E%2e/b HTTP/1.1\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse(raw).is_err(), "{raw}");
        }
        let mut head = RequestHead::default();
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost", &mut head),
            Ok(false)
        );
    }

    #[test]
    fn upstream_head_rewrites_headers() {
        let raw = "GET /api/menu?x=1 HTTP/1.1\r\nHost: gw.example\r\nConnection: keep-alive, Foo\r\nFoo: bar\r\nKeep-Alive: 5\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=x\r\nX-Request-Id: spoof\r\nClient-Cert: :AAAA:\r\nAccept: */*\r\n\r\n";
        let head = parse(raw).unwrap();
        let mut out = Vec::new();
        let fwd = Forwarding {
            backend_path: "/v2",
            rest: b"/menu",
            backend_authority: "127.0.0.1:9000",
            client_ip: "10.0.0.1".parse().unwrap(),
            request_id: "abc",
            client_cert: None,
            client_cert_chain: None,
        };
        write_upstream_head(raw.as_bytes(), &head, &fwd, &mut out);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "GET /v2/menu?x=1 HTTP/1.1\r\nAccept: */*\r\nHost: 127.0.0.1:9000\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: gw.example\r\nX-Request-Id: abc\r\n\r\n"
        );
    }

    #[test]
    fn response_framing() {
        let mut head = ResponseHead::default();
        let cases: [(&str, bool, Framing); 6] = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                false,
                Framing::Length(3),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                true,
                Framing::None,
            ),
            ("HTTP/1.1 204 No Content\r\n\r\n", false, Framing::None),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                Framing::None,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Framing::Chunked,
            ),
            ("HTTP/1.0 200 OK\r\n\r\n", false, Framing::UntilClose),
        ];
        for (raw, was_head, framing) in cases {
            assert!(parse_response(raw.as_bytes(), was_head, &mut head).unwrap());
            assert_eq!(head.framing, Some(framing), "{raw}");
        }
        assert!(!head.keep_alive);
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\nGET /next";
        let end = body.len() - b"GET /next".len();
        // Byte by byte and all at once must agree.
        let mut whole = Body::new(Framing::Chunked);
        assert_eq!(whole.advance(body), Ok(end));
        assert!(whole.is_done());
        let mut split = Body::new(Framing::Chunked);
        let (mut consumed, mut content) = (0, 0);
        for i in 0..body.len() {
            let (n, c) = split.advance_counting(&body[i..i + 1]).unwrap();
            consumed += n;
            content += c;
        }
        assert_eq!(consumed, end);
        // Only "hello" and "abc" count against a body limit, not the framing.
        assert_eq!(content, 8);
        assert_eq!(
            Body::new(Framing::Chunked).advance_counting(body),
            Ok((end, 8))
        );
        assert!(split.is_done());
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello",
            b"2\r\nabX",
            b"\r\n",
            b"11111111111111111\r\n",
        ] {
            assert!(Body::new(Framing::Chunked).advance(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn length_bodies() {
        let mut body = Body::new(Framing::Length(4));
        assert_eq!(body.advance(b"ab"), Ok(2));
        assert_eq!(body.advance(b"cdef"), Ok(2));
        assert!(body.is_done());
    }

    #[test]
    fn a_status_line_without_reason_phrase() {
        let raw = b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok";
        let mut head = ResponseHead::default();
        assert!(parse_response(raw, false, &mut head).unwrap());
        let mut out = Vec::new();
        write_client_head(raw, &head, false, false, None, &mut out);
        assert_eq!(out, b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n");
        let raw = "HTTP/1.1 200 \u{c7}a va\r\nX-Empty:\r\n\r\n".as_bytes();
        assert!(parse_response(raw, false, &mut head).unwrap());
        out.clear();
        write_client_head(raw, &head, false, false, None, &mut out);
        assert!(out.starts_with(b"HTTP/1.1 200 "), "{out:?}");
        assert!(out.ends_with(b"\r\nX-Empty: \r\n\r\n"), "{out:?}");
    }

    #[test]
    fn connection_cannot_strip_framing_or_host() {
        let raw = "POST /p HTTP/1.1\r\nHost: h\r\nConnection: Content-Length, Host, Transfer-Encoding\r\nContent-Length: 4\r\n\r\nbody";
        let head = parse(raw).unwrap();
        let mut out = Vec::new();
        let fwd = forwarding(b"/p");
        write_upstream_head(raw.as_bytes(), &head, &fwd, &mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("\r\nContent-Length: 4\r\n"), "{out}");
        let raw = b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut head = ResponseHead::default();
        assert!(parse_response(raw, false, &mut head).unwrap());
        let mut out = Vec::new();
        write_client_head(raw, &head, false, false, None, &mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Transfer-Encoding: chunked"));
    }

    #[test]
    fn ambiguous_responses_are_framed_safely() {
        let mut head = ResponseHead::default();
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n";
        assert!(parse_response(raw, false, &mut head).unwrap());
        assert_eq!(head.framing, Some(Framing::Chunked));
        assert!(!head.keep_alive);
        let mut out = Vec::new();
        write_client_head(raw, &head, true, false, None, &mut out);
        assert!(!String::from_utf8(out).unwrap().contains("Content-Length"));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n";
        assert!(parse_response(raw, false, &mut head).unwrap());
        assert_eq!(head.framing, Some(Framing::UntilClose));
        assert!(!head.keep_alive);
    }

    #[test]
    fn host_rules_and_http10() {
        assert_eq!(
            parse("GET / HTTP/1.1\r\n\r\n").unwrap_err(),
            HeadError::Host
        );
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").unwrap_err(),
            HeadError::Host
        );
        let raw = "GET /x HTTP/1.0\r\n\r\n";
        let head = parse(raw).unwrap();
        let mut out = Vec::new();
        let fwd = forwarding(b"/x");
        write_upstream_head(raw.as_bytes(), &head, &fwd, &mut out);
        assert!(out.starts_with(b"GET /x HTTP/1.0\r\n"));
    }
}
