//! A fault-injecting TCP proxy for tests: sits between sluice and a real service and, on chosen
//! connections, cuts the response part-way, answers an HTTP request with `503 SlowDown` instead of
//! forwarding it, or delays every chunk. Counts what it did, so a test can check faults happened.
//!
//! Faults a test switches on while traffic flows, for any TCP protocol (Kafka, PostgreSQL, S3),
//! through [`FaultProxy::control`]: drop every open connection, stall all forwarding, refuse new
//! connections for a while (a service that is down), add a delay, or cut the next response.

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

/// Faults switched on at run time (see [`FaultProxy::control`]).
#[derive(Debug)]
pub struct Control {
    /// Bumped by [`Control::drop_all`]: every connection open then is closed.
    generation: tokio::sync::watch::Sender<u64>,
    /// Nothing is forwarded, either way, until this instant (as micros since `epoch`).
    stalled_until: AtomicU64,
    /// New connections are closed at once until this instant.
    refused_until: AtomicU64,
    /// Extra delay before forwarding each chunk, in micros.
    delay_micros: AtomicU64,
    /// The next response chunk (from the service) is cut after this many bytes + 1 and its
    /// connection closed; 0 = no cut armed.
    cut_next: AtomicU64,
    epoch: std::time::Instant,
    pub dropped: AtomicUsize,
    pub refused: AtomicUsize,
}

impl Control {
    fn new() -> Control {
        Control {
            generation: tokio::sync::watch::Sender::new(0),
            stalled_until: AtomicU64::new(0),
            refused_until: AtomicU64::new(0),
            delay_micros: AtomicU64::new(0),
            cut_next: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            dropped: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Closes every connection open now (both sides see a reset-like EOF mid-stream).
    pub fn drop_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Forwards nothing, either way, for `d` (connections stay open: a network partition).
    pub fn stall(&self, d: Duration) {
        self.stalled_until.store(self.now() + d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Drops every connection and closes new ones at once for `d` (the service is down).
    pub fn refuse(&self, d: Duration) {
        self.refused_until.store(self.now() + d.as_micros() as u64, Ordering::SeqCst);
        self.drop_all();
    }

    /// Delays every chunk by `d` from now on (zero to stop).
    pub fn delay(&self, d: Duration) {
        self.delay_micros.store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Cuts the next chunk the service sends after `bytes` bytes and closes that connection.
    pub fn cut_next_response(&self, bytes: u64) {
        self.cut_next.store(bytes + 1, Ordering::SeqCst);
    }

    fn refusing(&self) -> bool {
        self.now() < self.refused_until.load(Ordering::SeqCst)
    }

    /// Waits out a stall and the run-time delay before a chunk is forwarded.
    async fn hold(&self) {
        loop {
            let until = self.stalled_until.load(Ordering::SeqCst);
            let now = self.now();
            if now >= until {
                break;
            }
            tokio::time::sleep(Duration::from_micros(until - now)).await;
        }
        let d = self.delay_micros.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_micros(d)).await;
        }
    }
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
    pub control: Arc<Control>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub fn start(upstream: SocketAddr, faults: Faults) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let control = Arc::new(Control::new());
        let (s, c) = (stats.clone(), control.clone());
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                if c.refusing() {
                    c.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let n = s.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let (faults, s, c) = (faults.clone(), s.clone(), c.clone());
                let mut generation = c.generation.subscribe();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(client, upstream, n, &faults, &s, &c) => {}
                        _ = generation.changed() => { c.dropped.fetch_add(1, Ordering::SeqCst); }
                    }
                });
            }
        });
        FaultProxy { addr, stats, control, runtime: Some(runtime) }
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
    control: &Control,
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
            control.hold().await;
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
            control.hold().await;
            let chunk = &buf[..r];
            let armed = control.cut_next.swap(0, Ordering::SeqCst);
            if armed > 0 {
                let take = ((armed - 1) as usize).min(r);
                cw.write_all(&chunk[..take]).await?;
                stats.cut.fetch_add(1, Ordering::SeqCst);
                return Ok(());
            }
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
