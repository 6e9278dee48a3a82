//! What the README and docs/limits.md promise of gRPC, checked where it went wrong before:
//! a `ModelStreamInfer` answer is held to the message limit as the client receives it (an
//! answer just under the limit, wrapped in the stream's message, is just over it: that answer
//! is an error, the call goes on), Triton's `timeout` parameter of 0 means no timeout, as
//! in Triton, a request compressed as tritonclient's `compression_algorithm` sends it is
//! taken (its inflated size held to the message limit), and speech audio sent without the
//! sequence parameters is told how to send a sequence.

use super::*;
use prost::Message;

/// A typed_ops request of one row in raw contents, with `id` (the answer echoes it, so its
/// length moves the answer's size byte by byte).
fn typed_ops_raw(id: String) -> ModelInferRequest {
    let a: Vec<u8> = [1i64, 2, 3, 4]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let b: Vec<u8> = [0.5f64, -1.0, 0.0, 2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    ModelInferRequest {
        model_name: "typed_ops".into(),
        id,
        inputs: vec![
            tensor("a", "INT64", &[1, 4], None),
            tensor("b", "FP64", &[1, 4], None),
            tensor("mask", "BOOL", &[1, 4], None),
        ],
        raw_input_contents: vec![a, b, vec![1, 0, 1, 0]],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_stream_answer_just_over_the_limit_once_wrapped_is_an_error_and_the_stream_goes_on() {
    const LIMIT: usize = 1000;
    let running = start_running(&repo().join("models"), |config| {
        config.grpc_max_message_bytes = Some(LIMIT);
    });
    let endpoint = format!("http://{}", running.grpc_addr.unwrap());
    let mut c = GrpcInferenceServiceClient::new(connect(&endpoint).await);
    // How big an answer with an empty id is (its timings move it by a byte or two).
    let base = c
        .model_infer(typed_ops_raw(String::new()))
        .await
        .unwrap()
        .into_inner()
        .encoded_len();
    assert!(base < 500, "{base}");
    // Ids that sweep the answer's size, three times each, across the limit: some answers
    // fit as they are but not wrapped (the stream's message adds 3 bytes).
    let requests: Vec<ModelInferRequest> = (LIMIT - base - 20..LIMIT - base + 10)
        .flat_map(|n| (0..3).map(move |k| typed_ops_raw(format!("{k}{}", "i".repeat(n - 1)))))
        .collect();
    let ids: Vec<String> = requests.iter().map(|r| r.id.clone()).collect();
    let mut answers = c
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let (mut fine, mut too_large) = (0, 0);
    for id in &ids {
        let answer = answers
            .message()
            .await
            .unwrap_or_else(|e| panic!("the stream ended before request {}: {e:?}", id.len()))
            .expect("every request is answered");
        assert!(answer.encoded_len() <= LIMIT, "{}", answer.encoded_len());
        assert_eq!(&answer.infer_response.unwrap().id, id, "answers in order");
        if answer.error_message.is_empty() {
            fine += 1;
        } else {
            assert!(
                answer
                    .error_message
                    .contains(&format!("exceeds the message limit of {LIMIT} bytes")),
                "{}",
                answer.error_message
            );
            too_large += 1;
        }
    }
    assert!(
        answers.message().await.unwrap().is_none(),
        "the call ends OK"
    );
    assert!(
        fine > 0 && too_large > 0,
        "{fine} answered, {too_large} too large"
    );
    // The connection serves on.
    assert!(c.model_infer(typed_ops_raw("after".into())).await.is_ok());
}

#[tokio::test]
async fn triton_timeout_zero_is_no_timeout_unary_and_streamed() {
    let mut c = grpc().await;
    let x = features(31, 1);
    for zero in [
        ParameterChoice::Int64Param(0),
        ParameterChoice::Uint64Param(0),
    ] {
        let mut request = mlp_raw(&x);
        request.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(zero),
            },
        );
        let answer = c.model_infer(request.clone()).await;
        assert!(answer.is_ok(), "{answer:?}");
        let mut answers = c
            .model_stream_infer(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        assert_eq!(answer.error_message, "");
    }
    // A timeout that has passed before the request is queued is still one (1 µs).
    let mut request = mlp_raw(&x);
    request.parameters.insert(
        "timeout".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(1)),
        },
    );
    expect_status(
        c.model_infer(request).await,
        Code::DeadlineExceeded,
        "deadline exceeded",
    );
}

/// tritonclient's `compression_algorithm="gzip"` / `"deflate"` compresses each request; it was
/// UNIMPLEMENTED ("Content is compressed with 'gzip' which isn't supported"). The answer is
/// the uncompressed request's. A message that inflates past the message limit (a megabyte of
/// one letter in its id, about a kilobyte compressed) is RESOURCE_EXHAUSTED before it is
/// decoded, and the connection serves the next request.
#[tokio::test]
async fn compressed_requests_are_taken_and_inflate_no_further_than_the_message_limit() {
    use tonic::codec::CompressionEncoding;

    const LIMIT: usize = 256 * 1024;
    let running = start_running(&repo().join("models"), |config| {
        config.grpc_max_message_bytes = Some(LIMIT);
    });
    let endpoint = format!("http://{}", running.grpc_addr.unwrap());
    let channel = connect(&endpoint).await;
    let x = features(71, 2);
    let plain = Client::new(channel.clone())
        .model_infer(mlp_raw(&x))
        .await
        .expect("answered")
        .into_inner();
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Deflate] {
        let mut c = Client::new(channel.clone()).send_compressed(encoding);
        let answer = c
            .model_infer(mlp_raw(&x))
            .await
            .unwrap_or_else(|e| panic!("{encoding:?}: {e:?}"))
            .into_inner();
        assert_eq!(
            answer.raw_output_contents, plain.raw_output_contents,
            "{encoding:?}"
        );

        let mut bomb = mlp_raw(&x);
        bomb.id = "a".repeat(1 << 20);
        expect_status(
            c.model_infer(bomb).await,
            Code::ResourceExhausted,
            "exceeded while decompressing",
        );
        assert!(c.model_infer(mlp_raw(&x)).await.is_ok(), "{encoding:?}");
    }
}

/// A speech model's audio sent on `ModelStreamInfer` without the sequence parameters runs as
/// one plain inference and fails on the input the model does not have; the error says how a
/// speech stream is sent. A plain request beside it on the same stream is answered.
#[tokio::test]
async fn stream_audio_without_a_sequence_id_is_told_how_to_send_a_sequence() {
    use super::common::grpc_sequence::{step, Samples};

    let mut audio = step(7, true, false, Samples::Pcm(&[0i16; 512]), &[]);
    for key in ["sequence_id", "sequence_start", "sequence_end"] {
        audio.parameters.remove(key);
    }
    let mut c = grpc().await;
    let mut answers = c
        .model_stream_infer(tokio_stream::iter([audio, mlp_raw(&features(72, 1))]))
        .await
        .unwrap()
        .into_inner();
    let refused = answers.message().await.unwrap().unwrap();
    assert!(
        refused.error_message.contains("has no input 'AUDIO'")
            && refused.error_message.contains("non-zero sequence_id"),
        "{}",
        refused.error_message
    );
    let answered = answers.message().await.unwrap().unwrap();
    assert_eq!(answered.error_message, "");
}
