//! Binding the listeners and running until a shutdown signal, finishing the
//! requests in flight.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use crate::api::DeviceService;
use crate::limits::Limits;

/// The bound listeners, so a caller (or a test with port 0) learns the
/// addresses before serving starts.
#[derive(Debug)]
pub struct Listeners {
    /// HTTP: devices, relying parties and operators.
    pub http: TcpListener,
    /// CoAP over UDP: devices.
    pub coap: UdpSocket,
}

impl Listeners {
    /// Binds both listeners.
    pub async fn bind(http: SocketAddr, coap: SocketAddr) -> std::io::Result<Self> {
        let http_l = TcpListener::bind(http).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen for HTTP on {http}: {e}"))
        })?;
        let coap_s = UdpSocket::bind(coap).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen for CoAP on {coap}: {e}"))
        })?;
        Ok(Listeners {
            http: http_l,
            coap: coap_s,
        })
    }

    /// The bound addresses (HTTP, CoAP).
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.http.local_addr()?, self.coap.local_addr()?))
    }
}

/// A sender that turns true on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot watch SIGTERM");
                        let _ = ctrl_c.await;
                        let _ = tx.send(true);
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down: finishing requests in flight");
        let _ = tx.send(true);
    });
    rx
}

/// Serves HTTP (`router`; over TLS when `tls` is given) and CoAP (`svc`)
/// until `shutdown` turns true, with the default CoAP [`Limits`] (the HTTP
/// ones are the router's).
pub async fn serve(
    listeners: Listeners,
    router: Router,
    svc: Arc<dyn DeviceService>,
    coap_workers: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let limits = Arc::new(Limits::default());
    serve_limited(listeners, router, svc, limits, coap_workers, tls, shutdown).await
}

/// Like [`serve`], with `limits` for CoAP (give the router's
/// [`crate::http::HttpState`] the same, so both bindings share one budget).
pub async fn serve_limited(
    listeners: Listeners,
    router: Router,
    svc: Arc<dyn DeviceService>,
    limits: Arc<Limits>,
    coap_workers: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut http_stop = shutdown.clone();
    let http = async move {
        match tls {
            Some(acceptor) => crate::tls::serve(listeners.http, acceptor, router, http_stop).await,
            None => {
                axum::serve(
                    listeners.http,
                    router.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move {
                    let _ = http_stop.wait_for(|s| *s).await;
                })
                .await
            }
        }
    };
    let coap = crate::coap::serve_limited(listeners.coap, svc, limits, coap_workers, shutdown);
    let (h, c) = tokio::join!(http, coap);
    h?;
    c
}
