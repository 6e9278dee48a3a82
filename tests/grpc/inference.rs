//! ModelInfer answered as REST answers the same input, in raw and typed contents, for every
//! datatype, with output selection and version pinning, and counted in the metrics as gRPC.

use streamserve::api::grpc::proto::inference::model_infer_request::InferRequestedOutputTensor;

use super::*;

#[tokio::test]
async fn raw_and_typed_inference_answer_what_rest_answers() {
    let mut c = grpc().await;
    let x = features(11, 3);
    let want = rest_mlp(&x).await;

    let mut request = mlp_raw(&x);
    request.id = "grpc-7".into();
    let answer = c.model_infer(request).await.unwrap();
    assert_eq!(answer.metadata().get("x-request-id").unwrap(), "grpc-7");
    let answer = answer.into_inner();
    assert_eq!(
        (answer.model_name.as_str(), answer.model_version.as_str()),
        ("mlp", "1")
    );
    assert_eq!(answer.id, "grpc-7");
    assert_eq!(
        param(&answer, "served_by"),
        ParameterChoice::StringParam("mlp:1".into())
    );
    assert_eq!(
        param(&answer, "degraded"),
        ParameterChoice::BoolParam(false)
    );
    let ParameterChoice::Int64Param(batch) = param(&answer, "batch_size") else {
        panic!("batch_size")
    };
    assert!(batch >= 3, "{batch}");
    assert!(matches!(
        param(&answer, "queue_time_us"),
        ParameterChoice::Int64Param(_)
    ));
    assert!(matches!(
        param(&answer, "compute_time_us"),
        ParameterChoice::Int64Param(_)
    ));
    // Raw in, raw out, in the model's output order.
    assert_eq!(answer.raw_output_contents.len(), 2);
    for (i, name) in ["logits", "probabilities"].into_iter().enumerate() {
        let output = &answer.outputs[i];
        assert_eq!(
            (output.name.as_str(), output.datatype.as_str()),
            (name, "FP32")
        );
        assert_eq!(output.shape, [3, 16]);
        assert!(output.contents.is_none());
        assert_close(&f32s(&answer.raw_output_contents[i]), &want[name], name);
    }

    // Typed in, typed out; the same numbers.
    let answer = c.model_infer(mlp_typed(&x)).await.unwrap().into_inner();
    assert!(answer.raw_output_contents.is_empty());
    assert_eq!(answer.id, "");
    for (i, name) in ["logits", "probabilities"].into_iter().enumerate() {
        let contents = answer.outputs[i].contents.as_ref().unwrap();
        assert_close(&contents.fp32_contents, &want[name], name);
    }
    // binary_data_output chooses the form explicitly.
    let mut request = mlp_typed(&x);
    request.parameters.insert(
        "binary_data_output".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::BoolParam(true)),
        },
    );
    let answer = c.model_infer(request).await.unwrap().into_inner();
    assert_close(
        &f32s(&answer.raw_output_contents[0]),
        &want["logits"],
        "logits",
    );
}

#[tokio::test]
async fn every_datatype_of_typed_ops_travels_typed_and_raw() {
    let mut c = grpc().await;
    let a = vec![1i64, 2, 3, 4, -5, 6, 9007199254740993, 8];
    let b = vec![0.5f64, -1.0, 0.0, 2.0, 1.0, 1.0, 0.0, -0.25];
    let mask = vec![true, false, true, false, true, true, true, false];
    let typed = ModelInferRequest {
        model_name: "typed_ops".into(),
        inputs: vec![
            tensor(
                "a",
                "INT64",
                &[2, 4],
                Some(InferTensorContents {
                    int64_contents: a.clone(),
                    ..Default::default()
                }),
            ),
            tensor(
                "b",
                "FP64",
                &[2, 4],
                Some(InferTensorContents {
                    fp64_contents: b.clone(),
                    ..Default::default()
                }),
            ),
            tensor(
                "mask",
                "BOOL",
                &[2, 4],
                Some(InferTensorContents {
                    bool_contents: mask.clone(),
                    ..Default::default()
                }),
            ),
        ],
        ..Default::default()
    };
    let answer = c.model_infer(typed).await.unwrap().into_inner();
    let out = |name: &str| {
        let o = answer.outputs.iter().find(|o| o.name == name).unwrap();
        (o.datatype.clone(), o.contents.clone().unwrap())
    };
    let (dt, sum) = out("sum");
    assert_eq!(dt, "FP64");
    assert_eq!(
        sum.fp64_contents,
        [1.5, 1.0, 3.0, 6.0, -4.0, 7.0, 9007199254740992.0, 7.75]
    );
    let (dt, masked) = out("masked");
    assert_eq!(dt, "INT64");
    assert_eq!(
        masked.int64_contents,
        [1, 0, 3, 0, -5, 6, 9007199254740993, 0],
        "INT64 exactly"
    );
    let (dt, positive) = out("positive");
    assert_eq!(dt, "BOOL");
    assert_eq!(
        positive.bool_contents,
        [true, false, false, true, true, true, false, false]
    );
    let (dt, masked_i32) = out("masked_i32");
    assert_eq!(dt, "INT32");
    assert_eq!(masked_i32.int_contents, [1, 0, 3, 0, -5, 6, 1, 0]);

    // The same raw: little-endian, BOOL one byte each, and only the outputs asked for.
    let raw = ModelInferRequest {
        model_name: "typed_ops".into(),
        model_version: "1".into(),
        inputs: vec![
            tensor("a", "INT64", &[2, 4], None),
            tensor("b", "FP64", &[2, 4], None),
            tensor("mask", "BOOL", &[2, 4], None),
        ],
        raw_input_contents: vec![
            a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            b.iter().flat_map(|v| v.to_le_bytes()).collect(),
            mask.iter().map(|&m| m as u8).collect(),
        ],
        outputs: vec![
            InferRequestedOutputTensor {
                name: "masked_i32".into(),
                parameters: HashMap::new(),
            },
            InferRequestedOutputTensor {
                name: "positive".into(),
                parameters: HashMap::new(),
            },
        ],
        ..Default::default()
    };
    let answer = c.model_infer(raw).await.unwrap().into_inner();
    let names: Vec<&str> = answer.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        names,
        ["masked_i32", "positive"],
        "the outputs asked for, in that order"
    );
    let ints: Vec<i32> = answer.raw_output_contents[0]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ints, [1, 0, 3, 0, -5, 6, 1, 0]);
    assert_eq!(answer.raw_output_contents[1], [1, 0, 0, 1, 1, 1, 0, 0]);
}

#[tokio::test]
async fn output_selection_and_version_pinning() {
    let mut c = grpc().await;
    let x = features(12, 1);
    let want = rest_mlp(&x).await;
    let mut request = mlp_raw(&x);
    request.model_version = "1".into();
    request.outputs = vec![InferRequestedOutputTensor {
        name: "probabilities".into(),
        parameters: HashMap::new(),
    }];
    let answer = c.model_infer(request).await.unwrap().into_inner();
    assert_eq!(answer.outputs.len(), 1);
    assert_eq!(answer.outputs[0].name, "probabilities");
    assert_eq!(answer.model_version, "1");
    assert_close(
        &f32s(&answer.raw_output_contents[0]),
        &want["probabilities"],
        "probabilities",
    );

    let mut request = mlp_raw(&x);
    request.model_version = "7".into();
    expect_status(
        c.model_infer(request).await,
        Code::NotFound,
        "no version '7'",
    );
    let mut request = mlp_raw(&x);
    request.outputs = vec![InferRequestedOutputTensor {
        name: "nope".into(),
        parameters: HashMap::new(),
    }];
    expect_status(
        c.model_infer(request).await,
        Code::InvalidArgument,
        "has no output 'nope'",
    );
}

#[tokio::test]
async fn grpc_calls_are_counted_with_their_protocol() {
    let mut c = grpc().await;
    let mut request = mlp_raw(&features(31, 1));
    request.model_name = "mlp_small".into();
    request.inputs[0].shape = vec![1, 256];
    let _ = c.model_infer(request).await;
    let text = metrics_text(&client(), &server().0).await;
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("streamserve_requests_total{")
                && l.contains("model=\"mlp_small\"")
                && l.contains("protocol=\"grpc\"")
                && l.contains("status=\"200\"")
        })
        .unwrap_or_else(|| panic!("no gRPC 200 series for mlp_small in:\n{text}"));
    let answered: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(answered >= 1.0, "{line}");
    // The error statuses are there (at 0 from the start), for gRPC as for REST.
    assert!(
        text.contains("streamserve_requests_total{model=\"mlp_small\",version=\"1\",status=\"503\",protocol=\"grpc\"} "),
        "{text}"
    );
    assert!(text.contains("streamserve_request_duration_seconds_count{model=\"mlp_small\",version=\"1\",protocol=\"grpc\"}"), "{text}");
}
