//! `microcert demo`: a tour of the protocol in one process. It makes a
//! seed, issues every message type as a node would, checks each as the
//! center would, and prints them.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use microcert_core::{
    self as core, Audience, DataDigest, DeviceId, EnrollKey, Header, Key128, KeySeed, Message,
    Opcode, SEED_LEN, Sender, Suite,
};
use zeroize::Zeroizing;

fn random<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
    Ok(b)
}

fn show(name: &str, bytes: &[u8], check: &str) {
    let hex = hex::encode(bytes);
    let shown = if hex.len() > 96 {
        format!("{}...", &hex[..96])
    } else {
        hex
    };
    say!("{name:<14} {:>4} B  {check:<28} {shown}", bytes.len());
}

/// Runs the tour with suite `suite` (1 or 2).
pub fn run(suite: u8) -> anyhow::Result<()> {
    let suite = Suite::new(suite)?;
    let now: u32 = SystemTime::now()
        .duration_since(UNIX_EPOCH)?
        .as_secs()
        .try_into()
        .context("the clock is past 2106")?;
    let year = core::time::date_of(i64::from(now)).year;
    let base_year = u16::try_from(year).context("year out of range")?;
    let device = DeviceId(random::<8>()?);
    let mut r = u64::from_be_bytes(random::<8>()?);
    let mut header = || {
        r = r.wrapping_add(1);
        Header {
            suite,
            device,
            generation: 0,
            t: now,
            r,
        }
    };

    // The center's transport master key and the chip's Ktr(device, 0).
    let ktrans = Key128::from_bytes(random::<16>()?);
    let ktr = core::transport_key(&ktrans, device, 0);
    let seed_bytes = Zeroizing::new(random::<SEED_LEN>()?);
    let seed = KeySeed::from_bytes(&seed_bytes, base_year);
    say!(
        "device {device}, suite {suite}, seed for {}..={}, t = {now}\n",
        seed.base_year(),
        seed.last_year()
    );
    let mut buf = vec![0u8; 1100];

    // ENROLL under Ktr; the center opens it and gets the same seed back.
    let h = header();
    let n = core::make_enroll(EnrollKey::Transport(&ktr), &seed, &h, &mut buf)?;
    let enroll = core::Enroll::decode(&buf[..n])?;
    let opened = core::open_enroll(EnrollKey::Transport(&ktr), &enroll)?;
    anyhow::ensure!(opened == seed, "ENROLL did not carry the seed");
    show("ENROLL", &buf[..n], "opened under Ktr");

    // The center's RECEIPT for it, keyed by the enrolled seed.
    let rh = header();
    let n = core::make_receipt(&opened, &rh, Sender::Center, h.r, 0, &mut buf)?;
    core::verify_receipt(&seed, &core::Receipt::decode(&buf[..n])?, Sender::Center)?;
    show("RECEIPT", &buf[..n], "node: center holds seed");

    let n = core::make_auth(&seed, &header(), &Audience::CENTER, &mut buf)?;
    core::verify_auth(&opened, &core::Auth::decode(&buf[..n])?, &Audience::CENTER)?;
    show("AUTH", &buf[..n], "verified by the center");

    let kchal = Key128::from_bytes(random::<16>()?);
    let challenge = core::make_challenge(&kchal, device, random::<8>()?, now);
    let n = core::make_auth_response(&seed, &header(), &challenge, &Audience::CENTER, &mut buf)?;
    let resp = core::AuthResponse::decode(&buf[..n])?;
    core::check_challenge(&kchal, device, resp.challenge, now)?;
    core::verify_auth_response(&opened, &resp, &Audience::CENTER)?;
    show("AUTH_RESPONSE", &buf[..n], "challenge answered");

    let data = b"temperature=21.5C humidity=40%";
    let digest = DataDigest::of(data);
    let n = core::make_signature(&seed, &header(), &digest, &mut buf)?;
    core::verify_signature(&opened, &core::Signature::decode(&buf[..n])?, &digest)?;
    show("SIGNATURE", &buf[..n], "data signed");

    let aud = Audience::relying_party("billing.example");
    let n = core::seal(&seed, &header(), &aud, data, &mut buf)?;
    let mut sealed = zeroize::Zeroizing::new(buf[..n].to_vec());
    let (_, plaintext) = core::open_in_place(&opened, &mut sealed, &aud)?;
    anyhow::ensure!(plaintext == data, "SEALED did not round-trip");
    show("SEALED", &buf[..n], "opened by billing.example");

    let n = core::make_command(&opened, &header(), now, Opcode::UPDATE_SEED, &mut buf)?;
    core::verify_command(&seed, &core::Command::decode(&buf[..n])?)?;
    show("COMMAND", &buf[..n], "UPDATE_SEED, node verified");

    // A forged AUTH: one bit flipped in the tag.
    let n = core::make_auth(&seed, &header(), &Audience::CENTER, &mut buf)?;
    buf[n - 1] ^= 1;
    let refused = match Message::decode(&buf[..n])? {
        Message::Auth(m) => core::verify_auth(&opened, &m, &Audience::CENTER).is_err(),
        _ => false,
    };
    anyhow::ensure!(refused, "a forged AUTH was accepted");
    say!("\na forged AUTH (one tag bit flipped) is refused: verification failed");
    Ok(())
}
