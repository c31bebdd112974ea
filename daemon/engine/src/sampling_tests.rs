//! Tests for the sampler: filters, penalties, seeds and parameter validation.
use super::*;
use proptest::prelude::*;
// Both preludes above export an `Rng`; name the one used here.
use rand::Rng;

/// A sampler for `params`, which the test expects to be valid.
fn sampler(params: SamplingParams) -> Sampler {
    Sampler::new(params).expect("test parameters are valid")
}

/// Seeded random sampling with every filter off unless the test turns it on.
fn plain(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

/// A deterministic, random-looking logits vector in [-8, 8).
fn noisy_logits(n: usize, salt: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(salt);
    (0..n).map(|_| rng.random::<f32>() * 16.0 - 8.0).collect()
}

/// Draws `draws` tokens with a fresh sampler each call sees a copy of `logits`.
fn draw_many(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<u32> {
    let mut s = sampler(params);
    (0..draws)
        .map(|_| s.sample(&mut logits.to_vec(), &[]))
        .collect()
}

#[test]
fn greedy_is_argmax_with_ties_to_lowest_id() {
    let mut s = sampler(SamplingParams::greedy());
    assert_eq!(s.sample(&mut [0.1, 3.0, -2.0, 2.9], &[]), 1);
    assert_eq!(s.sample(&mut [1.0, 5.0, 5.0, 4.0], &[]), 1);
    let logits = noisy_logits(49_152, 7);
    let expected = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i as u32);
    assert_eq!(Some(s.sample(&mut logits.clone(), &[])), expected);
}

#[test]
fn same_seed_same_sequence_different_seed_differs() {
    let logits = noisy_logits(49_152, 1);
    // Temperature 3 flattens the distribution so that the draws vary.
    let a = draw_many(plain(3.0, 42), &logits, 100);
    let b = draw_many(plain(3.0, 42), &logits, 100);
    let c = draw_many(plain(3.0, 43), &logits, 100);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let distinct: std::collections::BTreeSet<_> = a.iter().collect();
    assert!(distinct.len() > 10, "draws barely vary: {distinct:?}");
}

#[test]
fn same_seed_same_sequence_with_default_filters() {
    let logits = noisy_logits(49_152, 2);
    let params = SamplingParams {
        seed: Some(9),
        ..SamplingParams::default()
    };
    let a = draw_many(params.clone(), &logits, 100);
    assert_eq!(a, draw_many(params, &logits, 100));
}

#[test]
fn top_k_one_is_greedy_at_any_temperature() {
    let logits = noisy_logits(49_152, 3);
    let greedy = sampler(SamplingParams::greedy()).sample(&mut logits.clone(), &[]);
    for temperature in [0.1, 1.0, 5.0, 100.0] {
        let params = SamplingParams {
            top_k: 1,
            ..plain(temperature, 5)
        };
        assert!(draw_many(params, &logits, 20).iter().all(|&t| t == greedy));
    }
}

#[test]
fn tiny_top_p_is_argmax() {
    let logits = noisy_logits(49_152, 4);
    let greedy = sampler(SamplingParams::greedy()).sample(&mut logits.clone(), &[]);
    let params = SamplingParams {
        top_p: 1e-6,
        ..plain(5.0, 6)
    };
    assert!(draw_many(params, &logits, 20).iter().all(|&t| t == greedy));
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_the_mass() {
    // Probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1.
    let l = |p: f32| p.ln();
    let logits = [l(0.125), l(0.5), l(0.125), l(0.25)];
    let params = SamplingParams {
        top_p: 0.7,
        ..plain(1.0, 7)
    };
    let drawn: std::collections::BTreeSet<_> =
        draw_many(params, &logits, 300).into_iter().collect();
    assert_eq!(drawn, [1, 3].into());
}

#[test]
fn min_p_filters_unlikely_tokens() {
    // Token 2 is the favourite; 0 has half its probability, 1 and 3 a tenth.
    let l = |p: f32| p.ln();
    let logits = [l(0.5), l(0.1), l(1.0), l(0.1)];
    let params = SamplingParams {
        min_p: 0.3,
        ..plain(1.0, 8)
    };
    let drawn: std::collections::BTreeSet<_> =
        draw_many(params, &logits, 300).into_iter().collect();
    assert_eq!(drawn, [0, 2].into());
}

#[test]
fn repetition_penalty_lowers_seen_tokens_positive_and_negative() {
    let mut s = sampler(SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::greedy()
    });
    let mut logits = [4.0, -1.0, 3.0, -1.0];
    s.apply_penalties(&mut logits, &[0, 1, 0]);
    assert_eq!(logits, [2.0, -2.0, 3.0, -1.0]);
    // Through `sample`: token 0 was the argmax, the penalty hands it to token 2.
    assert_eq!(s.sample(&mut [4.0, -1.0, 3.0, -1.0], &[0]), 2);
}

#[test]
fn penalties_only_look_at_the_last_n_tokens() {
    let mut s = sampler(SamplingParams {
        repetition_penalty: 2.0,
        penalty_last_n: 2,
        ..SamplingParams::greedy()
    });
    let mut logits = [4.0, 4.0, 4.0];
    s.apply_penalties(&mut logits, &[0, 1, 2, 2, 99]);
    assert_eq!(logits, [4.0, 4.0, 2.0]);
}

#[test]
fn presence_and_frequency_penalties() {
    let mut s = sampler(SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        ..SamplingParams::greedy()
    });
    let mut logits = [1.0, 1.0, 1.0, -1.0];
    s.apply_penalties(&mut logits, &[0, 0, 0, 1, 3]);
    // 0 seen 3 times: 1 - 0.5 - 0.75; 1 once: 1 - 0.5 - 0.25; 3 once: -1 - 0.75.
    assert_eq!(logits, [-0.25, 0.25, 1.0, -1.75]);
    // Negative penalties raise seen tokens.
    let mut s = sampler(SamplingParams {
        presence_penalty: -1.0,
        ..SamplingParams::greedy()
    });
    assert_eq!(s.sample(&mut [1.0, 0.5], &[1]), 1);
}

#[test]
fn nan_logits_count_as_minus_infinity() {
    let nan = f32::NAN;
    let mut greedy = sampler(SamplingParams::greedy());
    assert_eq!(greedy.sample(&mut [nan, -3.0, nan], &[]), 1);
    assert_eq!(greedy.sample(&mut [nan, nan], &[]), 0);
    let mut random = sampler(SamplingParams {
        seed: Some(1),
        ..SamplingParams::default()
    });
    for _ in 0..50 {
        assert_eq!(
            random.sample(&mut [nan, -3.0, nan, f32::NEG_INFINITY], &[]),
            1
        );
    }
    assert_eq!(random.sample(&mut [nan, nan], &[]), 0);
    assert_eq!(random.sample(&mut [], &[]), 0);
}

#[test]
fn infinite_logits_do_not_break_the_draw() {
    let inf = f32::INFINITY;
    let mut s = sampler(plain(0.7, 3));
    for _ in 0..50 {
        assert_eq!(s.sample(&mut [1.0, inf, 2.0], &[]), 1);
    }
}

/// Asserts that the defaults changed by `edit` are rejected, with a message naming `field`.
fn check_rejected(field: &str, edit: impl FnOnce(&mut SamplingParams)) {
    let mut params = SamplingParams::default();
    edit(&mut params);
    let err = params.validate().expect_err("parameters should be invalid");
    let msg = err.to_string();
    assert!(msg.contains(&format!("`{field}`")), "{msg}");
    assert!(Sampler::new(params).is_err());
}

#[test]
fn validate_rejects_each_bad_field() {
    assert!(SamplingParams::default().validate().is_ok());
    assert!(SamplingParams::greedy().validate().is_ok());
    for v in [-0.1, f32::NAN, f32::INFINITY] {
        check_rejected("temperature", |p| p.temperature = v);
    }
    for v in [0.0, -0.5, 1.01, f32::NAN, f32::INFINITY] {
        check_rejected("top_p", |p| p.top_p = v);
    }
    for v in [1.0, -0.01, f32::NAN] {
        check_rejected("min_p", |p| p.min_p = v);
    }
    for v in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        check_rejected("repetition_penalty", |p| p.repetition_penalty = v);
    }
    for v in [2.5, -2.01, f32::NAN, f32::NEG_INFINITY] {
        check_rejected("presence_penalty", |p| p.presence_penalty = v);
        check_rejected("frequency_penalty", |p| p.frequency_penalty = v);
    }
}

#[test]
fn validate_reports_every_bad_field_with_value_and_range() {
    let params = SamplingParams {
        top_p: 1.5,
        min_p: f32::NAN,
        ..SamplingParams::default()
    };
    let msg = params.validate().unwrap_err().to_string();
    assert_eq!(
        msg,
        "invalid sampling parameters: `top_p` is 1.5 but must be 0 < top_p <= 1 (1 means \
         off); `min_p` is NaN but must be 0 <= min_p < 1 (0 means off)"
    );
}

#[test]
fn missing_fields_deserialise_to_defaults() {
    let params: SamplingParams = serde_json::from_str(r#"{"temperature":0.2}"#).unwrap();
    assert_eq!(
        params,
        SamplingParams {
            temperature: 0.2,
            ..SamplingParams::default()
        }
    );
}

/// The tokens `params` may return for `logits` after penalties, computed the slow and obvious
/// way: sort everything, cut top-k, top-p (with `slack` added to the mass target) and min-p.
fn allowed_tokens(params: &SamplingParams, penalised: &[f32], slack: f64) -> Vec<u32> {
    let logits: Vec<f32> = penalised
        .iter()
        .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l })
        .collect();
    if params.temperature == 0.0 || logits.iter().all(|&l| l == f32::NEG_INFINITY) {
        return vec![argmax(&logits)];
    }
    let mut sorted: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, &l)| l > f32::NEG_INFINITY)
        .map(|(i, &l)| (i as u32, l))
        .collect();
    sorted.sort_by(by_logit_desc);
    if params.top_k > 0 {
        sorted.truncate(params.top_k);
    }
    let max = sorted[0].1;
    let w: Vec<f64> = sorted
        .iter()
        .map(|&(_, l)| f64::from(weight(l, max, 1.0)))
        .collect();
    let total: f64 = w.iter().sum();
    if params.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = sorted.len();
        for (i, wi) in w.iter().enumerate() {
            cum += wi / total;
            if cum >= f64::from(params.top_p) + slack {
                keep = i + 1;
                break;
            }
        }
        sorted.truncate(keep);
    }
    if params.min_p > 0.0 {
        sorted.retain(|&(_, l)| l >= max + params.min_p.ln() - 1e-4);
    }
    sorted.into_iter().map(|(id, _)| id).collect()
}

fn logit_strategy() -> impl Strategy<Value = f32> {
    prop_oneof![
        20 => -20.0f32..20.0,
        1 => Just(f32::NAN),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(5.0f32),
    ]
}

fn params_strategy() -> impl Strategy<Value = SamplingParams> {
    (
        prop_oneof![Just(0.0f32), 0.05f32..4.0],
        prop_oneof![Just(0usize), 1usize..50],
        prop_oneof![Just(1.0f32), 0.01f32..1.0],
        prop_oneof![Just(0.0f32), 0.0f32..0.99],
        prop_oneof![Just(1.0f32), 0.5f32..2.0],
        -2.0f32..=2.0,
        -2.0f32..=2.0,
        0usize..10,
        any::<u64>(),
    )
        .prop_map(|(t, k, p, m, r, pres, freq, n, seed)| SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p: m,
            repetition_penalty: r,
            presence_penalty: pres,
            frequency_penalty: freq,
            penalty_last_n: n,
            seed: Some(seed),
        })
}

proptest! {
    #[test]
    fn sampled_token_is_in_vocab_and_never_filtered_out(
        logits in prop::collection::vec(logit_strategy(), 1..300),
        params in params_strategy(),
        history in prop::collection::vec(0u32..320, 0..20),
    ) {
        let mut s = sampler(params.clone());
        let mut penalised = logits.clone();
        for l in penalised.iter_mut() {
            if l.is_nan() { *l = f32::NEG_INFINITY; }
        }
        s.apply_penalties(&mut penalised, &history);
        let allowed = allowed_tokens(&params, &penalised, 1e-5);
        for _ in 0..5 {
            let mut scratch = logits.clone();
            let id = s.sample(&mut scratch, &history);
            prop_assert!((id as usize) < logits.len());
            prop_assert!(allowed.contains(&id), "{} not in {:?}", id, allowed);
        }
    }
}
