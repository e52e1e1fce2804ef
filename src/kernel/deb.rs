//! Reading Debian packages: the `ar` container, the control fields and extracting selected
//! paths of `data.tar.*`, refusing anything that would land outside the destination.
//!
//! A `.deb` is an `ar` archive (`!<arch>\n`, then members with 60-byte headers, bodies padded
//! to even offsets) whose first member is `debian-binary` (`2.0\n`), followed by
//! `control.tar.*` and `data.tar.*` (xz, zstd, gzip or plain; sniffed by magic).
//!
//! Extraction ([`DebPackage::extract`]): a temp directory is made beside the destination
//! (which must not exist yet), `data.tar.*` is streamed into it under `untar`'s confinement
//! (no absolute paths or `..`, nothing written through a symlink, symlinks only to targets
//! inside, hard links only to files extracted before, no devices or FIFOs, permission bits
//! only), skipping unselected entries; on success the temp directory is renamed to the
//! destination, on any error it is removed, so a failed extraction leaves nothing.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::compression::{self, Compression};
use crate::untar::{self, UntarError, normalize};

/// Errors from reading or extracting a Debian package.
#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("cannot read package {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a Debian package: {reason}")]
    NotADeb { path: PathBuf, reason: String },
    #[error("package {path}: malformed ar member header at byte {offset}: {reason}")]
    ArHeader {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("package {path}: member {member}")]
    MemberCompression {
        path: PathBuf,
        member: String,
        #[source]
        source: compression::DecompressError,
    },
    #[error("package {path}: cannot read {member}")]
    Member {
        path: PathBuf,
        member: String,
        #[source]
        source: io::Error,
    },
    #[error("package {path}: control.tar has no `control` file")]
    NoControl { path: PathBuf },
    #[error("package {path}: entry {entry:?} is refused: {reason}")]
    UnsafeEntry {
        path: PathBuf,
        entry: String,
        reason: String,
    },
    #[error("package {path}: cannot extract {entry:?} to {target}")]
    Write {
        path: PathBuf,
        entry: String,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot extract package {path} into {destination}: {reason}")]
    Destination {
        path: PathBuf,
        destination: PathBuf,
        reason: String,
    },
}

/// One member of an `ar` archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArMember {
    pub name: String,
    /// Offset of the member's body in the archive.
    pub offset: u64,
    pub size: u64,
}

const AR_MAGIC: &[u8; 8] = b"!<arch>\n";
const AR_HEADER: usize = 60;

/// Why an ar index could not be read; turned into a [`DebError`] naming the file.
#[derive(Debug)]
enum ArProblem {
    Io(io::Error),
    NotAr,
    Header { offset: u64, reason: String },
}

/// The members of the `ar` archive in `reader`, in order.
fn read_ar_index<R: Read + Seek>(reader: &mut R) -> Result<Vec<ArMember>, ArProblem> {
    let mut magic = [0u8; 8];
    reader
        .read_exact(&mut magic)
        .map_err(|error| match error.kind() {
            io::ErrorKind::UnexpectedEof => ArProblem::NotAr,
            _ => ArProblem::Io(error),
        })?;
    if &magic != AR_MAGIC {
        return Err(ArProblem::NotAr);
    }
    let end = reader.seek(SeekFrom::End(0)).map_err(ArProblem::Io)?;
    let mut members = Vec::new();
    let mut offset = AR_MAGIC.len() as u64;
    while offset < end {
        let bad = |reason: String| ArProblem::Header { offset, reason };
        reader
            .seek(SeekFrom::Start(offset))
            .map_err(ArProblem::Io)?;
        let mut header = [0u8; AR_HEADER];
        reader
            .read_exact(&mut header)
            .map_err(|error| match error.kind() {
                io::ErrorKind::UnexpectedEof => bad("the archive ends inside a header".into()),
                _ => ArProblem::Io(error),
            })?;
        if &header[58..60] != b"`\n" {
            return Err(bad("no \"`\\n\" terminator".into()));
        }
        let name = std::str::from_utf8(&header[..16])
            .map_err(|_| bad("the member name is not UTF-8".into()))?
            .trim_end_matches(' ');
        // GNU ar ends names with '/'; BSD-style long names (`#1/N`) do not occur in .debs.
        let name = name.strip_suffix('/').unwrap_or(name).to_owned();
        let size = std::str::from_utf8(&header[48..58])
            .ok()
            .and_then(|text| text.trim_end_matches(' ').parse::<u64>().ok())
            .ok_or_else(|| bad("the size is not a decimal number".into()))?;
        let body = offset + AR_HEADER as u64;
        if body.checked_add(size).is_none_or(|body_end| body_end > end) {
            return Err(bad(format!(
                "member {name:?} claims {size} bytes, past the end of the archive"
            )));
        }
        members.push(ArMember {
            name,
            offset: body,
            size,
        });
        // Bodies are padded to an even offset.
        offset = body + size + (size & 1);
    }
    Ok(members)
}

/// A Debian package on disk, its `ar` members indexed.
#[derive(Debug, Clone)]
pub struct DebPackage {
    path: PathBuf,
    members: Vec<ArMember>,
}

/// A package's control fields (`Package`, `Version`, `Depends`, …), in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlFields {
    pub fields: Vec<(String, String)>,
}

/// One package in a relationship field: `name (op version)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub name: String,
    /// `("=", "6.1.192-2")` for `(= 6.1.192-2)`.
    pub version: Option<(String, String)>,
}

impl ControlFields {
    /// Parses a `control` file: `Name: value` lines, continuation lines starting with
    /// whitespace.
    pub fn parse(text: &str) -> ControlFields {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some((_, value)) = fields.last_mut() {
                    value.push('\n');
                    value.push_str(line.trim());
                }
            } else if let Some((name, value)) = line.split_once(':') {
                fields.push((name.trim().to_owned(), value.trim().to_owned()));
            }
        }
        ControlFields { fields }
    }

    /// The value of field `name` (case-insensitive, as Debian field names are).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// A relationship field (`Depends`, `Pre-Depends`, …) as a list of alternatives
    /// (`a | b, c` → `[[a, b], [c]]`); architecture qualifiers and restrictions are dropped.
    pub fn relations(&self, name: &str) -> Vec<Vec<Relation>> {
        let Some(value) = self.get(name) else {
            return Vec::new();
        };
        value
            .split(',')
            .map(|group| {
                group
                    .split('|')
                    .filter_map(|atom| {
                        let atom = atom.trim();
                        let name_end = atom
                            .find(|c: char| c.is_whitespace() || c == '(' || c == '[' || c == '<')
                            .unwrap_or(atom.len());
                        let name = atom[..name_end].split(':').next().unwrap_or("");
                        if name.is_empty() {
                            return None;
                        }
                        let version = atom.find('(').and_then(|open| {
                            let close = atom[open..].find(')')? + open;
                            let inner = atom[open + 1..close].trim();
                            let split = inner
                                .find(|c: char| !matches!(c, '<' | '>' | '='))
                                .unwrap_or(inner.len());
                            Some((
                                inner[..split].trim().to_owned(),
                                inner[split..].trim().to_owned(),
                            ))
                        });
                        Some(Relation {
                            name: name.to_owned(),
                            version,
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .filter(|group| !group.is_empty())
            .collect()
    }
}

/// What an extraction wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExtractSummary {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    /// Bytes of regular file contents.
    pub bytes: u64,
}

impl DebPackage {
    /// Opens the package at `path` and indexes its members.
    pub fn open(path: &Path) -> Result<DebPackage, DebError> {
        let read_error = |source| DebError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(read_error)?;
        let members = read_ar_index(&mut file).map_err(|problem| match problem {
            ArProblem::Io(source) => read_error(source),
            ArProblem::NotAr => DebError::NotADeb {
                path: path.to_owned(),
                reason: "no `!<arch>` ar magic".into(),
            },
            ArProblem::Header { offset, reason } => DebError::ArHeader {
                path: path.to_owned(),
                offset,
                reason,
            },
        })?;
        let package = DebPackage {
            path: path.to_owned(),
            members,
        };
        let not_a_deb = |reason: &str| DebError::NotADeb {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        match package.members.first() {
            Some(first) if first.name == "debian-binary" => {
                let mut version = String::new();
                package
                    .member_reader(first)?
                    .take(16)
                    .read_to_string(&mut version)
                    .map_err(|_| not_a_deb("debian-binary is not text"))?;
                if !version.starts_with("2.") {
                    return Err(not_a_deb(&format!(
                        "format version {:?}, banger reads 2.x",
                        version.trim()
                    )));
                }
            }
            _ => return Err(not_a_deb("its first member is not `debian-binary`")),
        }
        for wanted in ["control.tar", "data.tar"] {
            package.tar_member(wanted)?;
        }
        Ok(package)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn members(&self) -> &[ArMember] {
        &self.members
    }

    /// The member `control.tar*` or `data.tar*`.
    fn tar_member(&self, stem: &str) -> Result<&ArMember, DebError> {
        self.members
            .iter()
            .find(|member| {
                member.name == stem
                    || member
                        .name
                        .strip_prefix(stem)
                        .is_some_and(|rest| rest.starts_with('.'))
            })
            .ok_or_else(|| DebError::NotADeb {
                path: self.path.clone(),
                reason: format!("no {stem}.* member"),
            })
    }

    fn member_reader(&self, member: &ArMember) -> Result<io::Take<File>, DebError> {
        let error = |source| DebError::Member {
            path: self.path.clone(),
            member: member.name.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(error)?;
        file.seek(SeekFrom::Start(member.offset)).map_err(error)?;
        Ok(file.take(member.size))
    }

    /// The decompressed tar stream of a `*.tar.*` member.
    fn tar_stream(&self, member: &ArMember) -> Result<Box<dyn Read>, DebError> {
        let mut head = [0u8; 6];
        let got = self
            .member_reader(member)?
            .read(&mut head)
            .map_err(|source| DebError::Member {
                path: self.path.clone(),
                member: member.name.clone(),
                source,
            })?;
        let compression = Compression::sniff(&head[..got]);
        compression::decoder(compression, self.member_reader(member)?).map_err(|source| {
            DebError::MemberCompression {
                path: self.path.clone(),
                member: member.name.clone(),
                source,
            }
        })
    }

    /// The fields of `control.tar.*`'s `control` file.
    pub fn control(&self) -> Result<ControlFields, DebError> {
        let member = self.tar_member("control.tar")?;
        let member_error = |source| DebError::Member {
            path: self.path.clone(),
            member: member.name.clone(),
            source,
        };
        let mut archive = tar::Archive::new(self.tar_stream(member)?);
        for entry in archive.entries().map_err(member_error)? {
            let mut entry = entry.map_err(member_error)?;
            let name = entry.path_bytes().into_owned();
            if normalize(&name).is_ok_and(|path| path == Path::new("control")) {
                let mut text = String::new();
                entry.read_to_string(&mut text).map_err(member_error)?;
                return Ok(ControlFields::parse(&text));
            }
        }
        Err(DebError::NoControl {
            path: self.path.clone(),
        })
    }

    /// Extracts the `data.tar.*` entries whose normalized path (`boot/vmlinuz-…`, no leading
    /// `./` or `/`) `select` accepts into `destination`, which must not exist yet and is
    /// created only if everything succeeded.
    pub fn extract(
        &self,
        destination: &Path,
        select: &dyn Fn(&Path) -> bool,
    ) -> Result<ExtractSummary, DebError> {
        let destination_error = |reason: String| DebError::Destination {
            path: self.path.clone(),
            destination: destination.to_owned(),
            reason,
        };
        if destination.symlink_metadata().is_ok() {
            return Err(destination_error("it already exists".into()));
        }
        let parent = destination
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let temp = tempfile::Builder::new()
            .prefix(".deb-extract-")
            .tempdir_in(parent)
            .map_err(|error| destination_error(format!("cannot make a temp directory: {error}")))?;
        let summary = self.extract_into(temp.path(), select)?;
        std::fs::rename(temp.path(), destination)
            .map_err(|error| destination_error(format!("cannot rename into place: {error}")))?;
        // Already renamed: nothing left for the guard to remove.
        let _ = temp.keep();
        Ok(summary)
    }

    fn extract_into(
        &self,
        root: &Path,
        select: &dyn Fn(&Path) -> bool,
    ) -> Result<ExtractSummary, DebError> {
        let member = self.tar_member("data.tar")?;
        let mut archive = tar::Archive::new(self.tar_stream(member)?);
        let summary =
            untar::extract_into(&mut archive, root, &PACKAGE_RULES, select).map_err(|error| {
                match error {
                    UntarError::Read { source } => DebError::Member {
                        path: self.path.clone(),
                        member: member.name.clone(),
                        source,
                    },
                    UntarError::Unsafe { entry, reason } => DebError::UnsafeEntry {
                        path: self.path.clone(),
                        entry,
                        reason,
                    },
                    UntarError::Write {
                        entry,
                        target,
                        source,
                    } => DebError::Write {
                        path: self.path.clone(),
                        entry,
                        target,
                        source,
                    },
                }
            })?;
        Ok(ExtractSummary {
            files: summary.files,
            directories: summary.directories,
            symlinks: summary.symlinks,
            hard_links: summary.hard_links,
            bytes: summary.bytes,
        })
    }
}

/// A package's files stay inside the destination, keep permission bits only (no
/// setuid/setgid) and leave every directory writable by its owner, so the tree can be removed.
const PACKAGE_RULES: untar::Rules = untar::Rules {
    link_targets: untar::LinkTargets::Inside,
    special_files: untar::SpecialFiles::Refuse,
    mode_mask: 0o777,
    directory_mode_floor: 0o700,
    keep_times: false,
};

/// Builds `.deb` files in memory for tests.
#[cfg(test)]
pub(crate) mod build {
    /// An `ar` archive of `members` (name, body).
    pub fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = b"!<arch>\n".to_vec();
        for (name, body) in members {
            let header = format!(
                "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                name,
                0,
                0,
                0,
                "100644",
                body.len()
            );
            assert_eq!(header.len(), 60);
            out.extend(header.as_bytes());
            out.extend(*body);
            if body.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    /// One entry of a test tar: path, type, contents or link target.
    pub enum Entry<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        Fifo(&'a str),
    }

    /// A plain tar of `entries`, paths written raw (so hostile ones survive).
    pub fn tar(entries: &[Entry]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_gnu();
            let (path, kind, body, link): (&str, tar::EntryType, &[u8], Option<&str>) = match entry
            {
                Entry::File(path, body) => (path, tar::EntryType::Regular, body, None),
                Entry::Dir(path) => (path, tar::EntryType::Directory, b"", None),
                Entry::Symlink(path, to) => (path, tar::EntryType::Symlink, b"", Some(to)),
                Entry::HardLink(path, to) => (path, tar::EntryType::Link, b"", Some(to)),
                Entry::Fifo(path) => (path, tar::EntryType::Fifo, b"", None),
            };
            // Raw bytes into the name field: `set_path` refuses `..`, which is the point here.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                let field = &mut header.as_old_mut().linkname;
                field[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_entry_type(kind);
            header.set_mode(if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            header.set_size(body.len() as u64);
            header.set_cksum();
            builder.append(&header, body).unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// A gzip-compressed copy of `data`.
    pub fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    /// A `.deb` with `control` text and data `entries` (zstd data, gzip control).
    pub fn deb(control: &str, entries: &[Entry]) -> Vec<u8> {
        let control_tar = tar(&[
            Entry::Dir("./"),
            Entry::File("./control", control.as_bytes()),
        ]);
        let data_tar = zstd::encode_all(&tar(entries)[..], 3).unwrap();
        ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.gz", &gzip(&control_tar)),
            ("data.tar.zst", &data_tar),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::build::Entry;
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const CONTROL: &str = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2), foo:any | bar (>= 1.0) [amd64]\nDescription: meta\n more text\n";

    fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
        let path = dir.join("p.deb");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn the_ar_index_finds_members_with_odd_sizes_and_gnu_names() {
        let mut archive = build::ar(&[("debian-binary", b"2.0\n"), ("odd/", b"abc"), ("x", b"")]);
        let index = read_ar_index(&mut io::Cursor::new(&archive)).unwrap();
        assert_eq!(
            index,
            vec![
                ArMember {
                    name: "debian-binary".into(),
                    offset: 68,
                    size: 4
                },
                ArMember {
                    name: "odd".into(),
                    offset: 132,
                    size: 3
                },
                ArMember {
                    name: "x".into(),
                    offset: 196,
                    size: 0
                },
            ]
        );
        assert_eq!(&archive[132..135], b"abc");
        // A member claiming more than the file holds.
        archive.truncate(133);
        assert!(matches!(
            read_ar_index(&mut io::Cursor::new(&archive)),
            Err(ArProblem::Header { offset: 72, .. })
        ));
        assert!(matches!(
            read_ar_index(&mut io::Cursor::new(b"PK\x03\x04 a zip file")),
            Err(ArProblem::NotAr)
        ));
    }

    #[test]
    fn control_fields_and_relations() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &build::deb(CONTROL, &[Entry::Dir("./")]));
        let control = DebPackage::open(&path).unwrap().control().unwrap();
        assert_eq!(control.get("package"), Some("linux-image-cloud-amd64"));
        assert_eq!(control.get("Description"), Some("meta\nmore text"));
        let relation = |name: &str, version: Option<(&str, &str)>| Relation {
            name: name.into(),
            version: version.map(|(op, v)| (op.into(), v.into())),
        };
        assert_eq!(
            control.relations("Depends"),
            vec![
                vec![relation(
                    "linux-image-6.1.0-56-cloud-amd64",
                    Some(("=", "6.1.192-2"))
                )],
                vec![relation("foo", None), relation("bar", Some((">=", "1.0")))],
            ]
        );
    }

    #[test]
    fn extracts_selected_entries_with_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &build::deb(
                CONTROL,
                &[
                    Entry::Dir("./"),
                    Entry::Dir("./boot/"),
                    Entry::File("./boot/vmlinuz-1", b"kernel"),
                    Entry::File("./usr/share/doc/x", b"docs"),
                    Entry::File("lib/modules/1/kernel/a.ko", b"module"),
                    Entry::Symlink("./lib/modules/1/source", "kernel/a.ko"),
                    Entry::HardLink("./lib/modules/1/b.ko", "./lib/modules/1/kernel/a.ko"),
                ],
            ),
        );
        let out = dir.path().join("out");
        let summary = DebPackage::open(&path)
            .unwrap()
            .extract(&out, &|p| !p.starts_with("usr"))
            .unwrap();
        assert_eq!(
            summary,
            ExtractSummary {
                files: 2,
                directories: 1,
                symlinks: 1,
                hard_links: 1,
                bytes: 12
            }
        );
        assert_eq!(
            std::fs::read(out.join("boot/vmlinuz-1")).unwrap(),
            b"kernel"
        );
        assert_eq!(
            std::fs::read(out.join("lib/modules/1/source")).unwrap(),
            b"module"
        );
        assert_eq!(
            std::fs::read(out.join("lib/modules/1/b.ko")).unwrap(),
            b"module"
        );
        assert!(!out.join("usr").exists());
        let mode = std::fs::metadata(out.join("boot/vmlinuz-1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o644);
        // Only the destination is left beside the package.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["out", "p.deb"]);
    }

    #[test]
    fn hostile_entries_are_refused_and_leave_nothing() {
        let cases: Vec<(Vec<Entry>, &str)> = vec![
            (vec![Entry::File("../escape", b"x")], "contains `..`"),
            (
                vec![Entry::File("./boot/../../escape", b"x")],
                "contains `..`",
            ),
            (vec![Entry::File("/etc/passwd", b"x")], "absolute"),
            (vec![Entry::Symlink("./link", "/etc")], "absolute path"),
            (vec![Entry::Symlink("./a/link", "../../etc")], "climbs out"),
            (
                vec![Entry::Symlink("./link", "."), Entry::File("./link/x", b"x")],
                "written through the symlink",
            ),
            (vec![Entry::HardLink("./h", "/etc/shadow")], "absolute"),
            (
                vec![Entry::HardLink("./h", "missing")],
                "not a file extracted before it",
            ),
            (vec![Entry::Fifo("./fifo")], "is not extracted"),
            (
                vec![Entry::File("./x", b"1"), Entry::File("./x", b"2")],
                "appears twice",
            ),
            (
                vec![Entry::File("./f", b"1"), Entry::File("./f/g", b"2")],
                "not a directory",
            ),
        ];
        for (entries, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = write(dir.path(), &build::deb(CONTROL, &entries));
            let out = dir.path().join("out");
            let error = DebPackage::open(&path)
                .unwrap()
                .extract(&out, &|_| true)
                .unwrap_err();
            assert!(matches!(error, DebError::UnsafeEntry { .. }), "{error}");
            let message = error.to_string();
            assert!(
                message.contains(expected),
                "expected {expected:?} in: {message}"
            );
            assert!(message.contains("p.deb"), "{message}");
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                1,
                "something was left behind for {expected:?}"
            );
        }
    }

    #[test]
    fn a_symlink_inside_the_package_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &build::deb(CONTROL, &[Entry::Symlink("./a/b/link", "../c/../../d")]),
        );
        let out = dir.path().join("out");
        DebPackage::open(&path)
            .unwrap()
            .extract(&out, &|_| true)
            .unwrap();
        assert_eq!(
            std::fs::read_link(out.join("a/b/link")).unwrap(),
            Path::new("../c/../../d")
        );
    }

    #[test]
    fn not_a_deb() {
        let dir = tempfile::tempdir().unwrap();
        for (bytes, expected) in [
            (b"hello".to_vec(), "no `!<arch>` ar magic"),
            (
                build::ar(&[("data.tar", b"")]),
                "first member is not `debian-binary`",
            ),
            (
                build::ar(&[("debian-binary", b"3.0\n")]),
                "format version \"3.0\"",
            ),
            (
                build::ar(&[("debian-binary", b"2.0\n")]),
                "no control.tar.* member",
            ),
        ] {
            let path = write(dir.path(), &bytes);
            let error = DebPackage::open(&path).unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }
        let path = dir.path().join("out");
        std::fs::create_dir(&path).unwrap();
        let deb = write(dir.path(), &build::deb(CONTROL, &[]));
        let error = DebPackage::open(&deb)
            .unwrap()
            .extract(&path, &|_| true)
            .unwrap_err();
        assert!(error.to_string().contains("already exists"), "{error}");
    }
}
