//! The fuzz group: generated and mutated inputs for every decoder that reads what another
//! party wrote. Each property says what must hold for *any* input: no panic, no hang, an
//! error that names the input, and nothing written where it should not be. Case counts are
//! fixed (64 to 256 per property; `PROPTEST_CASES` overrides), so CI's time is bounded; a failure's seed is kept
//! under `tests/fuzz-corpus/` and replayed first on every later run.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

use crate::rootfs::{Kind, LayerTar, entry};
use crate::support::{
    StopDaemon, TestContext, assert_fsck_clean, capable, fake_ready_frame, have_e2fsprogs,
    read_agent_request,
};

/// The configuration of every property here: `cases` by default, failures kept in
/// `tests/fuzz-corpus/NAME.txt`.
fn config(cases: u32, name: &'static str) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(leak(format!(
            "tests/fuzz-corpus/{name}.txt"
        ))))),
        ..Config::default()
    }
}

fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// Byte-level mutations of `seed`: each `(position, action, byte)` replaces, inserts or
/// deletes one byte, or cuts the input there.
fn mutate(seed: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for &(position, action, byte) in edits {
        if bytes.is_empty() {
            bytes.push(byte);
            continue;
        }
        let at = position % bytes.len();
        match action % 4 {
            0 => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            2 => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
    }
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)
}

// ---------------------------------------------------------------------------------------
// Bangerfiles

/// The seeds: every Bangerfile the project ships, and the corpus's own.
fn bangerfile_seeds() -> Vec<String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds = vec![
        std::fs::read_to_string(repo.join("Bangerfile.example")).unwrap(),
        std::fs::read_to_string(repo.join("tests/fixtures/c-project/Bangerfile")).unwrap(),
    ];
    let corpus = repo.join("tests/fuzz-corpus/bangerfiles");
    let mut extra: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    extra.sort();
    seeds.extend(
        extra
            .iter()
            .map(|path| std::fs::read_to_string(path).unwrap()),
    );
    seeds
}

/// Pieces of Bangerfile syntax that mutations splice in, so that they reach the validation
/// of values and not only TOML's parser.
const BANGERFILE_PIECES: &[&str] = &[
    "\n[image]\n",
    "\n[[image.provision]]\nrun = \"true\"\n",
    "\n[[image.provision]]\ncopy = \"../../etc/passwd\"\nto = \"/x\"\n",
    "\n[images.a]\nfrom = { image = \"a\" }\n",
    "\nsize = \"99999999999T\"\n",
    "\ntimeout = \"9999999h\"\n",
    "\nmode = \"0999\"\n",
    "\nfrom = { recipe = \"debian\", suite = \"--hook\" }\n",
    "\nfrom = \"::::\"\n",
    "\nnetwork = \"tap\"\n",
    "\nmemory = \"0\"\n",
    "\nvcpu = 4294967296\n",
    "\nenv = { \"A=B\" = \"x\" }\n",
    "\n[[file_sync]]\nhost = \"~\"\nguest = \"relative\"\n",
    "\"\\u0000\"",
    "[",
    "= =",
];

proptest! {
    #![proptest_config(config(256, "bangerfile"))]

    /// Any text, and any mutation of a real Bangerfile, parses or fails with diagnostics;
    /// it never panics.
    #[test]
    fn fuzz_bangerfiles_parse_or_fail_with_a_message(
        seed in any::<prop::sample::Index>(),
        edits in edits(),
        splices in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..4),
        noise in "\\PC{0,64}",
    ) {
        let seeds = bangerfile_seeds();
        let mut text = mutate(seeds[seed.index(seeds.len())].as_bytes(), &edits);
        for (piece, at) in splices {
            let piece = BANGERFILE_PIECES[piece.index(BANGERFILE_PIECES.len())];
            let at = at.index(text.len() + 1);
            text.splice(at..at, piece.bytes());
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("Bangerfile");
        let catalogs = banger::catalog::Catalogs::embedded();
        let context = banger::bangerfile::ParseContext::new(&catalogs);
        for input in [text.as_str(), noise.as_str()] {
            if let Err(error) = banger::bangerfile::parse(input, &file, &context) {
                prop_assert!(!error.to_string().trim().is_empty(), "an empty error for {input:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Layers → ext4

/// Path components: mostly ordinary, sometimes what layers misuse (parents, whiteouts,
/// opaque markers, empties), so that most stacks build and the checks of the image run.
const COMPONENTS: &[&str] = &[
    "a",
    "b",
    "etc",
    "usr",
    "x\u{e9}",
    "long-name-long-name-long-name",
];
const HOSTILE_COMPONENTS: &[&str] = &["..", ".", "", ".wh.a", ".wh.b", ".wh..wh..opq", ".wh.etc"];

fn layer_path() -> impl Strategy<Value = String> {
    let component = prop_oneof![
        30 => prop::sample::select(COMPONENTS),
        1 => prop::sample::select(HOSTILE_COMPONENTS),
    ];
    (
        prop::bool::weighted(0.01),
        proptest::collection::vec(component, 1..4),
    )
        .prop_map(|(absolute, parts)| {
            let joined = parts.join("/");
            if absolute {
                format!("/{joined}")
            } else {
                joined
            }
        })
}

#[derive(Debug, Clone)]
enum FuzzKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    HardLink(String),
    /// A hard link to an earlier regular file of the stack (skipped when there is none).
    HardLinkToEarlier(prop::sample::Index),
    Fifo,
    Char(u32, u32),
}

fn fuzz_kind() -> impl Strategy<Value = FuzzKind> {
    prop_oneof![
        12 => Just(FuzzKind::Dir),
        12 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(FuzzKind::File),
        4 => layer_path().prop_map(FuzzKind::Symlink),
        1 => layer_path().prop_map(FuzzKind::HardLink),
        4 => any::<prop::sample::Index>().prop_map(FuzzKind::HardLinkToEarlier),
        2 => Just(FuzzKind::Fifo),
        2 => (0u32..300, 0u32..300).prop_map(|(major, minor)| FuzzKind::Char(major, minor)),
    ]
}

fn layer_entries() -> impl Strategy<Value = LayerEntries> {
    proptest::collection::vec(
        (layer_path(), fuzz_kind(), 0u32..0o10000, 0u64..70000),
        0..12,
    )
}

/// Any stack of layers either builds an ext4 image that `e2fsck -fn` finds clean, or is
/// refused naming a layer, leaving no image and nothing outside the image's path.
#[test]
fn fuzz_layers_become_clean_ext4_or_are_refused() {
    if !capable("e2fsprogs", have_e2fsprogs()) {
        return;
    }
    let built = std::cell::Cell::new(0u32);
    let refused = std::cell::Cell::new(0u32);
    let mut runner = proptest::test_runner::TestRunner::new(config(256, "layers"));
    runner
        .run(
            &proptest::collection::vec(layer_entries(), 1..4),
            |layers| {
                let dir = tempfile::tempdir().unwrap();
                let stack = write_layers(dir.path(), &layers);
                let image = dir.path().join("rootfs.ext4");
                let before = listing(dir.path());
                // No fsync: the image is checked and thrown away.
                let options = banger::rootfs::layers::RootfsOptions {
                    sync: false,
                    ..crate::rootfs::options()
                };
                match banger::rootfs::layers::build_rootfs(&stack, &image, &options, &|_, _| {}) {
                    Ok(_) => {
                        built.set(built.get() + 1);
                        assert_fsck_clean(&image);
                    }
                    Err(error) => {
                        refused.set(refused.get() + 1);
                        let text = banger::error::error_chain(&error);
                        prop_assert!(
                            text.contains("layer sha256:fuzz"),
                            "unnamed layer: {}",
                            text
                        );
                        prop_assert!(!image.exists(), "a refused build left {:?}", image);
                    }
                }
                let mut after = listing(dir.path());
                after.retain(|name| name != "rootfs.ext4");
                prop_assert_eq!(before, after, "the build wrote beside its image");
                Ok(())
            },
        )
        .unwrap();
    // Both outcomes were exercised, or the property tested little.
    assert!(
        built.get() * 3 >= built.get() + refused.get() && refused.get() > 0,
        "built {}, refused {}",
        built.get(),
        refused.get()
    );
}

type LayerEntries = Vec<(String, FuzzKind, u32, u64)>;

/// Writes each layer as a tar in `dir`. Most entries come after directory entries for their
/// parents, as real layers have them; entries whose names a ustar header cannot hold are left
/// out.
fn write_layers(dir: &Path, layers: &[LayerEntries]) -> Vec<banger::rootfs::layers::Layer> {
    let mut stack = Vec::new();
    let mut files: Vec<String> = Vec::new();
    for (index, entries) in layers.iter().enumerate() {
        let mut tar = LayerTar::new();
        for (name, kind, mode, owner) in entries {
            if name.len() > 100 {
                continue;
            }
            let earlier;
            let kind = match kind {
                FuzzKind::Dir => Kind::Dir,
                FuzzKind::File(bytes) => Kind::File(bytes),
                FuzzKind::Symlink(target) if target.len() <= 100 => Kind::Symlink(target),
                FuzzKind::HardLink(target) if target.len() <= 100 => Kind::HardLink(target),
                FuzzKind::Symlink(_) | FuzzKind::HardLink(_) => continue,
                FuzzKind::HardLinkToEarlier(pick) => {
                    if files.is_empty() {
                        continue;
                    }
                    earlier = files[pick.index(files.len())].clone();
                    Kind::HardLink(&earlier)
                }
                FuzzKind::Fifo => Kind::Fifo,
                FuzzKind::Char(major, minor) => Kind::Char(*major, *minor),
            };
            // Parents first, unless the mode's lowest bit says otherwise (a layer may lack
            // them, and the builder must cope).
            if mode & 1 == 0 {
                let parts: Vec<&str> = name.split('/').collect();
                for depth in 1..parts.len() {
                    let parent = parts[..depth].join("/");
                    if !parent.is_empty() {
                        tar.add(entry(&parent, Kind::Dir, 0o755));
                    }
                }
            }
            if matches!(kind, Kind::File(_)) {
                files.push(name.clone());
            }
            let mut spec = entry(name, kind, *mode);
            spec.uid = *owner;
            spec.gid = *owner / 2;
            tar.add(spec);
        }
        let path = dir.join(format!("layer-{index}.tar"));
        std::fs::write(&path, tar.finish()).unwrap();
        stack.push(banger::rootfs::layers::Layer::tar(
            format!("sha256:fuzz{index}"),
            path,
        ));
    }
    stack
}

/// File names directly in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------------------
// Bundles

/// A small, valid kernel bundle and the files it holds.
fn seed_bundle(dir: &Path) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let kernel = dir.join("kernel");
    std::fs::create_dir_all(kernel.join("modules/kernel")).unwrap();
    let files = vec![
        (
            "vmlinux".to_owned(),
            b"\x7fELF not really a kernel".repeat(40),
        ),
        ("initrd".to_owned(), b"070701 not really an initrd".to_vec()),
        ("modules/kernel/a.ko".to_owned(), vec![7u8; 3000]),
    ];
    for (name, bytes) in &files {
        std::fs::write(kernel.join(name), bytes).unwrap();
    }
    let bundle = dir.join("seed.tar.zst");
    banger::bundle::write_bundle(
        &banger::bundle::BundleManifest::kernel("fuzz-kernel", "x86_64"),
        &banger::bundle::kernel_files(&kernel).unwrap(),
        &bundle,
        &mut |_, _| {},
        &tokio_util::sync::CancellationToken::new(),
    )
    .unwrap();
    (bundle, files)
}

/// The same bundle decompressed: mutations of the tar reach the entry checks, not only
/// zstd's frame checksum.
fn recompress(tar: &[u8]) -> Vec<u8> {
    zstd::encode_all(tar, 3).unwrap()
}

proptest! {
    #![proptest_config(config(256, "bundles"))]

    /// A damaged bundle (its compressed bytes, or its tar inside) unpacks exactly the files it
    /// was made of, or fails naming the bundle and leaves the target directory as it was.
    #[test]
    fn fuzz_bundles_unpack_exactly_or_leave_nothing(
        edits in edits(),
        inside in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (seed, files) = seed_bundle(dir.path());
        let compressed = std::fs::read(&seed).unwrap();
        let damaged = if inside {
            let tar = zstd::decode_all(compressed.as_slice()).unwrap();
            recompress(&mutate(&tar, &edits))
        } else {
            mutate(&compressed, &edits)
        };
        let bundle = dir.path().join("damaged.tar.zst");
        std::fs::write(&bundle, &damaged).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let outcome = banger::bundle::unpack_bundle(
            &bundle,
            &out,
            &mut |_, _| {},
            &tokio_util::sync::CancellationToken::new(),
        );
        match outcome {
            Ok(_) => {
                for (name, bytes) in &files {
                    prop_assert_eq!(&std::fs::read(out.join(name)).unwrap(), bytes, "{}", name);
                }
            }
            Err(error) => {
                let text = banger::error::error_chain(&error);
                prop_assert!(text.contains("damaged.tar.zst"), "unnamed bundle: {}", text);
                prop_assert_eq!(listing(&out), Vec::<String>::new(), "{}", text);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The agent protocol, both ends

/// Bytes on the wire: frames with any type, channel and payload (lengths honest or not), or
/// raw noise.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    let frame = (
        any::<u8>(),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..96),
        prop_oneof![Just(None), (0u32..=u32::MAX).prop_map(Some)],
    )
        .prop_map(|(kind, channel_one, payload, lie)| {
            let len = lie.unwrap_or(payload.len() as u32);
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend((if channel_one { 1u32 } else { 0 }).to_be_bytes());
            bytes.push(kind);
            bytes.extend(payload);
            bytes
        });
    prop_oneof![
        proptest::collection::vec(frame, 1..4).prop_map(|frames| frames.concat()),
        proptest::collection::vec(any::<u8>(), 0..128),
    ]
}

proptest! {
    #![proptest_config(config(256, "agent-frames"))]

    /// The host's decoder: whatever an agent sends after `Ready`, an exec ends (a status or
    /// an error) within its deadline and nothing panics.
    #[test]
    fn fuzz_the_host_survives_any_agent_answer(reply in wire_bytes()) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let Ok((mut stream, _)) = listener.accept() else { return };
            // Hello, answered properly; then the exec request, answered with `reply`.
            for answer in [None, Some(reply)] {
                let Some(header) = read_agent_request(&mut stream) else {
                    return;
                };
                let bytes = answer.unwrap_or_else(|| fake_ready_frame(header.channel, "fuzz"));
                let _ = stream.write_all(&bytes);
            }
            // Closed: the client must not wait for more.
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let outcome = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                let mut channel = banger::guest::GuestEndpoint::Unix { path: socket }
                    .connect(std::time::Instant::now() + Duration::from_secs(5))
                    .await?;
                channel.hello().await?;
                let mut stdout = Vec::new();
                let mut stderr = Vec::new();
                channel
                    .exec(
                        &banger::guest::ExecRequest::argv(["true"]),
                        &[][..],
                        &mut stdout,
                        &mut stderr,
                    )
                    .await
                    .map(|_| ())
            })
            .await
        });
        server.join().unwrap();
        prop_assert!(outcome.is_ok(), "the exec hung on a closed, garbled stream");
    }
}

/// The agent's decoder (the real binary, on a unix socket): any bytes from a client end
/// that connection at worst; the agent still serves the next client. Payloads are noise,
/// never well-formed requests, so nothing is executed.
#[test]
fn fuzz_the_agent_survives_any_client_bytes() {
    let agent = crate::guest::Agent::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(config(64, "agent-requests"));
    runner
        .run(&proptest::collection::vec(wire_bytes(), 1..4), |requests| {
            for bytes in &requests {
                let mut stream = std::os::unix::net::UnixStream::connect(agent.socket()).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let _ = stream.write_all(bytes);
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer);
            }
            let echoed = runtime.block_on(async {
                let mut channel = crate::support::connect_agent(&agent.socket()).await;
                let mut stdout = Vec::new();
                let status = channel
                    .exec(
                        &banger::guest::ExecRequest::argv(["echo", "still here"]),
                        &[][..],
                        &mut stdout,
                        tokio::io::sink(),
                    )
                    .await
                    .unwrap();
                (status, stdout)
            });
            prop_assert_eq!(
                echoed,
                (banger::guest::ExitStatus::Code(0), b"still here\n".to_vec())
            );
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// The daemon's requests

/// Requests that change nothing, whose one-byte mutations cannot become one that does (no
/// other request's name is one edit away from theirs).
const HARMLESS_REQUESTS: &[&str] = &[
    r#"{"type":"status"}"#,
    r#"{"type":"vm_list"}"#,
    r#"{"type":"hello","data":{"protocol":5,"client_version":"0.1.0"}}"#,
];

#[test]
fn fuzz_the_daemon_survives_any_request_line() {
    let context = TestContext::new();
    let _daemon = StopDaemon(&context);
    let started = context.run(&["vm", "list"]);
    assert_eq!(started.code, Some(0), "{started}");
    let socket = context.root.path().join("run/banger/banger.sock");
    let mut runner = proptest::test_runner::TestRunner::new(config(256, "daemon-requests"));
    let line = (
        prop::sample::select(HARMLESS_REQUESTS),
        proptest::collection::vec((any::<usize>(), 0u8..1, any::<u8>()), 0..2),
        proptest::collection::vec(any::<u8>(), 0..256),
        any::<bool>(),
    )
        .prop_map(|(seed, edits, noise, use_noise)| {
            let mut bytes = if use_noise {
                noise
            } else {
                mutate(seed.as_bytes(), &edits)
            };
            bytes.retain(|&byte| byte != b'\n');
            bytes.push(b'\n');
            bytes
        });
    runner
        .run(&line, |bytes| {
            let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream.write_all(&bytes).unwrap();
            let mut answer = [0u8; 1];
            let answered = stream.read(&mut answer).map(|read| read == 1);
            prop_assert!(
                matches!(answered, Ok(true)),
                "no answer to {:?}: {answered:?}",
                String::from_utf8_lossy(&bytes)
            );
            Ok(())
        })
        .unwrap();
    let listed = context.run(&["vm", "list"]);
    assert_eq!(listed.code, Some(0), "the daemon went away: {listed}");
    let log = std::fs::read_to_string(context.home().join(".local/state/banger/logs/daemon.log"))
        .unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}
