//! Just enough ELF64 (little-endian) reading for kernels and modules: the header, program
//! headers, section headers by name, and note iteration.
//!
//! Every offset read from the file is bounds-checked against the buffer; a malformed file
//! yields an [`ElfError`], never a panic. Callers attach the file's path to the error.

/// `EM_X86_64`.
pub const MACHINE_X86_64: u16 = 62;
const PT_NOTE: u32 = 4;
const SHT_NOTE: u32 = 7;

/// What is wrong with an ELF file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file (no \\x7fELF magic)")]
    NotElf,
    #[error("a 32-bit ELF file (banger needs ELF64)")]
    Not64Bit,
    #[error("a big-endian ELF file (banger needs little-endian)")]
    BigEndian,
    #[error("truncated or malformed ELF: {0}")]
    Malformed(&'static str),
}

/// A parsed view of an ELF64 LE file held in memory.
#[derive(Debug, Clone, Copy)]
pub struct Elf<'a> {
    bytes: &'a [u8],
    pub machine: u16,
    phoff: u64,
    phentsize: u16,
    phnum: u16,
    shoff: u64,
    shentsize: u16,
    shnum: u16,
    shstrndx: u16,
}

/// One section header's useful fields.
#[derive(Debug, Clone, Copy)]
struct Section {
    name: u32,
    kind: u32,
    offset: u64,
    size: u64,
}

/// One ELF note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Note<'a> {
    /// The owner without its terminating NUL (`Xen`, `GNU`, `Linux`).
    pub owner: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// `bytes[offset..offset + size]`, or `None` when it lies outside.
fn range(bytes: &[u8], offset: u64, size: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(size).ok()?)?;
    bytes.get(start..end)
}

impl<'a> Elf<'a> {
    /// Parses the ELF header of `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<Elf<'a>, ElfError> {
        if !bytes.starts_with(b"\x7fELF") {
            return Err(ElfError::NotElf);
        }
        let header = bytes
            .get(..64)
            .ok_or(ElfError::Malformed("shorter than an ELF64 header"))?;
        match header[4] {
            2 => {}
            1 => return Err(ElfError::Not64Bit),
            _ => return Err(ElfError::Malformed("unknown ELF class")),
        }
        match header[5] {
            1 => {}
            2 => return Err(ElfError::BigEndian),
            _ => return Err(ElfError::Malformed("unknown ELF data encoding")),
        }
        let field16 = |at| u16_at(header, at).expect("within the 64-byte header");
        let field64 = |at| u64_at(header, at).expect("within the 64-byte header");
        Ok(Elf {
            bytes,
            machine: field16(0x12),
            phoff: field64(0x20),
            shoff: field64(0x28),
            phentsize: field16(0x36),
            phnum: field16(0x38),
            shentsize: field16(0x3a),
            shnum: field16(0x3c),
            shstrndx: field16(0x3e),
        })
    }

    /// The file contents of every `PT_NOTE` segment.
    fn note_segments(&self) -> Result<Vec<&'a [u8]>, ElfError> {
        if self.phnum == 0 {
            return Ok(Vec::new());
        }
        if self.phentsize < 56 {
            return Err(ElfError::Malformed("program header entries are too small"));
        }
        let mut segments = Vec::new();
        for index in 0..u64::from(self.phnum) {
            let at = self
                .phoff
                .checked_add(index * u64::from(self.phentsize))
                .ok_or(ElfError::Malformed("program header offset overflows"))?;
            let header = range(self.bytes, at, 56)
                .ok_or(ElfError::Malformed("program headers lie outside the file"))?;
            if u32_at(header, 0) == Some(PT_NOTE) {
                let offset = u64_at(header, 8).expect("within 56 bytes");
                let size = u64_at(header, 32).expect("within 56 bytes");
                segments.push(
                    range(self.bytes, offset, size)
                        .ok_or(ElfError::Malformed("a note segment lies outside the file"))?,
                );
            }
        }
        Ok(segments)
    }

    fn sections(&self) -> Result<Vec<Section>, ElfError> {
        if self.shnum == 0 {
            return Ok(Vec::new());
        }
        if self.shentsize < 64 {
            return Err(ElfError::Malformed("section header entries are too small"));
        }
        (0..u64::from(self.shnum))
            .map(|index| {
                let at = self
                    .shoff
                    .checked_add(index * u64::from(self.shentsize))
                    .ok_or(ElfError::Malformed("section header offset overflows"))?;
                let header = range(self.bytes, at, 64)
                    .ok_or(ElfError::Malformed("section headers lie outside the file"))?;
                Ok(Section {
                    name: u32_at(header, 0).expect("within 64 bytes"),
                    kind: u32_at(header, 4).expect("within 64 bytes"),
                    offset: u64_at(header, 24).expect("within 64 bytes"),
                    size: u64_at(header, 32).expect("within 64 bytes"),
                })
            })
            .collect()
    }

    fn section_data(&self, section: &Section) -> Result<&'a [u8], ElfError> {
        range(self.bytes, section.offset, section.size)
            .ok_or(ElfError::Malformed("a section lies outside the file"))
    }

    /// The contents of the section called `name`, if there is one.
    pub fn section_by_name(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let sections = self.sections()?;
        let Some(names) = sections.get(usize::from(self.shstrndx)) else {
            return Ok(None);
        };
        let names = self.section_data(names)?;
        for section in &sections {
            let start = section.name as usize;
            let Some(rest) = names.get(start..) else {
                return Err(ElfError::Malformed("a section name lies outside its table"));
            };
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            if &rest[..end] == name.as_bytes() {
                return self.section_data(section).map(Some);
            }
        }
        Ok(None)
    }

    /// Every note in `PT_NOTE` segments, or, for files without them (modules, stripped
    /// program headers), in `SHT_NOTE` sections.
    pub fn notes(&self) -> Result<Vec<Note<'a>>, ElfError> {
        let mut areas = self.note_segments()?;
        if areas.is_empty() {
            for section in self.sections()? {
                if section.kind == SHT_NOTE {
                    areas.push(self.section_data(&section)?);
                }
            }
        }
        let mut notes = Vec::new();
        for area in areas {
            parse_notes(area, &mut notes)?;
        }
        Ok(notes)
    }
}

fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|n| n & !3)
}

/// Appends the notes in `area` (namesz, descsz, type, name, desc; name and desc padded to 4).
fn parse_notes<'a>(area: &'a [u8], notes: &mut Vec<Note<'a>>) -> Result<(), ElfError> {
    let mut at = 0usize;
    while at < area.len() {
        let malformed = ElfError::Malformed("a note runs past its segment");
        let name_size = u32_at(area, at).ok_or(malformed.clone())? as usize;
        let desc_size = u32_at(area, at + 4).ok_or(malformed.clone())? as usize;
        let kind = u32_at(area, at + 8).ok_or(malformed.clone())?;
        let name_at = at + 12;
        let desc_at = name_at
            .checked_add(align4(name_size).ok_or(malformed.clone())?)
            .ok_or(malformed.clone())?;
        let next = desc_at
            .checked_add(align4(desc_size).ok_or(malformed.clone())?)
            .ok_or(malformed.clone())?;
        let owner = area
            .get(name_at..name_at + name_size)
            .ok_or(malformed.clone())?;
        let owner = owner.strip_suffix(&[0]).unwrap_or(owner);
        let desc = area
            .get(desc_at..desc_at + desc_size)
            .ok_or(malformed.clone())?;
        notes.push(Note { owner, kind, desc });
        at = next;
    }
    Ok(())
}

/// Builds small ELF64 files for tests.
#[cfg(test)]
pub(crate) mod build {
    /// An x86_64 executable whose only program header is a `PT_NOTE` holding `notes`
    /// (owner, type, desc), followed by `payload`.
    pub fn executable(machine: u16, notes: &[(&str, u32, &[u8])], payload: &[u8]) -> Vec<u8> {
        let mut note_bytes = Vec::new();
        for (owner, kind, desc) in notes {
            let mut name = owner.as_bytes().to_vec();
            name.push(0);
            note_bytes.extend((name.len() as u32).to_le_bytes());
            note_bytes.extend((desc.len() as u32).to_le_bytes());
            note_bytes.extend(kind.to_le_bytes());
            note_bytes.extend(&name);
            note_bytes.resize(note_bytes.len().next_multiple_of(4), 0);
            note_bytes.extend(*desc);
            note_bytes.resize(note_bytes.len().next_multiple_of(4), 0);
        }
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[6] = 1;
        elf[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
        elf[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        let notes_at = 64 + 56;
        let mut header = vec![0u8; 56];
        header[0..4].copy_from_slice(&4u32.to_le_bytes());
        header[8..16].copy_from_slice(&(notes_at as u64).to_le_bytes());
        header[32..40].copy_from_slice(&(note_bytes.len() as u64).to_le_bytes());
        header[40..48].copy_from_slice(&(note_bytes.len() as u64).to_le_bytes());
        header[48..56].copy_from_slice(&4u64.to_le_bytes());
        elf.extend(header);
        elf.extend(note_bytes);
        elf.extend(payload);
        elf
    }

    /// A relocatable file (like a `.ko`) with a `.modinfo` section holding `modinfo`.
    pub fn relocatable(modinfo: &[u8]) -> Vec<u8> {
        let names = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[6] = 1;
        elf[0x10..0x12].copy_from_slice(&1u16.to_le_bytes());
        elf[0x12..0x14].copy_from_slice(&super::MACHINE_X86_64.to_le_bytes());
        let modinfo_at = 64u64;
        let names_at = modinfo_at + modinfo.len() as u64;
        let headers_at = (names_at + names.len() as u64).next_multiple_of(8);
        elf[0x28..0x30].copy_from_slice(&headers_at.to_le_bytes());
        elf[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf.extend(modinfo);
        elf.extend(names);
        elf.resize(headers_at as usize, 0);
        let section = |name: u32, kind: u32, offset: u64, size: u64| {
            let mut header = vec![0u8; 64];
            header[0..4].copy_from_slice(&name.to_le_bytes());
            header[4..8].copy_from_slice(&kind.to_le_bytes());
            header[24..32].copy_from_slice(&offset.to_le_bytes());
            header[32..40].copy_from_slice(&size.to_le_bytes());
            header
        };
        elf.extend(section(0, 0, 0, 0));
        elf.extend(section(1, 1, modinfo_at, modinfo.len() as u64));
        elf.extend(section(10, 3, names_at, names.len() as u64));
        elf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_notes_from_a_note_segment() {
        let elf = build::executable(
            MACHINE_X86_64,
            &[
                ("GNU", 3, b"buildid!"),
                ("Xen", 18, &[1, 2, 3, 4, 0, 0, 0, 0]),
            ],
            b"",
        );
        let parsed = Elf::parse(&elf).unwrap();
        assert_eq!(parsed.machine, MACHINE_X86_64);
        let notes = parsed.notes().unwrap();
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[1].owner, b"Xen");
        assert_eq!(notes[1].kind, 18);
        assert_eq!(notes[1].desc, &[1, 2, 3, 4, 0, 0, 0, 0]);
    }

    #[test]
    fn finds_a_section_by_name() {
        let elf = build::relocatable(b"license=GPL\0depends=virtio,virtio_ring\0");
        let parsed = Elf::parse(&elf).unwrap();
        assert_eq!(
            parsed.section_by_name(".modinfo").unwrap().unwrap(),
            b"license=GPL\0depends=virtio,virtio_ring\0"
        );
        assert_eq!(parsed.section_by_name(".missing").unwrap(), None);
    }

    #[test]
    fn malformed_files_are_errors_not_panics() {
        assert_eq!(Elf::parse(b"MZ\x90\x00").unwrap_err(), ElfError::NotElf);
        let mut elf = build::executable(MACHINE_X86_64, &[("Xen", 18, &[0; 8])], b"");
        elf[4] = 1;
        assert_eq!(Elf::parse(&elf).unwrap_err(), ElfError::Not64Bit);
        elf[4] = 2;
        // The note segment claims more bytes than the file has.
        elf[64 + 32..64 + 40].copy_from_slice(&10_000u64.to_le_bytes());
        assert!(matches!(
            Elf::parse(&elf).unwrap().notes(),
            Err(ElfError::Malformed(_))
        ));
        for cut in 0..elf.len() {
            if let Ok(parsed) = Elf::parse(&elf[..cut]) {
                let _ = parsed.notes();
                let _ = parsed.section_by_name(".modinfo");
            }
        }
    }
}
