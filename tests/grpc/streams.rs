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
