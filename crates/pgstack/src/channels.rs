//! LISTEN/NOTIFY and COPY on the facade: each delegates to the cluster
//! (see `docs/connection.md`, "Listen/notify" and "COPY").

use pgstack_connection::tokio_postgres::types::Type;
use pgstack_connection::{BinaryCopyIn, CopyIn, CopyOut, Error, Listener, Op, Route};

use crate::Database;

impl Database {
    /// A listener on `channels`, on a connection of its own to the primary
    /// (outside the pool): it re-connects and `LISTEN`s again after a
    /// restart or a failover, and [`Listener::recv`] reports the gap
    /// ([`crate::ListenerEvent::Reconnected`]). [`Database::shutdown`] ends
    /// it.
    ///
    /// ```no_run
    /// # async fn run(db: pgstack::Database) -> Result<(), pgstack::Error> {
    /// use pgstack::ListenerEvent;
    /// let mut listener = db.listener(["bills"]).await?;
    /// db.notify("bills", "42").await?;
    /// while let Ok(event) = listener.recv().await {
    ///     match event {
    ///         ListenerEvent::Notification(n) => println!("{}: {}", n.channel, n.payload),
    ///         ListenerEvent::Reconnected { down_for, .. } => {
    ///             println!("missed up to {down_for:?} of notifications: re-reading");
    ///         }
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`pgstack_connection::Cluster::listener`].
    pub async fn listener<I, S>(&self, channels: I) -> Result<Listener, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.cluster().listener(channels).await
    }

    /// Sends a notification (`SELECT pg_notify($1, $2)`, both as
    /// parameters) through the primary.
    ///
    /// # Errors
    /// As [`pgstack_connection::Cluster::notify`].
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), Error> {
        self.cluster().notify(channel, payload).await
    }

    /// `COPY … FROM STDIN` (text or CSV) on a connection of its own on the
    /// primary: a sink of bytes ([`CopyIn`]); nothing is kept unless
    /// [`CopyIn::finish`] succeeds.
    ///
    /// # Errors
    /// As [`pgstack_connection::Cluster::copy_in`].
    pub async fn copy_in(&self, op: impl Into<Op>, sql: &str) -> Result<CopyIn<'static>, Error> {
        self.cluster().copy_in(op, sql).await
    }

    /// `COPY … FROM STDIN (FORMAT binary)` on a connection of its own on the
    /// primary, fed with typed rows of the column `types`.
    ///
    /// # Errors
    /// As [`pgstack_connection::Cluster::copy_in_binary`].
    pub async fn copy_in_binary(
        &self,
        op: impl Into<Op>,
        sql: &str,
        types: &[Type],
    ) -> Result<BinaryCopyIn<'static>, Error> {
        self.cluster().copy_in_binary(op, sql, types).await
    }

    /// `COPY … TO STDOUT` on a connection of its own on the node `route`
    /// picks: a stream of bytes ([`CopyOut`]).
    ///
    /// # Errors
    /// As [`pgstack_connection::Cluster::copy_out`].
    pub async fn copy_out(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
    ) -> Result<CopyOut<'static>, Error> {
        self.cluster().copy_out(op, route, sql).await
    }
}
