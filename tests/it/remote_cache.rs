//! The remote step cache against registries: Debian's real `docker-registry` for sharing
//! steps between two stores, and the scripted fake registry for remotes that lie or fail.
//! The steps are the test kind `test.write`, shared by the cache under test; the slow group
//! has the same with real provisioned images (`provision::slow_provision_remote_cache…`).

use std::sync::Arc;

use banger::engine::{
    Engine, Event, HitKind, RecordingReporter, RemoteCache, ResourceLimits, RunOptions, RunReport,
};
use banger::key::output_digest;
use banger::oci::{RegistryOptions, RetryPolicy};
use banger::plan::Plan;
use banger::remote::OciRemoteCache;
use banger::store::{KeyKind, Lookup, StepRecord, Store};

use crate::registry::{FakeRegistry, RealRegistry, Reply, free_port};
use crate::support::{Counters, WriteExecutor, chain, read_output};

fn engine(dir: &std::path::Path, counters: &Arc<Counters>) -> Engine {
    Engine::builder(Store::open(dir).unwrap())
        .limits(ResourceLimits::uniform(4))
        .executor(
            "test.write",
            WriteExecutor {
                counters: Arc::clone(counters),
            },
        )
        .build()
}

fn remote(address: &str) -> Arc<dyn RemoteCache> {
    let options = RegistryOptions {
        retry: RetryPolicy::fast(2),
        ..RegistryOptions::default()
    };
    Arc::new(
        OciRemoteCache::new(&format!("{address}/team/cache"), &options)
            .unwrap()
            .sharing(&["test.write"]),
    )
}

fn run(
    runtime: &tokio::runtime::Runtime,
    engine: &Engine,
    plan: &Plan,
    from: Option<&Arc<dyn RemoteCache>>,
    to: Option<&Arc<dyn RemoteCache>>,
) -> (RunReport, Vec<Event>) {
    let reporter = RecordingReporter::default();
    let options = RunOptions {
        cache_from: from.cloned(),
        cache_to: to.cloned(),
        ..RunOptions::default()
    };
    let report = runtime
        .block_on(engine.run(plan, "test", &reporter, options))
        .unwrap_or_else(|error| panic!("{error}: {:#?}", reporter.events()));
    (report, reporter.events())
}

fn warnings(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::CacheWarning { step, warning } => Some(format!("{step}: {warning}")),
            _ => None,
        })
        .collect()
}

fn push_summary(events: &[Event]) -> (usize, usize, u64) {
    events
        .iter()
        .find_map(|event| match event {
            Event::PushFinished {
                pushed,
                present,
                uploaded_bytes,
                ..
            } => Some((*pushed, *present, *uploaded_bytes)),
            _ => None,
        })
        .expect("a push_finished event")
}

#[test]
fn a_fresh_store_takes_steps_from_a_warm_remote_and_pushes_only_what_it_lacks() {
    let Some(registry) = RealRegistry::start(None) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cache = remote(&registry.address);

    // Store A builds and pushes every shared step.
    let a_dir = tempfile::tempdir().unwrap();
    let a_counters = Arc::new(Counters::default());
    let a = engine(a_dir.path(), &a_counters);
    let plan = chain(["a", "b", "c"]);
    let (_, events) = run(&runtime, &a, &plan, None, Some(&cache));
    assert_eq!(a_counters.total_runs(), 3);
    assert_eq!(push_summary(&events), (3, 0, 1 + 2 + 3), "{events:#?}");
    // Pushing again sends nothing: every entry is there.
    let (_, events) = run(&runtime, &a, &plan, None, Some(&cache));
    assert_eq!(push_summary(&events).0, 0, "{events:#?}");
    // A run whose target is stored needs no other step, yet it exports them all.
    let other = Arc::new(
        OciRemoteCache::new(
            &format!("{}/team/other-cache", registry.address),
            &RegistryOptions::default(),
        )
        .unwrap()
        .sharing(&["test.write"]),
    ) as Arc<dyn RemoteCache>;
    let (report, events) = run(&runtime, &a, &plan, None, Some(&other));
    assert!(report.ran.is_empty());
    assert_eq!(push_summary(&events), (3, 0, 1 + 2 + 3), "{events:#?}");

    // Store B runs nothing: the target hits remotely, so its inputs are not even needed.
    let b_dir = tempfile::tempdir().unwrap();
    let b_counters = Arc::new(Counters::default());
    let b = engine(b_dir.path(), &b_counters);
    let (report, events) = run(&runtime, &b, &plan, Some(&cache), None);
    assert_eq!(b_counters.total_runs(), 0, "{events:#?}");
    assert_eq!(report.cached, [("c".to_owned(), HitKind::Remote)]);
    assert_eq!(report.remote_bytes, 3);
    assert_eq!(read_output(b.store(), &report, "c"), b"cba");
    assert!(warnings(&events).is_empty(), "{events:#?}");
    assert!(events.iter().any(|event| matches!(
        event,
        Event::RunFinished {
            remote: 1,
            remote_bytes: 3,
            ran: 0,
            ..
        }
    )));
    // Now it is a local hit, with the same outputs as A's.
    let (again, _) = run(&runtime, &b, &plan, Some(&cache), None);
    assert_eq!(again.cached, [("c".to_owned(), HitKind::Definition)]);
    let c = plan.find("c").unwrap();
    let key = plan.definition_keys().unwrap()[c.index()];
    let record_of = |store: &Store| match store.lookup(KeyKind::Definition, &key).unwrap() {
        Lookup::Hit(record) => record.outputs.clone(),
        Lookup::Miss(miss) => panic!("{miss:?}"),
    };
    assert_eq!(record_of(a.store()), record_of(b.store()));

    // B edits the last step: only it runs; its input comes from the remote.
    let edited = chain(["a", "b", "C"]);
    let (report, events) = run(&runtime, &b, &edited, Some(&cache), Some(&cache));
    assert_eq!(b_counters.runs_of("c"), 1, "{events:#?}");
    assert_eq!(b_counters.total_runs(), 1, "{events:#?}");
    assert_eq!(report.cached, [("b".to_owned(), HitKind::Remote)]);
    assert_eq!(read_output(b.store(), &report, "c"), b"Cba");
    // Its push sends the new step only; b is there already.
    assert_eq!(push_summary(&events), (1, 1, 3), "{events:#?}");
}

/// What a hostile or failing remote does to the entry of step `c` of `chain(["a", "b",
/// "c"])`, whose genuine output is `cba`.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    CorruptBlob,
    TruncatedBlob,
    WrongSizeInRecord,
    ServerError,
    Unreachable,
    AuthRequired,
}

/// The genuine record of step `c`, made by a real run in a store of its own.
fn genuine_record(runtime: &tokio::runtime::Runtime, plan: &Plan) -> StepRecord {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), &Arc::new(Counters::default()));
    run(runtime, &engine, plan, None, None);
    let c = plan.find("c").unwrap();
    let key = plan.definition_keys().unwrap()[c.index()];
    match engine.store().lookup(KeyKind::Definition, &key).unwrap() {
        Lookup::Hit(record) => *record,
        Lookup::Miss(miss) => panic!("{miss:?}"),
    }
}

fn sha256(bytes: &[u8]) -> String {
    crate::registry::sha256(bytes)
}

/// A fake registry serving `record` as the entry for its definition key, as
/// `docs/remote-cache.md` describes the format, with the blob `blob` for its output.
async fn serving(record: StepRecord, blob: Reply, hostile: Hostile) -> FakeRegistry {
    let output = record.outputs["out"].clone();
    let digest = {
        let integrity: ssri::Integrity = output.integrity.parse().unwrap();
        format!("sha256:{}", integrity.to_hex().1)
    };
    let mut stored = serde_json::to_value(&record).unwrap();
    stored["format"] = 1.into();
    let config = serde_json::to_vec(&stored).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.banger.step.v1",
        "config": {
            "mediaType": "application/vnd.banger.step.record.v1+json",
            "digest": sha256(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.banger.step.output.v1",
            "digest": digest,
            "size": output.size,
            "annotations": {"org.opencontainers.image.title": "out"},
        }],
    }))
    .unwrap();
    let manifest_path = format!(
        "/v2/team/cache/manifests/{}",
        OciRemoteCache::tag(&record.definition_key)
    );
    let config_path = format!("/v2/team/cache/blobs/{}", sha256(&config));
    let blob_path = format!("/v2/team/cache/blobs/{digest}");
    FakeRegistry::start(move |path, _| {
        match hostile {
            Hostile::ServerError => return Reply::status(500),
            Hostile::AuthRequired => {
                return Reply::Full {
                    status: 401,
                    headers: vec![(
                        "WWW-Authenticate".into(),
                        "Basic realm=\"banger-test\"".into(),
                    )],
                    body: Vec::new(),
                };
            }
            _ => {}
        }
        if path == "/v2/" {
            Reply::ok("application/json", b"{}".to_vec())
        } else if path == manifest_path {
            Reply::ok(
                "application/vnd.oci.image.manifest.v1+json",
                manifest.clone(),
            )
        } else if path == config_path {
            Reply::ok("application/octet-stream", config.clone())
        } else if path == blob_path {
            blob.clone()
        } else {
            Reply::status(404)
        }
    })
    .await
}

/// Every stored content file of a store.
fn stored_contents(store: &std::path::Path) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    let mut stack = vec![store.join("content-v2")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(std::fs::read(path).unwrap());
            }
        }
    }
    found
}

#[test]
fn a_lying_or_failing_remote_is_reported_once_and_the_step_runs_here() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let plan = chain(["a", "b", "c"]);
    let genuine = genuine_record(&runtime, &plan);
    for hostile in [
        Hostile::CorruptBlob,
        Hostile::TruncatedBlob,
        Hostile::WrongSizeInRecord,
        Hostile::ServerError,
        Hostile::Unreachable,
        Hostile::AuthRequired,
    ] {
        let mut record = genuine.clone();
        let (blob, unverified): (Reply, Option<&[u8]>) = match hostile {
            Hostile::CorruptBlob => (
                Reply::ok("application/octet-stream", b"cbX".to_vec()),
                Some(b"cbX"),
            ),
            Hostile::TruncatedBlob => (
                Reply::CutOff {
                    declared: 3,
                    body: b"cb".to_vec(),
                },
                Some(b"cb"),
            ),
            Hostile::WrongSizeInRecord => {
                // The record claims a byte more (and keeps its output digest consistent), so
                // only the transfer can tell.
                let out = record.outputs.get_mut("out").unwrap();
                out.size += 1;
                record.output_digest =
                    output_digest(record.outputs.iter().map(|(name, output)| {
                        (name.as_str(), output.integrity.as_str(), output.size)
                    }));
                (Reply::ok("application/octet-stream", b"cba".to_vec()), None)
            }
            _ => (Reply::ok("application/octet-stream", b"cba".to_vec()), None),
        };
        let server = runtime.block_on(serving(record, blob, hostile));
        let address = match hostile {
            Hostile::Unreachable => format!("127.0.0.1:{}", free_port()),
            _ => server.address.clone(),
        };
        let cache = remote(&address);
        let dir = tempfile::tempdir().unwrap();
        let counters = Arc::new(Counters::default());
        let engine = engine(dir.path(), &counters);
        let (report, events) = run(&runtime, &engine, &plan, Some(&cache), None);
        let warnings = warnings(&events);
        assert_eq!(warnings.len(), 1, "{hostile:?}: {warnings:#?}");
        assert_eq!(counters.total_runs(), 3, "{hostile:?}: {events:#?}");
        assert!(
            !report.cached.iter().any(|(_, hit)| *hit == HitKind::Remote),
            "{hostile:?}: {:?}",
            report.cached
        );
        assert_eq!(
            read_output(engine.store(), &report, "c"),
            b"cba",
            "{hostile:?}"
        );
        if let Some(unverified) = unverified {
            assert!(
                !stored_contents(dir.path())
                    .iter()
                    .any(|content| content == unverified),
                "{hostile:?}: unverified bytes entered the store"
            );
        }
        // Nothing of the download is left in scratch.
        let scratch: Vec<_> = std::fs::read_dir(dir.path().join("scratch"))
            .unwrap()
            .collect();
        assert!(scratch.is_empty(), "{hostile:?}: {scratch:?}");
    }
}

#[test]
fn an_upload_to_a_failing_remote_is_one_warning_and_the_run_still_succeeds() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let plan = chain(["a", "b", "c"]);
    for status in [401, 500] {
        let server = runtime.block_on(FakeRegistry::start(move |_, _| Reply::status(status)));
        let cache = remote(&server.address);
        let dir = tempfile::tempdir().unwrap();
        let counters = Arc::new(Counters::default());
        let engine = engine(dir.path(), &counters);
        let (report, events) = run(&runtime, &engine, &plan, None, Some(&cache));
        assert_eq!(report.ran.len(), 3, "HTTP {status}");
        let warnings = warnings(&events);
        assert_eq!(warnings.len(), 1, "HTTP {status}: {warnings:#?}");
        assert!(
            warnings[0].contains("nothing more is uploaded"),
            "HTTP {status}: {warnings:#?}"
        );
        assert_eq!(push_summary(&events), (0, 0, 0), "HTTP {status}");
    }
}
