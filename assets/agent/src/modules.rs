//! Kernel modules from `/etc/banger/modules.load` in the initramfs.
//!
//! The list is written by whoever builds the initramfs, already in dependency order, so no
//! `modules.dep` resolution happens in the guest. Each line is a path relative to
//! `/lib/modules/<release>/`, optionally followed by module parameters; `#` starts a comment.
//! Modules are loaded with `finit_module`; compressed ones (`.ko.xz`, `.ko.zst`, `.ko.gz`)
//! ask the kernel to decompress them, which needs `CONFIG_MODULE_DECOMPRESS`. A module that
//! is already there (built in, or loaded twice) is not an error.

use std::ffi::CString;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

/// Where the list lives in the initramfs.
pub const MODULES_LOAD: &str = "/etc/banger/modules.load";

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the module (Linux 6.4+).
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// One line of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    /// Relative to `/lib/modules/<release>/`.
    pub path: PathBuf,
    /// Parameters, space-separated as `insmod` takes them.
    pub params: String,
}

/// Parses the list; a line naming an absolute path or `..` is an error (with its number).
pub fn parse_modules_load(text: &str) -> Result<Vec<ModuleSpec>, String> {
    let mut modules = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (path, params) = match line.split_once(char::is_whitespace) {
            Some((path, params)) => (path, params.trim()),
            None => (line, ""),
        };
        let path = PathBuf::from(path);
        let relative_and_inside = path
            .components()
            .all(|component| matches!(component, Component::Normal(_) | Component::CurDir));
        if !relative_and_inside {
            return Err(format!(
                "{MODULES_LOAD} line {}: `{}` must be relative to /lib/modules/<release> and stay inside it",
                index + 1,
                path.display()
            ));
        }
        modules.push(ModuleSpec {
            path,
            params: params.to_owned(),
        });
    }
    Ok(modules)
}

/// Whether the kernel must decompress this module file.
pub fn is_compressed(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|extension| extension.to_str()),
        Some("xz" | "zst" | "gz")
    )
}

/// Loads one module; `Ok(false)` if it was already there.
pub fn load(directory: &Path, module: &ModuleSpec) -> Result<bool, String> {
    let path = directory.join(&module.path);
    let file = File::open(&path).map_err(|error| format!("{}: {error}", path.display()))?;
    let params = CString::new(module.params.as_str())
        .map_err(|_| format!("{}: parameters contain a NUL byte", path.display()))?;
    let flags = if is_compressed(&path) {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    };
    match finit_module(&file, &params, flags) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(errno) => Err(format!("{}: {errno}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_parameters_comments_and_blank_lines() {
        let text = "# banger's boot modules\n\
                    kernel/drivers/virtio/virtio_mmio.ko\n\
                    \n\
                    kernel/drivers/block/virtio_blk.ko.xz   # the disk\n\
                    kernel/net/vmw_vsock/vsock.ko  max_ports=4 debug=1\n";
        let modules = parse_modules_load(text).unwrap();
        assert_eq!(modules.len(), 3);
        assert_eq!(
            modules[0].path,
            Path::new("kernel/drivers/virtio/virtio_mmio.ko")
        );
        assert_eq!(modules[0].params, "");
        assert!(is_compressed(&modules[1].path));
        assert!(!is_compressed(&modules[0].path));
        assert_eq!(modules[2].params, "max_ports=4 debug=1");
    }

    #[test]
    fn refuses_paths_that_leave_the_module_directory() {
        let error = parse_modules_load("ok.ko\n/lib/evil.ko\n").unwrap_err();
        assert!(error.contains("line 2"), "{error}");
        assert!(parse_modules_load("kernel/../../x.ko").is_err());
    }

    #[test]
    fn an_empty_list_loads_nothing() {
        assert!(parse_modules_load("").unwrap().is_empty());
        assert!(parse_modules_load("# nothing\n\n").unwrap().is_empty());
    }
}
