//! The backup file's rows as JSON and back.

use microcert_core::{DeviceId, KeyState, Suite};
use serde_json::{Value, json};

use crate::card::EnrollVia;
use crate::db::{
    AuditRecord, Blob, CommandRow, DeviceRow, DigestShard, NewAudit, NotaryRow, SeedRow,
};

pub(super) fn device_json(d: &DeviceRow) -> Value {
    json!({"t": "device", "id": hex::encode(d.id.0), "class": d.class, "suite": d.suite.id(),
        "epoch": d.epoch, "transport_open": d.transport_open, "created": d.created,
        "highest_generation": d.highest_generation, "command_counter": d.command_counter,
        "tag": hex::encode(d.tag)})
}

pub(super) fn seed_json(s: &SeedRow) -> Value {
    json!({"t": "seed", "device": hex::encode(s.device.0), "generation": s.generation,
        "state": s.state.name(), "base_year": s.base_year, "suite": s.suite.id(),
        "kstore_version": s.kstore_version,
        "ciphertext": s.ciphertext.as_ref().map(|c| hex::encode(&c.0)),
        "tag": hex::encode(s.tag), "via": s.via.name(), "enroll_t": s.enroll_t,
        "enroll_r": s.enroll_r, "enroll_digest": hex::encode(s.enroll_digest),
        "receipt": hex::encode(&s.receipt.0), "created": s.created,
        "activated_at": s.activated_at, "suspended_at": s.suspended_at,
        "deactivated_at": s.deactivated_at, "compromised_at": s.compromised_at,
        "destroyed_at": s.destroyed_at, "grace_until": s.grace_until})
}

pub(super) fn h32(v: &Value) -> Option<[u8; 32]> {
    hex::decode(v.as_str()?).ok()?.try_into().ok()
}
pub(super) fn hdev(v: &Value) -> Option<DeviceId> {
    Some(DeviceId(hex::decode(v.as_str()?).ok()?.try_into().ok()?))
}
pub(super) fn u(v: &Value) -> Option<u64> {
    v.as_u64()
}
pub(super) fn u8_(v: &Value) -> Option<u8> {
    u8::try_from(v.as_u64()?).ok()
}
pub(super) fn u32_(v: &Value) -> Option<u32> {
    u32::try_from(v.as_u64()?).ok()
}
pub(super) fn ou(v: &Value) -> Option<Option<u64>> {
    if v.is_null() {
        Some(None)
    } else {
        Some(Some(v.as_u64()?))
    }
}

pub(super) fn parse_device(v: &Value) -> Option<DeviceRow> {
    Some(DeviceRow {
        id: hdev(&v["id"])?,
        class: u8_(&v["class"])?,
        suite: Suite::new(u8_(&v["suite"])?).ok()?,
        epoch: u8_(&v["epoch"])?,
        transport_open: v["transport_open"].as_bool()?,
        created: u(&v["created"])?,
        highest_generation: if v["highest_generation"].is_null() {
            None
        } else {
            Some(u8_(&v["highest_generation"])?)
        },
        command_counter: u32_(&v["command_counter"])?,
        tag: h32(&v["tag"])?,
    })
}

pub(super) fn parse_seed(v: &Value) -> Option<SeedRow> {
    Some(SeedRow {
        device: hdev(&v["device"])?,
        generation: u8_(&v["generation"])?,
        state: KeyState::from_name(v["state"].as_str()?)?,
        base_year: u16::try_from(u(&v["base_year"])?).ok()?,
        suite: Suite::new(u8_(&v["suite"])?).ok()?,
        kstore_version: u32_(&v["kstore_version"])?,
        ciphertext: match &v["ciphertext"] {
            Value::Null => None,
            c => Some(Blob(hex::decode(c.as_str()?).ok()?)),
        },
        tag: h32(&v["tag"])?,
        via: EnrollVia::from_name(v["via"].as_str()?)?,
        enroll_t: u32_(&v["enroll_t"])?,
        enroll_r: u(&v["enroll_r"])?,
        enroll_digest: h32(&v["enroll_digest"])?,
        receipt: Blob(hex::decode(v["receipt"].as_str()?).ok()?),
        created: u(&v["created"])?,
        activated_at: ou(&v["activated_at"])?,
        suspended_at: ou(&v["suspended_at"])?,
        deactivated_at: ou(&v["deactivated_at"])?,
        compromised_at: ou(&v["compromised_at"])?,
        destroyed_at: ou(&v["destroyed_at"])?,
        grace_until: ou(&v["grace_until"])?,
    })
}

pub(super) fn parse_shard(v: &Value) -> Option<DigestShard> {
    Some(DigestShard {
        shard: u8_(&v["shard"])?,
        acc: h32(&v["acc"])?,
        count: u(&v["count"])?,
        seq: u(&v["seq"])?,
        tag: h32(&v["tag"])?,
    })
}

pub(super) fn parse_command(v: &Value) -> Option<CommandRow> {
    Some(CommandRow {
        device: hdev(&v["device"])?,
        counter: u32_(&v["counter"])?,
        opcode: u8_(&v["opcode"])?,
        generation: u8_(&v["generation"])?,
        r: u(&v["r"])?,
        bytes: Blob(hex::decode(v["bytes"].as_str()?).ok()?),
        created: u(&v["created"])?,
        answered_at: ou(&v["answered_at"])?,
        status: if v["status"].is_null() {
            None
        } else {
            Some(u8_(&v["status"])?)
        },
    })
}

pub(super) fn parse_notary(v: &Value) -> Option<NotaryRow> {
    Some(NotaryRow {
        device: hdev(&v["device"])?,
        generation: u8_(&v["generation"])?,
        t: u32_(&v["t_"])?,
        r: u(&v["r"])?,
        digest: h32(&v["digest"])?,
        tag: hex::decode(v["tag"].as_str()?).ok()?,
        first_seen: u(&v["first_seen"])?,
        // Backups of version 1 have none: the restore seals every record
        // again (the backup's MAC vouches for it).
        seal: match &v["seal"] {
            Value::Null => None,
            x => Some(h32(x)?),
        },
    })
}

pub(super) fn parse_audit(v: &Value) -> Option<AuditRecord> {
    Some(AuditRecord {
        seq: u(&v["seq"])?,
        entry: NewAudit {
            time: u(&v["time"])?,
            actor: v["actor"].as_str()?.to_string(),
            action: v["action"].as_str()?.to_string(),
            device: match &v["device"] {
                Value::Null => None,
                d => Some(DeviceId::from_u64(
                    u64::from_str_radix(d.as_str()?, 16).ok()?,
                )),
            },
            generation: if v["generation"].is_null() {
                None
            } else {
                Some(u8_(&v["generation"])?)
            },
            reason: v["reason"].as_str()?.to_string(),
        },
        prev_hash: h32(&v["prev_hash"])?,
        hash: h32(&v["hash"])?,
    })
}
