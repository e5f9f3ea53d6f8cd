//! Audit completeness (issue 15 item 5): every SEALED opened for a
//! relying party is audited (who, which device, how much; never the
//! plaintext), and a configured second audit sink that cannot record an
//! entry refuses the change, which then changes nothing.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use microcert_center::audit::{AuditSink, FileSink};
use microcert_center::db::NewAudit;
use microcert_center::{Center, Error, SoftwareCard};
use microcert_core::{Audience, KeyState};

const C: Audience = Audience::CENTER;

/// A center with `n` imported devices whose first seed is active (each
/// did one AUTH); the nodes.
fn setup(backend: Backend, dir: &Path, n: u64) -> (Center, Vec<TestNode>) {
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = open_center(&backend.location(dir, "audit_events.db"), card.clone());
    let mut fleet = make_fleet(&*card, n);
    let batch = dir.join("b.jsonl");
    write_batch(&batch, &mut fleet, NOW);
    let r = center
        .import_batch(&batch, "factory", NOW, &mut |_| {})
        .unwrap();
    assert_eq!(r.enrolled, n);
    for node in fleet.iter_mut() {
        let (a, _) = node.auth(&C, NOW + 1);
        center.verify_auth(&a, &C, NOW + 1).unwrap();
    }
    (center, fleet)
}

fn entries(center: &Center, action: &str) -> Vec<microcert_center::db::AuditRecord> {
    center
        .audit_log(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.action == action)
        .collect()
}

fn state_of(center: &Center, node: &TestNode) -> KeyState {
    center.device(node.id).unwrap().unwrap().seeds[0].state
}

/// Attack: a relying party's token (or one stolen from it) decrypts
/// device data through `/v1/open` and no trace is left. Defence: every
/// opening is an audit entry (actor = the relying party, device,
/// generation, plaintext length), written before the plaintext is handed
/// out. The plaintext itself is never in the log.
fn every_opening_is_audited_without_its_plaintext(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (center, mut fleet) = setup(backend, dir.path(), 2);
    let rp = Audience::relying_party(RP);
    let secret = b"meter 4711: 21.5 kWh";
    let s = fleet[1].seal(&rp, secret, NOW + 5);
    let opened = center.open_sealed_audited(&s, RP, NOW + 5).unwrap();
    assert_eq!(&opened.plaintext[..], secret);
    let log = entries(&center, "open");
    assert_eq!(log.len(), 1, "one entry per opening");
    let e = &log[0].entry;
    assert_eq!(e.actor, RP);
    assert_eq!(e.device, Some(fleet[1].id));
    assert_eq!(e.generation, Some(0));
    assert!(
        e.reason.contains(&format!("{} byte(s)", secret.len())),
        "{}",
        e.reason
    );
    // Never the plaintext, in no form.
    for r in center.audit_log(0, 1000).unwrap() {
        let all = format!("{:?}", r.entry);
        assert!(!all.contains("4711"), "plaintext in the audit log: {all}");
        assert!(!all.contains(&hex::encode(secret)));
    }
    // A refused opening (a replay) is no opening.
    assert!(matches!(
        center.open_sealed_audited(&s, RP, NOW + 5),
        Err(Error::Replay)
    ));
    assert_eq!(entries(&center, "open").len(), 1);
    assert_eq!(center.verify_audit().unwrap().1, None);
}

/// A sink that fails once told to (a full disk, a syslog gone).
#[derive(Debug, Default)]
struct Switch {
    broken: std::sync::atomic::AtomicBool,
    lines: std::sync::Mutex<Vec<u64>>,
}

impl AuditSink for Switch {
    fn record(&self, entries: &[microcert_center::db::AuditRecord]) -> std::io::Result<()> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("disk full"));
        }
        self.lines
            .lock()
            .unwrap()
            .extend(entries.iter().map(|e| e.seq));
        Ok(())
    }
    fn describe(&self) -> String {
        "switch".into()
    }
}

/// Attack: fill the disk of the audit sink (or stop the syslog), then
/// act: the changes would be recorded only in the database the attacker
/// may control. Defence: a change whose entry the sink cannot record is
/// refused (Error::AuditSink, 503 on the operator API) and rolled back:
/// the device, the table and the head are unchanged; the same for an
/// opening (no plaintext without its entry).
fn a_sink_that_cannot_record_refuses_the_change(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (center, mut fleet) = setup(backend, dir.path(), 3);
    let path = dir.path().join("audit.jsonl");
    let sinks: Vec<Arc<dyn AuditSink>> = vec![
        Arc::new(FileSink::open(&path).unwrap()),
        Arc::new(Switch::default()),
    ];
    let switch = Arc::new(Switch::default());
    let both: Arc<dyn AuditSink> = Arc::new(microcert_center::audit::Sinks(vec![
        sinks[0].clone(),
        switch.clone(),
    ]));
    center.set_audit_sink(both).unwrap();
    assert!(matches!(
        center.set_audit_sink(sinks[1].clone()),
        Err(Error::AuditSink(_))
    ));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the audit file is private");
    }

    // Recorded: the sink's line carries the table's seq and chain hash.
    center
        .revoke(fleet[0].id, "alice", "lost", NOW + 10)
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let table = center.audit_log(0, 1000).unwrap();
    let head = table.last().unwrap();
    assert_eq!(last["seq"], head.seq);
    assert_eq!(last["hash"], hex::encode(head.hash));
    assert_eq!(last["action"], head.entry.action.as_str());
    assert!(text.lines().any(|l| l.contains(r#""action":"revoke""#)));
    assert_eq!(switch.lines.lock().unwrap().last(), Some(&head.seq));

    // The file sink's path becomes unwritable (a directory where the file
    // was: refused even for root).
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let before = center.audit_log(0, 1000).unwrap();
    let r = center.revoke(fleet[1].id, "alice", "lost", NOW + 11);
    assert!(matches!(r, Err(Error::AuditSink(_))), "{r:?}");
    assert_eq!(state_of(&center, &fleet[1]), KeyState::Active);
    assert_eq!(center.audit_log(0, 1000).unwrap(), before);
    assert_eq!(center.verify_audit().unwrap().1, None);
    assert!(matches!(
        center.record_audit(&[NewAudit {
            time: NOW,
            actor: "x".into(),
            action: "y".into(),
            device: None,
            generation: None,
            reason: String::new(),
        }]),
        Err(Error::AuditSink(_))
    ));
    std::fs::remove_dir(&path).unwrap();

    // The other sink fails: the same, and an opening gives no plaintext.
    switch
        .broken
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = center.revoke(fleet[1].id, "alice", "lost", NOW + 12);
    assert!(matches!(r, Err(Error::AuditSink(_))), "{r:?}");
    assert_eq!(state_of(&center, &fleet[1]), KeyState::Active);
    let rp = Audience::relying_party(RP);
    let s = fleet[2].seal(&rp, b"secret", NOW + 12);
    assert!(matches!(
        center.open_sealed_audited(&s, RP, NOW + 12),
        Err(Error::AuditSink(_))
    ));
    assert_eq!(center.audit_log(0, 1000).unwrap(), before);

    // Back: the change goes through, and the chain is whole.
    switch
        .broken
        .store(false, std::sync::atomic::Ordering::SeqCst);
    center
        .revoke(fleet[1].id, "alice", "lost", NOW + 13)
        .unwrap();
    assert_eq!(state_of(&center, &fleet[1]), KeyState::Compromised);
    assert_eq!(center.verify_audit().unwrap().1, None);
    let text = std::fs::read_to_string(&path).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let head = center.audit_log(0, 1000).unwrap().pop().unwrap();
    assert_eq!(line["hash"], hex::encode(head.hash));
}

both_backends!(
    every_opening_is_audited_without_its_plaintext,
    a_sink_that_cannot_record_refuses_the_change
);

/// The syslog sink: one RFC 3164 datagram per entry (facility auth,
/// severity notice) carrying the entry with its chain hash; no socket
/// listening: the sink cannot record, the change is refused.
#[cfg(unix)]
#[test]
fn the_syslog_sink_sends_one_datagram_per_entry() {
    use microcert_center::audit::SyslogSink;
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("log");
    let listener = UnixDatagram::bind(&sock).unwrap();
    listener
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let card = Arc::new(SoftwareCard::ephemeral().unwrap());
    let center = new_center(&dir.path().join("c.db"), card);
    center
        .set_audit_sink(Arc::new(SyslogSink::open(&sock).unwrap()))
        .unwrap();
    let e = NewAudit {
        time: NOW,
        actor: "alice".into(),
        action: "note".into(),
        device: None,
        generation: None,
        reason: "syslog".into(),
    };
    center.record_audit(&[e.clone(), e.clone()]).unwrap();
    let log = center.audit_log(0, 10).unwrap();
    for r in &log {
        let mut buf = [0u8; 4096];
        let n = listener.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(msg.starts_with("<37>microcert-audit: {"), "{msg}");
        assert!(msg.contains(&hex::encode(r.hash)), "{msg}");
    }
    // The daemon goes away: refused, nothing appended.
    drop(listener);
    std::fs::remove_file(&sock).unwrap();
    assert!(matches!(
        center.record_audit(&[e]),
        Err(Error::AuditSink(_))
    ));
    assert_eq!(center.audit_log(0, 10).unwrap().len(), log.len());
}
