//! Inbound PROXY protocol headers: any bytes → `proxy_protocol::read_header`, the first thing
//! a `proxy_protocol: true` listener reads from a trusted load balancer.
//!
//! Checked: it never panics; it reads exactly one header and nothing after it (what is left
//! in the reader on success is the input minus the header, whose length is worked out here
//! independently of the parser: v1 up to the first CRLF, at most 107 bytes; v2 16 bytes plus
//! the length field); and a socket that delivers the same bytes a few at a time, with
//! `Pending` in between, gives the same answer and leaves the same bytes as one read.

#![no_main]

use ephemera::proxy_protocol::read_header;
use libfuzzer_sys::fuzz_target;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// A reader over `data` that hands out at most the next planned chunk size per read, and
/// sometimes answers `Pending` first (waking itself at once), as a socket does.
struct Chunked<'a> {
    data: &'a [u8],
    plan: Vec<usize>,
    step: usize,
    pending_next: bool,
}

impl<'a> Chunked<'a> {
    fn new(data: &'a [u8], plan: Vec<usize>) -> Self {
        Chunked {
            data,
            plan,
            step: 0,
            pending_next: false,
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let size = this.plan[this.step % this.plan.len()];
        if this.pending_next {
            this.pending_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.step += 1;
        // A chunk size of 0 in the plan stands for "Pending before the next chunk".
        if size == 0 {
            this.pending_next = true;
        }
        let n = size.max(1).min(this.data.len()).min(buf.remaining());
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("current-thread runtime")
    })
}

/// The header length the spec gives for `data`, if `data` holds a whole one.
fn expected_header_len(data: &[u8]) -> Option<usize> {
    match data.first()? {
        b'P' => data.windows(2).position(|w| w == b"\r\n").map(|i| i + 2),
        0x0D => {
            let len = u16::from_be_bytes([*data.get(14)?, *data.get(15)?]);
            let total = 16 + usize::from(len);
            (data.len() >= total).then_some(total)
        }
        _ => None,
    }
}

/// The client address an accepted header names, read straight from the spec's layout:
/// v1 `PROXY TCP4|TCP6 SRC DST SPORT DPORT`, `UNKNOWN` → none; v2 the source address and
/// port of a PROXY command over AF_INET / AF_INET6, anything else (LOCAL, UNSPEC, UNIX) → none.
fn named_client(header: &[u8]) -> Option<SocketAddr> {
    if header[0] == b'P' {
        // The spec: after UNKNOWN, anything up to the CRLF is ignored.
        if header.starts_with(b"PROXY UNKNOWN") {
            return None;
        }
        let text = std::str::from_utf8(header).expect("an accepted v1 header is text");
        let fields: Vec<&str> = text.trim_end_matches("\r\n").split(' ').collect();
        let ip: IpAddr = fields[2].parse().expect("source address");
        let port: u16 = fields[4].parse().expect("source port");
        return Some(SocketAddr::new(ip, port));
    }
    let command = header[12] & 0x0f;
    let port = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    match (command, header[13] >> 4) {
        (1, 1) => {
            let ip: [u8; 4] = header[16..20].try_into().unwrap();
            Some(SocketAddr::new(IpAddr::from(ip), port(24)))
        }
        (1, 2) => {
            let ip: [u8; 16] = header[16..32].try_into().unwrap();
            Some(SocketAddr::new(IpAddr::from(ip), port(48)))
        }
        _ => None,
    }
}

/// Chunk sizes (1..=8, 0 = also return Pending) from a hash of the input, so the corpus
/// stays plain wire bytes and every input still gets its own split.
fn plan_for(data: &[u8]) -> Vec<usize> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..16)
        .map(|i| ((h >> (i * 4)) & 0xf) as usize % 9)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let rt = runtime();

    let mut whole = data;
    let result = rt.block_on(read_header(&mut whole));
    let outcome = format!("{result:?}");

    if result.is_ok() {
        let len = expected_header_len(data).expect("Ok without a whole header");
        assert_eq!(
            whole,
            &data[len..],
            "read past (or short of) the header: header {len} bytes, {} left of {}",
            whole.len(),
            data.len()
        );
        if data[0] == b'P' {
            assert!(len <= 107, "v1 header of {len} bytes accepted");
        }
        assert_eq!(
            result.as_ref().ok().copied().flatten(),
            named_client(&data[..len]),
            "the address used is not the one the header names: {outcome}"
        );
    }

    for plan in [vec![1], plan_for(data)] {
        let mut chunked = Chunked::new(data, plan);
        let again = rt.block_on(read_header(&mut chunked));
        assert_eq!(format!("{again:?}"), outcome, "split reads differ");
        if result.is_ok() {
            assert_eq!(chunked.data, whole, "split reads consumed differently");
        }
    }
});
