//! Kernel modules: the dependency closure of the modules banger's initramfs loads, in load
//! order, from an extracted `lib/modules/<release>/` tree.
//!
//! 1. [`ModuleTree::open`] walks the tree (without following symlinks) and indexes every
//!    `.ko`, `.ko.xz`, `.ko.zst` and `.ko.gz` by module name (`-` and `_` are the same in
//!    module names, so names are kept with `_`). It reads `modules.builtin` (modules compiled
//!    into the kernel) and, when present, `modules.dep`.
//! 2. [`ModuleTree::resolve`] follows dependencies depth-first from each requested module,
//!    emitting a module after all of its dependencies, so the list loads front to back.
//!    Dependencies come from `modules.dep` when the tree has one; otherwise from each
//!    module's own `.modinfo` `depends=` field, which is what `depmod` itself turns into
//!    `modules.dep`. A Debian kernel *package* ships no `modules.dep` (its postinst runs
//!    depmod), so for packages the modinfo path is the one taken.
//! 3. Built-in modules are skipped and reported, not errors. A module that is neither a
//!    file nor built in is an error naming it and the module that needed it.
//! 4. [`ResolvedModule::read_plain`] gives a module's uncompressed ELF: the in-initramfs
//!    loader uses `finit_module` on plain `.ko` files, and kernels need not have module
//!    decompression built in.
//!
//! Known weakness: `softdep` (soft dependencies, e.g. a crc32c implementation) is not
//! followed; none of the virtio and vsock modules banger loads declares one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::compression::{self, Compression};
use super::elf::{Elf, ElfError};

/// Errors from reading a module tree or resolving modules in it.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("cannot read the module tree {path}")]
    ReadTree {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read module {path}")]
    ReadModule {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("module {path} is not a valid ELF module")]
    ModuleElf {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error("module {name} {context}is neither a module file in {tree} nor built into the kernel")]
    Missing {
        name: String,
        /// `"(needed by virtio_net) "` or empty.
        context: String,
        tree: PathBuf,
    },
    #[error("module {name} appears twice in {tree}: {first} and {second}")]
    Duplicate {
        name: String,
        tree: PathBuf,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("modules depend on each other in a cycle: {}", cycle.join(" → "))]
    Cycle { cycle: Vec<String> },
}

/// A module name in its canonical form (`-` → `_`), as the kernel compares them.
pub fn canonical_name(name: &str) -> String {
    name.replace('-', "_")
}

/// A module file found in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    pub name: String,
    /// Path below the tree root as found, e.g. `kernel/drivers/virtio/virtio.ko.xz`.
    pub path: PathBuf,
    /// The file's compression, judged from its extension.
    pub compression: Compression,
}

/// Where dependencies were read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependencySource {
    ModulesDep,
    Modinfo,
}

/// An indexed `lib/modules/<release>/` tree.
#[derive(Debug, Clone)]
pub struct ModuleTree {
    root: PathBuf,
    files: BTreeMap<String, ModuleFile>,
    builtin: BTreeSet<String>,
    /// From `modules.dep`: module name → names of its direct and indirect dependencies.
    modules_dep: Option<HashMap<String, Vec<String>>>,
}

/// A module in a resolved load list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModule {
    pub name: String,
    /// The file on the host.
    pub source: PathBuf,
    pub compression: Compression,
    /// Where the plain module goes below `lib/modules/<release>/`: the tree path without a
    /// compression suffix (`kernel/drivers/virtio/virtio.ko`).
    pub load_path: PathBuf,
    /// Its dependencies' names, as declared.
    pub depends: Vec<String>,
}

/// The result of resolving a module list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModuleClosure {
    /// Every module to load, dependencies before the modules needing them.
    pub load_order: Vec<ResolvedModule>,
    /// Requested or needed modules that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
    pub source: Option<DependencySource>,
}

impl ModuleClosure {
    /// The names in load order.
    pub fn names(&self) -> Vec<&str> {
        self.load_order
            .iter()
            .map(|module| module.name.as_str())
            .collect()
    }
}

impl ResolvedModule {
    /// The module's uncompressed bytes.
    pub fn read_plain(&self) -> Result<Vec<u8>, ModulesError> {
        let read_error = |source| ModulesError::ReadModule {
            path: self.source.clone(),
            source,
        };
        let raw = std::fs::read(&self.source).map_err(read_error)?;
        if self.compression == Compression::None {
            return Ok(raw);
        }
        let mut plain = Vec::with_capacity(raw.len() * 3);
        compression::decoder(Compression::sniff(&raw), &raw[..])
            .map_err(|error| read_error(std::io::Error::other(error)))?
            .read_to_end(&mut plain)
            .map_err(read_error)?;
        Ok(plain)
    }
}

const MODULE_SUFFIXES: &[(&str, Compression)] = &[
    (".ko", Compression::None),
    (".ko.xz", Compression::Xz),
    (".ko.zst", Compression::Zstd),
    (".ko.gz", Compression::Gzip),
];

/// The module name and compression of a file name, if it is a module.
fn module_file_name(file_name: &str) -> Option<(String, Compression)> {
    MODULE_SUFFIXES.iter().find_map(|(suffix, compression)| {
        let stem = file_name.strip_suffix(suffix)?;
        (!stem.is_empty()).then(|| (canonical_name(stem), *compression))
    })
}

impl ModuleTree {
    /// Indexes the tree at `root` (a `lib/modules/<release>` directory).
    pub fn open(root: &Path) -> Result<ModuleTree, ModulesError> {
        let tree_error = |path: &Path| {
            let path = path.to_owned();
            move |source| ModulesError::ReadTree { path, source }
        };
        let mut files: BTreeMap<String, ModuleFile> = BTreeMap::new();
        let mut pending = vec![PathBuf::new()];
        while let Some(relative) = pending.pop() {
            let dir = root.join(&relative);
            let mut entries = std::fs::read_dir(&dir)
                .map_err(tree_error(&dir))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(tree_error(&dir))?;
            entries.sort_by_key(|entry| entry.file_name());
            for entry in entries {
                let path = relative.join(entry.file_name());
                let kind = entry.file_type().map_err(tree_error(&root.join(&path)))?;
                if kind.is_dir() {
                    pending.push(path);
                    continue;
                }
                if !kind.is_file() {
                    // Symlinks (`build`, `source`) point at headers, never at modules.
                    continue;
                }
                let Some((name, compression)) =
                    entry.file_name().to_str().and_then(module_file_name)
                else {
                    continue;
                };
                if let Some(first) = files.get(&name) {
                    return Err(ModulesError::Duplicate {
                        name,
                        tree: root.to_owned(),
                        first: first.path.clone(),
                        second: path,
                    });
                }
                files.insert(
                    name.clone(),
                    ModuleFile {
                        name,
                        path,
                        compression,
                    },
                );
            }
        }
        let builtin = read_optional(&root.join("modules.builtin"))?
            .map(|text| {
                text.lines()
                    .filter_map(|line| {
                        let file_name = line.trim().rsplit('/').next()?;
                        module_file_name(file_name).map(|(name, _)| name)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let modules_dep =
            read_optional(&root.join("modules.dep"))?.map(|text| parse_modules_dep(&text));
        Ok(ModuleTree {
            root: root.to_owned(),
            files,
            builtin,
            modules_dep,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The module files, by name.
    pub fn files(&self) -> &BTreeMap<String, ModuleFile> {
        &self.files
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&canonical_name(name))
    }

    /// The declared dependencies of `file`.
    fn dependencies_of(&self, file: &ModuleFile) -> Result<Vec<String>, ModulesError> {
        if let Some(dep) = &self.modules_dep {
            return Ok(dep.get(&file.name).cloned().unwrap_or_default());
        }
        let module = self.resolved(file, Vec::new());
        let bytes = module.read_plain()?;
        let modinfo_error = |source| ModulesError::ModuleElf {
            path: module.source.clone(),
            source,
        };
        let elf = Elf::parse(&bytes).map_err(modinfo_error)?;
        let modinfo = elf.section_by_name(".modinfo").map_err(modinfo_error)?;
        Ok(modinfo
            .unwrap_or_default()
            .split(|&b| b == 0)
            .filter_map(|field| field.strip_prefix(b"depends="))
            .flat_map(|list| list.split(|&b| b == b','))
            .filter(|name| !name.is_empty())
            .map(|name| canonical_name(&String::from_utf8_lossy(name)))
            .collect())
    }

    fn resolved(&self, file: &ModuleFile, depends: Vec<String>) -> ResolvedModule {
        let mut load_path = file.path.clone();
        if file.compression != Compression::None {
            // `x.ko.zst` → `x.ko`.
            load_path.set_extension("");
        }
        ResolvedModule {
            name: file.name.clone(),
            source: self.root.join(&file.path),
            compression: file.compression,
            load_path,
            depends,
        }
    }

    /// The modules to load for `wanted`, dependencies first, each once.
    pub fn resolve<S: AsRef<str>>(&self, wanted: &[S]) -> Result<ModuleClosure, ModulesError> {
        let mut closure = ModuleClosure {
            source: Some(if self.modules_dep.is_some() {
                DependencySource::ModulesDep
            } else {
                DependencySource::Modinfo
            }),
            ..ModuleClosure::default()
        };
        let mut done: BTreeSet<String> = BTreeSet::new();
        for name in wanted {
            let mut path = Vec::new();
            self.visit(
                &canonical_name(name.as_ref()),
                None,
                &mut path,
                &mut done,
                &mut closure,
            )?;
        }
        Ok(closure)
    }

    fn visit(
        &self,
        name: &str,
        needed_by: Option<&str>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        closure: &mut ModuleClosure,
    ) -> Result<(), ModulesError> {
        if done.contains(name) {
            return Ok(());
        }
        if let Some(start) = path.iter().position(|on_path| on_path == name) {
            let mut cycle = path[start..].to_vec();
            cycle.push(name.to_owned());
            return Err(ModulesError::Cycle { cycle });
        }
        let Some(file) = self.files.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_owned());
                closure.builtin.push(name.to_owned());
                return Ok(());
            }
            return Err(ModulesError::Missing {
                name: name.to_owned(),
                context: needed_by
                    .map(|by| format!("(needed by {by}) "))
                    .unwrap_or_default(),
                tree: self.root.clone(),
            });
        };
        let depends = self.dependencies_of(file)?;
        path.push(name.to_owned());
        for dependency in &depends {
            self.visit(dependency, Some(name), path, done, closure)?;
        }
        path.pop();
        done.insert(name.to_owned());
        closure.load_order.push(self.resolved(file, depends));
        Ok(())
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, ModulesError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModulesError::ReadTree {
            path: path.to_owned(),
            source,
        }),
    }
}

/// `modules.dep`: `kernel/a.ko: kernel/b.ko kernel/c.ko` per line → name → dependency names.
fn parse_modules_dep(text: &str) -> HashMap<String, Vec<String>> {
    let name_of = |path: &str| {
        path.trim()
            .rsplit('/')
            .next()
            .and_then(module_file_name)
            .map(|(name, _)| name)
    };
    text.lines()
        .filter_map(|line| {
            let (module, dependencies) = line.split_once(':')?;
            Some((
                name_of(module)?,
                dependencies
                    .split_whitespace()
                    .filter_map(name_of)
                    .collect(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::elf::build;

    fn module(depends: &str) -> Vec<u8> {
        build::relocatable(format!("license=GPL\0depends={depends}\0intree=Y\0").as_bytes())
    }

    fn write(root: &Path, path: &str, bytes: &[u8]) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// A tree shaped like Debian's virtio and vsock modules, deps only in modinfo.
    fn debian_like_tree(root: &Path) {
        write(root, "kernel/drivers/virtio/virtio_ring.ko", &module(""));
        write(
            root,
            "kernel/drivers/virtio/virtio.ko",
            &module("virtio_ring"),
        );
        write(
            root,
            "kernel/drivers/virtio/virtio_mmio.ko",
            &module("virtio,virtio_ring"),
        );
        write(
            root,
            "kernel/drivers/block/virtio_blk.ko",
            &module("virtio,virtio_ring"),
        );
        write(root, "kernel/net/core/failover.ko", &module(""));
        write(
            root,
            "kernel/drivers/net/net_failover.ko",
            &module("failover"),
        );
        write(
            root,
            "kernel/drivers/net/virtio_net.ko.zst",
            &zstd::encode_all(&module("virtio_ring,virtio,net_failover")[..], 3).unwrap(),
        );
        write(root, "kernel/net/vmw_vsock/vsock.ko", &module(""));
        write(
            root,
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
            &module("vsock"),
        );
        write(
            root,
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            &module("virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock"),
        );
        write(root, "kernel/arch/x86/intel-uncore.ko", &module(""));
        write(
            root,
            "modules.builtin",
            b"kernel/drivers/char/virtio_console.ko\nkernel/fs/ext4/ext4.ko\n",
        );
    }

    #[test]
    fn resolves_dependencies_first_from_modinfo() {
        let dir = tempfile::tempdir().unwrap();
        debian_like_tree(dir.path());
        let tree = ModuleTree::open(dir.path()).unwrap();
        assert!(tree.files().contains_key("intel_uncore"));
        let closure = tree
            .resolve(&[
                "virtio_mmio",
                "virtio_blk",
                "virtio_net",
                "virtio-console",
                "vsock",
                "vmw_vsock_virtio_transport",
            ])
            .unwrap();
        assert_eq!(closure.source, Some(DependencySource::Modinfo));
        assert_eq!(
            closure.names(),
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
            ]
        );
        assert_eq!(closure.builtin, ["virtio_console"]);
        let net = &closure.load_order[6];
        assert_eq!(net.compression, Compression::Zstd);
        assert_eq!(net.load_path, Path::new("kernel/drivers/net/virtio_net.ko"));
        assert_eq!(net.depends, ["virtio_ring", "virtio", "net_failover"]);
        assert_eq!(
            net.read_plain().unwrap(),
            module("virtio_ring,virtio,net_failover")
        );
    }

    #[test]
    fn modules_dep_wins_when_present() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "kernel/a.ko", b"not even an ELF");
        write(dir.path(), "kernel/b-c.ko", b"not even an ELF");
        write(
            dir.path(),
            "modules.dep",
            b"kernel/a.ko: kernel/b-c.ko\nkernel/b-c.ko:\n",
        );
        let closure = ModuleTree::open(dir.path())
            .unwrap()
            .resolve(&["a"])
            .unwrap();
        assert_eq!(closure.source, Some(DependencySource::ModulesDep));
        assert_eq!(closure.names(), ["b_c", "a"]);
    }

    #[test]
    fn a_missing_module_is_named_with_who_needed_it() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "kernel/a.ko", &module("ghost"));
        let tree = ModuleTree::open(dir.path()).unwrap();
        let error = tree.resolve(&["a"]).unwrap_err().to_string();
        assert!(
            error.starts_with("module ghost (needed by a) is neither"),
            "{error}"
        );
        let error = tree.resolve(&["nope"]).unwrap_err().to_string();
        assert!(
            error.starts_with("module nope is neither a module file in"),
            "{error}"
        );
    }

    #[test]
    fn cycles_and_duplicates_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "kernel/a.ko", &module("b"));
        write(dir.path(), "kernel/b.ko", &module("a"));
        let error = ModuleTree::open(dir.path())
            .unwrap()
            .resolve(&["a"])
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "modules depend on each other in a cycle: a → b → a"
        );
        write(dir.path(), "extra/a.ko.xz", b"");
        let error = ModuleTree::open(dir.path()).unwrap_err().to_string();
        assert!(error.contains("module a appears twice"), "{error}");
    }
}
