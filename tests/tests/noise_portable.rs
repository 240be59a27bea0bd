//! Portable noise: a fixed seed gives the committed values on this machine; node checks the
//! wasm32 build against the same file (`tests/wasm/noise_check.mjs`, run by `scripts/test.sh`).
//!
//! The fixture was written by this test with `DDPM_WRITE_NOISE_FIXTURE=1`; it pins the stream so
//! that a model's samples never change silently between releases or platforms.

use ddpm::noise::SeededNoise;
use serde_json::json;

/// (seed, first index, count) of each checked window of the stream.
const WINDOWS: [(u64, usize, usize); 4] =
    [(0, 0, 16), (42, 0, 16), (42, 1000, 8), (u64::MAX, 7, 8)];

fn window(seed: u64, start: usize, count: usize) -> Vec<String> {
    let mut noise = SeededNoise::new(seed);
    let values = noise.sample_vec(start + count);
    values[start..]
        .iter()
        .map(|v| format!("{:08x}", v.to_bits()))
        .collect()
}

#[test]
fn fixed_seeds_give_the_committed_values() {
    let path = ddpm_tests::fixture("noise.json");
    if std::env::var_os("DDPM_WRITE_NOISE_FIXTURE").is_some() {
        let streams: Vec<_> = WINDOWS
            .iter()
            .map(|&(seed, start, count)| {
                json!({"seed": seed.to_string(), "start": start, "bits": window(seed, start, count)})
            })
            .collect();
        let text = serde_json::to_string_pretty(&json!({ "streams": streams })).unwrap();
        std::fs::write(&path, text + "\n").unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let streams = fixture["streams"].as_array().unwrap();
    assert_eq!(streams.len(), WINDOWS.len());
    for (stream, &(seed, start, count)) in streams.iter().zip(&WINDOWS) {
        assert_eq!(stream["seed"].as_str().unwrap(), seed.to_string());
        let expected: Vec<String> = stream["bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().to_string())
            .collect();
        assert_eq!(window(seed, start, count), expected, "seed {seed}");
    }
}
