//! Audit entries of what is not a change of a record (issue 15 item 5):
//! the second audit sink, entries written for the front ends (failed
//! operator authentications, card exports), and every SEALED opened for
//! a relying party.

use std::sync::Arc;

use crate::audit::AuditSink;
use crate::db::{NewAudit, with_tx};
use crate::{Center, Error, OpenedSealed, Result};
use microcert_core::Audience;

impl Center {
    /// Sets the second audit sink (`[audit] file` / `syslog`): from now
    /// on every audit entry is recorded there before its transaction
    /// commits, and a change whose entry it cannot record is refused
    /// ([`Error::AuditSink`]). Once per center.
    pub fn set_audit_sink(&self, sink: Arc<dyn AuditSink>) -> Result<()> {
        let shown = sink.describe();
        if self.database().set_audit_sink(sink) {
            tracing::info!(sink = %shown, "audit entries are also recorded in a second sink");
            Ok(())
        } else {
            Err(Error::AuditSink(format!(
                "{shown}: this center's database already has an audit sink (or keeps none)"
            )))
        }
    }

    /// Appends `entries` to the audit log in one transaction (through the
    /// card-tagged head and the sink, like every other entry): for what
    /// the front ends do that changes no record (failed operator
    /// authentications, `card clone`, `split`, `recover`).
    pub fn record_audit(&self, entries: &[NewAudit]) -> Result<()> {
        let card = self.card();
        with_tx(self.database(), |tx| {
            crate::audit::append_many(tx, card, entries)
        })
    }

    /// Opens a SEALED message for the relying party `name` (its audience
    /// is derived from the name, [`Audience::relying_party`]) and audits
    /// the decryption (actor: the name; the device, the generation and the
    /// plaintext's length, never the plaintext) before the plaintext is
    /// handed out: an entry that cannot be written refuses the opening
    /// (the message stays spent: its replay record is committed first).
    pub fn open_sealed_audited(&self, bytes: &[u8], name: &str, now: u64) -> Result<OpenedSealed> {
        let opened = self.open_sealed(bytes, &Audience::relying_party(name), now)?;
        self.record_audit(&[NewAudit::new(now, name, "open")
            .on(Some(opened.device), Some(opened.generation))
            .because(format!(
                "SEALED of t={} opened for the relying party: {} byte(s) of plaintext",
                opened.time,
                opened.plaintext.len()
            ))])?;
        Ok(opened)
    }
}
