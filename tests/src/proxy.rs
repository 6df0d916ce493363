//! [`ChaosProxy`]: a loopback TCP proxy that injects network faults.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use pgstack_localpg::Error as KitError;

/// What a [`ChaosProxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProxyMode {
    /// Forward everything untouched.
    #[default]
    PassThrough,
    /// Forward everything, each chunk delayed by this much, in both directions.
    Latency(Duration),
    /// New connections are accepted and reset at once (the client's connect
    /// fails fast); open connections are left alone.
    Refuse,
    /// New connections are accepted and never answered; open connections stop
    /// moving data in both directions (like a network partition; what was
    /// sent is delivered once the mode changes back).
    Blackhole,
    /// New connections are reset as soon as they are accepted; open
    /// connections are reset as soon as data moves in either direction.
    Reset,
}

/// Counters of a [`ChaosProxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Connections accepted (including those reset or refused right away).
    pub accepted: u64,
    /// Connections open right now.
    pub active: u64,
    /// Connections refused ([`ProxyMode::Refuse`]).
    pub refused: u64,
    /// Connections reset by the proxy ([`ProxyMode::Reset`],
    /// [`ChaosProxy::reset_all`], an unreachable upstream).
    pub reset: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
}

/// A TCP proxy on `127.0.0.1:<free port>` in front of a server, whose
/// behaviour tests switch at run time with [`ChaosProxy::set_mode`] and
/// [`ChaosProxy::reset_all`]: added latency, resets, refused connections,
/// a black hole.
///
/// The proxy's tasks run on the runtime that called [`ChaosProxy::start`];
/// dropping the proxy stops listening and closes every connection.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// use pgstack_tests::{ChaosProxy, ProxyMode, TestCluster};
///
/// let cluster = TestCluster::start().await?;
/// let proxy = ChaosProxy::start(cluster.addr()).await?;
/// let url = format!("postgres://postgres@{}/postgres", proxy.addr());
/// // ... connect the code under test to `url` ...
/// proxy.set_mode(ProxyMode::Latency(std::time::Duration::from_millis(50)));
/// proxy.reset_all(); // every open connection gets a TCP RST
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ChaosProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    resets: watch::Sender<u64>,
    counters: Arc<Counters>,
    accept_task: JoinHandle<()>,
}

impl ChaosProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<ChaosProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| KitError::io("binding the chaos proxy on 127.0.0.1", source))?;
        let addr = listener
            .local_addr()
            .map_err(|source| KitError::io("reading the chaos proxy's address", source))?;
        let (mode, mode_rx) = watch::channel(ProxyMode::PassThrough);
        let (resets, resets_rx) = watch::channel(0_u64);
        let counters = Arc::new(Counters::default());
        let accept_task = tokio::spawn(accept_loop(
            listener,
            upstream,
            mode_rx,
            resets_rx,
            Arc::clone(&counters),
        ));
        tracing::debug!(%addr, %upstream, "chaos proxy listening");
        Ok(ChaosProxy {
            addr,
            upstream,
            mode,
            resets,
            counters,
            accept_task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The server behind the proxy.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// `postgres://postgres@127.0.0.1:PROXYPORT/DATABASE`: a kit cluster's
    /// URL through this proxy.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{}/{database}", self.addr)
    }

    /// Switches the mode; applies to new connections and, where it makes
    /// sense (latency, black hole, reset), to open ones.
    pub fn set_mode(&self, mode: ProxyMode) {
        tracing::debug!(proxy = %self.addr, ?mode, "chaos proxy mode");
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// Resets (TCP RST, both sides) every connection open right now; new
    /// connections are not affected.
    pub fn reset_all(&self) {
        self.resets.send_modify(|generation| *generation += 1);
    }

    /// How many times [`ChaosProxy::reset_all`] ran (by a test or by
    /// [`ChaosProxy::keep_resetting`]).
    pub fn reset_rounds(&self) -> u64 {
        *self.resets.borrow()
    }

    /// Resets every open connection again and again until `stop` is set,
    /// and returns how many times it did: each reset comes after a random
    /// pause of 10–60 ms, and never before `at_least` operations have ended
    /// since the previous one (the caller counts them in `ended`).
    ///
    /// A reset cuts the operations in flight on the connections it resets.
    /// Pacing resets by finished operations as well as by time keeps the
    /// share of operations they cut the same on a fast machine and on a
    /// saturated one, so a test's checks measure the code under test, not
    /// the machine.
    pub async fn keep_resetting(&self, stop: &AtomicBool, ended: &AtomicU64, at_least: u64) -> u64 {
        let mut resets = 0;
        let mut last = 0;
        while !stop.load(Ordering::Acquire) {
            let pause = rand::rng().random_range(10..60);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            while !stop.load(Ordering::Acquire) && ended.load(Ordering::Acquire) < last + at_least {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if stop.load(Ordering::Acquire) {
                break;
            }
            last = ended.load(Ordering::Acquire);
            self.reset_all();
            resets += 1;
        }
        resets
    }

    /// The counters.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            accepted: self.counters.accepted.load(Ordering::Relaxed),
            active: self.counters.active.load(Ordering::Relaxed),
            refused: self.counters.refused.load(Ordering::Relaxed),
            reset: self.counters.reset.load(Ordering::Relaxed),
        }
    }

    /// How many connections the proxy has accepted.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// How many connections are open right now.
    pub fn active(&self) -> u64 {
        self.counters.active.load(Ordering::Relaxed)
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        // The connection tasks end when the mode and reset senders drop.
        self.accept_task.abort();
    }
}

/// Closes `stream` with a TCP RST instead of a FIN.
fn rst(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<ProxyMode>,
    resets: watch::Receiver<u64>,
    counters: Arc<Counters>,
) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "chaos proxy accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        match *mode.borrow() {
            ProxyMode::Refuse => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                rst(client);
                continue;
            }
            ProxyMode::Reset => {
                counters.reset.fetch_add(1, Ordering::Relaxed);
                rst(client);
                continue;
            }
            _ => {}
        }
        tracing::trace!(%peer, "chaos proxy accepted");
        let connection = Connection {
            generation: *resets.borrow(),
            upstream,
            mode: mode.clone(),
            resets: resets.clone(),
            counters: Arc::clone(&counters),
        };
        tokio::spawn(connection.run(client));
    }
}

struct Connection {
    /// The `reset_all` generation when the connection was accepted.
    generation: u64,
    upstream: SocketAddr,
    mode: watch::Receiver<ProxyMode>,
    resets: watch::Receiver<u64>,
    counters: Arc<Counters>,
}

/// Decrements the active gauge however the connection task ends.
struct ActiveGuard(Arc<Counters>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Data read from one side, waiting to be written to the other.
#[derive(Default)]
struct Direction {
    pending: VecDeque<(Instant, Vec<u8>)>,
    read_closed: bool,
    write_shut: bool,
}

impl Direction {
    fn push(&mut self, data: Vec<u8>, latency: Duration) {
        let mut due = Instant::now() + latency;
        if let Some((last, _)) = self.pending.back() {
            due = due.max(*last);
        }
        self.pending.push_back((due, data));
    }

    fn next_due(&self) -> Option<Instant> {
        self.pending.front().map(|(due, _)| *due)
    }
}

/// How a connection task ended.
enum End {
    /// Close both sides normally.
    Close,
    /// Close both sides with a RST.
    Reset,
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Writes `data`; false when the write failed or a reset came first (a peer
/// that does not read must not make the connection deaf to `reset_all`).
async fn write_unless_reset(
    stream: &mut TcpStream,
    data: &[u8],
    resets: &mut watch::Receiver<u64>,
) -> bool {
    tokio::select! {
        written = stream.write_all(data) => written.is_ok(),
        _ = resets.changed() => false,
    }
}

impl Connection {
    async fn run(mut self, client: TcpStream) {
        self.counters.active.fetch_add(1, Ordering::Relaxed);
        let _guard = ActiveGuard(Arc::clone(&self.counters));
        if *self.resets.borrow_and_update() != self.generation {
            // reset_all came between the accept and now.
            self.counters.reset.fetch_add(1, Ordering::Relaxed);
            rst(client);
            return;
        }

        // A black hole holds new connections without going upstream.
        loop {
            let mode = *self.mode.borrow_and_update();
            match mode {
                ProxyMode::Blackhole => {
                    tokio::select! {
                        changed = self.mode.changed() => if changed.is_err() { return },
                        changed = self.resets.changed() => {
                            if changed.is_ok() {
                                self.counters.reset.fetch_add(1, Ordering::Relaxed);
                                rst(client);
                            }
                            return;
                        }
                    }
                }
                ProxyMode::Refuse | ProxyMode::Reset => {
                    self.counters.reset.fetch_add(1, Ordering::Relaxed);
                    rst(client);
                    return;
                }
                ProxyMode::PassThrough | ProxyMode::Latency(_) => break,
            }
        }

        let upstream = match TcpStream::connect(self.upstream).await {
            Ok(upstream) => upstream,
            Err(error) => {
                tracing::debug!(%error, upstream = %self.upstream, "chaos proxy: upstream unreachable");
                self.counters.reset.fetch_add(1, Ordering::Relaxed);
                rst(client);
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        let (client, upstream, end) = self.pump(client, upstream).await;
        match end {
            End::Close => {
                drop(client);
                drop(upstream);
            }
            End::Reset => {
                self.counters.reset.fetch_add(1, Ordering::Relaxed);
                rst(client);
                rst(upstream);
            }
        }
    }

    /// Moves bytes both ways until one side closes, an error happens, or the
    /// proxy resets the connection.
    async fn pump(
        &mut self,
        mut client: TcpStream,
        mut upstream: TcpStream,
    ) -> (TcpStream, TcpStream, End) {
        let mut up = Direction::default(); // client -> upstream
        let mut down = Direction::default(); // upstream -> client
        let mut client_buf = vec![0_u8; 16 * 1024];
        let mut upstream_buf = vec![0_u8; 16 * 1024];
        let mut mode = *self.mode.borrow_and_update();
        loop {
            if up.read_closed
                && down.read_closed
                && up.pending.is_empty()
                && down.pending.is_empty()
            {
                return (client, upstream, End::Close);
            }
            let flowing = !matches!(mode, ProxyMode::Blackhole);
            let latency = match mode {
                ProxyMode::Latency(latency) => latency,
                _ => Duration::ZERO,
            };
            let up_due = up.next_due();
            let down_due = down.next_due();
            tokio::select! {
                biased;
                changed = self.resets.changed() => {
                    return match changed {
                        Ok(()) => (client, upstream, End::Reset),
                        // The proxy is gone.
                        Err(_) => (client, upstream, End::Close),
                    };
                }
                changed = self.mode.changed() => {
                    if changed.is_err() {
                        return (client, upstream, End::Close);
                    }
                    mode = *self.mode.borrow_and_update();
                }
                () = sleep_until(up_due), if flowing && up_due.is_some() => {
                    if let Some((_, data)) = up.pending.pop_front()
                        && !write_unless_reset(&mut upstream, &data, &mut self.resets).await
                    {
                        return (client, upstream, End::Reset);
                    }
                }
                () = sleep_until(down_due), if flowing && down_due.is_some() => {
                    if let Some((_, data)) = down.pending.pop_front()
                        && !write_unless_reset(&mut client, &data, &mut self.resets).await
                    {
                        return (client, upstream, End::Reset);
                    }
                }
                read = client.read(&mut client_buf), if flowing && !up.read_closed => {
                    match read {
                        Ok(0) => up.read_closed = true,
                        Ok(n) => {
                            if mode == ProxyMode::Reset {
                                return (client, upstream, End::Reset);
                            }
                            up.push(client_buf[..n].to_vec(), latency);
                        }
                        Err(_) => return (client, upstream, End::Reset),
                    }
                }
                read = upstream.read(&mut upstream_buf), if flowing && !down.read_closed => {
                    match read {
                        Ok(0) => down.read_closed = true,
                        Ok(n) => {
                            if mode == ProxyMode::Reset {
                                return (client, upstream, End::Reset);
                            }
                            down.push(upstream_buf[..n].to_vec(), latency);
                        }
                        Err(_) => return (client, upstream, End::Reset),
                    }
                }
            }
            // Pass a half-close on once everything before it was delivered.
            if up.read_closed && up.pending.is_empty() && !up.write_shut {
                up.write_shut = true;
                let _ = upstream.shutdown().await;
            }
            if down.read_closed && down.pending.is_empty() && !down.write_shut {
                down.write_shut = true;
                let _ = client.shutdown().await;
            }
        }
    }
}
