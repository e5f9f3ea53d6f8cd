//! Issue 12, bounded unauthenticated work (center side): a garbage ENROLL
//! or an unauthenticated read of the command outbox neither invalidates the
//! device's cache entry nor takes the database's write lock. Measured on
//! the cache (`Center::cached_devices`) and with a second connection
//! holding the SQLite file's write lock (`BEGIN IMMEDIATE`) while the
//! request is served: it must be answered at once, not after the busy
//! timeout.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use microcert_center::{Center, CenterConfig, Error, SoftwareCard, SqliteOptions};
use microcert_core::{Audience, HEADER_LEN};

const C: Audience = Audience::CENTER;
const BUSY: Duration = Duration::from_secs(3);

struct Fx {
    dir: tempfile::TempDir,
    center: Center,
    fleet: Vec<TestNode>,
}

fn setup(n: u64) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let options = SqliteOptions {
        busy_timeout: BUSY,
        ..SqliteOptions::default()
    };
    let center =
        Center::open_sqlite_with(&path, options, card.clone(), CenterConfig::default()).unwrap();
    let mut fleet = make_fleet(&*card, n);
    let batch = dir.path().join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW);
        center.verify_auth(&a, &C, NOW).unwrap();
    }
    Fx { dir, center, fleet }
}

/// Garbage ENROLLs for a known device: a valid header and random bytes,
/// and a well-formed ENROLL whose tag was flipped.
fn garbage_enrolls(node: &mut TestNode, t: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    // Generation 1, the next one, so the ENROLL gets as far as its MAC.
    let mut good = node.enroll_transport(t);
    good[10] = 1;
    let mut random = good.clone();
    let mut x = 0x1234_5678_9abc_def0u64;
    for b in random[HEADER_LEN..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    out.push(random);
    let last = good.len() - 1;
    good[last] ^= 0x40;
    out.push(good);
    // Valid bytes of another ENROLL with the generation changed.
    let mut next = node.enroll_transport(t + 1);
    next[10] = 1;
    out.push(next);
    out
}

#[test]
fn garbage_enroll_keeps_the_cache_entry() {
    let Fx {
        center, mut fleet, ..
    } = setup(4);
    assert_eq!(center.cached_devices(), 4);
    for e in garbage_enrolls(&mut fleet[1], NOW + 10) {
        let r = center.enroll(&e, NOW + 10);
        assert!(r.is_err(), "garbage accepted");
        assert_eq!(
            center.cached_devices(),
            4,
            "a garbage ENROLL ({:?}) dropped the device from the cache",
            r.err()
        );
    }
    // So does an unauthenticated read of the outbox.
    assert_eq!(center.command(fleet[1].id).unwrap(), None);
    assert_eq!(center.cached_devices(), 4);
}

#[test]
fn garbage_enroll_and_command_read_take_no_write_lock() {
    let Fx {
        dir,
        center,
        mut fleet,
    } = setup(2);
    // A pending command, so a forged RECEIPT gets as far as its MAC.
    center
        .queue_update(fleet[0].id, "operator:ann", "roll-out", NOW + 5)
        .unwrap();
    let cmd = center.command(fleet[0].id).unwrap().unwrap();
    let cmd = microcert_core::Command::decode(&cmd).unwrap();
    let forged = {
        let h = microcert_core::Header {
            suite: fleet[0].suite,
            device: fleet[0].id,
            generation: cmd.header.generation,
            t: (NOW + 10) as u32,
            r: 7,
        };
        let wrong = test_seed(fleet[0].id, 9, 2026);
        let mut out = vec![0u8; 64];
        let n = microcert_core::make_receipt(
            &wrong,
            &h,
            microcert_core::Sender::Node,
            cmd.header.r,
            0,
            &mut out,
        )
        .unwrap();
        out.truncate(n);
        out
    };
    let other = rusqlite::Connection::open(dir.path().join("c.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    for e in garbage_enrolls(&mut fleet[0], NOW + 10) {
        let start = Instant::now();
        let r = center.enroll(&e, NOW + 10);
        let took = start.elapsed();
        assert!(matches!(r, Err(Error::Verification)), "{r:?}");
        assert!(took < BUSY / 3, "waited {took:?} for the write lock");
    }
    let start = Instant::now();
    assert!(matches!(
        center.accept_receipt(&forged, NOW + 10),
        Err(Error::Verification)
    ));
    assert!(
        start.elapsed() < BUSY / 3,
        "a forged RECEIPT waited for the write lock"
    );
    let start = Instant::now();
    assert_eq!(center.command(fleet[1].id).unwrap(), None);
    assert!(center.command(fleet[0].id).unwrap().is_some());
    assert!(
        start.elapsed() < BUSY / 3,
        "GET /command waited for the write lock"
    );
    other.execute_batch("ROLLBACK").unwrap();
    // Honest traffic still works after the lock is released.
    let (a, _) = fleet[0].auth(&C, NOW + 20);
    center.verify_auth(&a, &C, NOW + 20).unwrap();
}

/// The card's HMAC (record and digest tags) runs on SHA-256 cores and
/// block buffers that wipe themselves on drop (the `zeroize` features of
/// `sha2` and `hmac`): this does not compile without them.
#[test]
fn hmac_state_zeroizes_on_drop() {
    fn wipes_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    wipes_on_drop::<sha2::block_api::Sha256VarCore>();
    wipes_on_drop::<sha2::Sha256>();
}
