use super::*;
use crate::key::{content_key, definition_key, output_digest};

fn record(store: &Store, step_id: &str, payload: &[u8]) -> StepRecord {
    let scratch = store.scratch().unwrap();
    let file = scratch.path().join("out");
    std::fs::write(&file, payload).unwrap();
    let output = store.publish_file(&file).unwrap();
    let params = Params::new().with("id", step_id);
    let def = definition_key("test", 1, &params, &[]);
    StepRecord {
        step_id: step_id.into(),
        kind: "test".into(),
        version: 1,
        params: params.clone(),
        inputs: vec![],
        output_digest: output_digest([("out", output.integrity.as_str(), output.size)]),
        outputs: BTreeMap::from([("out".to_owned(), output)]),
        definition_key: def,
        content_key: content_key("test", 1, &params, &[]),
        created_ms: now_ms(),
        duration_ms: 1,
    }
}

#[test]
fn committed_records_hit_and_materialize_by_hard_link() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rec = record(&store, "a", b"hello");
    store.commit(&rec).unwrap();
    let hit = store
        .lookup(KeyKind::Definition, &rec.definition_key)
        .unwrap()
        .hit()
        .unwrap();
    assert_eq!(hit, rec);
    assert!(
        store
            .lookup(KeyKind::Content, &rec.content_key)
            .unwrap()
            .hit()
            .is_some()
    );
    let target = dir.path().join("linked");
    store.materialize(&hit.outputs["out"], &target).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"hello");
    use std::os::unix::fs::MetadataExt;
    assert!(
        std::fs::metadata(&target).unwrap().nlink() >= 2,
        "a hit must not copy bytes"
    );
}

#[test]
fn a_record_whose_bytes_are_gone_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rec = record(&store, "a", b"hello");
    store.commit(&rec).unwrap();
    let integrity = parse_integrity(&rec.outputs["out"].integrity).unwrap();
    let path = gc::content_path(dir.path(), &integrity);
    assert!(path.exists(), "content layout changed: {}", path.display());
    std::fs::remove_file(path).unwrap();
    match store
        .lookup(KeyKind::Definition, &rec.definition_key)
        .unwrap()
    {
        Lookup::Miss(Miss::OutputMissing { output, .. }) => assert_eq!(output, "out"),
        other => panic!("expected a miss, got {other:?}"),
    }
}

#[test]
fn gc_evicts_least_recently_used_first_and_spares_roots() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let old = record(&store, "old", &[1u8; 1000]);
    let rooted = record(&store, "rooted", &[2u8; 1000]);
    let recent = record(&store, "recent", &[3u8; 1000]);
    for rec in [&old, &rooted, &recent] {
        store.commit(rec).unwrap();
    }
    store.set_root("vm:test", &[rooted.definition_key]).unwrap();
    // Records made in the same millisecond tie on their index time: use times that differ.
    store
        .touch_at(&[rooted.definition_key], now_ms() + 5_000)
        .unwrap();
    store
        .touch_at(&[recent.definition_key], now_ms() + 10_000)
        .unwrap();

    let dry = store
        .gc(GcOptions {
            max_size: 2000,
            dry_run: true,
        })
        .unwrap();
    assert_eq!(dry.evicted, ["old"]);
    assert!(
        store
            .lookup(KeyKind::Definition, &old.definition_key)
            .unwrap()
            .hit()
            .is_some()
    );

    let report = store
        .gc(GcOptions {
            max_size: 2000,
            dry_run: false,
        })
        .unwrap();
    assert_eq!(report.evicted, ["old"], "{report:?}");
    assert_eq!(report.freed_bytes, 1000);
    assert!(matches!(
        store
            .lookup(KeyKind::Definition, &old.definition_key)
            .unwrap(),
        Lookup::Miss(Miss::Evicted { .. })
    ));
    assert!(
        store
            .lookup(KeyKind::Definition, &rooted.definition_key)
            .unwrap()
            .hit()
            .is_some()
    );
    assert!(
        store
            .lookup(KeyKind::Definition, &recent.definition_key)
            .unwrap()
            .hit()
            .is_some()
    );

    let report = store
        .gc(GcOptions {
            max_size: 0,
            dry_run: false,
        })
        .unwrap();
    assert_eq!(report.evicted, ["recent"]);
    assert_eq!(report.rooted, 1);
    assert_eq!(report.remaining_bytes, 1000);
}

#[test]
fn gc_sweeps_content_without_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let scratch = store.scratch().unwrap();
    let file = scratch.path().join("orphan");
    std::fs::write(&file, [7u8; 4096]).unwrap();
    let orphan = store.publish_file(&file).unwrap();
    let report = store
        .gc(GcOptions {
            max_size: u64::MAX,
            dry_run: false,
        })
        .unwrap();
    assert_eq!(report.orphan_bytes, 4096);
    let integrity = parse_integrity(&orphan.integrity).unwrap();
    assert!(!cacache::exists_sync(dir.path(), &integrity));
}

#[test]
fn last_runs_are_remembered_per_project_and_merged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let run = |command: &str| LastRun {
        definition_key: definition_key("k", 1, &Params::new().with("c", command), &[]),
        kind: "k".into(),
        version: 1,
        params: Params::new().with("c", command),
        inputs: vec![],
    };
    assert!(store.last_runs("p").unwrap().is_empty());
    store
        .update_last_runs(
            "p",
            [("a".to_owned(), run("1")), ("b".to_owned(), run("1"))],
        )
        .unwrap();
    store
        .update_last_runs("p", [("b".to_owned(), run("2"))])
        .unwrap();
    let runs = store.last_runs("p").unwrap();
    assert_eq!(runs["a"], run("1"));
    assert_eq!(runs["b"], run("2"));
    assert!(store.last_runs("q").unwrap().is_empty());
}

#[test]
fn scratch_of_dead_processes_is_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("scratch").join("step-999999999-abc");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("partial"), b"x").unwrap();
    let live = dir
        .path()
        .join("scratch")
        .join(format!("step-{}-abc", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    Store::open(dir.path()).unwrap();
    assert!(!stale.exists());
    assert!(live.exists());
}

#[test]
fn publishing_moves_the_file_into_the_store_without_copying_it() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let scratch = store.scratch().unwrap();
    let file = scratch.path().join("rootfs.ext4");
    std::fs::write(&file, vec![5u8; 3 << 20]).unwrap();
    let inode = std::fs::metadata(&file).unwrap().ino();
    let output = store.publish_file(&file).unwrap();
    assert_eq!(output.size, 3 << 20);
    assert!(!file.exists(), "the scratch file should have been moved");
    let stored = gc::content_path(dir.path(), &parse_integrity(&output.integrity).unwrap());
    let metadata = std::fs::metadata(&stored).unwrap();
    assert_eq!(metadata.ino(), inode, "the bytes were copied");
    assert!(metadata.permissions().readonly());
    // Publishing identical bytes again keeps the one stored copy.
    std::fs::write(&file, vec![5u8; 3 << 20]).unwrap();
    assert_eq!(store.publish_file(&file).unwrap(), output);
    assert_eq!(std::fs::metadata(&stored).unwrap().ino(), inode);
    // What cacache itself reads back is the same content.
    assert!(cacache::exists_sync(
        dir.path(),
        &parse_integrity(&output.integrity).unwrap()
    ));
}

#[test]
fn a_sparse_file_is_published_under_the_sha256_of_all_its_bytes() {
    use sha2::Digest as _;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let scratch = store.scratch().unwrap();
    let file = scratch.path().join("rootfs.ext4");
    let handle = std::fs::File::create(&file).unwrap();
    handle.write_all_at(b"superblock", 1024).unwrap();
    handle.write_all_at(&[3u8; 9000], 5 << 20).unwrap();
    handle.set_len(8 << 20).unwrap();
    drop(handle);
    let expected = crate::bundle::hex(&sha2::Sha256::digest(std::fs::read(&file).unwrap()));
    let output = store.publish_file(&file).unwrap();
    let (algorithm, stored_hex) = parse_integrity(&output.integrity).unwrap().to_hex();
    assert_eq!(algorithm, ssri::Algorithm::Sha256);
    assert_eq!(stored_hex, expected);
    assert_eq!(output.size, 8 << 20);
}

#[test]
fn a_vouched_hash_publishes_like_a_computed_one_and_a_malformed_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let scratch = store.scratch().unwrap();
    let payload = b"layer bytes, hashed while downloaded";
    let hashed = scratch.path().join("hashed");
    std::fs::write(&hashed, payload).unwrap();
    let computed = store.publish_file(&hashed).unwrap();
    let (_, sha256_hex) = parse_integrity(&computed.integrity).unwrap().to_hex();

    let vouched = scratch.path().join("vouched");
    std::fs::write(&vouched, payload).unwrap();
    assert_eq!(
        store.publish_hashed_file(&vouched, &sha256_hex).unwrap(),
        computed
    );
    for malformed in ["", "abc", &"g".repeat(64), &format!("{sha256_hex}00")] {
        let file = scratch.path().join("malformed");
        std::fs::write(&file, payload).unwrap();
        let error = store.publish_hashed_file(&file, malformed).unwrap_err();
        assert!(
            matches!(error, StoreError::BadIntegrity { .. }),
            "{malformed:?}: {error}"
        );
        assert!(file.exists(), "a refused file is left where it was");
    }
}
