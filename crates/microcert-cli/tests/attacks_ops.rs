//! The real binary run like a production service (issue 15, items 2 and
//! 3): logs without ANSI escapes when stderr is a file, a request id in
//! every log line of a request and an access log, a loud warning for plain
//! HTTP off loopback, the operator listener apart from the device one, and
//! `MICROCERT_SERVER` / `MICROCERT_TOKEN` honoured by operator commands,
//! `simulate` and `bench`.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use harness::*;

/// `microcert serve` with stderr into `log`; the fields of its first
/// stdout line ("microcert serving http=... coap=... [operator=...]").
fn serve_logged(data: &std::path::Path, extra: &[&str], log: &std::path::Path) -> (Child, String) {
    let mut child = bin()
        .args(["serve", "--data"])
        .arg(data)
        .args(["--coap", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

fn field(line: &str, name: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        .to_owned()
}

fn stop(mut child: Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `serve 2> file` wrote ANSI colour codes into the file (issue 15); now
/// the log has none, every line of a request carries its id, and the
/// access log names the route and the status, never the token.
#[test]
fn logs_to_a_file_have_no_escape_codes_and_carry_request_ids() {
    let setup = Setup::new(1);
    let log = setup.dir.path().join("serve.log");
    let (child, line) = serve_logged(
        &setup.data(),
        &["--http", "127.0.0.1:0", "--access-log"],
        &log,
    );
    let http = field(&line, "http=");
    let r = get(&http, "/healthz");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let id = r
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-request-id: ")
                .map(str::to_owned)
        })
        .expect("a request id header");
    // A request with a token: the access log must not show it.
    let mut s = TcpStream::connect(http.parse::<SocketAddr>().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /v1/devices HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        setup.operator
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    stop(child);
    let bytes = std::fs::read(&log).unwrap();
    assert!(!bytes.is_empty(), "nothing logged");
    assert!(
        !bytes.contains(&0x1b),
        "an ESC byte in the log file:\n{}",
        String::from_utf8_lossy(&bytes)
    );
    let text = String::from_utf8_lossy(&bytes);
    let access: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("microcert::access"))
        .collect();
    assert!(
        access.iter().any(|l| l.contains(&format!("id={id}"))
            && l.contains("route=/healthz")
            && l.contains("status=200")),
        "no access line for request {id}:\n{text}"
    );
    assert!(
        access.iter().any(|l| l.contains("route=/v1/devices")),
        "{text}"
    );
    assert!(
        !text.contains(setup.operator.trim()),
        "the token is in the log"
    );
}

/// A non-loopback listener serving plain HTTP is announced loudly on
/// stderr (bearer tokens would cross the network in clear).
#[test]
fn plain_http_off_loopback_is_warned_about() {
    let setup = Setup::new(1);
    let log = setup.dir.path().join("serve.log");
    let (child, line) = serve_logged(&setup.data(), &["--http", "0.0.0.0:0"], &log);
    assert!(line.contains("http="), "{line}");
    stop(child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("WARNING") && text.contains("plain HTTP on a non-loopback address"),
        "{text}"
    );
    // On loopback: no warning.
    let log2 = setup.dir.path().join("serve2.log");
    let (child, _) = serve_logged(&setup.data(), &["--http", "127.0.0.1:0"], &log2);
    stop(child);
    let text = std::fs::read_to_string(&log2).unwrap();
    assert!(!text.contains("plain HTTP on a non-loopback"), "{text}");
}

/// `--operator-http`: the operator API is on its own listener, the device
/// listener does not serve it; `MICROCERT_SERVER` and `MICROCERT_TOKEN`
/// stand for `--server` and `--token` (operator commands), and
/// `MICROCERT_SERVER` for `simulate` and `bench`.
#[test]
fn operator_listener_and_environment_for_operator_commands() {
    let setup = Setup::new(2);
    let log = setup.dir.path().join("serve.log");
    let (child, line) = serve_logged(
        &setup.data(),
        &["--http", "127.0.0.1:0", "--operator-http", "127.0.0.1:0"],
        &log,
    );
    let dev = format!("http://{}", field(&line, "http="));
    let op = format!("http://{}", field(&line, "operator="));
    let token = setup.operator.trim().to_owned();
    let env = |server: &str| {
        vec![
            ("MICROCERT_SERVER", server.to_owned()),
            ("MICROCERT_TOKEN", token.clone()),
        ]
    };
    let list = |server: &str| {
        let e = env(server);
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        bin()
            .args(["device", "list", "--json"])
            .envs(e.iter().copied())
            .output()
            .unwrap()
    };
    let o = list(&op);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = list(&dev);
    assert!(
        !o.status.success(),
        "the device listener served the operator API"
    );

    // simulate and bench take the server from the environment.
    let chips = setup.chips();
    let state = setup.state();
    let o = bin()
        .args([
            "simulate",
            "--state",
            state.to_str().unwrap(),
            "--transport",
            "http",
            "--chips",
            chips.to_str().unwrap(),
            "--rounds",
            "1",
            "--duration",
            "5",
            "--concurrency",
            "2",
            "--json",
        ])
        .env("MICROCERT_SERVER", &dev)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let o = bin()
        .args([
            "bench",
            "--state",
            state.to_str().unwrap(),
            "--transport",
            "http",
            "--chips",
            chips.to_str().unwrap(),
            "--duration",
            "1",
            "--concurrency",
            "1",
            "--json",
        ])
        .env("MICROCERT_SERVER", &dev)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(v["accepted"].as_u64().unwrap() > 0, "{v}");
    stop(child);
}
