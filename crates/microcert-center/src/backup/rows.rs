//! The backup file's lines as typed records (serde), and the database rows
//! they carry. Byte strings are lower-case hex; the field names are the
//! file format (`docs/architecture.md`, backups): never rename one.

use microcert_core::{DeviceId, KeyState, Suite};
use serde::{Deserialize, Serialize};

use crate::card::EnrollVia;
use crate::db::{
    AuditRecord, Blob, CommandRow, DeviceRow, DigestShard, KeyringRow, NewAudit, NotaryRow,
    SeedRow, SeedTimes,
};

/// The first line: what the file is, when it was made, and by which card.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct HeaderLine {
    pub format: String,
    pub version: u64,
    pub created: u64,
    pub card: String,
}

/// The last line: the card's MAC over every line before it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct MacLine {
    pub mac: String,
}

/// One line between the header and the MAC, by its `t`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub(super) enum Line {
    Device(DeviceLine),
    Seed(SeedLine),
    Shard(ShardLine),
    Command(CommandLine),
    Notary(NotaryLine),
    Keyring(KeyringLine),
    Audit(AuditLine),
    End(EndLine),
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct DeviceLine {
    id: String,
    class: u8,
    suite: u8,
    epoch: u8,
    transport_open: bool,
    created: u64,
    highest_generation: Option<u8>,
    command_counter: u32,
    tag: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SeedLine {
    device: String,
    generation: u8,
    state: String,
    base_year: u16,
    suite: u8,
    kstore_version: u32,
    ciphertext: Option<String>,
    tag: String,
    via: String,
    enroll_t: u32,
    enroll_r: u64,
    enroll_digest: String,
    receipt: String,
    #[serde(flatten)]
    times: SeedTimes,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ShardLine {
    shard: u8,
    acc: String,
    count: u64,
    seq: u64,
    tag: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CommandLine {
    device: String,
    counter: u32,
    opcode: u8,
    generation: u8,
    r: u64,
    bytes: String,
    created: u64,
    answered_at: Option<u64>,
    status: Option<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct NotaryLine {
    device: String,
    generation: u8,
    /// The message's t (`t` is the line's kind).
    #[serde(rename = "t_")]
    time: u32,
    r: u64,
    digest: String,
    tag: String,
    first_seen: u64,
    /// Backups of version 1 have none: the restore seals every record
    /// again (the backup's MAC vouches for it).
    #[serde(default)]
    seal: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct KeyringLine {
    version: u32,
    bytes: String,
    tag: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct AuditLine {
    seq: u64,
    time: u64,
    actor: String,
    action: String,
    device: Option<String>,
    generation: Option<u8>,
    reason: String,
    prev_hash: String,
    hash: String,
}

/// The counts and the anchor mark of the backup (read for completeness:
/// a file without its end line was cut short).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct EndLine {
    pub devices: u64,
    pub seeds: u64,
    pub shards: u64,
    pub commands: u64,
    pub notary: u64,
    pub audit: u64,
    pub kstore_versions: Vec<u32>,
    pub mark: MarkLine,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct MarkLine {
    pub shard_seq: Vec<u64>,
    pub audit_seq: u64,
    pub audit_hash: String,
}

fn h32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

fn hdev(s: &str) -> Option<DeviceId> {
    Some(DeviceId(hex::decode(s).ok()?.try_into().ok()?))
}

fn hvec(s: &str) -> Option<Vec<u8>> {
    hex::decode(s).ok()
}

impl From<&DeviceRow> for DeviceLine {
    fn from(d: &DeviceRow) -> Self {
        DeviceLine {
            id: hex::encode(d.id.0),
            class: d.class,
            suite: d.suite.id(),
            epoch: d.epoch,
            transport_open: d.transport_open,
            created: d.created,
            highest_generation: d.highest_generation,
            command_counter: d.command_counter,
            tag: hex::encode(d.tag),
        }
    }
}

impl DeviceLine {
    pub(super) fn row(&self) -> Option<DeviceRow> {
        Some(DeviceRow {
            id: hdev(&self.id)?,
            class: self.class,
            suite: Suite::new(self.suite).ok()?,
            epoch: self.epoch,
            transport_open: self.transport_open,
            created: self.created,
            highest_generation: self.highest_generation,
            command_counter: self.command_counter,
            tag: h32(&self.tag)?,
        })
    }
}

impl From<&SeedRow> for SeedLine {
    fn from(s: &SeedRow) -> Self {
        SeedLine {
            device: hex::encode(s.device.0),
            generation: s.generation,
            state: s.state.name().to_string(),
            base_year: s.base_year,
            suite: s.suite.id(),
            kstore_version: s.kstore_version,
            ciphertext: s.ciphertext.as_ref().map(|c| hex::encode(&c.0)),
            tag: hex::encode(s.tag),
            via: s.via.name().to_string(),
            enroll_t: s.enroll_t,
            enroll_r: s.enroll_r,
            enroll_digest: hex::encode(s.enroll_digest),
            receipt: hex::encode(&s.receipt.0),
            times: SeedTimes::of(s),
        }
    }
}

impl SeedLine {
    pub(super) fn row(&self) -> Option<SeedRow> {
        let mut row = SeedRow {
            device: hdev(&self.device)?,
            generation: self.generation,
            state: KeyState::from_name(&self.state)?,
            base_year: self.base_year,
            suite: Suite::new(self.suite).ok()?,
            kstore_version: self.kstore_version,
            ciphertext: match &self.ciphertext {
                None => None,
                Some(c) => Some(Blob(hvec(c)?)),
            },
            tag: h32(&self.tag)?,
            via: EnrollVia::from_name(&self.via)?,
            enroll_t: self.enroll_t,
            enroll_r: self.enroll_r,
            enroll_digest: h32(&self.enroll_digest)?,
            receipt: Blob(hvec(&self.receipt)?),
            created: 0,
            activated_at: None,
            suspended_at: None,
            deactivated_at: None,
            compromised_at: None,
            destroyed_at: None,
            grace_until: None,
        };
        self.times.set(&mut row);
        Some(row)
    }
}

impl From<&DigestShard> for ShardLine {
    fn from(s: &DigestShard) -> Self {
        ShardLine {
            shard: s.shard,
            acc: hex::encode(s.acc),
            count: s.count,
            seq: s.seq,
            tag: hex::encode(s.tag),
        }
    }
}

impl ShardLine {
    pub(super) fn row(&self) -> Option<DigestShard> {
        Some(DigestShard {
            shard: self.shard,
            acc: h32(&self.acc)?,
            count: self.count,
            seq: self.seq,
            tag: h32(&self.tag)?,
        })
    }
}

impl From<&CommandRow> for CommandLine {
    fn from(c: &CommandRow) -> Self {
        CommandLine {
            device: hex::encode(c.device.0),
            counter: c.counter,
            opcode: c.opcode,
            generation: c.generation,
            r: c.r,
            bytes: hex::encode(&c.bytes.0),
            created: c.created,
            answered_at: c.answered_at,
            status: c.status,
        }
    }
}

impl CommandLine {
    pub(super) fn row(&self) -> Option<CommandRow> {
        Some(CommandRow {
            device: hdev(&self.device)?,
            counter: self.counter,
            opcode: self.opcode,
            generation: self.generation,
            r: self.r,
            bytes: Blob(hvec(&self.bytes)?),
            created: self.created,
            answered_at: self.answered_at,
            status: self.status,
        })
    }
}

impl From<&NotaryRow> for NotaryLine {
    fn from(n: &NotaryRow) -> Self {
        NotaryLine {
            device: hex::encode(n.device.0),
            generation: n.generation,
            time: n.t,
            r: n.r,
            digest: hex::encode(n.digest),
            tag: hex::encode(&n.tag),
            first_seen: n.first_seen,
            seal: n.seal.map(hex::encode),
        }
    }
}

impl NotaryLine {
    pub(super) fn row(&self) -> Option<NotaryRow> {
        Some(NotaryRow {
            device: hdev(&self.device)?,
            generation: self.generation,
            t: self.time,
            r: self.r,
            digest: h32(&self.digest)?,
            tag: hvec(&self.tag)?,
            first_seen: self.first_seen,
            seal: match &self.seal {
                None => None,
                Some(x) => Some(h32(x)?),
            },
        })
    }
}

impl From<&KeyringRow> for KeyringLine {
    fn from(k: &KeyringRow) -> Self {
        KeyringLine {
            version: k.version,
            bytes: hex::encode(&k.bytes),
            tag: hex::encode(&k.tag),
        }
    }
}

impl KeyringLine {
    pub(super) fn row(&self) -> Option<KeyringRow> {
        Some(KeyringRow {
            version: self.version,
            bytes: hvec(&self.bytes)?,
            tag: hvec(&self.tag)?,
        })
    }
}

impl From<&AuditRecord> for AuditLine {
    fn from(r: &AuditRecord) -> Self {
        AuditLine {
            seq: r.seq,
            time: r.entry.time,
            actor: r.entry.actor.clone(),
            action: r.entry.action.clone(),
            device: r.entry.device.map(|d| d.to_string()),
            generation: r.entry.generation,
            reason: r.entry.reason.clone(),
            prev_hash: hex::encode(r.prev_hash),
            hash: hex::encode(r.hash),
        }
    }
}

impl AuditLine {
    pub(super) fn row(&self) -> Option<AuditRecord> {
        Some(AuditRecord {
            seq: self.seq,
            entry: NewAudit {
                time: self.time,
                actor: self.actor.clone(),
                action: self.action.clone(),
                device: match &self.device {
                    None => None,
                    Some(d) => Some(DeviceId::from_u64(u64::from_str_radix(d, 16).ok()?)),
                },
                generation: self.generation,
                reason: self.reason.clone(),
            },
            prev_hash: h32(&self.prev_hash)?,
            hash: h32(&self.hash)?,
        })
    }
}
