//! A fault-injecting TCP proxy for tests: sits between sluice and a real service and, on chosen
//! connections, cuts the response part-way, answers an HTTP request with `503 SlowDown` instead of
//! forwarding it, or delays every chunk. Counts what it did, so a test can check faults happened.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What to do to the connections (numbered from 1 in accept order).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Every `cut_every`-th response (counted over all connections) is cut after `cut_after`
    /// bytes and its connection dropped (the request reached the service: a retry must be
    /// idempotent).
    pub cut_every: usize,
    pub cut_after: u64,
    /// Every `slowdown_every`-th connection answers its first request with `503 SlowDown` (as S3
    /// does when throttling) and closes, without forwarding it.
    pub slowdown_every: usize,
    /// Delay before forwarding each chunk, both ways.
    pub delay: Duration,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicUsize,
    pub responses: AtomicUsize,
    pub cut: AtomicUsize,
    pub slowdowns: AtomicUsize,
    pub bytes: AtomicU64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub fn start(upstream: SocketAddr, faults: Faults) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let n = s.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let (faults, s) = (faults.clone(), s.clone());
                tokio::spawn(async move {
                    let _ = serve(client, upstream, n, &faults, &s).await;
                });
            }
        });
        FaultProxy { addr, stats, runtime: Some(runtime) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn every(k: usize, n: usize) -> bool {
    k > 0 && n.is_multiple_of(k)
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    n: usize,
    faults: &Faults,
    stats: &Stats,
) -> std::io::Result<()> {
    if every(faults.slowdown_every, n) {
        // Read the request head, answer 503 and close.
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") && got < buf.len() {
            let r = client.read(&mut buf[got..]).await?;
            if r == 0 {
                return Ok(());
            }
            got += r;
        }
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let resp = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(resp.as_bytes()).await?;
        stats.slowdowns.fetch_add(1, Ordering::SeqCst);
        return client.shutdown().await;
    }
    let server = TcpStream::connect(upstream).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let delay = faults.delay;
    let up = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let r = cr.read(&mut buf).await?;
            if r == 0 {
                return sw.shutdown().await;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            sw.write_all(&buf[..r]).await?;
        }
    };
    let (cut_every, cut_after) = (faults.cut_every, faults.cut_after as usize);
    let down = async move {
        let mut buf = vec![0u8; 64 << 10];
        // Bytes still to forward of a response being cut.
        let mut cutting: Option<usize> = None;
        loop {
            let r = sr.read(&mut buf).await?;
            if r == 0 {
                return cw.shutdown().await;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let chunk = &buf[..r];
            if cutting.is_none() {
                // Responses start with the status line (S3 answers to writes are small, so a
                // body that happens to hold these bytes is not a concern here).
                for at in memchr::memmem::find_iter(chunk, b"HTTP/1.1 ") {
                    let k = stats.responses.fetch_add(1, Ordering::SeqCst) + 1;
                    if every(cut_every, k) {
                        cutting = Some(at + cut_after);
                        break;
                    }
                }
            }
            let take = cutting.map_or(r, |left| left.min(r));
            cw.write_all(&chunk[..take]).await?;
            stats.bytes.fetch_add(take as u64, Ordering::Relaxed);
            if let Some(left) = cutting.as_mut() {
                *left -= take;
                if *left == 0 {
                    stats.cut.fetch_add(1, Ordering::SeqCst);
                    // Drop both halves: the client sees the connection die mid-response.
                    return Ok(());
                }
            }
        }
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}
