//! Raw HTTP/2 for the abuse tests (tests/h2_abuse.rs): frames written by hand (9-byte header +
//! payload), HPACK by hand (static-table indexes and plain, non-Huffman literals only), and a
//! frame reader that decodes what a test needs from the server's frames: GOAWAY (last stream
//! id, code, debug data), RST_STREAM (code), and a response's `:status` when it is a static
//! index or a literal (plain or Huffman; a Huffman `:status` is digits only, whose codes are
//! listed below).
//!
//! Not a client: no flow control, no dynamic table on the decoding side. Declared only from
//! tests/h2_abuse.rs with `#[path]`, so tests/common/mod.rs does not carry it.
#![allow(dead_code)]

use tokio::io::{AsyncRead, AsyncReadExt};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 §6).
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// Error codes (RFC 9113 §7).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn name(code: u32) -> &'static str {
        match code {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            _ => "unknown",
        }
    }
}

// ---------- writing ----------

/// Append one frame: 24-bit length, type, flags, 31-bit stream id, payload.
pub fn push_frame(buf: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    assert!(len < 1 << 24, "frame payload too long: {len}");
    buf.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    buf.push(kind);
    buf.push(flags);
    buf.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    buf.extend_from_slice(payload);
}

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(9 + payload.len());
    push_frame(&mut buf, kind, flags, stream, payload);
    buf
}

/// SETTINGS with `(identifier, value)` pairs; empty is valid.
pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, v) in pairs {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&v.to_be_bytes());
    }
    frame(kind::SETTINGS, 0, 0, &payload)
}

pub fn settings_ack() -> Vec<u8> {
    frame(kind::SETTINGS, flag::ACK, 0, &[])
}

pub fn ping(opaque: [u8; 8]) -> Vec<u8> {
    frame(kind::PING, 0, 0, &opaque)
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(kind::RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(kind::WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

pub fn data(stream: u32, payload: &[u8], end_stream: bool) -> Vec<u8> {
    let flags = if end_stream { flag::END_STREAM } else { 0 };
    frame(kind::DATA, flags, stream, payload)
}

pub fn headers(stream: u32, block: &[u8], end_stream: bool, end_headers: bool) -> Vec<u8> {
    let mut flags = 0;
    if end_stream {
        flags |= flag::END_STREAM;
    }
    if end_headers {
        flags |= flag::END_HEADERS;
    }
    frame(kind::HEADERS, flags, stream, block)
}

pub fn continuation(stream: u32, block: &[u8], end_headers: bool) -> Vec<u8> {
    let flags = if end_headers { flag::END_HEADERS } else { 0 };
    frame(kind::CONTINUATION, flags, stream, block)
}

/// HPACK encoding by hand (RFC 7541): integers, plain strings, and the three representations
/// the tests need. No Huffman on the way out.
pub mod hpack {
    /// Static table indexes used below (RFC 7541 Appendix A).
    pub const AUTHORITY: u32 = 1;
    pub const METHOD_GET: u32 = 2;
    pub const METHOD_POST: u32 = 3;
    pub const PATH: u32 = 4;
    pub const PATH_ROOT: u32 = 4;
    pub const SCHEME_HTTPS: u32 = 7;
    /// The first dynamic-table index.
    pub const FIRST_DYNAMIC: u32 = 62;

    /// An integer with an N-bit prefix; `high` holds the representation's leading bits.
    pub fn int(buf: &mut Vec<u8>, prefix_bits: u8, high: u8, value: u32) {
        let max = (1u32 << prefix_bits) - 1;
        if value < max {
            buf.push(high | value as u8);
            return;
        }
        buf.push(high | max as u8);
        let mut rest = value - max;
        while rest >= 0x80 {
            buf.push((rest & 0x7f) as u8 | 0x80);
            rest >>= 7;
        }
        buf.push(rest as u8);
    }

    /// A string literal, H = 0 (not Huffman).
    pub fn string(buf: &mut Vec<u8>, s: &[u8]) {
        int(buf, 7, 0x00, s.len() as u32);
        buf.extend_from_slice(s);
    }

    /// Indexed header field (§6.1): one byte for indexes below 127.
    pub fn indexed(buf: &mut Vec<u8>, index: u32) {
        int(buf, 7, 0x80, index);
    }

    /// Literal without indexing, name from the static table (§6.2.2).
    pub fn literal_name_index(buf: &mut Vec<u8>, name_index: u32, value: &[u8]) {
        int(buf, 4, 0x00, name_index);
        string(buf, value);
    }

    /// Literal without indexing, new name (§6.2.2).
    pub fn literal_new_name(buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        buf.push(0x00);
        string(buf, name);
        string(buf, value);
    }

    /// Literal with incremental indexing, new name (§6.2.1): the decoder inserts it into its
    /// dynamic table, as entry 62 (the newest).
    pub fn literal_new_name_indexed(buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        buf.push(0x40);
        string(buf, name);
        string(buf, value);
    }

    /// A request's header block: `:method`, `:scheme https`, `:path`, `:authority localhost`.
    pub fn request(method: &str, path: &str) -> Vec<u8> {
        let mut b = Vec::new();
        match method {
            "GET" => indexed(&mut b, METHOD_GET),
            "POST" => indexed(&mut b, METHOD_POST),
            other => panic!("method {other} not encoded by this helper"),
        }
        indexed(&mut b, SCHEME_HTTPS);
        if path == "/" {
            indexed(&mut b, PATH_ROOT);
        } else {
            literal_name_index(&mut b, PATH, path.as_bytes());
        }
        literal_name_index(&mut b, AUTHORITY, b"localhost");
        b
    }

    /// The size one header field counts toward a header list (RFC 9113 §6.5.2; the same as a
    /// dynamic-table entry's, RFC 7541 §4.1).
    pub fn field_size(name: &[u8], value: &[u8]) -> usize {
        name.len() + value.len() + 32
    }
}

// ---------- reading ----------

/// One frame as received.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// A decoded GOAWAY.
#[derive(Debug, Clone, PartialEq)]
pub struct GoAway {
    pub last_stream: u32,
    pub code: u32,
    pub debug: String,
}

impl std::fmt::Display for GoAway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GOAWAY {} (0x{:x}), last_stream_id {}, debug data {:?}",
            code::name(self.code),
            self.code,
            self.last_stream,
            self.debug
        )
    }
}

/// A response's `:status` as far as this decoder can tell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Status {
    Code(u16),
    /// An indexed reference to the server's dynamic table (this decoder keeps none).
    Dynamic(u32),
    /// The block did not start with `:status` in a form decoded here.
    Unknown,
}

impl Frame {
    pub fn goaway(&self) -> Option<GoAway> {
        if self.kind != kind::GOAWAY || self.payload.len() < 8 {
            return None;
        }
        let p = &self.payload;
        Some(GoAway {
            last_stream: u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
            code: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
            debug: String::from_utf8_lossy(&p[8..]).into_owned(),
        })
    }

    pub fn rst_code(&self) -> Option<u32> {
        if self.kind != kind::RST_STREAM || self.payload.len() != 4 {
            return None;
        }
        Some(u32::from_be_bytes(self.payload[..4].try_into().unwrap()))
    }

    pub fn is_ack(&self, frame_kind: u8) -> bool {
        self.kind == frame_kind && self.flags & flag::ACK != 0
    }

    /// The `:status` of a HEADERS frame (servers put it first in the block).
    pub fn status(&self) -> Option<Status> {
        if self.kind != kind::HEADERS {
            return None;
        }
        let mut p = &self.payload[..];
        let mut pad = 0;
        if self.flags & flag::PADDED != 0 {
            pad = *p.first()? as usize;
            p = &p[1..];
        }
        if self.flags & flag::PRIORITY != 0 {
            p = p.get(5..)?;
        }
        let block = p.get(..p.len().checked_sub(pad)?)?;
        Some(decode_status(block))
    }

    pub fn describe(&self) -> String {
        match self.kind {
            kind::GOAWAY => self.goaway().map(|g| g.to_string()).unwrap_or_default(),
            kind::RST_STREAM => format!(
                "RST_STREAM stream {} {}",
                self.stream,
                code::name(self.rst_code().unwrap_or(u32::MAX))
            ),
            kind::HEADERS => format!("HEADERS stream {} {:?}", self.stream, self.status()),
            k => format!(
                "frame type {k} flags 0x{:x} stream {} len {}",
                self.flags,
                self.stream,
                self.payload.len()
            ),
        }
    }
}

/// Read one frame; `Ok(None)` on a clean end of stream before a frame header.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 9];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }))
}

/// Decode an HPACK integer with an N-bit prefix; returns (value, bytes used).
fn decode_int(b: &[u8], prefix_bits: u8) -> Option<(u32, usize)> {
    let max = (1u32 << prefix_bits) - 1;
    let first = u32::from(*b.first()?) & max;
    if first < max {
        return Some((first, 1));
    }
    let mut value = max;
    let mut shift = 0;
    for (i, byte) in b[1..].iter().enumerate() {
        value = value.checked_add(u32::from(byte & 0x7f).checked_shl(shift)?)?;
        if byte & 0x80 == 0 {
            return Some((value, i + 2));
        }
        shift += 7;
    }
    None
}

/// `:status` from the start of a response header block: a static index (8–14), a dynamic
/// index, or a literal with name index 8 (any of the three literal kinds).
pub fn decode_status(mut block: &[u8]) -> Status {
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    // Skip dynamic table size updates (001xxxxx), allowed at the start of a block.
    while let Some(&b) = block.first() {
        if b & 0xe0 != 0x20 {
            break;
        }
        let Some((_, used)) = decode_int(block, 5) else {
            return Status::Unknown;
        };
        block = &block[used..];
    }
    let Some(&first) = block.first() else {
        return Status::Unknown;
    };
    if first & 0x80 != 0 {
        return match decode_int(block, 7) {
            Some((i @ 8..=14, _)) => Status::Code(STATIC[i as usize - 8]),
            Some((i, _)) if i >= hpack::FIRST_DYNAMIC => Status::Dynamic(i),
            _ => Status::Unknown,
        };
    }
    // Literal: with incremental indexing (01, 6-bit index), otherwise (0000 / 0001, 4-bit).
    let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
    let Some((8, used)) = decode_int(block, prefix) else {
        return Status::Unknown;
    };
    let rest = &block[used..];
    let Some(&h) = rest.first() else {
        return Status::Unknown;
    };
    let Some((len, used)) = decode_int(rest, 7) else {
        return Status::Unknown;
    };
    let Some(s) = rest.get(used..used + len as usize) else {
        return Status::Unknown;
    };
    let digits = if h & 0x80 != 0 {
        match huffman_digits(s) {
            Some(d) => d,
            None => return Status::Unknown,
        }
    } else {
        String::from_utf8_lossy(s).into_owned()
    };
    digits.parse().map(Status::Code).unwrap_or(Status::Unknown)
}

/// Huffman-decode a string of decimal digits only (RFC 7541 Appendix B): '0' 00000, '1' 00001,
/// '2' 00010 (5 bits); '3'..'9' 011001..011111 (6 bits). Padding is up to 7 one bits.
pub fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let total = bytes.len() * 8;
    let bit = |i: usize| (bytes[i / 8] >> (7 - i % 8)) & 1;
    let mut out = String::new();
    let mut i = 0;
    while i < total {
        let left = total - i;
        if left <= 7 && (i..total).all(|j| bit(j) == 1) {
            break; // EOS padding
        }
        if left < 5 {
            return None;
        }
        let five = (0..5).fold(0u8, |acc, j| acc << 1 | bit(i + j));
        if five <= 2 {
            out.push((b'0' + five) as char);
            i += 5;
        } else if (0b01100..=0b01111).contains(&five) && left >= 6 {
            let six = five << 1 | bit(i + 5);
            if !(0b011001..=0b011111).contains(&six) {
                return None;
            }
            out.push((b'3' + (six - 0b011001)) as char);
            i += 6;
        } else {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_round_trip() {
        for (prefix, v) in [
            (7u8, 5u32),
            (7, 126),
            (7, 127),
            (7, 4058),
            (5, 1337),
            (4, 15),
        ] {
            let mut b = Vec::new();
            hpack::int(&mut b, prefix, 0, v);
            assert_eq!(decode_int(&b, prefix), Some((v, b.len())), "{prefix} {v}");
        }
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        let mut b = Vec::new();
        hpack::int(&mut b, 5, 0, 1337);
        assert_eq!(b, [0x1f, 0x9a, 0x0a]);
    }

    #[test]
    fn statuses_decode() {
        assert_eq!(decode_status(&[0x88]), Status::Code(200));
        assert_eq!(decode_status(&[0x8d]), Status::Code(404));
        assert_eq!(decode_status(&[0xbe]), Status::Dynamic(62));
        // Literal with incremental indexing, name index 8, Huffman "431" (as h2 encodes it).
        assert_eq!(
            decode_status(&[0x48, 0x83, 0x69, 0x90, 0xff]),
            Status::Code(431)
        );
        // RFC 7541 C.6.1: ":status 302" Huffman-encoded is 64 02.
        assert_eq!(decode_status(&[0x48, 0x82, 0x64, 0x02]), Status::Code(302));
        // Plain literal without indexing.
        assert_eq!(decode_status(b"\x08\x03503"), Status::Code(503));
        assert_eq!(huffman_digits(&[0x64, 0x02]).as_deref(), Some("302"));
    }
}
