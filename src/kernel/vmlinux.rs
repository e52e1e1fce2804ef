//! bzImage → ELF vmlinux with the PVH entry note: the one kernel format both QEMU microvm and
//! Firecracker boot directly.
//!
//! 1. Read the image. An ELF file is taken as it is (step 4). Anything else must be a
//!    bzImage: boot flag `0xAA55` at 0x1FE, `HdrS` at 0x202, boot protocol ≥ 2.08 (the first
//!    with `payload_offset`/`payload_length`).
//! 2. The compressed payload starts `payload_offset` bytes into the protected-mode code,
//!    which itself starts after the `setup_sects + 1` real-mode sectors (0 means 4).
//! 3. Its compression is sniffed from its magic. The kernel build appends the decompressed
//!    length as a LE u32 to every payload (gzip has it natively as ISIZE); that trailer is cut
//!    off before decoding formats that would read it as another stream, and checked against
//!    the decoded length afterwards.
//! 4. The result must be an x86_64 ELF64 with a Xen `XEN_ELFNOTE_PHYS32_ENTRY` (18) note:
//!    without it (`CONFIG_PVH` unset) neither VMM can enter the kernel, so it is refused
//!    here rather than hanging at boot.
//! 5. The release (`6.1.0-56-cloud-amd64`) comes from the `Linux version …` banner in the
//!    image, so it can be checked against the package's `lib/modules/<release>`.
//!
//! The decoded vmlinux (53 MB for Debian 12's cloud kernel) is held in memory once.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::compression::{self, Compression, DecompressError};
use super::elf::{Elf, ElfError, MACHINE_X86_64};

/// The Xen note type carrying the 32-bit PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const BANNER_PREFIX: &[u8] = b"Linux version ";

/// Errors from turning a kernel image into an ELF vmlinux.
#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    #[error("cannot read kernel image {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither an ELF vmlinux nor a bzImage ({reason})")]
    UnknownFormat { path: PathBuf, reason: String },
    #[error("bzImage {path} has a bad setup header: {reason}")]
    SetupHeader { path: PathBuf, reason: String },
    #[error("cannot decompress the {compression} payload of {path}")]
    Decompress {
        path: PathBuf,
        compression: Compression,
        #[source]
        source: std::io::Error,
    },
    #[error("the payload of {path}")]
    PayloadCompression {
        path: PathBuf,
        #[source]
        source: DecompressError,
    },
    #[error(
        "the payload of {path} decompressed to {actual} bytes, but its size trailer says {expected}"
    )]
    PayloadSize {
        path: PathBuf,
        expected: u32,
        actual: u64,
    },
    #[error(
        "the payload of {path} would decompress to more than {limit} bytes (its size trailer \
         says {expected}); no kernel is that large"
    )]
    PayloadTooLarge {
        path: PathBuf,
        expected: u32,
        limit: u64,
    },
    #[error("the kernel in {path} is not a usable ELF vmlinux")]
    Elf {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error("the kernel in {path} is for ELF machine {machine}, not x86_64 (62)")]
    NotX86_64 { path: PathBuf, machine: u16 },
    #[error(
        "the kernel in {path} has no PVH entry note (ELF note owner \"Xen\", type 18, \
         XEN_ELFNOTE_PHYS32_ENTRY): it was built without CONFIG_PVH=y, and QEMU microvm and \
         Firecracker cannot boot it as an ELF vmlinux"
    )]
    NoPvhNote { path: PathBuf },
    #[error("the kernel in {path} has no `Linux version` banner to take its release from")]
    NoVersion { path: PathBuf },
    #[error("cannot write vmlinux {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the kernel image came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageFormat {
    /// Already an ELF vmlinux.
    Elf,
    /// A bzImage whose payload used `compression`.
    BzImage {
        compression: Compression,
        /// Boot protocol version, e.g. 0x020f.
        protocol: u16,
        /// The version string the setup header points at (`6.1.0-56-cloud-amd64 (…) #1 …`).
        header_version: Option<String>,
    },
}

/// Facts about a vmlinux.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmlinuxInfo {
    pub format: ImageFormat,
    /// The kernel release, as `uname -r` will print it and `lib/modules/` names it.
    pub release: String,
    /// The whole `Linux version …` banner line.
    pub banner: String,
    /// The PVH 32-bit entry point (physical address).
    pub pvh_entry: u64,
    /// Size of the ELF vmlinux.
    pub size: u64,
}

/// An ELF vmlinux in memory with its facts.
#[derive(Debug, Clone)]
pub struct Vmlinux {
    pub elf: Vec<u8>,
    pub info: VmlinuxInfo,
}

impl Vmlinux {
    /// Reads the kernel image at `path` (bzImage or ELF).
    pub fn from_file(path: &Path) -> Result<Vmlinux, VmlinuxError> {
        let image = std::fs::read(path).map_err(|source| VmlinuxError::Read {
            path: path.to_owned(),
            source,
        })?;
        Vmlinux::from_image(image, path)
    }

    /// Turns `image` (a bzImage or an ELF vmlinux) into a checked ELF vmlinux. `origin`
    /// names it in errors.
    pub fn from_image(image: Vec<u8>, origin: &Path) -> Result<Vmlinux, VmlinuxError> {
        let (format, elf) = if image.starts_with(b"\x7fELF") {
            (ImageFormat::Elf, image)
        } else {
            let bz = BzImage::parse(&image, origin)?;
            let (compression, elf) = bz.decompress(origin)?;
            (
                ImageFormat::BzImage {
                    compression,
                    protocol: bz.protocol,
                    header_version: bz.header_version,
                },
                elf,
            )
        };
        let pvh_entry = pvh_entry(&elf, origin)?;
        let banner = find_banner(&elf).ok_or_else(|| VmlinuxError::NoVersion {
            path: origin.to_owned(),
        })?;
        let release = release_of_banner(&banner).to_owned();
        Ok(Vmlinux {
            info: VmlinuxInfo {
                format,
                release,
                banner,
                pvh_entry,
                size: elf.len() as u64,
            },
            elf,
        })
    }

    /// Writes the ELF to `path`, through a temp file beside it renamed into place, so a
    /// failed write leaves nothing.
    pub fn write_to(&self, path: &Path) -> Result<(), VmlinuxError> {
        let write_error = |source| VmlinuxError::Write {
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        let mut temp = tempfile::Builder::new()
            .prefix(".vmlinux.partial-")
            .tempfile_in(dir.unwrap_or(Path::new(".")))
            .map_err(write_error)?;
        std::io::Write::write_all(&mut temp, &self.elf).map_err(write_error)?;
        temp.persist(path)
            .map_err(|error| write_error(error.error))?;
        Ok(())
    }
}

/// Converts the kernel image at `image` to an ELF vmlinux at `output`.
pub fn convert(image: &Path, output: &Path) -> Result<VmlinuxInfo, VmlinuxError> {
    let vmlinux = Vmlinux::from_file(image)?;
    vmlinux.write_to(output)?;
    Ok(vmlinux.info)
}

/// The fields of a bzImage setup header banger needs.
#[derive(Debug)]
struct BzImage<'a> {
    protocol: u16,
    payload: &'a [u8],
    header_version: Option<String>,
}

impl<'a> BzImage<'a> {
    fn parse(image: &'a [u8], origin: &Path) -> Result<BzImage<'a>, VmlinuxError> {
        let bad = |reason: String| VmlinuxError::SetupHeader {
            path: origin.to_owned(),
            reason,
        };
        let u16_at = |at: usize| {
            image
                .get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let u32_at = |at: usize| {
            image
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0x1fe) != Some(0xaa55) || image.get(0x202..0x206) != Some(b"HdrS") {
            return Err(VmlinuxError::UnknownFormat {
                path: origin.to_owned(),
                reason: "no ELF magic, and no bzImage boot flag 0xAA55 with `HdrS` header".into(),
            });
        }
        let protocol = u16_at(0x206).expect("within the checked header");
        if protocol < 0x0208 {
            return Err(bad(format!(
                "boot protocol {}.{:02} predates payload_offset (2.08)",
                protocol >> 8,
                protocol & 0xff
            )));
        }
        let setup_sectors = match image[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let protected_mode = (setup_sectors + 1) * 512;
        let offset = u32_at(0x248).ok_or_else(|| bad("header is truncated".into()))? as usize;
        let length = u32_at(0x24c).ok_or_else(|| bad("header is truncated".into()))? as usize;
        let start = protected_mode + offset;
        let payload = image.get(start..start + length).ok_or_else(|| {
            bad(format!(
                "payload ({length} bytes at {start}) runs past the end of the {}-byte image",
                image.len()
            ))
        })?;
        if payload.len() < 8 {
            return Err(bad(format!("payload is only {} bytes", payload.len())));
        }
        let header_version = match u16_at(0x20e) {
            Some(0) | None => None,
            Some(pointer) => image.get(0x200 + usize::from(pointer)..).and_then(|rest| {
                let end = rest.iter().position(|&b| b == 0)?;
                String::from_utf8(rest[..end].to_vec()).ok()
            }),
        };
        Ok(BzImage {
            protocol,
            payload,
            header_version,
        })
    }

    fn decompress(&self, origin: &Path) -> Result<(Compression, Vec<u8>), VmlinuxError> {
        let compression = Compression::sniff(self.payload);
        if compression == Compression::None {
            return Err(VmlinuxError::SetupHeader {
                path: origin.to_owned(),
                reason: format!(
                    "payload starts with {:02x?}, the magic of no known compression",
                    &self.payload[..6]
                ),
            });
        }
        let (body, trailer) = self.payload.split_at(self.payload.len() - 4);
        let expected = u32::from_le_bytes(trailer.try_into().expect("4 bytes"));
        // gzip's own trailer ends in ISIZE, so the whole payload is the gzip stream.
        let stream = if compression == Compression::Gzip {
            self.payload
        } else {
            body
        };
        let mut decoder = compression::decoder(compression, stream).map_err(|source| {
            VmlinuxError::PayloadCompression {
                path: origin.to_owned(),
                source,
            }
        })?;
        // The trailer is the image's word: checked before it sizes an allocation, and the
        // decoder is cut off past the cap whatever the trailer says.
        if u64::from(expected) > MAX_VMLINUX_BYTES {
            return Err(VmlinuxError::PayloadTooLarge {
                path: origin.to_owned(),
                expected,
                limit: MAX_VMLINUX_BYTES,
            });
        }
        let mut elf = Vec::with_capacity(expected as usize);
        (&mut decoder)
            .take(u64::from(expected) + 1)
            .read_to_end(&mut elf)
            .map_err(|source| VmlinuxError::Decompress {
                path: origin.to_owned(),
                compression,
                source,
            })?;
        if elf.len() as u32 != expected {
            return Err(VmlinuxError::PayloadSize {
                path: origin.to_owned(),
                expected,
                actual: elf.len() as u64,
            });
        }
        Ok((compression, elf))
    }
}

/// The largest vmlinux banger decompresses (Debian's cloud kernel is 53 MB).
pub const MAX_VMLINUX_BYTES: u64 = 512 << 20;

/// The PVH entry point of the x86_64 ELF `elf`, or why it has none.
pub fn pvh_entry(elf: &[u8], origin: &Path) -> Result<u64, VmlinuxError> {
    let elf_error = |source| VmlinuxError::Elf {
        path: origin.to_owned(),
        source,
    };
    let parsed = Elf::parse(elf).map_err(elf_error)?;
    if parsed.machine != MACHINE_X86_64 {
        return Err(VmlinuxError::NotX86_64 {
            path: origin.to_owned(),
            machine: parsed.machine,
        });
    }
    parsed
        .notes()
        .map_err(elf_error)?
        .into_iter()
        .find(|note| note.owner == b"Xen" && note.kind == XEN_ELFNOTE_PHYS32_ENTRY)
        .and_then(|note| match note.desc.len() {
            4 => Some(u64::from(u32::from_le_bytes(note.desc.try_into().ok()?))),
            8 => Some(u64::from_le_bytes(note.desc.try_into().ok()?)),
            _ => None,
        })
        .ok_or_else(|| VmlinuxError::NoPvhNote {
            path: origin.to_owned(),
        })
}

/// The kernel's `linux_banner` line, `Linux version <release> (…) #<n> …`, from `image`.
///
/// Debian 6.1 images hold two copies, one with an empty build number (`# SMP`, from the
/// link-time placeholder) and the real one (`#1 SMP`), so the one with a number is preferred.
pub fn find_banner(image: &[u8]) -> Option<String> {
    let mut first = None;
    let mut from = 0;
    while let Some(found) = find(&image[from..], BANNER_PREFIX) {
        let start = from + found;
        from = start + 1;
        let rest = &image[start..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n' || b == 0)
            .unwrap_or(rest.len());
        // `linux_proc_banner` is a format string ("%s version %s"); a real banner has a
        // release that starts with a digit.
        let Some(line) = std::str::from_utf8(&rest[..end]).ok().filter(|line| {
            line.as_bytes()
                .get(BANNER_PREFIX.len())
                .is_some_and(u8::is_ascii_digit)
        }) else {
            continue;
        };
        let numbered = line.split_whitespace().any(|word| {
            word.len() > 1 && word.starts_with('#') && word[1..].bytes().all(|b| b.is_ascii_digit())
        });
        if numbered {
            return Some(line.to_owned());
        }
        first.get_or_insert_with(|| line.to_owned());
    }
    first
}

/// The release in a `Linux version <release> (…)` banner.
pub fn release_of_banner(banner: &str) -> &str {
    banner
        .strip_prefix("Linux version ")
        .unwrap_or(banner)
        .split_whitespace()
        .next()
        .unwrap_or("")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut at = 0;
    while at + needle.len() <= haystack.len() {
        let next = haystack[at..].iter().position(|&b| b == first)?;
        at += next;
        if haystack.get(at..at + needle.len())? == needle {
            return Some(at);
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::kernel::elf::build;

    const BANNER: &[u8] = b"\0Linux version 6.1.0-99-cloud-amd64 (builder@example) # SMP Debian 6.1.999-1\n\0%s version %s\0Linux version 6.1.0-99-cloud-amd64 (builder@example) #1 SMP Debian 6.1.999-1\n\0";

    fn pvh_elf() -> Vec<u8> {
        build::executable(
            MACHINE_X86_64,
            &[
                ("Xen", 6, b"linux\0"),
                (
                    "Xen",
                    XEN_ELFNOTE_PHYS32_ENTRY,
                    &0x0100_0850u64.to_le_bytes(),
                ),
            ],
            BANNER,
        )
    }

    /// A bzImage around `payload`, with the size trailer the kernel build appends to every
    /// compression but gzip (whose own trailer ends in the size) when `decoded_len` is given.
    fn bzimage(payload: &[u8], decoded_len: Option<usize>) -> Vec<u8> {
        let setup_sectors = 3u8;
        let mut image = vec![0u8; (usize::from(setup_sectors) + 1) * 512];
        image[0x1f1] = setup_sectors;
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let version = b"6.1.0-99-cloud-amd64 (builder@example) #1\0";
        image[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        image[0x300..0x300 + version.len()].copy_from_slice(version);
        let mut payload = payload.to_vec();
        if let Some(decoded_len) = decoded_len {
            payload.extend((decoded_len as u32).to_le_bytes());
        }
        image[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend(vec![0xccu8; 100]);
        image.extend(payload);
        image.extend(b"after the payload");
        image
    }

    #[test]
    fn an_elf_with_the_pvh_note_is_accepted_as_it_is() {
        let vmlinux = Vmlinux::from_image(pvh_elf(), Path::new("vmlinux")).unwrap();
        assert_eq!(vmlinux.info.format, ImageFormat::Elf);
        assert_eq!(vmlinux.info.pvh_entry, 0x0100_0850);
        assert_eq!(vmlinux.info.release, "6.1.0-99-cloud-amd64");
        assert_eq!(
            vmlinux.info.banner,
            "Linux version 6.1.0-99-cloud-amd64 (builder@example) #1 SMP Debian 6.1.999-1"
        );
        assert!(vmlinux.elf == pvh_elf());
    }

    #[test]
    fn an_elf_without_the_pvh_note_is_refused_naming_the_note() {
        let elf = build::executable(MACHINE_X86_64, &[("Xen", 6, b"linux\0")], BANNER);
        let error = Vmlinux::from_image(elf, Path::new("/k/vmlinux-nopvh")).unwrap_err();
        assert!(matches!(error, VmlinuxError::NoPvhNote { .. }));
        let message = error.to_string();
        assert!(message.contains("/k/vmlinux-nopvh"), "{message}");
        assert!(message.contains("XEN_ELFNOTE_PHYS32_ENTRY"), "{message}");
        assert!(message.contains("CONFIG_PVH=y"), "{message}");
        // Type 18 under another owner is not the PVH note.
        let elf = build::executable(MACHINE_X86_64, &[("Linux", 18, &[0; 8])], BANNER);
        assert!(matches!(
            Vmlinux::from_image(elf, Path::new("k")),
            Err(VmlinuxError::NoPvhNote { .. })
        ));
    }

    #[test]
    fn a_foreign_architecture_is_refused() {
        let elf = build::executable(183, &[("Xen", 18, &[0; 8])], BANNER);
        let error = Vmlinux::from_image(elf, Path::new("arm64-Image")).unwrap_err();
        assert!(
            matches!(error, VmlinuxError::NotX86_64 { machine: 183, .. }),
            "{error}"
        );
    }

    #[test]
    fn bzimage_payloads_decompress_in_every_supported_format() {
        let elf = pvh_elf();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(&elf).unwrap();
        let payloads = [
            (Compression::Gzip, gzip.finish().unwrap()),
            (Compression::Zstd, zstd::encode_all(&elf[..], 19).unwrap()),
            (
                Compression::Lz4Legacy,
                compression::lz4_legacy_compress(&elf),
            ),
        ];
        for (compression, payload) in payloads {
            let trailer = (compression != Compression::Gzip).then_some(elf.len());
            let image = bzimage(&payload, trailer);
            let vmlinux = Vmlinux::from_image(image, Path::new("vmlinuz")).unwrap();
            assert!(vmlinux.elf == elf, "{compression}");
            assert_eq!(
                vmlinux.info.format,
                ImageFormat::BzImage {
                    compression,
                    protocol: 0x020f,
                    header_version: Some("6.1.0-99-cloud-amd64 (builder@example) #1".into()),
                }
            );
            assert_eq!(vmlinux.info.release, "6.1.0-99-cloud-amd64");
        }
    }

    #[test]
    fn a_wrong_size_trailer_is_reported() {
        let elf = pvh_elf();
        let image = bzimage(&compression::lz4_legacy_compress(&elf), Some(elf.len() + 1));
        let error = Vmlinux::from_image(image, Path::new("vmlinuz")).unwrap_err();
        assert!(
            matches!(error, VmlinuxError::PayloadSize { actual, .. } if actual == elf.len() as u64),
            "{error}"
        );
        // A trailer that claims less: decoding stops one byte past it.
        let image = bzimage(&compression::lz4_legacy_compress(&elf), Some(100));
        let error = Vmlinux::from_image(image, Path::new("vmlinuz")).unwrap_err();
        assert!(
            matches!(
                error,
                VmlinuxError::PayloadSize {
                    expected: 100,
                    actual: 101,
                    ..
                }
            ),
            "{error}"
        );
        // A trailer past the cap sizes nothing.
        let image = bzimage(&compression::lz4_legacy_compress(&elf), Some(3 << 30));
        let error = Vmlinux::from_image(image, Path::new("vmlinuz")).unwrap_err();
        assert!(
            matches!(error, VmlinuxError::PayloadTooLarge { expected, .. } if expected == 3 << 30),
            "{error}"
        );
    }

    #[test]
    fn other_files_are_refused() {
        let error = Vmlinux::from_image(b"#!/bin/sh\n".repeat(100), Path::new("init")).unwrap_err();
        assert!(
            matches!(error, VmlinuxError::UnknownFormat { .. }),
            "{error}"
        );
        let mut image = bzimage(b"BZh91AY&SY", Some(10));
        let error = Vmlinux::from_image(image.clone(), Path::new("vmlinuz")).unwrap_err();
        let text = crate::error::error_chain(&error);
        assert!(
            text.contains("bzip2 compression is recognised but not supported"),
            "{text}"
        );
        image[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = Vmlinux::from_image(image, Path::new("vmlinuz")).unwrap_err();
        let text = crate::error::error_chain(&error);
        assert!(text.contains("runs past the end"), "{text}");
    }

    #[test]
    fn write_to_replaces_the_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vmlinux");
        std::fs::write(&out, b"old").unwrap();
        let vmlinux = Vmlinux::from_image(pvh_elf(), Path::new("v")).unwrap();
        vmlinux.write_to(&out).unwrap();
        assert!(std::fs::read(&out).unwrap() == pvh_elf());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
