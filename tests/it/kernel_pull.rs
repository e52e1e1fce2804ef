//! `banger kernel pull NAME` of a catalog kernel whose source is a bundle, through the real
//! binary in a sandboxed HOME: a well-formed bundle is fetched, unpacked and recorded; a bundle
//! whose catalog sha256 is wrong, a truncated one and one with a path-traversal entry are each
//! refused with an error naming the kernel (or the URL) and the cause, exit status 1 (a step
//! failed, `docs/cli.md`), and leave nothing behind: no kernel recorded, no file under HOME that
//! is not accounted for, no file outside HOME, and the same name pulls a good bundle afterwards.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use banger::bundle::{BundleManifest, FileDigest, kernel_files, write_bundle};
use tokio_util::sync::CancellationToken;

use crate::registry::{FakeRegistry, Reply};
use crate::support::{TestContext, sha256_hex};

/// `docs/cli.md`, `src/cli/exit.rs`: a step failed.
const STEP_FAILED: i32 = 1;

fn vmlinux_bytes() -> Vec<u8> {
    crate::support::pseudo_random(2 * 1024 * 1024 + 77, 1)
}

fn initrd_bytes() -> Vec<u8> {
    crate::support::pseudo_random(300 * 1024, 2)
}

/// A kernel bundle file and what a catalog entry says of it.
#[derive(Debug, Clone)]
struct Bundle {
    path: PathBuf,
    sha256: String,
    size: u64,
}

impl Bundle {
    fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(&self.path).unwrap()
    }

    /// `bytes` written to `path`, described by their own sha256 and size.
    fn raw(path: PathBuf, bytes: &[u8]) -> Bundle {
        fs::write(&path, bytes).unwrap();
        Bundle {
            path,
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
        }
    }
}

/// A well-formed kernel bundle written by banger's own writer: `vmlinux`, `initrd` and a small
/// module tree.
fn good_bundle(dir: &Path) -> Bundle {
    let kernel = dir.join("kernel-tree");
    let modules = kernel.join("modules/6.1.0-test/kernel/drivers");
    fs::create_dir_all(modules.join("net")).unwrap();
    fs::write(kernel.join("vmlinux"), vmlinux_bytes()).unwrap();
    fs::write(kernel.join("initrd"), initrd_bytes()).unwrap();
    fs::write(
        modules.join("net/virtio_net.ko"),
        crate::support::pseudo_random(60_000, 3),
    )
    .unwrap();
    fs::write(kernel.join("modules/6.1.0-test/modules.dep"), b"").unwrap();
    let path = dir.join("good-kernel.tar.zst");
    let written = write_bundle(
        &BundleManifest::kernel("test-kernel", "x86_64"),
        &kernel_files(&kernel).unwrap(),
        &path,
        &mut |_, _| {},
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(written.size, fs::metadata(&path).unwrap().len());
    Bundle {
        path,
        sha256: written.sha256,
        size: written.size,
    }
}

/// Makes the config's kernel catalog a file listing `entries` (kernel name → bundle source,
/// URL, sha256, size). The catalog is configured by path, which banger reads in place: unlike a
/// URL catalog, it keeps no copy of it under the cache.
fn write_catalog(context: &TestContext, entries: &[(&str, &str, &str, u64)]) {
    let kernels: Vec<serde_json::Value> = entries
        .iter()
        .map(|(name, url, sha256, size)| {
            serde_json::json!({
                "name": name,
                "description": "a test kernel from a bundle",
                "arch": "x86_64",
                "prefer": "bundle",
                "bundle": {"url": url, "sha256": sha256, "size": size},
            })
        })
        .collect();
    let catalog = context.root.path().join("kernels.json");
    fs::write(
        &catalog,
        serde_json::json!({"version": 1, "kernels": kernels}).to_string(),
    )
    .unwrap();
    fs::create_dir_all(context.config_file().parent().unwrap()).unwrap();
    fs::write(
        context.config_file(),
        format!("[catalogs]\nkernels = \"{}\"\n", catalog.display()),
    )
    .unwrap();
}

/// The catalog lists one kernel, `name`, from `bundle`.
fn catalog_with(context: &TestContext, name: &str, bundle: &Bundle) {
    write_catalog(
        context,
        &[(name, &bundle.url(), &bundle.sha256, bundle.size)],
    );
}

fn records(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn kernels(context: &TestContext) -> Vec<serde_json::Value> {
    let list = context.run(&["--json", "kernel", "list"]);
    assert_eq!(list.code, Some(0), "{list}");
    records(&list.stdout)
}

/// `cache ls --json`: each stored step's `{step, kind, key, …}`.
fn cache_entries(context: &TestContext) -> Vec<serde_json::Value> {
    let ls = context.run(&["--json", "cache", "ls"]);
    assert_eq!(ls.code, Some(0), "{ls}");
    records(&ls.stdout)
        .into_iter()
        .map(|record| record["data"].clone())
        .collect()
}

/// Every file under `dir` (relative path → sha256 of its bytes) and every directory (→ `None`).
/// Symlinks are listed by their target, never followed.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<String>> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<PathBuf, Option<String>>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(root).unwrap().to_owned();
            let kind = fs::symlink_metadata(&path).unwrap().file_type();
            if kind.is_dir() {
                into.insert(relative, None);
                walk(root, &path, into);
            } else if kind.is_symlink() {
                let target = fs::read_link(&path).unwrap();
                into.insert(relative, Some(format!("-> {}", target.display())));
            } else {
                into.insert(relative, Some(sha256_hex(&fs::read(&path).unwrap())));
            }
        }
    }
    let mut found = BTreeMap::new();
    walk(dir, dir, &mut found);
    found
}

/// Runs `kernel pull name` against a catalog already pointing at a bad bundle, and checks that
/// it fails with exit status 1, says every one of `expected` on stderr, and leaves nothing
/// behind.
///
/// `fetched` is the bundle's bytes when the download itself is sound (the catalog vouches for
/// exactly these bytes) and only unpacking refuses them. The store then legitimately keeps the
/// `kernel.fetch-bundle` step's output: every step is cached on its own once it succeeded
/// (`ARCHITECTURE.md`: only failures are never recorded), it is keyed by the catalog's url and
/// sha256 so a corrected catalog entry never hits it, it is no GC root, and `cache gc` evicts
/// it. Exactly that is allowed: its bytes and its record in cacache's content store, its
/// record's index entries, and the run's bookkeeping (`last-use-v1.log`, `last-run-v1/`, see
/// `store/mod.rs`); `cache ls` must then show that one record and no other.
///
/// The state database is created beforehand (by `kernel list`) so that it is part of the
/// snapshot: a failed pull must leave it byte for byte as it was.
fn assert_refused_cleanly(
    context: &TestContext,
    name: &str,
    expected: &[&str],
    fetched: Option<&[u8]>,
) {
    // `kernel list` creates the state database; a pull that fails must not touch it.
    assert!(kernels(context).is_empty());
    let cached_before: Vec<_> = cache_entries(context)
        .iter()
        .map(|entry| entry["key"].clone())
        .collect();
    let outside_home = snapshot(context.root.path());
    let before = snapshot(&context.home());

    let pull = context.run(&["kernel", "pull", name]);
    assert_eq!(pull.code, Some(STEP_FAILED), "{pull}");
    assert!(pull.stdout.is_empty(), "{pull}");
    for fragment in expected {
        // Output is redacted: the sandbox's path reads `[ROOT]`.
        let fragment = context.redact(fragment);
        assert!(
            pull.stderr.contains(&fragment),
            "missing {fragment:?}:\n{pull}"
        );
    }

    let after = snapshot(&context.home());
    let store = PathBuf::from(".cache/banger/store");
    let fetched_sha = fetched.map(sha256_hex);
    let allowed = |path: &Path, content: &Option<String>| -> bool {
        // Directories hold no data: `Store::open` makes the store (and its parents) and its
        // scratch area (empty, checked below) before any step runs, and cacache's directories
        // hold only the files checked here.
        if content.is_none() {
            return store.starts_with(path) || path.starts_with(&store);
        }
        let Ok(in_store) = path.strip_prefix(&store) else {
            return false;
        };
        // The empty lock files of the steps that ran and of the store's use lease hold
        // nothing (and are never removed).
        if in_store.starts_with("locks-v1") || in_store == Path::new("use.lock") {
            return content.as_deref() == Some(sha256_hex(b"").as_str());
        }
        let Some(fetched_sha) = &fetched_sha else {
            return false;
        };
        if in_store.starts_with("content-v2") {
            // The downloaded bundle, or the fetch step's record (cacache keeps an entry's
            // JSON as content too).
            return content.as_ref() == Some(fetched_sha)
                || serde_json::from_slice::<serde_json::Value>(
                    &fs::read(context.home().join(path)).unwrap(),
                )
                .is_ok_and(|record| record["step_id"] == format!("kernel:{name}/fetch-bundle"));
        }
        in_store.starts_with("index-v5")
            || in_store == Path::new("last-use-v1.log")
            || in_store.starts_with("last-run-v1")
    };
    let left: Vec<_> = after
        .iter()
        .filter(|(path, content)| before.get(*path) != Some(*content))
        .filter(|(path, content)| !allowed(path, content))
        .map(|(path, _)| path)
        .collect();
    assert!(left.is_empty(), "{pull}\nleft behind under HOME: {left:#?}");
    let gone: Vec<_> = before
        .keys()
        .filter(|path| !after.contains_key(*path))
        .collect();
    assert!(gone.is_empty(), "{pull}\nremoved from HOME: {gone:#?}");
    let scratch = context.store_dir().join("scratch");
    let stray = fs::read_dir(&scratch).map_or(0, Iterator::count);
    assert_eq!(stray, 0, "{pull}\nscratch left in {scratch:?}");

    // Nothing appeared in the sandbox outside HOME either (the traversal cases aim there).
    let home = PathBuf::from("home");
    let outside: Vec<_> = snapshot(context.root.path())
        .into_keys()
        .filter(|path| !path.starts_with(&home) && !outside_home.contains_key(path))
        .collect();
    assert!(
        outside.is_empty(),
        "{pull}\nwritten outside HOME: {outside:#?}"
    );

    assert!(kernels(context).is_empty(), "{pull}\na kernel was recorded");
    // An unknown kernel is a user error (exit status 1 as well).
    let show = context.run(&["kernel", "show", name]);
    assert_eq!(show.code, Some(1), "{show}");
    assert!(show.stderr.contains(name), "{show}");
    let cached: Vec<_> = cache_entries(context)
        .into_iter()
        .filter(|entry| !cached_before.contains(&entry["key"]))
        .map(|entry| format!("{} {}", entry["step"], entry["kind"]))
        .collect();
    let expected_cached = match fetched {
        Some(_) => vec![format!(
            "\"kernel:{name}/fetch-bundle\" \"{}\"",
            banger::steps::KERNEL_FETCH_BUNDLE.name
        )],
        None => Vec::new(),
    };
    assert_eq!(cached, expected_cached, "{pull}");
}

/// Points `name` at the good bundle and pulls it: the failed pull poisoned nothing.
fn pull_good_afterwards(context: &TestContext, name: &str, good: &Bundle) {
    catalog_with(context, name, good);
    let pull = context.run(&["kernel", "pull", name]);
    assert_eq!(pull.code, Some(0), "{pull}");
    assert_recorded(context, name);
}

/// `name` is recorded with the good bundle's files.
fn assert_recorded(context: &TestContext, name: &str) {
    let listed = kernels(context);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let kernel = &listed[0]["data"];
    assert_eq!(kernel["name"], name);
    assert_eq!(
        kernel["source"],
        format!("catalog:{name} (bundle)"),
        "{kernel}"
    );
    let vmlinux = vmlinux_bytes();
    assert_eq!(kernel["vmlinux"]["bytes"], vmlinux.len() as u64);
    assert_eq!(
        kernel["vmlinux"]["integrity"],
        ssri::Integrity::from(&vmlinux).to_string()
    );
    assert_eq!(
        kernel["initrd"]["integrity"],
        ssri::Integrity::from(initrd_bytes()).to_string()
    );
    assert!(kernel["modules"]["bytes"].as_u64().unwrap() > 0, "{kernel}");

    let show = context.run(&["--json", "kernel", "show", name]);
    assert_eq!(show.code, Some(0), "{show}");
    assert_eq!(&records(&show.stdout)[0]["data"], kernel);
    let text = context.run(&["kernel", "show", name]);
    assert!(text.stdout.contains(&format!("name:     {name}")), "{text}");
}

#[test]
fn kernel_pull_records_a_well_formed_bundle() {
    let context = TestContext::new();
    let good = good_bundle(context.root.path());
    catalog_with(&context, "bundled", &good);

    let available = context.run(&["--json", "kernel", "list", "--available"]);
    assert_eq!(available.code, Some(0), "{available}");
    let available = records(&available.stdout);
    assert_eq!(available.len(), 1, "{available:?}");
    assert_eq!(available[0]["data"]["name"], "bundled");
    assert_eq!(available[0]["data"]["bundle"], true);

    let pull = context.run(&["kernel", "pull", "bundled"]);
    assert_eq!(pull.code, Some(0), "{pull}");
    assert!(pull.stdout.starts_with("bundled  -  ready"), "{pull}");
    assert_recorded(&context, "bundled");
    let list = context.run(&["kernel", "list"]);
    assert!(list.stdout.contains("catalog:bundled (bundle)"), "{list}");

    // Everything is cached now: a second pull fetches nothing and records the same kernel.
    let again = context.run(&["kernel", "pull", "bundled"]);
    assert_eq!(again.code, Some(0), "{again}");
    assert!(
        again.stdout.starts_with("bundled  -  up to date"),
        "{again}"
    );
    assert_recorded(&context, "bundled");
}

#[test]
fn kernel_pull_refuses_a_bundle_whose_sha256_differs_from_the_catalog() {
    let context = TestContext::new();
    let good = good_bundle(context.root.path());
    let wrong = "0".repeat(64);
    write_catalog(&context, &[("tampered", &good.url(), &wrong, good.size)]);
    assert_refused_cleanly(
        &context,
        "tampered",
        &[
            "kernel:tampered/fetch-bundle",
            &good.url(),
            "failed verification",
            &format!("its content has sha256 {}", good.sha256),
            &format!("not the expected {wrong}"),
            "nothing was kept",
        ],
        None,
    );
    pull_good_afterwards(&context, "tampered", &good);
}

#[test]
fn kernel_pull_refuses_a_bundle_whose_sha256_differs_over_http() {
    let context = TestContext::new();
    let good = good_bundle(context.root.path());
    let bytes = good.bytes();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(FakeRegistry::start(move |path, _| match path {
        "/kernels/good.tar.zst" => Reply::ok("application/zstd", bytes.clone()),
        _ => Reply::status(404),
    }));
    let url = format!("http://{}/kernels/good.tar.zst", server.address);
    let wrong = "f".repeat(64);
    write_catalog(&context, &[("tampered", &url, &wrong, good.size)]);
    assert_refused_cleanly(
        &context,
        "tampered",
        &[
            "kernel:tampered/fetch-bundle",
            &url,
            "failed verification",
            &format!("not the expected {wrong}"),
        ],
        None,
    );
    assert_eq!(
        server.count("/kernels/good.tar.zst"),
        1,
        "a verification failure is final"
    );

    // The same server, the right sha256: the download the failure did not keep now succeeds.
    write_catalog(&context, &[("tampered", &url, &good.sha256, good.size)]);
    let pull = context.run(&["kernel", "pull", "tampered"]);
    assert_eq!(pull.code, Some(0), "{pull}");
    assert_recorded(&context, "tampered");
}

#[test]
fn kernel_pull_refuses_a_truncated_bundle() {
    let context = TestContext::new();
    let good = good_bundle(context.root.path());
    let full = good.bytes();
    let half = &full[..full.len() / 2];

    // The catalog vouches for the truncated bytes: the download succeeds, the zstd decoder
    // (or tar) finds the stream cut short.
    let truncated = Bundle::raw(context.root.path().join("half.tar.zst"), half);
    catalog_with(&context, "truncated", &truncated);
    assert_refused_cleanly(
        &context,
        "truncated",
        &[
            "kernel:truncated/unpack",
            &format!("cannot unpack the bundle from {}", truncated.url()),
            "the file is damaged or incomplete",
            "incomplete frame",
        ],
        Some(half),
    );
    pull_good_afterwards(&context, "truncated", &good);
    let removed = context.run(&["kernel", "rm", "truncated"]);
    assert_eq!(removed.code, Some(0), "{removed}");

    // The catalog describes the full bundle, but only half of it is there: the download stops
    // short and keeps nothing.
    write_catalog(
        &context,
        &[("cut-short", &truncated.url(), &good.sha256, good.size)],
    );
    assert_refused_cleanly(
        &context,
        "cut-short",
        &[
            "kernel:cut-short/fetch-bundle",
            &truncated.url(),
            &format!("has {} bytes, but {} were expected", half.len(), good.size),
            "nothing was kept",
        ],
        None,
    );

    // The full bundle's sha256 but the truncated size: the size matches, the digest does not.
    write_catalog(
        &context,
        &[(
            "mislabelled",
            &truncated.url(),
            &good.sha256,
            truncated.size,
        )],
    );
    assert_refused_cleanly(
        &context,
        "mislabelled",
        &[
            "kernel:mislabelled/fetch-bundle",
            &truncated.url(),
            "failed verification",
            &format!("its content has sha256 {}", truncated.sha256),
        ],
        None,
    );
    pull_good_afterwards(&context, "cut-short", &good);
}

// ---------------------------------------------------------------------------------------
// Hostile bundles, written byte by byte (the tar crate refuses to write `..` or absolute names)

/// A GNU tar header and data for a regular file called `name`, whatever `name` is; a name
/// longer than the header's 100 bytes goes first in a GNU long-name entry.
fn raw_entry(tar: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    let field = header.as_gnu_mut().unwrap().name.len();
    if name.len() > field {
        let mut long_name = name.as_bytes().to_vec();
        long_name.push(0);
        raw_header(
            tar,
            "././@LongLink",
            tar::EntryType::GNULongName,
            &long_name,
        );
    }
    raw_header(
        tar,
        &name[..name.len().min(field)],
        tar::EntryType::Regular,
        data,
    );
}

fn raw_header(tar: &mut Vec<u8>, name: &str, entry_type: tar::EntryType, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(entry_type);
    header.set_cksum();
    tar.extend_from_slice(header.as_bytes());
    tar.extend_from_slice(data);
    tar.resize(tar.len().next_multiple_of(512), 0);
}

/// A kernel bundle whose manifest lists a good `vmlinux` and `initrd`, both present and
/// correct, followed by an entry called `hostile` holding `payload`.
fn hostile_bundle(path: PathBuf, hostile: &str) -> Bundle {
    let vmlinux = vmlinux_bytes();
    let initrd = initrd_bytes();
    let mut manifest = BundleManifest::kernel("hostile-kernel", "x86_64");
    for (name, data) in [("vmlinux", &vmlinux), ("initrd", &initrd)] {
        manifest.files.insert(
            name.to_owned(),
            FileDigest {
                sha256: sha256_hex(data),
                size: data.len() as u64,
            },
        );
    }
    let mut tar = Vec::new();
    raw_entry(&mut tar, "manifest.json", &manifest.to_json());
    // The good files first: they are written before the hostile entry is seen, so the refusal
    // must also take them back.
    raw_entry(&mut tar, "initrd", &initrd);
    raw_entry(&mut tar, "vmlinux", &vmlinux);
    raw_entry(&mut tar, hostile, b"escaped from the bundle\n");
    tar.extend_from_slice(&[0u8; 1024]);
    Bundle::raw(path, &zstd::stream::encode_all(&tar[..], 3).unwrap())
}

#[test]
fn kernel_pull_refuses_a_bundle_with_a_traversal_entry() {
    let context = TestContext::new();
    let good = good_bundle(context.root.path());
    // Targets in the sandbox but outside HOME: an absolute path, and one reached from the
    // unpack directory (a dozen levels deep in the store's scratch) by climbing to `/` first
    // (a name past 100 bytes, so it also goes through the GNU long-name path).
    let root = fs::canonicalize(context.root.path()).unwrap();
    let absolute = root.join("escaped-absolute");
    let relative = root.join("escaped-relative");
    let climbing = format!(
        "{}{}",
        "../".repeat(40),
        relative.strip_prefix("/").unwrap().display()
    );
    let cases = [
        ("dotdot", "../escape".to_owned()),
        ("nested", "modules/../../escape".to_owned()),
        ("climbing", climbing),
        ("absolute", absolute.display().to_string()),
    ];
    for (index, (name, entry)) in cases.iter().enumerate() {
        let bundle = hostile_bundle(
            context.root.path().join(format!("hostile-{index}.tar.zst")),
            entry,
        );
        catalog_with(&context, name, &bundle);
        let reason = if entry.starts_with('/') {
            "the path is absolute"
        } else {
            "the path has a `..` component"
        };
        let bytes = bundle.bytes();
        assert_refused_cleanly(
            &context,
            name,
            &[
                &format!("kernel:{name}/unpack"),
                &format!("cannot unpack the bundle from {}", bundle.url()),
                &format!("entry `{entry}` is refused: {reason}"),
                "nothing was unpacked",
            ],
            Some(&bytes),
        );
        assert!(!absolute.exists() && !relative.exists());

        pull_good_afterwards(&context, name, &good);
        let removed = context.run(&["kernel", "rm", name]);
        assert_eq!(removed.code, Some(0), "{removed}");
    }
}
