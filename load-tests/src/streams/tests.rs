//! Unit tests of the stream load's pieces that need no server: audio frames, the option
//! bounds and the results mode.

use super::*;

fn audio() -> Arc<Audio> {
    let samples: Vec<i16> = (0..1000).map(|i| i as i16).collect();
    Arc::new(Audio::from_samples(&samples, 16000).unwrap())
}

#[test]
fn frames_wrap_around_the_loop() {
    let a = audio();
    let f = a.frame(990, 20);
    let values: Vec<i16> = f
        .chunks(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert_eq!(values.len(), 20);
    assert_eq!(values[0], 990);
    assert_eq!(values[9], 999);
    assert_eq!(values[10], 0);
    assert_eq!(a.frame(1000, 1), a.frame(0, 1));
}

#[test]
fn the_fixture_loads() {
    let a = Audio::load(&default_wav()).unwrap();
    assert_eq!(a.sample_rate, 16000);
    assert!(a.seconds() > 9.0 && a.seconds() < 10.0, "{}", a.seconds());
}

#[test]
fn bounds_and_loopback() {
    let base = StreamOptions::new("http://127.0.0.1:9", audio());
    assert_eq!(
        base.endpoint().unwrap(),
        "ws://127.0.0.1:9/v1/streams/silero_vad"
    );
    assert_eq!(base.frame_samples(), 320);
    let bad: [fn(&mut StreamOptions); 8] = [
        |o| o.streams = 0,
        |o| o.streams = MAX_STREAMS + 1,
        |o| o.duration = Duration::ZERO,
        |o| o.speed = 0.0,
        |o| o.frame_ms = 0,
        |o| o.url = "http://localhost:9".into(),
        |o| o.url = "http://192.0.2.1:9".into(),
        |o| o.model = "../x".into(),
    ];
    for change in bad {
        let mut o = base.clone();
        change(&mut o);
        assert!(o.endpoint().is_err(), "{o:?} was accepted");
    }
    assert_eq!("events".parse(), Ok(ResultsMode::Events));
    assert!("some".parse::<ResultsMode>().is_err());
}

#[test]
fn a_score_maps_to_the_chunk_its_t_ends() {
    let chunk = 1280;
    // Full chunks: t is a chunk's end, whichever side of it the float lands.
    assert_eq!(results::scored_chunk(7.36, 16000.0, chunk), 91);
    assert_eq!(results::scored_chunk(7.360000001, 16000.0, chunk), 91);
    assert_eq!(results::scored_chunk(7.359999999, 16000.0, chunk), 91);
    // The last, partial chunk: t is the end of the audio sent, a quarter into chunk 92.
    assert_eq!(results::scored_chunk(7.38, 16000.0, chunk), 92);
    assert_eq!(results::scored_chunk(7.42, 16000.0, chunk), 92);
    assert_eq!(results::scored_chunk(0.08, 16000.0, chunk), 0);
    assert_eq!(results::scored_chunk(0.0, 16000.0, chunk), 0);
}
