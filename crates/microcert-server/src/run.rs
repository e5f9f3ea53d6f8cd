//! Binding the listeners and running until a shutdown signal, finishing the
//! requests in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, watch};

use crate::api::DeviceService;
use crate::limits::Limits;

/// The bound listeners, so a caller (or a test with port 0) learns the
/// addresses before serving starts.
#[derive(Debug)]
pub struct Listeners {
    /// HTTP: devices (and, without `operator`, relying parties and
    /// operators too).
    pub http: TcpListener,
    /// CoAP over UDP: devices.
    pub coap: UdpSocket,
    /// HTTP for operators, relying parties and `/metrics`, apart from the
    /// devices' listener (`operator_http`); None: all on `http`.
    pub operator: Option<TcpListener>,
}

impl Listeners {
    /// Binds both listeners.
    pub async fn bind(http: SocketAddr, coap: SocketAddr) -> std::io::Result<Self> {
        Self::bind_all(http, coap, None).await
    }

    /// Binds the listeners, with a separate operator listener when
    /// `operator` is given.
    pub async fn bind_all(
        http: SocketAddr,
        coap: SocketAddr,
        operator: Option<SocketAddr>,
    ) -> std::io::Result<Self> {
        let tcp = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen for {what} on {addr}: {e}"))
            })
        };
        let http_l = tcp(http, "HTTP").await?;
        let coap_s = UdpSocket::bind(coap).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen for CoAP on {coap}: {e}"))
        })?;
        let operator = match operator {
            Some(a) => Some(tcp(a, "operator HTTP").await?),
            None => None,
        };
        Ok(Listeners {
            http: http_l,
            coap: coap_s,
            operator,
        })
    }

    /// The bound addresses (HTTP, CoAP).
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.http.local_addr()?, self.coap.local_addr()?))
    }

    /// The operator listener's address, if it has its own.
    pub fn operator_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.operator.as_ref().map(|l| l.local_addr()).transpose()
    }
}

/// The warning for a listener serving plain HTTP on a non-loopback
/// address (bearer tokens and relying-party data in clear), if it is one.
pub fn plain_http_warning(what: &str, addr: SocketAddr, tls: bool) -> Option<String> {
    (!tls && !addr.ip().is_loopback()).then(|| {
        format!(
            "WARNING: the {what} listener {addr} serves plain HTTP on a non-loopback address: \
             bearer tokens and relying-party data cross the network in clear. Configure \
             tls_cert and tls_key, or listen on 127.0.0.1 behind a TLS proxy."
        )
    })
}

/// The bounds of an HTTP listener (from [`crate::limits::LimitsConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct HttpBounds {
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Connections open at once; beyond, new ones are closed at once.
    pub max_connections: usize,
}

impl Default for HttpBounds {
    fn default() -> Self {
        let c = crate::limits::LimitsConfig::default();
        HttpBounds {
            header_timeout: Duration::from_millis(c.http_header_timeout_ms),
            max_connections: c.http_max_connections,
        }
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until
/// `stop` turns true, then lets the connections in flight finish
/// (bounded). The client's address is given to the router as
/// `ConnectInfo`; a client that does not finish its headers within the
/// header timeout is disconnected (slowloris), and connections beyond
/// `max_connections` are closed as soon as they are accepted.
pub async fn serve_http(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    bounds: HttpBounds,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(bounds.header_timeout))
        .keep_alive_timeout(bounds.header_timeout);
    let slots = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        };
        let (tcp, peer) = match accepted {
            None => break,
            Some(Ok(x)) => x,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "accept failed");
                // E.g. out of file descriptors: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("microcert_http_connections_refused_total").increment(1);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        );
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let header_timeout = bounds.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                Some(acceptor) => {
                    let handshake = header_timeout.max(Duration::from_secs(1));
                    let stream = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
            }
        });
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    Ok(())
}

/// How long requests in flight may take to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

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
        sd_notify("STOPPING=1");
        let _ = tx.send(true);
    });
    rx
}

/// The CoAP side of a server: the device service, its limits (give the
/// router's [`crate::http::HttpState`] the same, so both bindings share
/// one budget) and the number of workers.
#[derive(Clone)]
pub struct CoapSetup {
    /// The device service.
    pub svc: Arc<dyn DeviceService>,
    /// Limits of unauthenticated work.
    pub limits: Arc<Limits>,
    /// CoAP worker tasks.
    pub workers: usize,
}

impl std::fmt::Debug for CoapSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoapSetup")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// Serves HTTP (`router`; over TLS when `tls` is given) and CoAP until
/// `shutdown` turns true. An operator listener, if any, serves the same
/// router.
pub async fn serve_limited(
    listeners: Listeners,
    router: Router,
    coap: CoapSetup,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let operator = listeners.operator.is_some().then(|| router.clone());
    serve_split(listeners, (router, operator), coap, tls, shutdown).await
}

/// Serves the device router on the HTTP listener, the operator router on
/// the operator listener (both when given), and CoAP, until `shutdown`
/// turns true.
pub async fn serve_split(
    listeners: Listeners,
    (device_router, operator_router): (Router, Option<Router>),
    CoapSetup {
        svc,
        limits,
        workers: coap_workers,
    }: CoapSetup,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let c = limits.config();
    let bounds = HttpBounds {
        header_timeout: Duration::from_millis(c.http_header_timeout_ms.max(1)),
        max_connections: c.http_max_connections,
    };
    let http = serve_http(
        listeners.http,
        tls.clone(),
        device_router,
        bounds,
        shutdown.clone(),
    );
    let operator = async {
        match (listeners.operator, operator_router) {
            (Some(l), Some(r)) => serve_http(l, tls, r, bounds, shutdown.clone()).await,
            _ => Ok(()),
        }
    };
    let coap = crate::coap::serve_limited(
        listeners.coap,
        svc,
        limits.clone(),
        coap_workers,
        shutdown.clone(),
    );
    let (h, o, c) = tokio::join!(http, operator, coap);
    h?;
    o?;
    c
}

/// Tells systemd the service's state (`READY=1`, `STOPPING=1`) when it
/// started the process with `Type=notify` (the `NOTIFY_SOCKET` datagram
/// socket, a path or an abstract name written `@name`); does nothing
/// otherwise. Returns whether a notification was sent. A failure is
/// logged, never fatal: the service runs the same without systemd.
pub fn sd_notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    match notify_to(&socket, state) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot notify systemd");
            false
        }
    }
}

#[cfg(unix)]
fn notify_to(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = socket.as_bytes();
    let addr = match bytes.split_first() {
        #[cfg(target_os = "linux")]
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name)?
        }
        Some((b'/', _)) => SocketAddr::from_pathname(std::path::Path::new(socket))?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither a path nor an abstract name",
            ));
        }
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(not(unix))]
fn notify_to(_socket: &std::ffi::OsStr, _state: &str) -> std::io::Result<()> {
    Ok(())
}
