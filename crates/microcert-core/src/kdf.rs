//! NIST SP 800-108r1 KDF in counter mode with AES-128-CMAC (PROTOCOL.md
//! section 3), and the per-device transport key.

// The encryption-only AES: CMAC and CCM never decrypt, so the decryption
// key schedule would be wasted work on every call (about 8% of a verify).
use aes::Aes128Enc;
use cmac::digest::FixedOutput;
use cmac::{Cmac, KeyInit, Mac};
use zeroize::Zeroize;

use crate::secret::Key128;
use crate::wire::DeviceId;
use crate::{Error, Result};

/// Longest input [`cmac_parts`] gathers into one buffer on x86: the CSK
/// combination's six 16-byte rows (96 bytes) and every working-key and tag
/// input of the verification path fit.
#[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
const GATHER_LEN: usize = 128;

/// AES-128-CMAC of the concatenation of `parts`, written straight into a
/// secret key (no copy of the output is left behind).
///
/// On x86 the parts are first gathered into one (wiped) stack buffer and
/// given to the MAC in one call: the `aes` crate's VAES backends load
/// (broadcast) the 11 round keys into wide registers on every call, and
/// the `cmac` crate makes one call per `update` that completes a block,
/// so six 16-byte parts cost six broadcasts where one buffer costs one
/// (issue 16: the broadcasts were a fifth of the center's warm path).
/// Other targets (a microcontroller's software AES has no such cost) feed
/// the parts as they are and keep the 128 bytes of stack.
pub(crate) fn cmac_parts(key: &[u8; 16], parts: &[&[u8]]) -> Key128 {
    let mut mac = <Cmac<Aes128Enc> as KeyInit>::new(key.into());
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total <= GATHER_LEN {
            let mut buf = zeroize::Zeroizing::new([0u8; GATHER_LEN]);
            let mut at = 0;
            for part in parts {
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            mac.update(&buf[..at]);
        } else {
            for part in parts {
                mac.update(part);
            }
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    for part in parts {
        mac.update(part);
    }
    let mut out = Key128::zero();
    // Finalizing in place avoids moving the whole MAC state (round keys
    // and buffer) into a by-value call.
    cmac::digest::FixedOutputReset::finalize_into_reset(&mut mac, out.as_mut().into());
    out
}

/// AES-128-CMAC (RFC 4493) of `data` under `key`: the PRF every tag, the
/// CSK combination and the KDF are built on, public so that it can be
/// checked against the RFC's examples.
pub fn aes_cmac(key: &[u8; 16], data: &[u8]) -> [u8; 16] {
    *cmac_parts(key, &[data]).expose()
}

/// The generic SP 800-108 counter-mode KDF: a 32-bit counter from 1 before
/// the fixed input, AES-128-CMAC as PRF, `out.len()` bytes of output.
///
/// The fixed input carries Label, 0x00, Context and L as the caller encodes
/// them; this function only counts blocks. Fails for an empty output or one
/// longer than the 32-bit counter allows.
pub fn kdf_ctr_cmac(key: &[u8; 16], fixed_input: &[u8], out: &mut [u8]) -> Result<()> {
    kdf_ctr_cmac_parts(key, &[fixed_input], out)
}

fn kdf_ctr_cmac_parts(key: &[u8; 16], fixed: &[&[u8]], out: &mut [u8]) -> Result<()> {
    let blocks = out.len().div_ceil(16);
    if out.is_empty() || blocks as u64 > u64::from(u32::MAX) {
        return Err(Error::OutputLength);
    }
    let prf = <Cmac<Aes128Enc> as KeyInit>::new(key.into());
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        let mut mac = prf.clone();
        mac.update(&(i as u32 + 1).to_be_bytes());
        for part in fixed {
            mac.update(part);
        }
        let mut block = mac.finalize_fixed();
        chunk.copy_from_slice(&block[..chunk.len()]);
        block.zeroize();
    }
    Ok(())
}

/// A 128-bit working key: KDF(K, Label, Context) with L = 128, one PRF block.
pub fn derive_key(key: &Key128, label: &[u8], context: &[u8]) -> Key128 {
    cmac_parts(
        key.expose(),
        &[
            &1u32.to_be_bytes(),
            label,
            &[0x00],
            context,
            &128u32.to_be_bytes(),
        ],
    )
}

/// What a working key is for; each purpose has its own KDF label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Kauth: AUTH and AUTH_RESPONSE.
    Auth,
    /// Ksign: SIGNATURE.
    Sign,
    /// Kenc: SEALED.
    Enc,
    /// Kcmd: COMMAND.
    Cmd,
    /// Kupd: ENROLL of a seed update.
    Upd,
    /// Krcpt-c: a RECEIPT sent by the center.
    ReceiptCenter,
    /// Krcpt-n: a RECEIPT sent by a node.
    ReceiptNode,
}

impl Purpose {
    /// The KDF label of this purpose.
    pub const fn label(self) -> &'static [u8] {
        match self {
            Purpose::Auth => b"MC-AUTH",
            Purpose::Sign => b"MC-SIGN",
            Purpose::Enc => b"MC-ENC",
            Purpose::Cmd => b"MC-CMD",
            Purpose::Upd => b"MC-UPD",
            Purpose::ReceiptCenter => b"MC-RCPT-C",
            Purpose::ReceiptNode => b"MC-RCPT-N",
        }
    }
}

/// Ktr(device, epoch): the per-device transport key derived from the
/// transport master key Ktrans.
pub fn transport_key(ktrans: &Key128, device: DeviceId, epoch: u8) -> Key128 {
    let mut context = [0u8; 9];
    context[..8].copy_from_slice(&device.0);
    context[8] = epoch;
    derive_key(ktrans, b"MC-TRANSPORT", &context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derive_key_is_one_block_of_the_generic_kdf() {
        let k = Key128::from_bytes([7; 16]);
        let fixed = b"MC-AUTH\x00012345678901234567890\x00\x00\x00\x80";
        let mut out = [0u8; 16];
        kdf_ctr_cmac(k.expose(), fixed, &mut out).unwrap();
        let d = derive_key(&k, b"MC-AUTH", b"012345678901234567890");
        assert_eq!(d.expose(), &out);
    }

    /// The MAC of the parts is the MAC of their concatenation, whether the
    /// parts are gathered (at most 128 bytes on x86) or fed one by one
    /// (longer inputs, other targets), for every split of every length
    /// around the block and gather boundaries.
    #[test]
    fn parts_mac_is_the_mac_of_their_concatenation() {
        let key = [0x2b; 16];
        let data: [u8; 200] = core::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x5a);
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 96, 127, 128, 129, 160, 200] {
            let whole = cmac_parts(&key, &[&data[..len]]);
            for a in 0..=len {
                let b = (a + (len - a) / 2).min(len);
                let split = cmac_parts(&key, &[&data[..a], &data[a..b], &data[b..len]]);
                assert_eq!(
                    split.expose(),
                    whole.expose(),
                    "len {len}, split at {a} and {b}"
                );
            }
            // Against the MAC crate driven directly, one update per byte.
            let mut mac = <Cmac<Aes128Enc> as KeyInit>::new((&key).into());
            for byte in &data[..len] {
                mac.update(core::slice::from_ref(byte));
            }
            assert_eq!(&mac.finalize_fixed()[..], whole.expose(), "len {len}");
        }
    }

    #[test]
    fn empty_output_is_refused() {
        assert_eq!(
            kdf_ctr_cmac(&[0; 16], b"x", &mut []),
            Err(Error::OutputLength)
        );
    }
}
