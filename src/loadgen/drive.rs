//! loadgen: the workers that make the load. Handshake mode: each worker loops ticket →
//! new TCP + TLS connection → one request → close. Requests mode: each worker keeps one
//! connection (HTTP/1.1, or HTTP/2 with `--streams` request loops on it) and reconnects when
//! it ends. Both record into the shared `Recorder`.

use super::connect::Connector;
use super::failure::{ErrorKind, Failure};
use super::http::{self, Proto, RequestTemplate, Sender};
use super::options::{Alpn, Mode, Options};
use super::schedule::Schedule;
use super::stats::Recorder;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};

/// How long a finished connection may take to close cleanly before it is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Everything the workers share.
pub struct Shared {
    pub connector: Connector,
    pub template: RequestTemplate,
    pub schedule: Schedule,
    pub recorder: Recorder,
    pub mode: Mode,
    pub connections: usize,
    pub streams: usize,
    pub alpn: Option<Alpn>,
    pub timeout: Duration,
    /// Warned once: the server chose HTTP/1.1 although --streams asked for more.
    warned_h1_streams: AtomicBool,
}

impl Shared {
    pub fn new(
        opts: &Options,
        connector: Connector,
        schedule: Schedule,
        recorder: Recorder,
    ) -> Shared {
        Shared {
            connector,
            template: RequestTemplate::new(opts),
            schedule,
            recorder,
            mode: opts.mode,
            connections: opts.connections,
            streams: opts.streams,
            alpn: opts.alpn,
            timeout: opts.timeout,
            warned_h1_streams: AtomicBool::new(false),
        }
    }
}

/// Run every worker to the end of the schedule. A first Ctrl-C stops issuing requests and
/// lets those in flight finish; a second abandons them. Returns the run's wall time, or what
/// a worker panicked with: the others are stopped, since a report missing that worker's
/// share would pass for a complete one.
pub async fn run(shared: Arc<Shared>) -> Result<Duration, String> {
    let mut workers = JoinSet::new();
    for id in 0..shared.connections {
        let sh = shared.clone();
        match shared.mode {
            Mode::Handshake => workers.spawn(handshake_worker(sh, id)),
            Mode::Requests => workers.spawn(connection_worker(sh, id)),
        };
    }
    let mut interrupts = 0;
    let mut panicked = None;
    loop {
        tokio::select! {
            next = workers.join_next() => match next {
                None => break,
                Some(Err(e)) if e.is_panic() && panicked.is_none() => {
                    panicked = Some(panic_message(e.into_panic()));
                    shared.schedule.stop();
                    workers.abort_all();
                }
                Some(_) => {}
            },
            Ok(()) = tokio::signal::ctrl_c(), if interrupts < 2 => {
                interrupts += 1;
                shared.schedule.stop();
                if interrupts == 2 {
                    workers.abort_all();
                }
            }
        }
    }
    match panicked {
        Some(message) => Err(message),
        None => Ok(shared.schedule.start().elapsed()),
    }
}

/// The text a panic was raised with (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_string(), |s| s.to_string()),
    }
}

/// Handshake mode: one fresh connection per request.
async fn handshake_worker(sh: Arc<Shared>, id: usize) {
    while let Some(ticket) = sh.schedule.take() {
        let started = ticket.begin().await;
        let deadline = Instant::now() + sh.timeout;
        if let Err(f) = one_connection(&sh, id, started, deadline).await {
            sh.recorder.failure(id, &f);
        }
    }
}

async fn one_connection(
    sh: &Shared,
    id: usize,
    started: Instant,
    deadline: Instant,
) -> Result<(), Failure> {
    let conn = sh.connector.connect(deadline).await?;
    sh.recorder.handshake(id, &conn);
    let proto = Proto::choose(conn.negotiated.alpn, sh.alpn);
    let exchange = async {
        let (sender, driver) = http::handshake(conn.stream, proto).await?;
        http::exchange_once(sender, driver, sh.template.build(proto, true)).await
    };
    let (answer, driver) = timeout_at(deadline, exchange)
        .await
        .map_err(|_| Failure::timed_out(ErrorKind::Timeout, "the response", sh.timeout))??;
    sh.recorder
        .response(id, started.elapsed(), answer.status, answer.body_bytes);
    http::close(driver, CLOSE_WAIT).await;
    Ok(())
}

/// Requests mode: one keep-alive connection at a time, reopened when it ends.
async fn connection_worker(sh: Arc<Shared>, id: usize) {
    // Tickets whose request never went out: the server closed the connection first (its
    // max connection age, an idle close). They go on the next connection, their latency
    // still counted from their intended start.
    let mut carried: Vec<(Instant, Instant)> = Vec::new();
    // The ticket is taken before connecting so that a server refusing connections uses up
    // the run (each refusal is one failed attempt) instead of spinning outside it.
    loop {
        let (started, deadline) = match carried.pop() {
            Some(t) => t,
            None => {
                let Some(ticket) = sh.schedule.take() else {
                    break;
                };
                let started = ticket.begin().await;
                (started, Instant::now() + sh.timeout)
            }
        };
        let opened = async {
            let conn = sh.connector.connect(deadline).await?;
            sh.recorder.handshake(id, &conn);
            let proto = Proto::choose(conn.negotiated.alpn, sh.alpn);
            timeout_at(deadline, http::handshake(conn.stream, proto))
                .await
                .map_err(|_| Failure::timed_out(ErrorKind::Timeout, "HTTP/2 setup", sh.timeout))?
                .map(|(sender, driver)| (proto, sender, driver))
        };
        let (proto, sender, driver) = match opened.await {
            Ok(c) => c,
            Err(f) => {
                sh.recorder.failure(id, &f);
                continue;
            }
        };
        let driver = tokio::spawn(driver);
        let streams = match proto {
            Proto::H2 => sh.streams,
            Proto::H1 => {
                if sh.streams > 1 && !sh.warned_h1_streams.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "warning: the server chose HTTP/1.1; --streams {} ignored (one request in flight per connection)",
                        sh.streams
                    );
                }
                1
            }
        };
        let mut loops = JoinSet::new();
        for i in 1..streams {
            if let Some(s) = sender.try_clone() {
                loops.spawn(request_loop(sh.clone(), id + i, s, proto, carried.pop()));
            }
        }
        // This loop owns the ticket already taken; it runs on this task.
        carried
            .extend(request_loop(sh.clone(), id, sender, proto, Some((started, deadline))).await);
        while let Some(unsent) = loops.join_next().await {
            match unsent {
                Ok(tickets) => carried.extend(tickets),
                // Up to `run`, which stops the run: a report without this loop's share
                // would pass for a complete one.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            }
        }
        // Every sender is gone: the connection closes (GOAWAY / FIN) unless the server
        // already closed it.
        let _ = tokio::time::timeout(CLOSE_WAIT, driver).await;
    }
}

/// Requests on one connection, one at a time, until the schedule ends or the connection does.
/// Requests on one connection until it closes or the schedule ends. Returns the ticket of a
/// request that never went out because the connection had closed meanwhile.
async fn request_loop(
    sh: Arc<Shared>,
    id: usize,
    mut sender: Sender,
    proto: Proto,
    mut first: Option<(Instant, Instant)>,
) -> Option<(Instant, Instant)> {
    loop {
        let (started, deadline, opening) = match first.take() {
            Some((s, d)) => (s, d, true),
            None => {
                // A connection the server closed (keep-alive limit, idle close) is not a
                // failed request: this loop ends and the worker reconnects.
                if sender.ready().await.is_err() {
                    return None;
                }
                let ticket = sh.schedule.take()?;
                let started = ticket.begin().await;
                (started, Instant::now() + sh.timeout, false)
            }
        };
        // The server may have closed the connection while this ticket waited for its time
        // (GOAWAY, `Connection: close`, an age limit): the request was not sent, and is not
        // a failure of the server; it goes on the next connection. A connection closed
        // before its first request is a failure (no endless reconnecting).
        if let Err(f) = sender.ready().await {
            if opening {
                sh.recorder.failure(id, &f);
                return None;
            }
            return Some((started, deadline));
        }
        match timeout_at(deadline, sender.send(sh.template.build(proto, false))).await {
            Ok(Ok(answer)) => {
                sh.recorder
                    .response(id, started.elapsed(), answer.status, answer.body_bytes);
            }
            Ok(Err(f)) => {
                // A keep-alive connection the server closed just as the request went out
                // (the HTTP/1.1 idle-close race; an HTTP/2 stream past the final GOAWAY): as
                // browsers do, an idempotent request goes once more on a new connection. A
                // stream the GOAWAY refused goes again whatever its method: it was not
                // processed, and the connection may still be finishing other streams.
                if !opening
                    && (f.refused_by_goaway()
                        || f.is_unanswered()
                            && (proto == Proto::H1 || !sender.is_open())
                            && sh.template.idempotent())
                {
                    return Some((started, deadline));
                }
                sh.recorder.failure(id, &f);
                if !sender.is_open() {
                    return None;
                }
            }
            Err(_) => {
                let f = Failure::timed_out(ErrorKind::Timeout, "the response", sh.timeout);
                sh.recorder.failure(id, &f);
                // An abandoned HTTP/1.1 response leaves the connection unusable; an HTTP/2
                // stream is reset on its own.
                if proto == Proto::H1 {
                    return None;
                }
            }
        }
    }
}
