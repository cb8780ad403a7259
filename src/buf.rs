//! [`ReadBuf`]: the buffer a connection reads into. Bytes are appended at the back by reads and
//! taken from the front as they are consumed, and every byte of it is zeroed once in its life,
//! not before each read: a `Vec` resized for every read and truncated after it spends more time
//! in `memset` than in moving the bytes.

use std::io;
use std::ops::Deref;

/// How much room a read asks for at least; the buffer grows by this much up to its limit.
const STEP: usize = 16 * 1024;

#[derive(Debug, Default)]
pub struct ReadBuf {
    /// All of it initialised; `start..end` holds the bytes not yet consumed.
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    /// Reads once from `read` into the room after the last byte, keeping the whole at most
    /// `limit` bytes; `Ok(0)` from `read` means end of stream. Call only while `len() < limit`.
    pub fn read_from(
        &mut self,
        limit: usize,
        read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        if self.end == self.data.len() || self.data.len() - self.end < STEP {
            self.make_room(limit);
        }
        let room = (self.end + limit.saturating_sub(self.len())).min(self.data.len());
        let n = read(&mut self.data[self.end..room])?;
        self.end += n.min(room - self.end);
        Ok(n)
    }

    /// Drops the first `n` bytes (all of them if there are fewer).
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.clear();
        }
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Moves the bytes to the front, and grows the buffer (by zeroing new room once) when that
    /// leaves less than a step free and the limit allows.
    fn make_room(&mut self, limit: usize) {
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let want = (self.end + STEP).min(limit.max(STEP));
        if self.data.len() < want {
            self.data.resize(want, 0);
        }
    }
}

impl Deref for ReadBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(buf: &mut ReadBuf, limit: usize, bytes: &[u8]) -> usize {
        buf.read_from(limit, |room| {
            let n = room.len().min(bytes.len());
            room[..n].copy_from_slice(&bytes[..n]);
            Ok(n)
        })
        .unwrap()
    }

    #[test]
    fn bytes_come_out_in_order_across_consumes_and_compaction() {
        let mut buf = ReadBuf::default();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut fed = 0;
        let mut out = Vec::new();
        while out.len() < data.len() {
            if fed < data.len() && buf.len() < 64 * 1024 {
                fed += feed(
                    &mut buf,
                    64 * 1024,
                    &data[fed..(fed + 5000).min(data.len())],
                );
            }
            let take = buf.len().min(3001);
            out.extend_from_slice(&buf[..take]);
            buf.consume(take);
        }
        assert_eq!(out, data);
        assert!(buf.is_empty());
    }

    #[test]
    fn never_holds_more_than_the_limit() {
        let mut buf = ReadBuf::default();
        let big = vec![7u8; 100_000];
        let mut total = 0;
        while buf.len() < 40_000 {
            total += feed(&mut buf, 40_000, &big);
        }
        assert_eq!(total, 40_000);
        assert_eq!(buf.len(), 40_000);
        buf.consume(10_000);
        assert_eq!(feed(&mut buf, 40_000, &big), 10_000);
        assert_eq!(buf.len(), 40_000);
    }

    #[test]
    fn end_of_stream_and_errors_add_nothing() {
        let mut buf = ReadBuf::default();
        assert_eq!(buf.read_from(1024, |_| Ok(0)).unwrap(), 0);
        assert!(buf.is_empty());
        let err = buf.read_from(1024, |_| Err(io::ErrorKind::WouldBlock.into()));
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(buf.is_empty());
    }
}
