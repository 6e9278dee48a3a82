//! Streams that survive their instance, through a real balancer: three `streamserve`
//! processes sharing the fleet's stream token keys behind haproxy (round robin per
//! connection, not sticky), twenty concurrent speech streams; one instance is drained
//! (SIGTERM: it hands its streams over) and another killed (SIGKILL) while they run. Every
//! stream reconnects through the balancer, resumes from its last checkpoint wherever it
//! lands, and ends with exactly the results of a solo run of the same audio: the same
//! messages, none missing, none twice.

use crate::common;

use std::time::Duration;

use common::fleet::*;
use common::stream_client::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_survive_a_drained_and_a_killed_instance_behind_haproxy() {
    let keys = temp_dir("stream-keys").join("keys");
    std::fs::write(&keys, "a-fleet-wide-stream-token-key-of-forty-characters\n").unwrap();
    let models = common::repo().join("models");
    let registry = temp_dir("unused-registry");
    let start = |id: &str| {
        Instance::start(InstanceSetup {
            id,
            registry: registry.to_str().unwrap(),
            models: &models,
            cache: &temp_dir("cache"),
            env: &[],
            extra: &[
                "--stream-token-keys",
                keys.to_str().unwrap(),
                "--stream-checkpoint-ms",
                "500",
                "--drain-secs",
                "5",
            ],
        })
    };
    let mut fleet: Vec<Instance> = ["s0", "s1", "s2"].iter().map(|id| start(id)).collect();
    let haproxy = Haproxy::start(&fleet.iter().map(|i| i.url.clone()).collect::<Vec<_>>());
    let (audio, rate) = fixture_pcm16("two_phrases_16k");

    // What one uninterrupted stream of this audio gives, straight from one instance.
    let solo = stream_resumable(
        &[fleet[2].url.clone()],
        &audio,
        rate,
        2048,
        Duration::ZERO,
        0,
    )
    .await;
    assert!(matches!(solo.ends[..], [Ended::Done]), "{:?}", solo.ends);

    // Twenty streams through the balancer, at about twice real time (9.4 s of audio each).
    let streams: Vec<_> = (0..20)
        .map(|_| {
            let (url, audio) = (haproxy.url.clone(), audio.clone());
            tokio::spawn(async move {
                stream_resumable(&[url], &audio, rate, 1024, Duration::from_millis(16), 10).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let drained = fleet.remove(0);
    let stopping = tokio::task::spawn_blocking(move || drained.stop());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fleet.remove(0).kill();
    stopping.await.unwrap();

    let mut resumes = 0;
    let mut resent = 0;
    for (i, stream) in streams.into_iter().enumerate() {
        let run = stream.await.unwrap();
        assert!(
            matches!(run.ends.last(), Some(Ended::Done)),
            "stream {i} did not finish: {:?}",
            run.ends
        );
        assert!(
            run.out_of_order.is_empty(),
            "stream {i}: {:?}",
            run.out_of_order
        );
        assert_eq!(
            run.results.len(),
            solo.results.len(),
            "stream {i}: as many results"
        );
        for (a, b) in run.results.iter().zip(&solo.results) {
            assert_eq!(a, b, "stream {i}: the same result as the solo run");
        }
        resumes += run.resumes;
        resent += run.resent_bytes;
    }
    // The two instances that went away carried streams: some had to move.
    assert!(resumes >= 2, "{resumes} resumes");
    println!(
        "{resumes} resumes, {resent} bytes of audio sent again (of {} per stream)",
        audio.len()
    );
}
