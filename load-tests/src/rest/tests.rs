//! Unit tests of the closed-loop REST load, without a server: loopback-only URLs, option
//! bounds, request bodies and the checks of `mlp` answers.

use super::*;

#[test]
fn loopback_only() {
    assert!(check_loopback("http://127.0.0.1:8080").is_ok());
    assert!(check_loopback("http://127.3.2.1:1/").is_ok());
    assert!(check_loopback("http://[::1]:8080").is_ok());
    for bad in [
        "http://10.0.0.1:8080",
        "http://example.com",
        "http://localhost:8080",
        "https://127.0.0.1:8080",
        "http://0.0.0.0:8080",
        "127.0.0.1:8080",
        "http://127.0.0.1:8080/?q=1",
    ] {
        assert!(check_loopback(bad).is_err(), "{bad} was accepted");
    }
    let url = RestOptions {
        url: "http://127.0.0.1:9/".into(),
        ..RestOptions::default()
    }
    .endpoint()
    .unwrap();
    assert_eq!(url.as_str(), "http://127.0.0.1:9/v2/models/mlp/infer");
}

#[test]
fn bounds_are_enforced() {
    let bad: [fn(&mut RestOptions); 5] = [
        |o| o.concurrency = 0,
        |o| o.concurrency = MAX_CONCURRENCY + 1,
        |o| o.duration = Duration::ZERO,
        |o| o.rows = 0,
        |o| o.model = "../x".into(),
    ];
    for change in bad {
        let mut o = RestOptions::default();
        change(&mut o);
        assert!(o.endpoint().is_err(), "{o:?} was accepted");
    }
}

#[test]
fn bodies() {
    let json = mlp_request(2, 1, false);
    assert!(json.json_length.is_none());
    let v: serde_json::Value = serde_json::from_slice(&json.body).unwrap();
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!([2, 256]));
    assert_eq!(v["inputs"][0]["data"].as_array().unwrap().len(), 512);

    let bin = mlp_request(2, 1, true);
    let n = bin.json_length.unwrap();
    assert_eq!(bin.body.len() - n, 512 * 4);
    let v: serde_json::Value = serde_json::from_slice(&bin.body[..n]).unwrap();
    assert_eq!(v["inputs"][0]["parameters"]["binary_data_size"], 2048);
    assert!(v["inputs"][0].get("data").is_none());
    // Same data both ways.
    let first = f32::from_le_bytes(bin.body[n..n + 4].try_into().unwrap());
    assert_eq!(first as f64, v_first(&json));
}

fn v_first(body: &RequestBody) -> f64 {
    let v: serde_json::Value = serde_json::from_slice(&body.body).unwrap();
    v["inputs"][0]["data"][0].as_f64().unwrap() as f32 as f64
}

#[test]
fn response_checks() {
    let good = br#"{"model_name":"mlp","model_version":"1","parameters":{"batch_size":3},
        "outputs":[{"name":"logits","datatype":"FP32","shape":[1,16],"data":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]}]}"#;
    assert_eq!(
        check_mlp_response(good, None, 1),
        Ok(ServerSide {
            batch_size: 3,
            queue_us: 0,
            compute_us: 0,
            degraded: 0,
        })
    );
    assert!(check_mlp_response(good, None, 2)
        .unwrap_err()
        .contains("shape"));
    let short = br#"{"outputs":[{"name":"l","datatype":"FP32","shape":[1,16],"data":[0]}]}"#;
    assert!(check_mlp_response(short, None, 1)
        .unwrap_err()
        .contains("values"));
    let json = br#"{"outputs":[{"name":"l","datatype":"FP32","shape":[1,16],"parameters":{"binary_data_size":64}}]}"#;
    let mut body = json.to_vec();
    body.extend_from_slice(&[0u8; 64]);
    assert_eq!(
        check_mlp_response(&body, Some(json.len()), 1),
        Ok(ServerSide::default())
    );
    body.push(0);
    assert!(check_mlp_response(&body, Some(json.len()), 1)
        .unwrap_err()
        .contains("binary section"));
    assert!(check_mlp_response(b"{", None, 1).is_err());
    let degraded = br#"{"parameters":{"batch_size":2,"degraded":true,"served_by":"mlp_small:1"},
        "outputs":[{"name":"l","datatype":"FP32","shape":[1,16],"data":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]}]}"#;
    assert_eq!(check_mlp_response(degraded, None, 1).unwrap().degraded, 1);
}
