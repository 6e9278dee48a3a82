//! Overload at the door, over real sockets on the bundled models: a burst far above what the
//! server can take gets only answers (200, degraded 200 from the fallback past the limit, or
//! 429 with Retry-After once the fallback's places are full too), one per request; health
//! checks go on being answered; the admission limit grows back afterwards; and while the door
//! refuses, a new stream is told to retry (close 1013) and a later one is let in. Behaviour, not timings: speed is the load suite's (`loadgen overload`).

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::stream_client::open_stream;
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use streamserve::config::Admission;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const TOKEN: &str = "test-token";
/// The adaptive limit's ceiling in these tests: far below the burst, so that the door refuses
/// on any machine, however fast.
const CEILING: usize = 32;
const BURST: usize = 1200;

/// The admission metrics are the process's, not a server's: the tests of this binary take
/// turns so that each reads its own server's.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const CONCURRENT: usize = 400;

/// One answer per request: its status, whether the fallback served it, its Retry-After, its
/// request id as the server echoed it, and its error text.
struct Answer {
    status: u16,
    degraded: bool,
    retry_after: Option<String>,
    request_id: String,
    error: String,
}

async fn infer(c: &reqwest::Client, url: &str, i: usize) -> Answer {
    let id = format!("burst-{i}");
    let response = c
        .post(format!("{url}/v2/models/mlp/infer"))
        .header("x-request-id", &id)
        .json(&mlp_request(&features(i as u64, 1)))
        .send()
        .await
        .expect("every request gets an HTTP answer");
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header("retry-after");
    let request_id = header("x-request-id").unwrap_or_else(|| id.clone());
    let body: Value = response.json().await.expect("a JSON body");
    Answer {
        status,
        degraded: body["parameters"]["degraded"] == true,
        retry_after,
        request_id,
        error: body["error"].as_str().unwrap_or("").to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_far_above_capacity_gets_one_answer_each_and_the_limit_grows_back() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let url = start(&repo().join("models"), |config| {
        config.admission = Admission::Adaptive;
        config.max_inflight = CEILING;
    });
    let c = client();
    let metrics = metrics_text(&c, &url).await;
    assert_eq!(
        sample(&metrics, "streamserve_admission_limit"),
        Some(CEILING as f64),
        "the adaptive limit starts at its ceiling"
    );

    // Health checks all through the burst.
    let bursting = Arc::new(AtomicBool::new(true));
    let health = {
        let (c, url, bursting) = (c.clone(), url.clone(), bursting.clone());
        tokio::spawn(async move {
            let mut answered = 0;
            while bursting.load(Ordering::Acquire) {
                let status = c
                    .get(format!("{url}/v2/health/ready"))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .expect("health answers during the burst")
                    .status();
                assert_eq!(status, 200, "readiness holds during the burst");
                answered += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answered
        })
    };

    let answers: Vec<Answer> = futures_util::stream::iter(0..BURST)
        .map(|i| {
            let (c, url) = (c.clone(), url.clone());
            async move { infer(&c, &url, i).await }
        })
        .buffer_unordered(CONCURRENT)
        .collect()
        .await;
    bursting.store(false, Ordering::Release);
    let health_checks = health.await.unwrap();
    assert!(health_checks >= 1, "health was checked during the burst");

    // One answer per request, each for its own request, and only the three kinds.
    assert_eq!(answers.len(), BURST);
    let ids: HashSet<&str> = answers.iter().map(|a| a.request_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        BURST,
        "each request answered once, under its own id"
    );
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let degraded = answers.iter().filter(|a| a.degraded).count();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(ok + refused.len(), BURST, "only 200 and 429 answers");
    assert!(ok >= CEILING, "the door lets requests in: {ok} of {BURST}");
    assert!(!refused.is_empty(), "past the limit requests are refused");
    for answer in &refused {
        assert_eq!(
            answer.retry_after.as_deref(),
            Some("1"),
            "a refusal says when to retry"
        );
        assert!(
            answer.error.contains("admission limit") || answer.error.contains("overloaded"),
            "{}",
            answer.error
        );
    }
    let metrics = metrics_text(&c, &url).await;
    let refused_at_door = sample(&metrics, "streamserve_admission_refused_total").unwrap();
    assert!(refused_at_door >= 1.0);
    // Past the limit, `mlp`'s fallback answered some before the door refused the rest.
    let to_fallback = sample(&metrics, "streamserve_admission_fallback_total").unwrap();
    assert!(to_fallback >= 1.0, "the fallback took the overflow first");
    assert!(degraded >= 1, "answers from the fallback say so");
    // Every refusal is counted, by the model asked for (the metrics are the process's, so
    // at least as many).
    let counted = |series: &str| sample(&metrics, series).unwrap_or(0.0);
    let busy = counted(r#"streamserve_requests_total{model="mlp",version="1",status="429"}"#);
    let shed = counted(r#"streamserve_shed_total{model="mlp",version="1"}"#);
    assert!(
        busy >= refused.len() as f64 && shed >= refused.len() as f64,
        "{} refused; counted {busy} as 429 and {shed} as shed",
        refused.len()
    );
    eprintln!(
        "burst of {BURST}: {ok} answered ({degraded} degraded), {} refused ({refused_at_door} at the door)",
        refused.len()
    );

    // After the burst: a quiet second, then every request is let in, and the limit is back
    // at its ceiling.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for i in 0..20 {
        let answer = infer(&c, &url, BURST + i).await;
        assert_eq!(answer.status, 200, "{}", answer.error);
    }
    let metrics = metrics_text(&c, &url).await;
    assert_eq!(
        sample(&metrics, "streamserve_admission_limit"),
        Some(CEILING as f64),
        "the limit grows back once the overload is over"
    );
    assert_eq!(
        sample(&metrics, "streamserve_admission_in_flight"),
        Some(0.0),
        "every place at the door was given back"
    );
    assert_eq!(
        sample(&metrics, "streamserve_admission_fallback_in_flight"),
        Some(0.0),
        "and every place of the fallbacks"
    );
}

/// Waits (a second at most) until the gauge `name` reads `value`.
async fn gauge_reaches(c: &reqwest::Client, url: &str, name: &str, value: f64) {
    for _ in 0..500 {
        if sample(&metrics_text(c, url).await, name) == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_door_refuses_a_new_stream_is_told_to_retry() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let url = start(&repo().join("models"), |config| {
        config.admin_token = Some(TOKEN.into());
        config.admission = Admission::Static;
        config.max_inflight = 1;
    });
    let c = client();
    // One slow inference holds the only place at the door, and one slow answer of the
    // fallback the only place past it.
    for model in ["mlp", "mlp_small"] {
        let fault = json!({"fault": {"kind": "slow", "ms": 1500}, "count": 1});
        inject_fault(&c, &url, TOKEN, model, fault).await;
    }
    let spawn_infer = |i: usize| {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { infer(&c, &url, i).await })
    };
    let holder = spawn_infer(0);
    gauge_reaches(&c, &url, "streamserve_admission_in_flight", 1.0).await;
    let past_the_limit = spawn_infer(1);
    gauge_reaches(&c, &url, "streamserve_admission_fallback_in_flight", 1.0).await;
    let mut refused = None;
    for i in 2..200 {
        let answer = infer(&c, &url, i).await;
        if answer.status == 429 {
            refused = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = refused.expect("a third request is refused while the first two hold both places");
    assert!(
        refused.error.contains("admission limit"),
        "{}",
        refused.error
    );

    let close = open_stream(&url)
        .await
        .expect_err("the new stream is refused");
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, CloseCode::Again, "1013: try again later");
    assert!(reason.contains("retry"), "{reason}");

    let first = holder.await.unwrap();
    assert_eq!(
        (first.status, first.degraded),
        (200, false),
        "{}",
        first.error
    );
    let second = past_the_limit.await.unwrap();
    assert_eq!(
        (second.status, second.degraded),
        (200, true),
        "past the limit the fallback answers: {}",
        second.error
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let first = open_stream(&url)
        .await
        .expect("once the door lets requests in, a new stream is let in");
    assert_eq!(first, "started");
}
