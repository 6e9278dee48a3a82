//! The supervisor's deployments on test doubles: blue/green, its smoke test and rollback, a
//! canary rolled back or promoted, a rolling update an operator stops, one at a time.

use super::*;

#[actix::test]
async fn blue_green_switches_the_default_and_unloads_the_old() {
    let f = start("blue-green", 1024).await;
    let answer = f.deploy("2", Strategy::BlueGreen).await.unwrap();
    assert_eq!(answer["strategy"], "blue_green");
    assert_eq!((&answer["from"], &answer["to"]), (&"1".into(), &"2".into()));
    assert_eq!(f.default_of("m"), "2");
    assert_eq!(f.label("m", "2"), "READY");
    assert_eq!(f.label("m", "1"), "UNLOADED");
    let served = f.catalog.snapshot().resolve("m", None).unwrap();
    assert_eq!(served.info.version, "2");
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(f.rollouts().await["previous_default"]["m"], "1");
}

#[actix::test]
async fn a_failing_smoke_test_changes_nothing() {
    let f = start("smoke-test", 1024).await;
    f.loader.set(Behaviour::Fail);
    match f.deploy("2", Strategy::BlueGreen).await {
        Err(ServeError::Conflict(message)) => {
            assert!(message.contains("m:2 failed, nothing changed"), "{message}")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(f.default_of("m"), "1");
    // The new version was loaded for the deployment only, so it goes again.
    assert_eq!(f.label("m", "2"), "UNLOADED");
    assert_eq!(f.label("m", "1"), "READY");
    assert!(f.rollback().await.is_err(), "nothing to roll back to");
    f.loader.set(Behaviour::Echo);
    let served = f.catalog.snapshot().resolve("m", None).unwrap();
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}

#[actix::test]
async fn a_rollback_restores_the_previous_default_once() {
    let f = start("rollback", 1024).await;
    f.deploy("2", Strategy::BlueGreen).await.unwrap();
    let answer = f.rollback().await.unwrap();
    assert_eq!((&answer["from"], &answer["to"]), (&"2".into(), &"1".into()));
    assert_eq!(f.default_of("m"), "1");
    assert_eq!(f.label("m", "1"), "READY");
    assert_eq!(f.label("m", "2"), "UNLOADED");
    let served = f.catalog.snapshot().resolve("m", None).unwrap();
    assert_eq!(served.info.version, "1");
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    // The previous default is consumed: a second rollback does not undo the first.
    match f.rollback().await {
        Err(ServeError::Conflict(message)) => {
            assert!(message.contains("no previous version"), "{message}")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(f.default_of("m"), "1");
}

#[actix::test]
async fn a_canary_worse_than_stable_is_rolled_back() {
    let f = start("canary-worse", 1024).await;
    // Steps of 2 s: time enough to record the canary's failures before its first judgement.
    let answer = f.deploy_in_steps("2", Strategy::Canary, 2).await.unwrap();
    assert_eq!(answer["strategy"], "canary");
    assert_eq!(answer["steps"], serde_json::json!([50, 100]));
    let canary = f.catalog.snapshot().models["m"].canary.clone().unwrap();
    assert_eq!((canary.version.as_str(), canary.percent), ("2", 50));
    // While it runs: the default is unchanged, and neither version can be unloaded or deployed.
    assert_eq!(f.default_of("m"), "1");
    let unload = f.supervisor.send(Unload {
        name: "m".into(),
        version: Some("1".into()),
    });
    assert!(matches!(
        unload.await.unwrap(),
        Err(ServeError::Conflict(_))
    ));
    assert!(matches!(
        f.deploy("2", Strategy::BlueGreen).await,
        Err(ServeError::Conflict(_))
    ));
    // Another model's version of the same name is not held by this rollout.
    f.ensure("idle", Some("1")).await.unwrap();
    let unload = f.supervisor.send(Unload {
        name: "idle".into(),
        version: Some("1".into()),
    });
    assert_eq!(unload.await.unwrap().unwrap()["unloaded"], true);
    // Five failed answers from the canary, none from stable.
    let health = f.served("m", "2").health;
    for _ in 0..5 {
        health.record(true, Duration::from_millis(1));
    }
    eventually("the canary is rolled back", || {
        f.catalog.snapshot().models["m"].canary.is_none()
    })
    .await;
    assert_eq!(f.default_of("m"), "1");
    assert_eq!(f.label("m", "2"), "UNLOADED");
    assert_eq!(f.label("m", "1"), "READY");
    let rollouts = f.rollouts().await;
    assert_eq!(rollouts["running"], serde_json::json!({}));
    let reason = rollouts["last_rollback"]["m"].as_str().unwrap();
    assert!(
        reason.starts_with("canary worse than stable: errors 100.0%"),
        "{reason}"
    );
}

#[actix::test]
async fn a_canary_that_holds_up_is_promoted_step_by_step() {
    let f = start("canary-promoted", 1024).await;
    f.deploy_in_steps("2", Strategy::Canary, 0).await.unwrap();
    eventually("the canary is promoted", || f.default_of("m") == "2").await;
    assert!(f.catalog.snapshot().models["m"].canary.is_none());
    assert_eq!(f.label("m", "2"), "READY");
    assert_eq!(f.label("m", "1"), "UNLOADED");
    let rollouts = f.rollouts().await;
    assert_eq!(rollouts["running"], serde_json::json!({}));
    assert_eq!(rollouts["previous_default"]["m"], "1");
    // A promotion is a deployment like a switch: it can be rolled back.
    f.rollback().await.unwrap();
    assert_eq!(f.default_of("m"), "1");
}

#[actix::test]
async fn a_rolling_update_steps_one_replicas_share_and_an_operator_can_stop_it() {
    let f = start("rolling", 1024).await;
    assert!(
        matches!(
            f.deploy("1", Strategy::Rolling).await,
            Err(ServeError::Conflict(_))
        ),
        "m:1 is already the default"
    );
    let answer = f.deploy("2", Strategy::Rolling).await.unwrap();
    assert_eq!(answer["strategy"], "rolling");
    // m:2 has two replicas: half the traffic, then all of it.
    assert_eq!(answer["steps"], serde_json::json!([50, 100]));
    let running = &f.rollouts().await["running"]["m"];
    assert_eq!(
        (&running["canary"], &running["percent"]),
        (&"2".into(), &50.into())
    );
    let answer = f.rollback().await.unwrap();
    assert_eq!(answer["rolled_back"], "canary");
    assert!(f.catalog.snapshot().models["m"].canary.is_none());
    assert_eq!(f.label("m", "2"), "UNLOADED");
    assert_eq!(f.default_of("m"), "1");
    assert_eq!(
        f.rollouts().await["last_rollback"]["m"],
        "rolled back by an operator"
    );
}

#[actix::test]
async fn one_deploy_or_rollback_of_a_model_at_a_time() {
    let f = start("one-at-a-time", 1024).await;
    // Every model call takes 300 ms: the first deploy's smoke test holds it that long.
    f.loader.set(Behaviour::Sleep(Duration::from_millis(300)));
    let deploy = |version: &str, strategy| Deploy {
        name: "m".into(),
        version: version.into(),
        strategy,
        steps: vec![50, 100],
        step_secs: 60,
        smoke_test: true,
    };
    // Sent together: the first is handled (and reserves `m`) before the others.
    let first = f.supervisor.send(deploy("2", Strategy::BlueGreen));
    let second = f.supervisor.send(deploy("2", Strategy::Canary));
    let again = f.supervisor.send(deploy("1", Strategy::BlueGreen));
    let rollback = f.supervisor.send(Rollback { name: "m".into() });
    let unload = f.supervisor.send(Unload {
        name: "m".into(),
        version: Some("1".into()),
    });
    for refused in [second.await, again.await, rollback.await] {
        match refused.unwrap() {
            Err(ServeError::Conflict(message)) => assert_eq!(
                message,
                "a deployment of 'm' is in progress; wait for its answer and try again"
            ),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    // The versions of a deployment being prepared are held, like a running canary's.
    assert!(matches!(
        unload.await.unwrap(),
        Err(ServeError::Conflict(_))
    ));
    let answer = first.await.unwrap().unwrap();
    assert_eq!((&answer["from"], &answer["to"]), (&"1".into(), &"2".into()));
    assert_eq!(f.default_of("m"), "2");
    assert_eq!(f.label("m", "2"), "READY");
    assert_eq!(f.label("m", "1"), "UNLOADED");
    assert!(f.rollouts().await["running"]
        .as_object()
        .unwrap()
        .is_empty());

    // Answered: the model is free again. A rollback holds it in turn, while m:1 loads.
    let rollback = f.supervisor.send(Rollback { name: "m".into() });
    let during = f.supervisor.send(deploy("1", Strategy::BlueGreen));
    match during.await.unwrap() {
        Err(ServeError::Conflict(message)) => {
            assert!(
                message.starts_with("a rollback of 'm' is in progress"),
                "{message}"
            )
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(rollback.await.unwrap().unwrap()["to"], "1");
    assert_eq!(f.default_of("m"), "1");

    // A failed deployment frees the model too.
    f.loader.set(Behaviour::Fail);
    assert!(f.deploy("2", Strategy::BlueGreen).await.is_err());
    f.loader.set(Behaviour::Echo);
    f.deploy("2", Strategy::BlueGreen).await.unwrap();
    assert_eq!(f.default_of("m"), "2");
    let served = f.catalog.snapshot().resolve("m", None).unwrap();
    assert_eq!(echo(&served).await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}
