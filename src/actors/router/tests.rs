//! The router's supervision and admission rules, on test doubles of the model session
//! (`runtime::doubles`): real actors, real worker threads, no ONNX Runtime and no model file,
//! so each case takes milliseconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::budget::Budgets;
use crate::actors::catalog::{Catalog, ModelVersions, SharedCatalog, VersionState};
use crate::actors::faults::Fault;
use crate::actors::served::{InferOptions, Priority, ServedModel};
use crate::actors::supervisor::load_version;
use crate::error::ServeError;
use crate::manifest::{sha256_file, Manifest, ModelEntry};
use crate::model::InferRequest;
use crate::runtime::doubles::{Behaviour, DoubleLoader};
use crate::tensor::{NamedTensor, TensorData};

/// Manifest entries of the double model: one version "1" per `(name, manifest keys)`.
fn entries(models: &[(&str, &str)]) -> Vec<ModelEntry> {
    let dir = std::env::temp_dir().join(format!(
        "streamserve-router-{}-{:?}",
        std::process::id(),
        Instant::now()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.onnx"), b"a test double needs no model").unwrap();
    let sha256 = sha256_file(&dir.join("model.onnx")).unwrap();
    let text: String = models
        .iter()
        .map(|(name, keys)| {
            format!(
                "[[models]]\nname = \"{name}\"\nversion = \"1\"\nfile = \"model.onnx\"\nsha256 = \"{sha256}\"\n{keys}\n"
            )
        })
        .collect();
    Manifest::parse(&dir, &text).unwrap().models
}

/// Serves a version on sessions from `loader`.
async fn serve_entry(
    loader: &'static DoubleLoader,
    catalog: &Arc<SharedCatalog>,
    entry: ModelEntry,
) -> ServedModel {
    let budgets = Arc::new(Budgets::new(64, 1 << 20, 0));
    match load_version(
        Arc::new(entry),
        loader,
        catalog.clone(),
        budgets,
        Default::default(),
    )
    .await
    {
        VersionState::Serving(served) => served,
        _ => panic!("the double model did not load"),
    }
}

/// Serves one version named `name` of the double model with the manifest keys in `keys`.
async fn serve(
    loader: &'static DoubleLoader,
    catalog: &Arc<SharedCatalog>,
    name: &str,
    keys: &str,
) -> ServedModel {
    let entry = entries(&[(name, keys)]).remove(0);
    serve_entry(loader, catalog, entry).await
}

/// Lists serving versions in the catalog, so that fallbacks can be found by name.
fn publish(shared: &SharedCatalog, served: &[&ServedModel]) {
    let mut catalog = Catalog::default();
    for s in served {
        let mut versions = ModelVersions {
            manifest_default: Some(s.info.version.clone()),
            ..ModelVersions::default()
        };
        versions
            .versions
            .insert(s.info.version.clone(), VersionState::Serving((*s).clone()));
        catalog.models.insert(s.info.name.clone(), versions);
    }
    shared.publish(catalog);
}

fn request(served: &ServedModel, rows: usize) -> InferRequest {
    let x = NamedTensor {
        name: "x".into(),
        shape: vec![rows as i64, 4],
        data: TensorData::Fp32(vec![0.5; rows * 4]),
    };
    served.info.validate(vec![x], None).unwrap()
}

/// Waits until the version has `n` healthy replicas again (restarts load in the background).
async fn healthy(served: &ServedModel, n: usize) {
    let start = Instant::now();
    while served
        .health
        .healthy_replicas
        .load(std::sync::atomic::Ordering::Relaxed)
        < n
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "replicas did not come back"
        );
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves `m` on two replicas of `loader`'s sessions, batching what queued while both ran.
async fn two_replicas(loader: &'static DoubleLoader) -> ServedModel {
    let catalog = Arc::new(SharedCatalog::default());
    let keys = "replicas = 2\nmax_batch_size = 8\nmax_queue_delay_ms = 0.0";
    let served = serve(loader, &catalog, "m", keys).await;
    healthy(&served, 2).await;
    served
}

/// Heals the double's sessions, waits for `n` replicas and checks that the version answers.
async fn answers_again(loader: &DoubleLoader, served: &ServedModel, n: usize) {
    loader.set(Behaviour::Echo);
    healthy(served, n).await;
    assert!(served
        .infer(request(served, 1), InferOptions::now())
        .await
        .is_ok());
}

#[actix_web::test]
async fn requests_that_wait_together_run_in_one_model_call() {
    let loader = DoubleLoader::new(Behaviour::Echo).leak();
    let catalog = Arc::new(SharedCatalog::default());
    let served = serve(
        loader,
        &catalog,
        "m",
        "max_batch_size = 8\nmax_queue_delay_ms = 50",
    )
    .await;
    let answers: Vec<_> = (0..5)
        .map(|_| served.infer(request(&served, 1), InferOptions::now()))
        .collect();
    for answer in futures_util::future::join_all(answers).await {
        let response = answer.unwrap();
        assert_eq!(response.batch_size, 5);
        assert_eq!(response.outputs[0].shape, vec![1, 4]);
    }
    assert_eq!(loader.calls(), vec![5]);
}

#[actix_web::test]
async fn requests_that_come_while_a_replica_runs_fill_one_batch_for_the_next() {
    let loader = DoubleLoader::new(Behaviour::Sleep(Duration::from_millis(300))).leak();
    let served = two_replicas(loader).await;
    // An idle model runs a lone request at once, on the first replica.
    let first = served.infer(request(&served, 1), InferOptions::now());
    let first = actix_web::rt::spawn(first);
    actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    // Three more while it runs (admitted in one poll, well within the wait): sent at once,
    // the first would go alone to the idle replica.
    let more: Vec<_> = (0..3)
        .map(|_| served.infer(request(&served, 1), InferOptions::now()))
        .collect();
    for answer in futures_util::future::join_all(more).await {
        assert_eq!(answer.unwrap().batch_size, 3);
    }
    assert_eq!(first.await.unwrap().unwrap().batch_size, 1);
    assert_eq!(loader.calls(), vec![1, 3]);
}

/// A lone client's requests stay on the replica that ran last (its thread still awake, its
/// model in the CPU's caches); another replica gets a batch while that one is busy.
#[actix_web::test]
async fn a_lone_client_stays_on_the_replica_that_ran_last() {
    let loader = DoubleLoader::new(Behaviour::Sleep(Duration::from_millis(50))).leak();
    let served = two_replicas(loader).await;
    // Replica 1 panics on its next batch: one request after another never reach it. (Each
    // waits for the worker that answered the last to report back: sent before that, a
    // request finds replica 0 still busy and rightly takes the idle one.)
    served.inject_fault(Some(1), Fault::Panic, 1).await.unwrap();
    for _ in 0..6 {
        served
            .infer(request(&served, 1), InferOptions::now())
            .await
            .unwrap();
        while served.status().await.unwrap().busy_replicas > 0 {
            actix_web::rt::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(served.status().await.unwrap().restarts, 0);
    // Two at once: the second finds replica 0 busy and goes to replica 1, which panics; it is
    // retried on replica 0 and answered all the same.
    let two: Vec<_> = (0..2)
        .map(|_| served.infer(request(&served, 1), InferOptions::now()))
        .collect();
    for answer in futures_util::future::join_all(two).await {
        answer.unwrap();
    }
    assert_eq!(served.status().await.unwrap().restarts, 1);
    answers_again(loader, &served, 2).await;
}

#[actix_web::test]
async fn a_request_meets_at_most_two_dying_workers_then_gets_503_and_replicas_come_back() {
    let loader = DoubleLoader::new(Behaviour::Panic).leak();
    let catalog = Arc::new(SharedCatalog::default());
    let served = serve(loader, &catalog, "m", "max_batch_size = 4\nreplicas = 2").await;
    let answer = served.infer(request(&served, 1), InferOptions::now()).await;
    assert!(
        matches!(answer, Err(ServeError::WorkerLost(_))),
        "{answer:?}"
    );
    assert_eq!(
        loader.calls().len(),
        2,
        "tried on one worker, retried once on the other"
    );
    answers_again(loader, &served, 2).await;
}

#[actix_web::test]
async fn a_hung_worker_is_given_up_on_before_it_returns() {
    let loader = DoubleLoader::new(Behaviour::Sleep(Duration::from_secs(5))).leak();
    let catalog = Arc::new(SharedCatalog::default());
    let served = serve(
        loader,
        &catalog,
        "m",
        "max_batch_size = 4\nreplicas = 2\nhang_timeout_ms = 100",
    )
    .await;
    let started = Instant::now();
    let answer = served.infer(request(&served, 1), InferOptions::now()).await;
    assert!(
        matches!(answer, Err(ServeError::WorkerLost(ref why)) if why.contains("hung")),
        "{answer:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered before the hang ended"
    );
    answers_again(loader, &served, 2).await;
}

#[actix_web::test]
async fn a_request_past_its_deadline_is_answered_504_without_running() {
    let loader = DoubleLoader::new(Behaviour::Sleep(Duration::from_millis(300))).leak();
    let catalog = Arc::new(SharedCatalog::default());
    let served = serve(loader, &catalog, "m", "max_batch_size = 1").await;
    let running = served.infer(request(&served, 1), InferOptions::now());
    let late = served.infer(
        request(&served, 1),
        InferOptions::now().with_timeout(Some(Duration::from_millis(50))),
    );
    let (running, late) = futures_util::join!(running, late);
    assert!(running.is_ok());
    assert!(
        matches!(late, Err(ServeError::DeadlineExceeded { .. })),
        "{late:?}"
    );
    assert_eq!(loader.calls(), vec![1], "the late request never ran");
}

#[actix_web::test]
async fn a_full_queue_refuses_at_once_with_retry_after() {
    let loader = DoubleLoader::new(Behaviour::Sleep(Duration::from_millis(200))).leak();
    let catalog = Arc::new(SharedCatalog::default());
    let served = serve(loader, &catalog, "m", "max_batch_size = 1\nmax_queue = 2").await;
    let first = served.infer(request(&served, 1), InferOptions::now());
    // Let the first request reach the worker, so that the next two fill the queue.
    actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    let queued: Vec<_> = (0..2)
        .map(|_| served.infer(request(&served, 1), InferOptions::now()))
        .collect();
    let refused = served.infer(request(&served, 1), InferOptions::now()).await;
    match refused {
        Err(ServeError::Overloaded {
            limit, retry_after, ..
        }) => {
            assert_eq!(limit, 2);
            assert!(retry_after >= Duration::from_millis(100));
        }
        other => panic!("expected 429, got {other:?}"),
    }
    assert!(first.await.is_ok());
    for answer in futures_util::future::join_all(queued).await {
        assert!(answer.is_ok());
    }
}

#[actix_web::test]
async fn when_every_worker_of_a_model_dies_its_requests_go_to_the_fallback() {
    let catalog = Arc::new(SharedCatalog::default());
    let broken = DoubleLoader::new(Behaviour::Panic).leak();
    let spare = DoubleLoader::new(Behaviour::Echo).leak();
    let mut models = entries(&[
        (
            "primary",
            "max_batch_size = 4\nreplicas = 2\nfallback = \"spare\"",
        ),
        ("spare", "max_batch_size = 4"),
    ]);
    let fallback = serve_entry(spare, &catalog, models.remove(1)).await;
    let primary = serve_entry(broken, &catalog, models.remove(0)).await;
    publish(&catalog, &[&primary, &fallback]);
    let response = primary
        .infer(request(&primary, 1), InferOptions::now())
        .await
        .unwrap();
    assert!(response.degraded);
    assert_eq!(response.served_by.0, "spare");
    assert_eq!(broken.calls().len(), 2);
    assert_eq!(spare.calls(), vec![1]);
}

#[actix_web::test]
async fn normal_requests_overtake_low_priority_ones_in_the_queue() {
    let loader = DoubleLoader::new(Behaviour::Sleep(Duration::from_millis(100))).leak();
    let catalog = Arc::new(SharedCatalog::default());
    let served = serve(loader, &catalog, "m", "max_batch_size = 1").await;
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let send = |label: &'static str, priority: Priority| {
        let order = order.clone();
        let answer = served.infer(
            request(&served, 1),
            InferOptions::now().with_priority(priority),
        );
        async move {
            answer.await.unwrap();
            order.lock().unwrap().push(label);
        }
    };
    let running = send("first", Priority::Normal);
    actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    let bulk = send("bulk", Priority::Low);
    let interactive = send("interactive", Priority::Normal);
    futures_util::join!(running, bulk, interactive);
    assert_eq!(*order.lock().unwrap(), vec!["first", "interactive", "bulk"]);
}

#[actix_web::test]
async fn low_priority_requests_are_refused_first_when_the_queue_fills() {
    let loader = DoubleLoader::new(Behaviour::Sleep(Duration::from_millis(200))).leak();
    let catalog = Arc::new(SharedCatalog::default());
    let served = serve(loader, &catalog, "m", "max_batch_size = 1\nmax_queue = 4").await;
    let low = InferOptions::now().with_priority(Priority::Low);
    let running = served.infer(request(&served, 1), InferOptions::now());
    actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    // The queue is empty: a low-priority request is queued.
    let queued_low = served.infer(request(&served, 1), low);
    let queued_normal = served.infer(request(&served, 1), InferOptions::now());
    // Half full now: the next low-priority request is refused, a normal one still queued.
    let refused = served.infer(request(&served, 1), low).await;
    assert!(
        matches!(refused, Err(ServeError::Overloaded { .. })),
        "{refused:?}"
    );
    let normal = served.infer(request(&served, 1), InferOptions::now());
    let (a, b, c, d) = futures_util::join!(running, queued_low, queued_normal, normal);
    assert!(a.is_ok() && b.is_ok() && c.is_ok() && d.is_ok());
}

#[actix_web::test]
async fn a_request_to_an_unloaded_version_is_refused_at_once() {
    // A caller may still hold the handle of a version that finished draining; with a batching
    // delay its request would otherwise wait for a flush timer that no longer runs.
    let loader = DoubleLoader::new(Behaviour::Echo).leak();
    let catalog = Arc::new(SharedCatalog::default());
    let served = serve(
        loader,
        &catalog,
        "m",
        "max_batch_size = 8\nmax_queue_delay_ms = 50",
    )
    .await;
    assert!(served
        .infer(request(&served, 1), InferOptions::now())
        .await
        .is_ok());
    served.drain();
    let start = Instant::now();
    while served.status().await.is_some() {
        assert!(start.elapsed() < Duration::from_secs(5), "did not unload");
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    let late = actix_web::rt::time::timeout(
        Duration::from_secs(2),
        served.infer(request(&served, 1), InferOptions::now()),
    )
    .await
    .expect("answered, not left waiting");
    // Nothing of it ran: its version is out of service (not unloaded for idleness).
    assert!(
        matches!(late, Err(ServeError::VersionRetired { .. })),
        "{late:?}"
    );
}

#[actix_web::test]
async fn a_request_the_door_sends_to_the_fallback_goes_there_while_one_is_ready() {
    let catalog = Arc::new(SharedCatalog::default());
    let main = DoubleLoader::new(Behaviour::Echo).leak();
    let spare = DoubleLoader::new(Behaviour::Echo).leak();
    let mut models = entries(&[
        ("primary", "max_batch_size = 4\nfallback = \"spare\""),
        ("spare", "max_batch_size = 4"),
    ]);
    let fallback = serve_entry(spare, &catalog, models.remove(1)).await;
    let primary = serve_entry(main, &catalog, models.remove(0)).await;
    let fallback_first = || InferOptions::now().with_fallback_first(true);
    // No fallback in the catalog yet: the request is the primary's, as any other.
    let response = primary
        .infer(request(&primary, 1), fallback_first())
        .await
        .unwrap();
    assert!(!response.degraded);
    assert_eq!(main.calls(), vec![1]);
    publish(&catalog, &[&primary, &fallback]);
    // A healthy primary with an empty queue, but the door asked for the fallback.
    let response = primary
        .infer(request(&primary, 1), fallback_first())
        .await
        .unwrap();
    assert!(response.degraded);
    assert_eq!(response.served_by.0, "spare");
    assert_eq!(spare.calls(), vec![1]);
    // Without the door's word, the primary answers.
    let response = primary
        .infer(request(&primary, 1), InferOptions::now())
        .await
        .unwrap();
    assert!(!response.degraded);
    assert_eq!(main.calls(), vec![1, 1]);
}

/// Fails its next `failures` loads (each after `slow`), then loads the double model: one
/// replica of a version that fails to load while the others do, or a file that goes away.
struct FlakyLoader {
    inner: DoubleLoader,
    failures: std::sync::atomic::AtomicUsize,
    slow: Duration,
}

impl FlakyLoader {
    fn leak(failures: usize, slow: Duration, behaviour: Behaviour) -> &'static FlakyLoader {
        Box::leak(Box::new(FlakyLoader {
            inner: DoubleLoader::new(behaviour),
            failures: failures.into(),
            slow,
        }))
    }
}

impl crate::runtime::SessionLoader for FlakyLoader {
    fn load(
        &self,
        entry: &ModelEntry,
    ) -> Result<Box<dyn crate::runtime::InferenceSession>, String> {
        use std::sync::atomic::Ordering;
        let fail = self
            .failures
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            std::thread::sleep(self.slow);
            return Err("flaky load".into());
        }
        self.inner.load(entry)
    }
}

/// Serves `entry` on `sessions` within `budgets`.
async fn serve_within(
    sessions: crate::runtime::Sessions,
    budgets: &Arc<Budgets>,
    entry: ModelEntry,
) -> ServedModel {
    let catalog = Arc::new(SharedCatalog::default());
    let state = load_version(
        Arc::new(entry),
        sessions,
        catalog,
        budgets.clone(),
        Default::default(),
    )
    .await;
    match state {
        VersionState::Serving(served) => served,
        _ => panic!("the double model did not load"),
    }
}

/// Waits until the router reports `n` replicas (a scale-up or its undoing is in the background).
async fn replicas(served: &ServedModel, n: usize, what: &str) {
    let start = Instant::now();
    while served.status().await.unwrap().replicas != n {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn a_replica_that_failed_to_load_with_its_version_is_started_again() {
    let loader = FlakyLoader::leak(1, Duration::ZERO, Behaviour::Echo);
    let budgets = Arc::new(Budgets::new(64, 100, 0));
    let entry = entries(&[("m", "replicas = 2\nmax_batch_size = 4")]).remove(0);
    let served = serve_within(loader, &budgets, entry).await;
    // The version serves on the replica that loaded, and gets the other back.
    healthy(&served, 2).await;
    assert!(served
        .infer(request(&served, 1), InferOptions::now())
        .await
        .is_ok());
    // Both replicas' memory is held while it serves (1 MiB each, the file rounded up), and all
    // of it, no more, goes back when it unloads.
    let cpu = crate::manifest::Device::Cpu;
    assert_eq!(budgets.memory.in_use_mb(cpu), 2);
    served.drain();
    let start = Instant::now();
    while served.status().await.is_some() {
        assert!(start.elapsed() < Duration::from_secs(5), "did not unload");
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(budgets.memory.in_use_mb(cpu), 0);
    assert!(
        budgets.memory.try_take(cpu, 101).is_err(),
        "the budget grew past its 100 MiB"
    );
    assert_eq!(budgets.cpu.available(), 64);
}

#[actix_web::test]
async fn a_new_replica_that_cannot_load_is_given_up_with_its_budget() {
    let sleep = Behaviour::Sleep(Duration::from_millis(100));
    let loader = FlakyLoader::leak(0, Duration::from_millis(300), sleep);
    let budgets = Arc::new(Budgets::new(64, 100, 0));
    let keys = "replicas = 1\nmax_replicas = 2\nmax_batch_size = 1";
    let entry = entries(&[("m", keys)]).remove(0);
    let served = serve_within(loader, &budgets, entry).await;
    // Its file is gone, say: every session load fails from now on (after 300 ms).
    loader
        .failures
        .store(usize::MAX, std::sync::atomic::Ordering::Release);
    // 20 requests of 100 ms on one replica: the queue stays deeper than it can take for well
    // over a second, so the router adds a replica, which cannot load.
    let answers: Vec<_> = (0..20)
        .map(|_| served.infer(request(&served, 1), InferOptions::now()))
        .collect();
    let answers = actix_web::rt::spawn(futures_util::future::join_all(answers));
    let start = Instant::now();
    while served.status().await.unwrap().replicas < 2 {
        assert!(start.elapsed() < Duration::from_secs(3), "did not scale up");
        actix_web::rt::time::sleep(Duration::from_millis(5)).await;
    }
    // The version's health (model metadata) counts the replicas running, not the manifest's.
    let running = || {
        served
            .health
            .replicas
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(running(), 2);
    replicas(&served, 1, "the replica that cannot load is still counted").await;
    assert_eq!(running(), 1);
    assert_eq!(budgets.cpu.available(), 63, "its thread went back");
    let cpu = crate::manifest::Device::Cpu;
    assert_eq!(budgets.memory.in_use_mb(cpu), 1, "its memory went back");
    for answer in answers.await.unwrap() {
        assert!(answer.is_ok(), "{answer:?}");
    }
    let status = served.status().await.unwrap();
    assert_eq!((status.replicas, status.healthy_replicas), (1, 1));
}

#[actix_web::test]
async fn an_overloaded_model_whose_fallback_is_cold_queues_instead_of_shedding() {
    // The fallback is named but not loaded (lazy, or unloaded when idle): nothing can take the
    // overflow, so the model's own queue does, up to max_queue, as without a fallback.
    let loader = DoubleLoader::new(Behaviour::Sleep(Duration::from_millis(40))).leak();
    let catalog = Arc::new(SharedCatalog::default());
    let keys = "max_batch_size = 1\nmax_queue = 100\nslo_ms = 50\nfallback = \"spare\"";
    let primary = entries(&[("m", keys), ("spare", "max_batch_size = 4")]).remove(0);
    let served = serve_entry(loader, &catalog, primary).await;
    // 20 at once: from the 12th on the predicted wait passes 50 ms (11 batches queued at
    // 5 ms each), and the model is overloaded.
    let answers: Vec<_> = (0..20)
        .map(|_| served.infer(request(&served, 1), InferOptions::now()))
        .collect();
    assert!(served.status().await.unwrap().overloaded);
    for answer in futures_util::future::join_all(answers).await {
        let response = answer.expect("queued, not shed: the queue had room");
        assert!(!response.degraded);
    }
    assert_eq!(loader.calls().len(), 20);
}
