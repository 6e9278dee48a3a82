//! The supervisor's loading and unloading on test doubles: eager and lazy versions, idle
//! unloads, a request that holds (or reached) a version taken down, the memory budget.

use super::*;

#[actix::test]
async fn start_serves_eager_versions_and_lists_the_rest() {
    let f = start("start", 1024).await;
    assert_eq!(f.label("m", "1"), "READY");
    assert_eq!(f.label("m", "2"), "UNLOADED");
    assert_eq!(f.label("idle", "1"), "UNLOADED");
    // The manifest's default is the highest eager version, lazy ones wait for a deployment.
    assert_eq!(f.default_of("m"), "1");
    let served = f.catalog.snapshot().resolve("m", None).unwrap();
    assert_eq!(served.info.version, "1");
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    // A file that is not what the manifest says is refused, with the reason; it stays so.
    assert_eq!(f.label("bad", "1"), "UNAVAILABLE");
    match f.ensure("bad", None).await {
        Err(ServeError::ModelUnavailable { reason, .. }) => {
            assert!(reason.contains("sha256 mismatch"), "{reason}")
        }
        other => panic!("expected unavailable, got {:?}", other.map(|_| ())),
    }
}

#[actix::test]
async fn a_lazy_version_loads_on_its_first_request() {
    let f = start("lazy", 1024).await;
    let served = f.ensure("m", Some("2")).await.unwrap();
    assert_eq!(served.info.version, "2");
    assert_eq!(served.info.replicas, 2);
    assert_eq!(f.label("m", "2"), "READY");
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    // Loading does not make it the default.
    assert_eq!(f.default_of("m"), "1");
    assert!(matches!(
        f.ensure("m", Some("9")).await,
        Err(ServeError::VersionNotFound { .. })
    ));
    assert!(matches!(
        f.ensure("nope", None).await,
        Err(ServeError::ModelNotFound(_))
    ));
}

#[actix::test]
async fn an_idle_version_unloads_and_loads_again_on_demand() {
    let f = start("idle", 1024).await;
    f.ensure("idle", None).await.unwrap();
    assert_eq!(f.label("idle", "1"), "READY");
    eventually("idle:1 is unloaded", || f.label("idle", "1") == "UNLOADED").await;
    // Versions without idle_unload_secs stay.
    assert_eq!(f.label("m", "1"), "READY");
    let served = f.ensure("idle", None).await.unwrap();
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}

/// The catalog's own handle of a serving version, as a request takes it in the instant of an
/// unload: it does not hold the version.
fn unheld(f: &Fixture, name: &str, version: &str) -> ServedModel {
    match &f.catalog.snapshot().models[name].versions[version] {
        VersionState::Serving(served) => served.clone(),
        _ => panic!("{name}:{version} is not serving"),
    }
}

/// Waits until the version's router has stopped (drained after an unload).
async fn stopped(served: &ServedModel) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while served.status().await.is_some() {
        assert!(Instant::now() < deadline, "the router did not stop");
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

#[actix::test]
async fn a_held_version_is_not_unloaded_idle_and_a_request_it_stopped_under_loads_it_again() {
    let f = start("idle-held", 1024).await;
    // Held, as by a request whose body is still arriving or a silent stream: it stays loaded
    // well past its second of idleness, and serves.
    let held = f.ensure("idle", None).await.unwrap();
    assert_eq!(held.holders(), 1);
    actix::clock::sleep(Duration::from_millis(1600)).await;
    assert_eq!(f.label("idle", "1"), "READY");
    assert_eq!(echo(&held).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    // Once nobody holds it, it unloads.
    let stale = unheld(&f, "idle", "1");
    drop(held);
    assert_eq!(stale.holders(), 0);
    eventually("idle:1 unloads once free", || {
        f.label("idle", "1") == "UNLOADED"
    })
    .await;
    stopped(&stale).await;
    // A request that still reaches the stopped router is not lost: the version loads again
    // and answers it, once.
    let calls = f.loader.calls().len();
    assert_eq!(echo(&stale).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(f.loader.calls().len(), calls + 1, "run exactly once");
    assert_eq!(f.label("idle", "1"), "READY");
    // The stale handle now leads to the new version (and holds it), with no second load.
    let reloaded = unheld(&f, "idle", "1");
    assert_eq!(reloaded.holders(), 1);
    assert_eq!(echo(&stale).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(f.label("idle", "1"), "READY");
    drop(stale);
    assert_eq!(reloaded.holders(), 0);
    eventually("idle:1 unloads again", || {
        f.label("idle", "1") == "UNLOADED"
    })
    .await;
}

#[actix::test]
async fn a_request_taken_to_the_version_loaded_again_says_which_answered_it() {
    // What counts the answer (the version's health, its series) must be the version that
    // answered, not the stopped one the request was resolved to.
    let f = start("idle-counted", 1024).await;
    f.ensure("idle", None).await.unwrap();
    let stale = unheld(&f, "idle", "1");
    eventually("idle:1 unloads", || f.label("idle", "1") == "UNLOADED").await;
    stopped(&stale).await;
    let request = Arc::new(one_row(&stale).unwrap());
    let Sent::Answered { answer, by } = stale.send(request.clone(), InferOptions::now()).await
    else {
        panic!("an idle unload is not a retirement");
    };
    assert!(answer.is_ok());
    let reloaded = unheld(&f, "idle", "1");
    let by = by.expect("another version answered");
    assert!(
        Arc::ptr_eq(&by.health, &reloaded.health),
        "the reloaded one"
    );
    assert!(!Arc::ptr_eq(&by.health, &stale.health));
    // Straight to it the next time, and said so again.
    let Sent::Answered { by, .. } = stale.send(request, InferOptions::now()).await else {
        panic!("served");
    };
    assert!(Arc::ptr_eq(&by.unwrap().health, &reloaded.health));
    // A handle whose own router serves names none.
    let request = Arc::new(one_row(&reloaded).unwrap());
    let Sent::Answered { by, .. } = reloaded.send(request, InferOptions::now()).await else {
        panic!("served");
    };
    assert!(by.is_none());
}

#[actix::test]
async fn a_request_that_reaches_a_version_unloaded_otherwise_is_told_it_was_retired() {
    // Only an idle unload loads the version again for what still holds it: an admin's (or a
    // rollout's) unload is meant to take the version away, and says so.
    let f = start("admin-unload", 1024).await;
    let held = f.served("m", "1");
    let unload = f.supervisor.send(Unload {
        name: "m".into(),
        version: Some("1".into()),
    });
    assert_eq!(unload.await.unwrap().unwrap()["unloaded"], true);
    stopped(&held).await;
    match echo(&held).await {
        Err(ServeError::VersionRetired { model, version }) => {
            assert_eq!((model.as_str(), version.as_str()), ("m", "1"))
        }
        other => panic!("expected a retired version, got {other:?}"),
    }
    assert_eq!(f.label("m", "1"), "UNLOADED");
    // `send` gives the request back unrun, for REST or gRPC to send to the default now.
    let request = Arc::new(one_row(&held).unwrap());
    match held.send(request.clone(), InferOptions::now()).await {
        Sent::Retired {
            request: back,
            stopped,
        } => {
            assert!(Arc::ptr_eq(&back, &request), "the same request, unrun");
            assert_eq!(stopped.info.version, "1");
        }
        Sent::Answered { answer, .. } => panic!("expected it back, got {:?}", answer.map(|_| ())),
    }
}

#[actix::test]
async fn a_version_that_does_not_fit_stays_loadable() {
    // No memory budget at all: nothing fits.
    let f = start("does-not-fit", 0).await;
    assert_eq!(f.label("m", "1"), "UNLOADED");
    let catalog = f.catalog.snapshot();
    let VersionState::Cold { last_error, .. } = &catalog.models["m"].versions["1"] else {
        panic!("expected m:1 cold");
    };
    let reason = last_error.as_deref().unwrap_or_default();
    assert!(reason.starts_with(DOES_NOT_FIT), "{reason}");
    match f.ensure("m", None).await {
        Err(ServeError::ModelUnavailable { reason, .. }) => {
            assert!(reason.starts_with(DOES_NOT_FIT), "{reason}")
        }
        other => panic!("expected unavailable, got {:?}", other.map(|_| ())),
    }
    assert_eq!(f.label("m", "1"), "UNLOADED");
}
