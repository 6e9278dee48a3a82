//! ModelStreamInfer: answers come in request order, a bad request gets an error answer
//! without ending the stream, and many requests in flight on one stream share model calls.

use super::*;

#[tokio::test]
async fn a_stream_answers_in_order_and_a_bad_request_does_not_end_it() {
    let mut c = grpc().await;
    let (x1, x3) = (features(21, 2), features(23, 1));
    let (want1, want3) = (rest_mlp(&x1).await, rest_mlp(&x3).await);
    let mut first = mlp_raw(&x1);
    first.id = "one".into();
    let mut bad = mlp_raw(&x3[..255]);
    bad.id = "two".into();
    bad.inputs[0].shape = vec![1, 255];
    let mut third = mlp_raw(&x3);
    third.id = "three".into();
    let requests = tokio_stream::iter(vec![first, bad, third]);
    let mut answers = c.model_stream_infer(requests).await.unwrap().into_inner();

    let one = answers.message().await.unwrap().unwrap();
    assert_eq!(one.error_message, "");
    let one = one.infer_response.unwrap();
    assert_eq!(one.id, "one");
    assert_close(
        &f32s(&one.raw_output_contents[0]),
        &want1["logits"],
        "first",
    );

    let two = answers.message().await.unwrap().unwrap();
    assert!(
        two.error_message.contains("dimension 1 must be 256"),
        "{}",
        two.error_message
    );
    assert_eq!(
        two.infer_response.unwrap().id,
        "two",
        "the error names its request"
    );

    let three = answers.message().await.unwrap().unwrap();
    assert_eq!(three.error_message, "");
    let three = three.infer_response.unwrap();
    assert_eq!(three.id, "three");
    assert_close(
        &f32s(&three.raw_output_contents[1]),
        &want3["probabilities"],
        "third",
    );
    // The client closed its side: the stream ends cleanly.
    assert!(answers.message().await.unwrap().is_none());
}

#[tokio::test]
async fn a_stream_of_many_requests_batches_them() {
    let mut c = grpc().await;
    // A stream keeps many requests in flight, so they share model calls; a round of 40 that
    // happened to run one by one is tried again, up to five rounds.
    let mut shared = 0;
    for round in 0..5u64 {
        let inputs: Vec<Vec<f32>> = (0..40).map(|i| features(100 + 40 * round + i, 1)).collect();
        let requests: Vec<ModelInferRequest> = inputs
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let mut r = mlp_raw(x);
                r.id = i.to_string();
                r
            })
            .collect();
        let mut answers = c
            .model_stream_infer(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        for (i, x) in inputs.iter().enumerate() {
            let answer = answers.message().await.unwrap().unwrap();
            assert_eq!(answer.error_message, "");
            let answer = answer.infer_response.unwrap();
            assert_eq!(answer.id, i.to_string(), "in request order");
            if let ParameterChoice::Int64Param(rows) = param(&answer, "batch_size") {
                shared += usize::from(rows > 1);
            }
            if i % 10 == 0 {
                let want = rest_mlp(x).await;
                assert_close(
                    &f32s(&answer.raw_output_contents[0]),
                    &want["logits"],
                    "logits",
                );
            }
        }
        assert!(answers.message().await.unwrap().is_none());
        if shared > 0 {
            break;
        }
    }
    assert!(shared > 0, "no streamed request shared a model call");
}

/// A client that stops reading a stream's answers holds up that stream, not its connection.
/// The stream's requests pile up unread in the server's HTTP/2 receive window once it has 64 in
/// flight and its answers wait for the client; that window is the stream's, smaller than the
/// connection's, so a unary call on the same connection still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_does_not_hold_up_its_connection() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    // One connection, shared by the stalled stream and the unary calls. Its small window for
    // each answer stream (64 KiB; the connection's stays tonic's 5 MiB) makes the stalled
    // stream's answers back up, and the server stop reading it, after fewer requests.
    let channel = Channel::from_shared(server().1.clone())
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .connect()
        .await
        .expect("gRPC connects");
    let mut stalled = Client::new(channel.clone());
    let mut unary = Client::new(channel);

    // 64-row requests (64 KiB each) until `stop`; `taken` counts those the transport pulled.
    // They go to mlp_small (mlp's interface, a fraction of its compute), so that this load
    // does not push the other tests' mlp requests over mlp's SLO to its fallback.
    let taken = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let requests = {
        let (taken, stop, x) = (taken.clone(), stop.clone(), features(51, 64));
        tokio_stream::iter(std::iter::from_fn(move || {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            taken.fetch_add(1, Ordering::Relaxed);
            let mut request = mlp_raw(&x);
            request.model_name = "mlp_small".into();
            Some(request)
        }))
    };
    let mut answers = stalled
        .model_stream_infer(requests)
        .await
        .expect("the stream opens")
        .into_inner(); // never read

    // The source never runs dry, so the transport stops pulling from it only when the stream's
    // send window is spent: the server holds a window's worth (at least half of it, as window
    // updates go) unread. Before streams had a window of their own, that window was the
    // connection's, and every other call on it waited.
    let last = stalled_after(&taken).await;
    // The server stopped reading with 64 requests in flight or 64 answers waiting to be sent,
    // and left at least half its 1 MiB window unread (8 requests).
    eprintln!("the stream stalled after {last} requests");
    assert!(
        last >= 64 + 8,
        "only {last} requests were taken before the stall"
    );

    let x = features(52, 1);
    let answered = tokio::time::timeout(Duration::from_secs(10), unary.model_infer(mlp_raw(&x)))
        .await
        .expect("a unary call on the stalled stream's connection is answered")
        .expect("and served");
    assert_eq!(answered.into_inner().outputs.len(), 2);
    let live = tokio::time::timeout(
        Duration::from_secs(10),
        unary.server_live(ServerLiveRequest {}),
    )
    .await
    .expect("ServerLive on the same connection is answered")
    .unwrap();
    assert!(live.into_inner().live);
    assert_eq!(
        taken.load(Ordering::Relaxed),
        last,
        "the stream stayed stalled throughout"
    );

    // The client stops sending and reads the backlog: the server takes the rest of what was
    // sent, every request taken is answered in order, and the stream ends. (A tonic client cannot
    // reset a stream whose request body waits for window: only the server's reading frees it.)
    stop.store(true, Ordering::Relaxed);
    let mut read = 0;
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(answer) = answers.message().await.expect("the stream goes on") {
            assert_eq!(answer.error_message, "", "answer {read}");
            read += 1;
        }
    })
    .await;
    assert!(drained.is_ok(), "the stream ended ({read} answers read)");
    assert_eq!(
        read,
        taken.load(Ordering::Relaxed),
        "one answer per request"
    );
    let again = tokio::time::timeout(Duration::from_secs(10), unary.model_infer(mlp_raw(&x)))
        .await
        .expect("answered after the stream")
        .unwrap();
    assert_eq!(again.into_inner().outputs.len(), 2);
}

/// What a stream holds counts against `--max-body-memory-mb` as REST bodies do: its requests
/// from when they are read, its answers until the client takes them. A client that stops
/// reading pins its answers (here each echoes a 60 KB id), so with a 1 MiB bound the stalled
/// stream fills it: its further requests are refused with an answer of their own, and a large
/// request from another client gets UNAVAILABLE until the stalled client reads. Before these
/// were counted, the bound saw none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_counts_what_it_holds_against_the_memory_bound() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    let running = start_running(&repo().join("models"), |c| c.max_body_memory_mb = 1);
    let endpoint = format!("http://{}", running.grpc_addr.expect("gRPC is on"));
    let channel = Channel::from_shared(endpoint.clone())
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .connect()
        .await
        .expect("gRPC connects");
    let mut stalled = Client::new(channel);
    let mut other = GrpcInferenceServiceClient::new(connect(&endpoint).await);
    let small_model = |x: &[f32]| {
        let mut request = mlp_raw(x);
        request.model_name = "mlp_small".into();
        request
    };

    let taken = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let requests = {
        let (taken, stop, x) = (taken.clone(), stop.clone(), features(61, 1));
        let id = "i".repeat(60_000);
        tokio_stream::iter(std::iter::from_fn(move || {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            taken.fetch_add(1, Ordering::Relaxed);
            let mut request = small_model(&x);
            request.id = id.clone();
            Some(request)
        }))
    };
    let mut answers = stalled
        .model_stream_infer(requests)
        .await
        .expect("the stream opens")
        .into_inner(); // not read until the end

    stalled_after(&taken).await;

    // 64 rows: a message of 64 KiB and more, which the bound no longer has room for.
    let large = small_model(&features(62, 64));
    let refused = tokio::time::timeout(Duration::from_secs(10), other.model_infer(large.clone()))
        .await
        .expect("answered")
        .expect_err("the bound is held by the stalled stream");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("memory"),
        "{}",
        refused.message()
    );

    // The client reads: every request it sent has one answer, in order; those read past the
    // bound say so; then the bound is free again.
    stop.store(true, Ordering::Relaxed);
    let (mut read, mut over) = (0, 0);
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(answer) = answers.message().await.expect("the stream goes on") {
            if !answer.error_message.is_empty() {
                assert!(
                    answer.error_message.contains("memory"),
                    "answer {read}: {}",
                    answer.error_message
                );
                over += 1;
            }
            assert_eq!(answer.infer_response.unwrap().id.len(), 60_000);
            read += 1;
        }
    })
    .await;
    assert!(drained.is_ok(), "the stream ended ({read} answers read)");
    assert_eq!(
        read,
        taken.load(Ordering::Relaxed),
        "one answer per request"
    );
    assert!(over > 0, "no request of {read} found the bound full");
    let served = tokio::time::timeout(Duration::from_secs(10), other.model_infer(large))
        .await
        .expect("answered after the stream")
        .expect("the bound is free again");
    assert_eq!(served.into_inner().outputs.len(), 2);
}

/// Waits until the transport has stopped pulling requests from a stream's source (`taken`, the
/// requests it pulled, unchanged for 2 s): the server has stopped reading it. Returns how many
/// it took.
async fn stalled_after(taken: &std::sync::atomic::AtomicUsize) -> usize {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let started = Instant::now();
    let (mut last, mut still_since) = (taken.load(Ordering::Relaxed), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = taken.load(Ordering::Relaxed);
        if now != last {
            (last, still_since) = (now, Instant::now());
        } else if still_since.elapsed() >= Duration::from_secs(2) {
            return last;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the stream never stalled ({now} requests taken)"
        );
    }
}
