//! LISTEN/NOTIFY: a listener on a connection of its own, outside the pools,
//! that re-connects (to whichever node is primary by then) and LISTENs
//! again after a restart or a failover, and says so, since notifications
//! sent while it was away are lost.

use std::collections::BTreeSet;
use std::future::poll_fn;
use std::sync::atomic::AtomicU64;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::AsyncMessage;

use super::*;

/// Counter of listener re-connections, labelled `node` (where it
/// re-connected).
pub const LISTENER_RECONNECTS_METRIC: &str = "pgstack_listener_reconnects_total";
/// Counter of notifications a listener dropped because its caller did not
/// receive them fast enough ([`ListenerEvent::Lagged`]).
pub const LISTENER_DROPPED_METRIC: &str = "pgstack_listener_dropped_total";

/// The operation name a listener's work carries.
const LISTEN_OP: &str = "pgstack-listen";
/// The operation name of [`Cluster::notify`].
pub(super) const NOTIFY_OP: &str = "pgstack-notify";
/// Notifications a listener keeps for its caller before it drops them
/// (and reports [`ListenerEvent::Lagged`]).
const DEFAULT_CAPACITY: usize = 10_000;
/// The longest channel name PostgreSQL keeps (`NAMEDATALEN - 1` bytes);
/// longer ones are cut short by `LISTEN` and refused by `pg_notify`.
pub const MAX_CHANNEL_LEN: usize = 63;

/// One notification (`NOTIFY` / `pg_notify`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Notification {
    /// The channel it was sent on.
    pub channel: String,
    /// The payload (empty when none was given).
    pub payload: String,
    /// The server process that sent it.
    pub process_id: i32,
}

/// What [`Listener::recv`] hands back.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenerEvent {
    /// A notification on one of the channels listened to.
    Notification(Notification),
    /// The listener's connection was lost and is back (on `node`, the
    /// primary now), listening on every channel again. Notifications sent
    /// in between (for about `down_for`) were **missed**: re-read whatever
    /// state the notifications stand for.
    Reconnected {
        /// The node the listener is connected to now.
        node: Arc<str>,
        /// How long it was not listening.
        down_for: Duration,
    },
    /// The caller did not receive fast enough: `missed` notifications were
    /// dropped (the listener keeps at most its capacity waiting).
    Lagged {
        /// How many notifications were dropped.
        missed: u64,
    },
}

/// A request from the [`Listener`] handle to its task.
enum Command {
    Listen(String, oneshot::Sender<Result<(), Error>>),
    Unlisten(String, oneshot::Sender<Result<(), Error>>),
}

/// A `LISTEN`er on a connection of its own ([`Cluster::listener`]).
///
/// The connection is outside the pools (it counts against no
/// `pool.max_size`) and is driven by a task of its own. When the connection
/// is lost (a restart, a failover, a network cut), the task re-connects with
/// the `retry` section's backoff to whichever node is the primary then,
/// `LISTEN`s on every channel again, and hands [`ListenerEvent::Reconnected`]
/// to [`Listener::recv`] before any notification of the new connection:
/// notifications sent while it was away are lost (PostgreSQL keeps none for
/// a session that is gone), and the event says so.
///
/// Dropping the listener ends its task and closes its connection, also while
/// it is re-connecting. [`Cluster::close`] ends every listener: `recv`
/// returns the events already received, then [`Error::ShuttingDown`].
#[derive(Debug)]
pub struct Listener {
    events: mpsc::Receiver<ListenerEvent>,
    commands: mpsc::Sender<Command>,
    dropped: Arc<AtomicU64>,
}

impl Listener {
    /// The next event: a notification, a re-connection (with the gap), or
    /// a report of dropped notifications. Cancel-safe.
    ///
    /// # Errors
    /// [`Error::ShuttingDown`] once the cluster was closed (after the
    /// events received before).
    pub async fn recv(&mut self) -> Result<ListenerEvent, Error> {
        let missed = self.dropped.swap(0, Ordering::AcqRel);
        if missed > 0 {
            return Ok(ListenerEvent::Lagged { missed });
        }
        match self.events.recv().await {
            Some(event) => Ok(event),
            None => Err(Error::ShuttingDown {
                operation: LISTEN_OP.to_owned(),
            }),
        }
    }

    /// An event if one is waiting now (`None`: nothing yet).
    ///
    /// # Errors
    /// As [`Listener::recv`].
    pub fn try_recv(&mut self) -> Result<Option<ListenerEvent>, Error> {
        let missed = self.dropped.swap(0, Ordering::AcqRel);
        if missed > 0 {
            return Ok(Some(ListenerEvent::Lagged { missed }));
        }
        match self.events.try_recv() {
            Ok(event) => Ok(Some(event)),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(Error::ShuttingDown {
                operation: LISTEN_OP.to_owned(),
            }),
        }
    }

    /// Starts listening on `channel` too. Channel names are taken as they
    /// are (quoted: `Orders` and `orders` are two channels), as
    /// `pg_notify(channel, ..)` and [`Cluster::notify`] take them. While the
    /// listener is re-connecting, the channel is listened on once it is
    /// back.
    ///
    /// # Errors
    /// [`Error::Usage`] for an empty name, one longer than 63 bytes or
    /// holding a NUL; [`Error::Database`] when the server refused;
    /// [`Error::ShuttingDown`] when the listener has ended.
    pub async fn listen(&self, channel: &str) -> Result<(), Error> {
        check_channel(channel, LISTEN_OP)?;
        self.command(|reply| Command::Listen(channel.to_owned(), reply))
            .await
    }

    /// Stops listening on `channel`.
    ///
    /// # Errors
    /// As [`Listener::listen`].
    pub async fn unlisten(&self, channel: &str) -> Result<(), Error> {
        check_channel(channel, LISTEN_OP)?;
        self.command(|reply| Command::Unlisten(channel.to_owned(), reply))
            .await
    }

    async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), Error>>) -> Command,
    ) -> Result<(), Error> {
        let ended = || Error::ShuttingDown {
            operation: LISTEN_OP.to_owned(),
        };
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| ended())?;
        answer.await.map_err(|_| ended())?
    }
}

/// Refuses channel names PostgreSQL would change or refuse.
pub(super) fn check_channel(channel: &str, op: &str) -> Result<(), Error> {
    let problem = if channel.is_empty() {
        "a channel name cannot be empty".to_owned()
    } else if channel.len() > MAX_CHANNEL_LEN {
        format!(
            "the channel name `{}…` is {} bytes long; PostgreSQL keeps at most {MAX_CHANNEL_LEN} \
             (LISTEN would cut it short, pg_notify refuses it)",
            channel.chars().take(40).collect::<String>(),
            channel.len()
        )
    } else if channel.contains('\0') {
        "a channel name cannot hold a NUL character".to_owned()
    } else {
        return Ok(());
    };
    Err(Error::Usage {
        operation: op.to_owned(),
        problem,
    })
}

/// `channel` as a quoted identifier: any name, exactly as given.
fn quoted(channel: &str) -> String {
    format!("\"{}\"", channel.replace('"', "\"\""))
}

/// The listener's live connection: the client, and the notifications its
/// driver task forwards (closed when the connection ends).
struct Session {
    client: tokio_postgres::Client,
    notes: mpsc::UnboundedReceiver<Notification>,
    node: Node,
}

impl Cluster {
    /// A listener on `channels`, on a connection of its own to the primary
    /// (see [`Listener`]): it re-connects and `LISTEN`s again after a
    /// restart or a failover, and reports the gap.
    ///
    /// ```no_run
    /// # async fn run(cluster: pgstack_connection::Cluster) -> Result<(), pgstack_connection::Error> {
    /// use pgstack_connection::ListenerEvent;
    /// let mut listener = cluster.listener(["bills"]).await?;
    /// loop {
    ///     match listener.recv().await? {
    ///         ListenerEvent::Notification(n) => { /* n.channel, n.payload */ }
    ///         ListenerEvent::Reconnected { .. } | ListenerEvent::Lagged { .. } => {
    ///             /* notifications were missed: re-read the state */
    ///         }
    ///         _ => {}
    ///     }
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Usage`] for a channel name PostgreSQL would change
    /// ([`Listener::listen`]); [`Error::Unavailable`] when the primary could
    /// not be reached; [`Error::Database`] when it refused;
    /// [`Error::ShuttingDown`] after [`Cluster::close`].
    pub async fn listener<I, S>(&self, channels: I) -> Result<Listener, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = BTreeSet::new();
        for channel in channels {
            let channel = channel.as_ref();
            check_channel(channel, LISTEN_OP)?;
            set.insert(channel.to_owned());
        }
        let closing = self.inner.listeners.subscribe();
        if self.is_closing() {
            return Err(Error::ShuttingDown {
                operation: LISTEN_OP.to_owned(),
            });
        }
        let session = self.open_listening(&set).await?;
        let (events_tx, events) = mpsc::channel(DEFAULT_CAPACITY);
        let (commands, commands_rx) = mpsc::channel(16);
        let dropped = Arc::new(AtomicU64::new(0));
        let task = ListenTask {
            cluster: self.clone(),
            channels: set,
            events: events_tx,
            commands: commands_rx,
            dropped: Arc::clone(&dropped),
            closing,
        };
        tokio::spawn(task.run(session));
        Ok(Listener {
            events,
            commands,
            dropped,
        })
    }

    /// Sends a notification on `channel` with `payload`
    /// (`SELECT pg_notify($1, $2)`, both as parameters) through the primary.
    /// Listeners get it when the statement commits (at once: it is its own
    /// transaction); inside [`Cluster::transaction`], run the same statement
    /// to send it with the transaction's commit.
    ///
    /// # Errors
    /// [`Error::Usage`] for a channel name PostgreSQL would refuse;
    /// [`Error::Database`] for a payload PostgreSQL refuses (8000 bytes or
    /// more: `22023`); as [`Cluster::execute`] otherwise.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), Error> {
        check_channel(channel, NOTIFY_OP)?;
        self.execute(
            NOTIFY_OP,
            Route::Write,
            "SELECT pg_notify($1, $2)",
            &[&channel, &payload],
        )
        .await
        .map(|_| ())
    }

    /// Listener tasks running now.
    pub fn listeners(&self) -> usize {
        self.inner.listeners.receiver_count()
    }

    /// Connects to the primary outside its pool and `LISTEN`s on
    /// `channels`; a node that turns out not to accept writes triggers a
    /// re-discovery.
    async fn open_listening(&self, channels: &BTreeSet<String>) -> Result<Session, Error> {
        let node = self.primary().clone();
        let op = Op::from(LISTEN_OP);
        let (client, mut connection) = node
            .pool()
            .connect_dedicated()
            .await
            .map_err(|e| Error::from_pool(e, node.name_arc(), op.name()))?;
        let (notes_tx, notes) = mpsc::unbounded_channel();
        let label = Arc::clone(node.name_arc());
        tokio::spawn(async move {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        let note = Notification {
                            channel: n.channel().to_owned(),
                            payload: n.payload().to_owned(),
                            process_id: n.process_id(),
                        };
                        if notes_tx.send(note).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::debug!(node = %label, %error, "listener connection lost");
                        return;
                    }
                    None => return,
                }
            }
        });
        let session = Session {
            client,
            notes,
            node,
        };
        if !channels.is_empty() {
            let sql: String = channels
                .iter()
                .map(|c| format!("LISTEN {};", quoted(c)))
                .collect();
            let limit = self.inner.settings.check_timeout + self.inner.settings.check_timeout;
            let result = match tokio::time::timeout(limit, session.client.batch_execute(&sql)).await
            {
                Ok(result) => result
                    .map_err(|e| Error::from_postgres(e, session.node.name_arc(), LISTEN_OP, true)),
                Err(_) => Err(Error::Timeout {
                    node: Arc::clone(session.node.name_arc()),
                    operation: LISTEN_OP.to_owned(),
                    after: limit,
                }),
            };
            if let Err(error) = result {
                // A standby refuses LISTEN: the primary moved.
                if error.code() == Some("25006") || error.code() == Some("0A000") {
                    let _ = self.rediscover().await;
                }
                return Err(error);
            }
        }
        Ok(session)
    }
}

/// The task behind a [`Listener`].
struct ListenTask {
    cluster: Cluster,
    channels: BTreeSet<String>,
    events: mpsc::Sender<ListenerEvent>,
    commands: mpsc::Receiver<Command>,
    dropped: Arc<AtomicU64>,
    /// Flips when the cluster closes; the task holds a receiver, which
    /// [`Cluster::listeners`] counts.
    closing: watch::Receiver<bool>,
}

/// Why a listener's session ended.
enum Ended {
    /// The connection was lost: re-connect.
    Lost,
    /// The listener was dropped or the cluster closed: stop.
    Stop,
}

impl ListenTask {
    async fn run(mut self, first: Session) {
        let mut session = first;
        loop {
            if let Ended::Stop = self.serve(&mut session).await {
                return;
            }
            let lost_at = Instant::now();
            tracing::warn!(
                node = session.node.name(),
                channels = self.channels.len(),
                "listener connection lost; re-connecting"
            );
            drop(session);
            match self.reconnect().await {
                Some(next) => {
                    let down_for = lost_at.elapsed();
                    metrics::counter!(LISTENER_RECONNECTS_METRIC, "node" => node_label(&next.node))
                        .increment(1);
                    tracing::info!(
                        node = next.node.name(),
                        ?down_for,
                        "listener re-connected; notifications sent meanwhile were missed"
                    );
                    let event = ListenerEvent::Reconnected {
                        node: Arc::clone(next.node.name_arc()),
                        down_for,
                    };
                    self.deliver(event);
                    session = next;
                }
                None => return,
            }
        }
    }

    /// Hands `event` to the caller, or counts it dropped when the caller
    /// lags behind.
    fn deliver(&self, event: ListenerEvent) {
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::AcqRel);
                metrics::counter!(LISTENER_DROPPED_METRIC).increment(1);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn stopping(&self) -> bool {
        *self.closing.borrow() || self.events.is_closed()
    }

    /// Forwards notifications and runs commands until the connection is
    /// lost or the listener should stop.
    async fn serve(&mut self, session: &mut Session) -> Ended {
        loop {
            if self.stopping() {
                return Ended::Stop;
            }
            tokio::select! {
                note = session.notes.recv() => match note {
                    Some(note) => self.deliver(ListenerEvent::Notification(note)),
                    None => return Ended::Lost,
                },
                command = self.commands.recv() => match command {
                    None => return Ended::Stop,
                    Some(command) => {
                        if self.run_command(session, command).await {
                            return Ended::Lost;
                        }
                    }
                },
                _ = self.events.closed() => return Ended::Stop,
                _ = self.closing.changed() => return Ended::Stop,
            }
        }
    }

    /// Runs one command; true when the connection was lost meanwhile.
    async fn run_command(&mut self, session: &Session, command: Command) -> bool {
        let (sql, reply, channel, listen) = match command {
            Command::Listen(channel, reply) => {
                (format!("LISTEN {}", quoted(&channel)), reply, channel, true)
            }
            Command::Unlisten(channel, reply) => (
                format!("UNLISTEN {}", quoted(&channel)),
                reply,
                channel,
                false,
            ),
        };
        let limit = self.cluster.inner.settings.check_timeout * 2;
        let result = tokio::time::timeout(limit, session.client.batch_execute(&sql)).await;
        let (answer, lost) = match result {
            Ok(Ok(())) => (Ok(()), false),
            Ok(Err(e)) if e.as_db_error().is_some() => (
                Err(Error::from_postgres(
                    e,
                    session.node.name_arc(),
                    LISTEN_OP,
                    true,
                )),
                false,
            ),
            // The connection broke: the change is made on the next one.
            Ok(Err(_)) | Err(_) => (Ok(()), true),
        };
        if answer.is_ok() {
            if listen {
                self.channels.insert(channel);
            } else {
                self.channels.remove(&channel);
            }
        }
        let _ = reply.send(answer);
        lost
    }

    /// Opens a new session, with backoff, until it works or the listener
    /// should stop (dropped, or the cluster closing). Commands that arrive
    /// meanwhile change the channel set, used once connected.
    async fn reconnect(&mut self) -> Option<Session> {
        let backoff = *self.cluster.inner.retry.backoff();
        let mut delay = backoff.initial();
        let mut attempt = 0u32;
        loop {
            if self.stopping() {
                return None;
            }
            let (cluster, channels) = (&self.cluster, &self.channels);
            let open = async move {
                // A failover moves the primary: ask again after failures.
                if attempt > 0 && attempt.is_multiple_of(3) {
                    let _ = cluster.rediscover().await;
                }
                cluster.open_listening(channels).await
            };
            let (events, closing) = (&self.events, &mut self.closing);
            let result = tokio::select! {
                result = open => result,
                _ = events.closed() => return None,
                _ = closing.changed() => return None,
            };
            match result {
                Ok(session) => return Some(session),
                Err(Error::ShuttingDown { .. }) => return None,
                Err(error) => {
                    tracing::debug!(%error, attempt, "listener re-connection failed");
                }
            }
            attempt = attempt.saturating_add(1);
            delay = backoff.delay(attempt, delay);
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = self.events.closed() => return None,
                    _ = self.closing.changed() => return None,
                    command = self.commands.recv() => match command {
                        None => return None,
                        Some(Command::Listen(channel, reply)) => {
                            self.channels.insert(channel);
                            let _ = reply.send(Ok(()));
                        }
                        Some(Command::Unlisten(channel, reply)) => {
                            self.channels.remove(&channel);
                            let _ = reply.send(Ok(()));
                        }
                    },
                }
            }
        }
    }
}
