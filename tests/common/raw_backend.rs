//! Raw TCP backends for the fault tests: a listener on 127.0.0.1 port 0 whose connections
//! are each handed to a script that writes exactly the bytes (and closes exactly the way) a
//! test needs, something a well-behaved server library will not do. Plus the few HTTP/1.1
//! reading and closing steps those scripts share.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct RawBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    /// Each accepted connection goes to `script(stream, n)` in a task of its own, `n`
    /// counting connections from 0. The listener closes when the `RawBackend` is dropped;
    /// scripts still running finish on their own.
    pub async fn start<F, Fut>(script: F) -> RawBackend
    where
        F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let accept_task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(script(sock, n));
            }
        });
        RawBackend {
            addr,
            accepted,
            accept_task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// One HTTP/1.1 request as the backend read it.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub head: String,
    pub body: Vec<u8>,
}

impl RawRequest {
    /// The request line's method.
    pub fn method(&self) -> &str {
        self.head.split(' ').next().unwrap_or("")
    }
}

/// Read one HTTP/1.1 request: the head, then a body framed by Content-Length or chunked
/// (read up to its last chunk, not decoded). `None` when the peer closed or failed first.
pub async fn read_request(sock: &mut TcpStream) -> Option<RawRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = lower
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    let mut body = buf[head_end..].to_vec();
    loop {
        let done = match (length, chunked) {
            (Some(n), _) => body.len() >= n,
            (None, true) => body.ends_with(b"0\r\n\r\n"),
            (None, false) => true,
        };
        if done {
            return Some(RawRequest { head, body });
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Read and discard until the peer closes (or fails): holds our end exactly as long as the
/// proxy holds its own, so descriptor counts settle when the proxy lets go.
pub async fn drain(sock: &mut TcpStream) {
    let mut chunk = [0u8; 4096];
    while let Ok(n) = sock.read(&mut chunk).await {
        if n == 0 {
            return;
        }
    }
}

/// Close with FIN after the bytes written so far, then wait for the peer to close too.
pub async fn close(mut sock: TcpStream) {
    let _ = sock.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), drain(&mut sock)).await;
}

/// Close abortively: SO_LINGER 0 makes the kernel send RST (and drop anything unsent).
pub fn reset(sock: TcpStream) {
    // Deprecated because a non-zero linger blocks the thread in close(); zero does not.
    #[allow(deprecated)]
    sock.set_linger(Some(Duration::ZERO)).unwrap();
    drop(sock);
}

/// A response head with `Content-Length: len`.
pub fn head_with_length(len: usize) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {len}\r\n\r\n"
    )
}

/// A chunked response head.
pub const CHUNKED_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// One chunk of chunked encoding.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// A listener that never accepts, with its accept queue full: the kernel drops further SYNs,
/// so a connect to `addr` neither succeeds nor fails (for `connect_timeout`). The address
/// stays a black hole while this value lives.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
}

impl BlackHole {
    pub async fn start() -> BlackHole {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // Backlog 0: Linux queues one connection, then drops SYNs.
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => queued.push(s),
                Ok(Err(e)) => panic!("connect to the black hole failed: {e}"),
                // Hung: the queue is full (unless this task was merely slow to run before
                // any connection was queued; then try again).
                Err(_) if !queued.is_empty() => {
                    return BlackHole {
                        addr,
                        _listener: listener,
                        _queued: queued,
                    };
                }
                Err(_) => {}
            }
        }
        panic!("the accept queue of {addr} never filled");
    }
}
