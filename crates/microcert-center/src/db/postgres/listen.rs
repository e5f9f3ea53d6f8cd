//! The change listener (LISTEN/NOTIFY) that keeps other centers' seed
//! caches fresh.

use std::time::Duration;

use microcert_core::DeviceId;
use tokio_postgres::Socket;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

use super::CHANGES_CHANNEL;

/// Keeps a connection LISTENing on [`CHANGES_CHANNEL`] and passes each
/// notified device to `on_change`; after the connection is lost (and at the
/// start, before LISTEN took effect) it reports None, since changes may
/// have been missed. Runs on the driver thread until the database is
/// dropped.
pub(super) async fn listen<T>(
    config: tokio_postgres::Config,
    tls: T,
    on_change: crate::db::ChangeHook,
) where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    use tokio_postgres::AsyncMessage;
    loop {
        if let Ok((client, mut connection)) = config.connect(tls.clone()).await {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            // The connection's messages, notifications among them, come
            // out of poll_message; polling it is also what drives it.
            let driver = tokio::spawn(async move {
                while let Some(m) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    match m {
                        Ok(AsyncMessage::Notification(n)) => {
                            if tx.send(n.payload().to_string()).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "PostgreSQL change listener disconnected");
                            break;
                        }
                    }
                }
            });
            let listening = client
                .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
                .await;
            if listening.is_ok() {
                on_change(None);
                while let Some(payload) = rx.recv().await {
                    let mut id = [0u8; 8];
                    match hex::decode_to_slice(payload.as_bytes(), &mut id) {
                        Ok(()) => on_change(Some(DeviceId(id))),
                        Err(_) => on_change(None),
                    }
                }
            }
            driver.abort();
            drop(client);
        }
        on_change(None);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
