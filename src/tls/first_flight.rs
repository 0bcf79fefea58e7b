//! HTTP/2's first flight, held for the first response (used by `stream::ClientStream`, on
//! HTTP/2 connections only).
//!
//! A new HTTP/2 connection's server SETTINGS, WINDOW_UPDATE and SETTINGS ACK are ready as soon
//! as the client's preface has been read, while the client's first request is still on its
//! way to the backend. Written at once, they take a write of their own, wake the client, and
//! draw its SETTINGS ACK as a packet of its own (another read here). So writes made only of
//! those frames are queued in rustls; once the connection's reads block, they are held on if
//! a request without a body has arrived (one with a body may need our WINDOW_UPDATEs to
//! come; the response will take them along: the first write with anything
//! else in it, which may also be a PING ACK or a GOAWAY) for at most `HOLD`, and otherwise
//! written then. A client that waits for our SETTINGS before its first request thus gets them
//! as before; one that sends its request at once (RFC 9113 §3.4 allows it; curl does) gets
//! them with the response.
use std::io::IoSlice;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;
use tokio::time::Sleep;

/// Upper bound on holding the first flight for the first response. Short against a client's
/// SETTINGS timeout (seconds) and a one-time pause of an upload waiting for our first
/// WINDOW_UPDATE; long enough for a nearby backend's answer through a busy proxy.
pub const HOLD: Duration = Duration::from_millis(8);

/// The largest write sniffed for frame types: a first flight is well under 100 bytes.
const MAX_SNIFF: usize = 256;
const FRAME_HEADER: usize = 9;
pub(crate) const SETTINGS: u8 = 0x4;
const WINDOW_UPDATE: u8 = 0x8;

pub enum FirstFlight {
    /// Nothing queued yet.
    Open,
    /// Setup frames are queued in rustls; whether to hold them is decided when the reads
    /// block.
    Queued,
    /// Held for the first response; the timer bounds how long.
    Held(Pin<Box<Sleep>>),
    /// The first flight went out (or this is no HTTP/2 connection): nothing more is held.
    Over,
}

impl FirstFlight {
    pub fn new(h2: bool) -> FirstFlight {
        if h2 {
            FirstFlight::Open
        } else {
            FirstFlight::Over
        }
    }

    /// Whether a write of `bufs` is to be queued without writing (the caller then calls
    /// `queued`). Anything but setup frames ends the hold for good: that write takes the
    /// queued records along.
    pub fn holds(&mut self, bufs: &[IoSlice<'_>]) -> bool {
        if matches!(self, FirstFlight::Over) {
            return false;
        }
        if setup_frames_only(bufs) {
            return true;
        }
        *self = FirstFlight::Over;
        false
    }

    pub fn queued(&mut self) {
        if matches!(self, FirstFlight::Open) {
            *self = FirstFlight::Queued;
        }
    }

    /// The queued records went out (with a write, a flush, or a KeyUpdate).
    pub fn sent(&mut self) {
        if !matches!(self, FirstFlight::Open) {
            *self = FirstFlight::Over;
        }
    }

    /// A flush is held: records are queued and their fate is not decided yet, or they are
    /// held and the time is not up.
    pub fn holding(&mut self, cx: &mut Context<'_>) -> bool {
        match self {
            FirstFlight::Queued => true,
            FirstFlight::Held(timer) => timer.as_mut().poll(cx).is_pending(),
            FirstFlight::Open | FirstFlight::Over => false,
        }
    }

    /// The connection's reads block with records queued: hold them for the response if a
    /// request has arrived (the timer then wakes `cx`'s task when the time is up). `false`:
    /// not held (any longer); the caller writes them.
    pub fn read_blocked(&mut self, cx: &mut Context<'_>, request_arrived: bool) -> bool {
        match self {
            FirstFlight::Queued if request_arrived => {
                let mut timer = Box::pin(tokio::time::sleep(HOLD));
                // Registers the waker: the time cannot be up yet.
                let _ = timer.as_mut().poll(cx);
                *self = FirstFlight::Held(timer);
                true
            }
            FirstFlight::Held(timer) => timer.as_mut().poll(cx).is_pending(),
            _ => false,
        }
    }
}

/// `bufs` holds whole HTTP/2 frames, all SETTINGS or WINDOW_UPDATE (h2 starts each write at a
/// frame boundary; a write that rustls took only in part ends the hold, see `stream`).
pub fn setup_frames_only(bufs: &[IoSlice<'_>]) -> bool {
    let mut bytes = [0u8; MAX_SNIFF];
    let mut total = 0;
    for b in bufs {
        let Some(room) = bytes.get_mut(total..total + b.len()) else {
            return false;
        };
        room.copy_from_slice(b);
        total += b.len();
    }
    let mut rest = &bytes[..total];
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let Some((header, after)) = rest.split_first_chunk::<FRAME_HEADER>() else {
            return false;
        };
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        if header[3] != SETTINGS && header[3] != WINDOW_UPDATE {
            return false;
        }
        let Some(next) = after.get(len..) else {
            return false;
        };
        rest = next;
    }
    true
}

/// An HTTP/2 frame on stream 0, for tests.
#[cfg(test)]
pub(crate) fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sniff(parts: &[&[u8]]) -> bool {
        let bufs: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        setup_frames_only(&bufs)
    }

    #[test]
    fn settings_and_window_updates_are_setup_frames() {
        let settings = frame(SETTINGS, &[0, 3, 0, 0, 0, 100]);
        let ack = frame(SETTINGS, &[]);
        let wu = frame(WINDOW_UPDATE, &[0, 0x0f, 0, 0]);
        assert!(sniff(&[&settings]));
        assert!(sniff(&[&wu, &ack]));
        // A frame split across the slices of one write.
        assert!(sniff(&[&settings[..4], &settings[4..], &wu]));
    }

    #[test]
    fn anything_else_is_not() {
        let settings = frame(SETTINGS, &[]);
        let headers = frame(0x1, &[0x88]);
        let ping_ack = frame(0x6, &[0; 8]);
        assert!(!sniff(&[&settings, &headers]));
        assert!(!sniff(&[&ping_ack]));
        assert!(!sniff(&[]), "an empty write");
        assert!(!sniff(&[&settings[..5]]), "a cut frame header");
        let wu = frame(WINDOW_UPDATE, &[0, 0, 1, 0]);
        assert!(!sniff(&[&wu[..11]]), "a cut payload");
        assert!(
            !sniff(&[&[0u8; MAX_SNIFF + 1]]),
            "too long to be a first flight"
        );
        assert!(!sniff(&[b"ping-pong"]), "not HTTP/2 at all");
    }
}
