//! Packaging (issue 15 item 6): shell completions and man pages generated
//! from the command line, the LICENSE the manifests name, and the
//! container's entry point run as a process (no container runtime needed):
//! first start makes the card in the volume and serves; a second start
//! keeps it; a command runs instead of `serve`; no passphrase is a clear
//! error.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{bin, stderr, stdout};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn bash_completions_parse_and_name_every_command() {
    let out = bin().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    for word in [
        "serve",
        "rotate-storage-key",
        "token",
        "completions",
        "--passphrase-file",
    ] {
        assert!(script.contains(word), "completion lacks {word}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("microcert.bash");
    std::fs::write(&path, &script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(check.status.success(), "bash -n: {}", stderr(&check));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let o = bin().args(["completions", shell]).output().unwrap();
        assert!(o.status.success() && !o.stdout.is_empty(), "{shell}");
    }
    let bad = bin().args(["completions", "tcsh"]).output().unwrap();
    assert!(!bad.status.success());
}

#[test]
fn man_pages_cover_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin().arg("man").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "microcert.1",
        "microcert-serve.1",
        "microcert-card-rotate-storage-key.1",
        "microcert-token-create.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is not roff"
        );
        assert!(text.contains(".SH NAME"), "{page} has no NAME section");
    }
    let serve = std::fs::read_to_string(dir.path().join("microcert-serve.1")).unwrap();
    assert!(
        serve.contains("passphrase"),
        "serve's options are documented"
    );
}

#[test]
fn the_license_file_is_the_one_the_manifests_name() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"Apache-2.0\""));
    let license = std::fs::read_to_string(root().join("LICENSE")).unwrap();
    assert!(license.contains("Apache License"));
    assert!(license.contains("Version 2.0, January 2004"));
    assert!(license.contains("END OF TERMS AND CONDITIONS"));
}

fn entrypoint(data: &Path, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg(root().join("deploy/docker-entrypoint.sh"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MICROCERT_BIN", env!("CARGO_BIN_EXE_microcert"))
        .env("MICROCERT_DATA", data)
        .env("MICROCERT_HTTP", "127.0.0.1:0")
        .env("MICROCERT_COAP", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    cmd
}

/// Starts the entry point with no command (serve), returns the child and
/// its HTTP address from the "microcert serving http=..." line.
fn start(data: &Path, env: &[(&str, &str)]) -> (Child, String) {
    let mut child = entrypoint(data, env, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let http = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap_or_else(|| panic!("no http= in {line:?}"))
        .to_owned();
    (child, http)
}

fn get_status(addr: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn terminate(mut child: Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("the center did not stop on SIGTERM within 15 s");
}

#[test]
fn the_container_entry_point_makes_the_card_once_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("volume");
    // A secret's path with a space (a mounted secret's name is the
    // operator's): passed to the binary as one argument.
    let secret = dir.path().join("card passphrase");
    std::fs::write(&secret, "a container secret passphrase\n").unwrap();
    let env = [("MICROCERT_PASSPHRASE_FILE", secret.to_str().unwrap())];

    // No passphrase at all: a clear error, nothing made.
    let out = entrypoint(&data, &[], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("MICROCERT_PASSPHRASE_FILE"));
    assert!(!data.join("card.mccard").exists());

    // First start: the card is made in the volume, the center serves, and
    // SIGTERM (what `docker stop` sends to the entry point's exec'd
    // process) stops it cleanly.
    let (child, http) = start(&data, &env);
    assert!(data.join("card.mccard").exists());
    assert_eq!(get_status(&http, "/v1/openapi.json"), 200);
    let card = std::fs::read(data.join("card.mccard")).unwrap();
    assert!(terminate(child).success());

    // A command instead of serve, on the same volume: the card is kept.
    let out = entrypoint(
        &data,
        &env,
        &[
            "token",
            "create",
            "--role",
            "operator",
            "--name",
            "ops",
            "--passphrase-file",
            secret.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).trim().is_empty(), "a token is printed");
    assert_eq!(std::fs::read(data.join("card.mccard")).unwrap(), card);

    // Second start: the same card opens.
    let (child, http) = start(&data, &env);
    assert_eq!(get_status(&http, "/v1/openapi.json"), 200);
    assert_eq!(std::fs::read(data.join("card.mccard")).unwrap(), card);
    assert!(terminate(child).success());
}

#[test]
fn the_packaging_files_are_there() {
    let docker = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(docker.matches("FROM ").count() >= 2, "multi-stage");
    assert!(docker.contains("USER microcert"), "non-root");
    assert!(docker.contains("VOLUME"), "data volume");
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    for s in ["postgres", "center-a:", "center-b:"] {
        assert!(compose.contains(s), "compose lacks {s}");
    }
    let unit = std::fs::read_to_string(root().join("deploy/microcert.service")).unwrap();
    for s in [
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "User=microcert",
    ] {
        assert!(unit.contains(s), "unit lacks {s}");
    }
}

/// systemd's `Type=notify` (deploy/microcert.service): `READY=1` once the
/// center serves, `STOPPING=1` when SIGTERM starts the clean shutdown, on
/// the datagram socket named by NOTIFY_SOCKET.
#[test]
fn serve_notifies_systemd_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    harness::run(&["card", "init", "--data", data.to_str().unwrap()]);
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let server = harness::Server::start_with(
        &data,
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(
        get_status(server.http.trim_start_matches("http://"), "/healthz"),
        200
    );
    server.stop();
    let n = sock.recv(&mut buf).expect("STOPPING=1 at SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1");
}
