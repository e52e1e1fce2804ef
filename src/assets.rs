//! Guest-side files embedded in the binary (`assets/`), written into images by the agent
//! injection step.
//!
//! Their combined digest is a parameter of that step, so changing any asset re-keys every image
//! that carries it, and nothing else.

use crate::key::KeyEncoder;

/// One embedded guest file.
#[derive(Debug, Clone, Copy)]
pub struct GuestAsset {
    /// Absolute path inside the guest.
    pub guest_path: &'static str,
    pub mode: u32,
    pub contents: &'static [u8],
}

/// Every guest asset, in the order they are written.
pub const GUEST_ASSETS: &[GuestAsset] = &[GuestAsset {
    guest_path: "/etc/ssh/sshd_config.d/banger.conf",
    mode: 0o644,
    contents: include_bytes!("../assets/sshd/banger.conf"),
}];

/// Digest over every asset's path, mode and contents (`blake3:<hex>`).
pub fn guest_assets_digest() -> String {
    let mut encoder = KeyEncoder::new("banger/guest-assets/v1");
    encoder.u64(GUEST_ASSETS.len() as u64);
    for asset in GUEST_ASSETS {
        encoder.str(asset.guest_path);
        encoder.u64(u64::from(asset.mode));
        encoder.bytes(asset.contents);
    }
    format!("blake3:{}", encoder.finish())
}
