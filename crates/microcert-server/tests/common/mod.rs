// Shared by several test binaries; each uses a part of it.
#![allow(dead_code)]

//! A center with a software card and a real SQLite file, served on
//! ephemeral loopback ports inside the test process.

use std::net::SocketAddr;
use std::sync::Arc;

use microcert_center::{Center, CenterConfig, SoftwareCard};
use microcert_server::api::DeviceService;
use microcert_server::http::{HttpState, device_routes};
use microcert_server::limits::Limits;
use microcert_server::operator::{self, OperatorState};
use microcert_server::run::{CoapSetup, Listeners, serve_limited};
use microcert_server::service::CenterService;
use microcert_server::tokens::TokenStore;
use tokio::sync::watch;

#[derive(Debug)]
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub center: Arc<Center>,
    pub http: SocketAddr,
    pub coap: SocketAddr,
    pub limits: Arc<Limits>,
    pub tokens: Arc<TokenStore>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let card = Arc::new(SoftwareCard::ephemeral().unwrap());
        let center = Arc::new(
            Center::open_sqlite(&dir.path().join("center.db"), card, CenterConfig::default())
                .unwrap(),
        );
        let tokens = Arc::new(TokenStore::new(center.clone()));
        let svc: Arc<dyn DeviceService> = Arc::new(CenterService::new(center.clone()));
        let limits = Arc::new(limits);
        let router = device_routes(HttpState {
            svc: svc.clone(),
            tokens: tokens.clone(),
            limits: limits.clone(),
        })
        .merge(operator::routes(OperatorState {
            center: center.clone(),
            tokens: tokens.clone(),
            // A recorder that is not installed globally: it renders
            // nothing, but the route is served as in production.
            metrics: Some(
                metrics_exporter_prometheus::PrometheusBuilder::new()
                    .build_recorder()
                    .handle(),
            ),
            maintenance: Some(microcert_server::operator::MaintenancePaths {
                backups: dir.path().join("backups"),
                keep: 3,
                anchor: dir.path().join("center.anchor"),
            }),
            health: None,
        }));
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listeners = Listeners::bind(any, any).await.unwrap();
        let (http, coap) = listeners.addrs().unwrap();
        let (stop, rx) = watch::channel(false);
        let setup = CoapSetup {
            svc,
            limits: limits.clone(),
            workers: 2,
        };
        let task = tokio::spawn(serve_limited(listeners, router, setup, None, rx));
        TestServer {
            dir,
            center,
            http,
            coap,
            limits,
            tokens,
            stop,
            task,
        }
    }

    pub async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }
}
