//! `streamserve.speech.v1.Speech` over a real socket: `Segments` (server streaming: a WAV in,
//! speech events out as they are found, then the summary) and `Summarize` (client streaming:
//! audio in pieces, the summary out) give what the one-shot REST endpoint gives for the same
//! audio; bad calls get precise status codes while a good call carries on.

use crate::common;

use std::time::Duration;

use common::stream_client::fixture_pcm16;
use common::*;
use streamserve::api::grpc::proto::speech::speech_client::SpeechClient;
use streamserve::api::grpc::proto::speech::speech_event::Event;
use streamserve::api::grpc::proto::speech::*;
use tonic::transport::Channel;
use tonic::Code;

async fn speech(running: &streamserve::server::Running) -> SpeechClient<Channel> {
    let endpoint = format!("http://{}", running.grpc_addr.unwrap());
    SpeechClient::new(
        Channel::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

fn wav_bytes() -> Vec<u8> {
    std::fs::read(repo().join("tests/audio/two_phrases_16k.wav")).unwrap()
}

/// The one-shot REST endpoint's segments for the fixture, as (start, end).
async fn one_shot(running: &streamserve::server::Running) -> Vec<(f64, f64)> {
    let url = format!("http://{}/v1/models/silero_vad/segments", running.addr);
    let response = client().post(url).body(wav_bytes()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    body["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap()))
        .collect()
}

/// A call that must fail with `code`, its message containing `needle`.
fn expect<T>(result: Result<tonic::Response<T>, tonic::Status>, code: Code, needle: &str) {
    let status = result.map(|_| ()).unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "'{}' lacks '{needle}'",
        status.message()
    );
}

fn pairs(summary: &Summary) -> Vec<(f64, f64)> {
    summary.segments.iter().map(|s| (s.start, s.end)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn segments_stream_events_as_found_and_summarize_takes_pieces() {
    let running = start_running(&repo().join("models"), |_| {});
    let want = one_shot(&running).await;
    assert_eq!(want.len(), 2);
    let mut c = speech(&running).await;

    // Server streaming: events in order, then the summary.
    let request = SegmentsRequest {
        model: "silero_vad".into(),
        wav: wav_bytes(),
        vad: None,
    };
    let mut events = c.segments(request).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(event) = events.message().await.unwrap() {
        got.push(event.event.unwrap());
    }
    let Some(Event::Summary(summary)) = got.pop() else {
        panic!("the last message is the summary: {got:?}")
    };
    assert_eq!(pairs(&summary), want, "the one-shot endpoint's segments");
    assert_eq!(
        (summary.model.as_str(), summary.version.as_str()),
        ("silero_vad", "1")
    );
    assert_eq!(summary.chunks, 295);
    let mut expected = Vec::new();
    for (start, end) in &want {
        expected.push(Event::SpeechStart(*start));
        expected.push(Event::SpeechEnd(*end));
    }
    assert_eq!(got, expected, "each segment's start and end, as found");

    // Client streaming: PCM in pieces of 3,000 samples (the first names the model).
    let (pcm, rate) = fixture_pcm16("two_phrases_16k");
    let mut pieces: Vec<AudioPiece> = pcm
        .chunks(6000)
        .map(|bytes| AudioPiece {
            pcm16: bytes.to_vec(),
            ..Default::default()
        })
        .collect();
    pieces[0].model = "silero_vad".into();
    pieces[0].sample_rate = rate;
    let summary = c
        .summarize(tokio_stream::iter(pieces))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pairs(&summary), want);

    // The same as float samples, with an option: a longer silence merges nothing here but
    // must be taken.
    let floats: Vec<f32> = pcm
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect();
    let mut pieces: Vec<AudioPiece> = floats
        .chunks(5000)
        .map(|samples| AudioPiece {
            samples: samples.to_vec(),
            ..Default::default()
        })
        .collect();
    pieces[0].model = "silero_vad".into();
    pieces[0].vad = Some(VadOptions {
        min_silence_ms: Some(100),
        ..Default::default()
    });
    let summary = c
        .summarize(tokio_stream::iter(pieces))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.segments.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_speech_calls_get_precise_codes_while_a_good_one_carries_on() {
    let running = start_running(&repo().join("models"), |_| {});
    let want = one_shot(&running).await;
    let good = {
        let mut c = speech(&running).await;
        tokio::spawn(async move {
            let mut summaries = Vec::new();
            for _ in 0..5 {
                let request = SegmentsRequest {
                    model: "silero_vad".into(),
                    wav: wav_bytes(),
                    vad: None,
                };
                let mut events = c.segments(request).await.unwrap().into_inner();
                while let Some(event) = events.message().await.unwrap() {
                    if let Some(Event::Summary(s)) = event.event {
                        summaries.push(pairs(&s));
                    }
                }
            }
            summaries
        })
    };
    let mut c = speech(&running).await;
    let segments = |model: &str, wav: Vec<u8>| SegmentsRequest {
        model: model.into(),
        wav,
        vad: None,
    };
    expect(
        c.segments(segments("silero_vad", b"RIFF not really".to_vec()))
            .await,
        Code::InvalidArgument,
        "not a readable WAV",
    );
    expect(
        c.segments(segments("nosuch", wav_bytes())).await,
        Code::NotFound,
        "unknown model",
    );
    expect(
        c.segments(segments("mlp", wav_bytes())).await,
        Code::InvalidArgument,
        "does not serve streams",
    );
    let mut loose = segments("silero_vad", wav_bytes());
    loose.vad = Some(VadOptions {
        threshold: Some(1.5),
        ..Default::default()
    });
    expect(c.segments(loose).await, Code::InvalidArgument, "threshold");

    let piece = |model: &str, rate: u32, pcm16: Vec<u8>, samples: Vec<f32>| AudioPiece {
        model: model.into(),
        sample_rate: rate,
        vad: None,
        pcm16,
        samples,
    };
    let cases: Vec<(Vec<AudioPiece>, Code, &str)> = vec![
        (vec![], Code::InvalidArgument, "no audio"),
        (
            vec![piece("", 16000, vec![0; 64], vec![])],
            Code::InvalidArgument,
            "names the model",
        ),
        (
            vec![piece("silero_vad", 44100, vec![0; 64], vec![])],
            Code::InvalidArgument,
            "sample_rate must be 16000 or 8000",
        ),
        (
            vec![piece("silero_vad", 16000, vec![0; 64], vec![0.0])],
            Code::InvalidArgument,
            "not both",
        ),
        (
            vec![piece("silero_vad", 16000, vec![0; 63], vec![])],
            Code::InvalidArgument,
            "whole number",
        ),
        (
            vec![piece("silero_vad", 16000, vec![], vec![0.5, 2.0])],
            Code::InvalidArgument,
            "outside [-1, 1]",
        ),
        (
            vec![
                piece("silero_vad", 16000, vec![0; 64], vec![]),
                piece("vad_energy", 0, vec![0; 64], vec![]),
            ],
            Code::InvalidArgument,
            "only the first piece names the model",
        ),
    ];
    for (pieces, code, needle) in cases {
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            c.summarize(tokio_stream::iter(pieces)),
        )
        .await
        .expect("answered");
        expect(result, code, needle);
    }
    let summaries = good.await.unwrap();
    assert_eq!(summaries, vec![want; 5], "the good calls never noticed");
}
