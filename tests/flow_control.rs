//! Flow control end to end: a client that reads a 256 MiB response slowly, over HTTP/2,
//! through the proxy, from an HTTP/2 (h2c) backend. Every hop must apply backpressure
//! (client stream window, proxy, backend stream window), so the process's memory stays
//! bounded instead of growing with the response. Its own test binary: the figure is the
//! RSS of this process, which holds the client, the proxy and the backend.

mod common;

use common::*;
use hyper::body::Body;
use std::time::Duration;

const SIZE: usize = 256 * 1024 * 1024;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_of_256_mib_keeps_memory_bounded() {
    let certs = Certs::new(&["localhost"]);
    let backend = h2_backend::start(None, None).await;
    let yaml = config_yaml(&certs, Some(&[backend.addr]), "", "", "")
        .replace("protocol: http1", "protocol: h2c");
    let proxy = Proxy::start(&yaml).await;
    let mut client = HttpClient::connect(proxy.addr, &certs.ca_der(), true).await;
    // Warm up allocators and pools with a small request first.
    let (status, _, _) = client.get("/bytes/1000").await;
    assert_eq!(status, 200);
    let baseline = rss_bytes();

    let resp = client
        .send(request("GET", &format!("/bytes/{SIZE}"), empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut read = 0usize;
    let mut peak = baseline;
    let mut paused = false;
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            assert_eq!(
                &data[..],
                &pattern(read, data.len())[..],
                "at offset {read}"
            );
            read += data.len();
        }
        // Slow: a pause of 2 s after the first MiB, then 1 ms per 256 KiB read.
        if !paused && read >= 1 << 20 {
            paused = true;
            tokio::time::sleep(Duration::from_secs(2)).await;
            peak = peak.max(rss_bytes());
        }
        if read % (256 * 1024) < 16 * 1024 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            peak = peak.max(rss_bytes());
        }
    }
    assert_eq!(read, SIZE, "the whole response arrived");
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "RSS baseline {} MiB, peak {} MiB, growth {} MiB while streaming {} MiB",
        baseline >> 20,
        peak >> 20,
        growth >> 20,
        SIZE >> 20
    );
    // Windows on the way: client stream 2 MiB (hyper's default), proxy-to-backend stream
    // 256 KiB, plus socket buffers. Buffering the response would grow by ~256 MiB.
    assert!(growth < 48 << 20, "RSS grew by {} MiB", growth >> 20);
}
