//! `microcert_server::app`: the assembled server serves the device and
//! operator routes on the listeners it is given, runs the scheduler (an
//! automatic backup after a change) and stops on shutdown; bad TLS files
//! are refused before anything is bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use microcert_center::{Center, CenterConfig, SoftwareCard};
use microcert_core::DeviceId;
use microcert_server::app::{App, Schedule, Settings};
use microcert_server::run::Listeners;
use microcert_server::service::now;
use microcert_server::tokens::TokenStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn app(
    dir: &std::path::Path,
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> std::io::Result<App> {
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = Arc::new(
        Center::open_sqlite(&dir.join("center.db"), card, CenterConfig::default()).unwrap(),
    );
    center
        .register_device(DeviceId::from_u64(7), 1, None, 0, "test", now())
        .unwrap();
    let tokens = Arc::new(TokenStore::new(center.clone()));
    let mut schedule = Schedule::for_data_dir(dir);
    schedule.backup_interval_secs = 0;
    App::new(
        center,
        tokens,
        Settings {
            coap_workers: 1,
            limits: Default::default(),
            tls,
            schedule,
            access_log: false,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_serves_schedules_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path(), None).unwrap();
    assert!(!app.is_tls());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let listeners = Listeners::bind(any, any).await.unwrap();
    let (h, _) = listeners.addrs().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(app.run(listeners, rx));

    let r = get(h, "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // The operator routes are mounted, behind their tokens.
    let r = get(h, "/v1/devices").await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");

    // The scheduler's first backup tick backs up the change.
    let backups = dir.path().join("backups");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&backups).map_or(0, |d| d.count()) == 0 {
        assert!(Instant::now() < deadline, "no automatic backup");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("stops on shutdown")
        .unwrap()
        .unwrap();
}

#[test]
fn missing_tls_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.pem");
    assert!(app(dir.path(), Some((missing.clone(), missing))).is_err());
}
