//! Oracle tests of the probe fits (`src/probe.rs`):
//!
//! 1. Logistic regression against scikit-learn's solution on the same data (`tests/data/
//!    logistic_sklearn.json`, written by `scripts/probe_oracle.py`), and against its own optimality
//!    condition (the gradient of the objective, recomputed naively, vanishes).
//! 2. Difference of means against its formula.
//! 3. Cross-validation against a brute-force recomputation (each fold refitted cold, the held-out
//!    log-loss summed naively), and the folds' contract (stratified, groups kept whole, seeded).
//! 4. Bit-identical fits whatever the thread count; bad input refused.

use actwatch_detect::probe::{
    choose_c, default_c_grid, difference_of_means, fit_logistic, folds, OwnedExamples, Standardizer,
};
use actwatch_detect::Error;
use actwatch_testkit::Rng;

type Owned = OwnedExamples;

fn oracle() -> (Owned, serde_json::Value) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/logistic_sklearn.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let f64s = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let n = v["n"].as_u64().unwrap() as usize;
    let ex = Owned {
        rows: f64s("rows").iter().map(|&x| x as f32).collect(),
        dim: v["dim"].as_u64().unwrap() as usize,
        labels: f64s("labels").iter().map(|&l| l == 1.0).collect(),
        weights: f64s("weights"),
        groups: (0..n as u32).collect(),
    };
    (ex, v)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn logistic_regression_matches_scikit_learn() {
    let (ex, v) = oracle();
    let ex_view = ex.view();
    let std = Standardizer::fit(&ex_view);
    let want_mean: Vec<f64> = v["mean"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let want_scale: Vec<f64> = v["scale"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(
        max_abs_diff(&std.mean, &want_mean) < 1e-9,
        "weighted means differ"
    );
    assert!(
        max_abs_diff(&std.scale, &want_scale) < 1e-9,
        "weighted scales differ"
    );
    for case in v["cases"].as_array().unwrap() {
        let c = case["c"].as_f64().unwrap();
        let beta: Vec<f64> = case["beta"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let intercept = case["intercept"].as_f64().unwrap();
        let fit = fit_logistic(&ex_view, c).unwrap();
        let size = beta
            .iter()
            .fold(intercept.abs(), |m, b| m.max(b.abs()))
            .max(1e-3);
        let err = max_abs_diff(&fit.beta, &beta).max((fit.intercept - intercept).abs());
        // scikit-learn stops at a gradient of 1e-12 per its own scale, actwatch at 1e-8 per unit
        // weight; both sit within 1e-6 of the optimum relative to the coefficients' size.
        assert!(
            err <= 1e-6 * size,
            "C = {c}: coefficients differ from scikit-learn's by {err:.3e} (size {size:.3e}); \
             actwatch {:?} + {}, sklearn {beta:?} + {intercept}",
            fit.beta,
            fit.intercept
        );
        // The raw-space probe scores exactly what the standardised one does.
        let raw = fit.probe.scores(&ex.rows);
        for (i, r) in raw.iter().enumerate() {
            let z: f64 = (0..ex.dim)
                .map(|j| {
                    (f64::from(ex.rows[i * ex.dim + j]) - std.mean[j]) / std.scale[j] * fit.beta[j]
                })
                .sum::<f64>()
                + fit.intercept;
            assert!(
                (r - z).abs() <= 1e-9 * (1.0 + z.abs()),
                "row {i}: {r} vs {z}"
            );
        }
    }
}

/// The gradient of `C Σ sᵢ ℓᵢ + ½‖β‖²` at the fit, computed naively on standardised features.
fn naive_gradient(
    ex: &Owned,
    std: &Standardizer,
    beta: &[f64],
    intercept: f64,
    c: f64,
) -> Vec<f64> {
    let d = ex.dim;
    let mut g: Vec<f64> = beta.to_vec();
    g.push(0.0);
    for i in 0..ex.labels.len() {
        let zrow: Vec<f64> = (0..d)
            .map(|j| (f64::from(ex.rows[i * d + j]) - std.mean[j]) / std.scale[j])
            .collect();
        let z: f64 = zrow.iter().zip(beta).map(|(a, b)| a * b).sum::<f64>() + intercept;
        let p = 1.0 / (1.0 + (-z).exp());
        let r = c * ex.weights[i] * (p - if ex.labels[i] { 1.0 } else { 0.0 });
        for j in 0..d {
            g[j] += r * zrow[j];
        }
        g[d] += r;
    }
    g
}

#[test]
fn logistic_regression_solves_its_optimality_condition() {
    let mut rng = Rng::new(11);
    for (n, d, c) in [(300usize, 5usize, 0.01), (500, 40, 1.0), (200, 60, 30.0)] {
        let mut rows = rng.correlated_rows(n, d, 0.5, 17);
        // Offsets and scales far from 1, so standardisation is exercised.
        for (k, x) in rows.iter_mut().enumerate() {
            *x = *x * (1.0 + (k % d) as f32) + 3.0;
        }
        let labels: Vec<bool> = (0..n)
            .map(|i| f64::from(rows[i * d]) + rng.normal() * 2.0 > 3.0)
            .collect();
        let ex = Owned {
            rows,
            dim: d,
            labels,
            weights: (0..n).map(|i| 1.0 + (i % 3) as f64).collect(),
            groups: (0..n as u32).collect(),
        };
        let fit = fit_logistic(&ex.view(), c).unwrap();
        let std = Standardizer::fit(&ex.view());
        let g = naive_gradient(&ex, &std, &fit.beta, fit.intercept, c);
        let total: f64 = ex.weights.iter().sum();
        // Per unit weight the tolerance is 1e-8; the naive gradient is C·S times that scale.
        let worst = g.iter().fold(0.0f64, |m, x| m.max(x.abs())) / (c * total);
        assert!(
            worst <= 1e-7,
            "n={n} d={d} C={c}: gradient {worst:.3e} after {} iterations",
            fit.iterations
        );
    }
}

#[test]
fn difference_of_means_is_its_formula() {
    let mut rng = Rng::new(3);
    let (n, d) = (250, 7);
    let rows = rng.gaussian_rows(n, d, 0.0);
    let labels: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
    let weights: Vec<f64> = (0..n).map(|i| 0.5 + (i % 4) as f64).collect();
    let ex = Owned {
        rows,
        dim: d,
        labels,
        weights,
        groups: (0..n as u32).collect(),
    };
    let probe = difference_of_means(&ex.view()).unwrap();
    let mean = |class: bool| -> Vec<f64> {
        let mut s = vec![0.0; d];
        let mut t = 0.0;
        for i in (0..n).filter(|&i| ex.labels[i] == class) {
            t += ex.weights[i];
            for (s, &x) in s.iter_mut().zip(&ex.rows[i * d..(i + 1) * d]) {
                *s += ex.weights[i] * f64::from(x);
            }
        }
        s.iter().map(|v| v / t).collect()
    };
    let (m1, m0) = (mean(true), mean(false));
    let w: Vec<f64> = m1.iter().zip(&m0).map(|(a, b)| a - b).collect();
    assert!(max_abs_diff(&probe.weights, &w) < 1e-12);
    // The midpoint of the class means scores zero.
    let mid: Vec<f32> = m1
        .iter()
        .zip(&m0)
        .map(|(a, b)| ((a + b) / 2.0) as f32)
        .collect();
    assert!(probe.scores(&mid)[0].abs() < 1e-5);
}

fn grouped_examples(seed: u64) -> Owned {
    // 60 computations of 1..=4 traces each; the label is per computation.
    let mut rng = Rng::new(seed);
    let d = 6;
    let (mut rows, mut labels, mut groups) = (Vec::new(), Vec::new(), Vec::new());
    for g in 0..60u32 {
        let label = g % 3 == 0;
        let len = 1 + (rng.next_u64() % 4) as usize;
        let shift = if label { 0.6 } else { 0.0 };
        rows.extend(rng.gaussian_rows(len, d, shift));
        labels.extend(std::iter::repeat_n(label, len));
        groups.extend(std::iter::repeat_n(g + 1000, len));
    }
    let n = labels.len();
    Owned {
        rows,
        dim: d,
        labels,
        weights: vec![1.0; n],
        groups,
    }
}

#[test]
fn folds_are_stratified_grouped_and_seeded() {
    let ex = grouped_examples(5);
    let f = folds(&ex.view(), 5, 9).unwrap();
    for i in 0..f.len() {
        for j in 0..f.len() {
            if ex.groups[i] == ex.groups[j] {
                assert_eq!(f[i], f[j], "a computation split across folds");
            }
        }
    }
    for label in [false, true] {
        let mut per_fold = [
            std::collections::BTreeSet::new(),
            Default::default(),
            Default::default(),
            Default::default(),
            Default::default(),
        ];
        for i in 0..f.len() {
            if ex.labels[i] == label {
                per_fold[f[i]].insert(ex.groups[i]);
            }
        }
        let sizes: Vec<usize> = per_fold.iter().map(|s| s.len()).collect();
        let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(
            hi - lo <= 1,
            "label {label}: computations per fold {sizes:?}"
        );
    }
    assert_eq!(f, folds(&ex.view(), 5, 9).unwrap());
    assert_ne!(
        f,
        folds(&ex.view(), 5, 10).unwrap(),
        "the seed changes the folds"
    );
}

#[test]
fn cross_validation_matches_brute_force() {
    let ex = grouped_examples(8);
    let grid = default_c_grid();
    let (chosen, loss) = choose_c(&ex.view(), &grid, 5, 4).unwrap();
    let fold = folds(&ex.view(), 5, 4).unwrap();
    let mut naive = vec![0.0; grid.len()];
    let mut held = 0.0;
    for f in 0..5 {
        let pick = |keep: bool| -> Owned {
            let idx: Vec<usize> = (0..fold.len())
                .filter(|&i| (fold[i] == f) == keep)
                .collect();
            Owned {
                rows: idx
                    .iter()
                    .flat_map(|&i| ex.rows[i * ex.dim..(i + 1) * ex.dim].to_vec())
                    .collect(),
                dim: ex.dim,
                labels: idx.iter().map(|&i| ex.labels[i]).collect(),
                weights: idx.iter().map(|&i| ex.weights[i]).collect(),
                groups: idx.iter().map(|&i| ex.groups[i]).collect(),
            }
        };
        let (train, test) = (pick(false), pick(true));
        held += test.weights.iter().sum::<f64>();
        for (k, &c) in grid.iter().enumerate() {
            let fit = fit_logistic(&train.view(), c).unwrap();
            let z = fit.probe.scores(&test.rows);
            for (i, z) in z.iter().enumerate() {
                let p = 1.0 / (1.0 + (-z).exp());
                naive[k] -= test.weights[i]
                    * if test.labels[i] {
                        p.ln()
                    } else {
                        (1.0 - p).ln()
                    };
            }
        }
    }
    naive.iter_mut().for_each(|l| *l /= held);
    assert!(max_abs_diff(&loss, &naive) < 1e-6, "{loss:?} vs {naive:?}");
    let best = naive.iter().cloned().fold(f64::INFINITY, f64::min);
    let k = grid.iter().position(|&c| c == chosen).unwrap();
    assert!(
        naive[k] <= best + 1e-6,
        "chose C = {chosen} (loss {}), best {best}",
        naive[k]
    );
    // The loss curve is not flat: the choice means something on these data.
    assert!(naive[0] > best + 0.01);
}

#[test]
fn fits_are_identical_whatever_the_thread_count() {
    let mut rng = Rng::new(21);
    let (n, d) = (5000, 24);
    let rows = rng.gaussian_rows(n, d, 0.0);
    let labels: Vec<bool> = (0..n)
        .map(|i| rows[i * d] + rows[i * d + 1] > 0.3)
        .collect();
    let ex = Owned {
        rows,
        dim: d,
        labels,
        weights: vec![1.0; n],
        groups: (0..n as u32).collect(),
    };
    let fit_in = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| fit_logistic(&ex.view(), 0.5).unwrap())
    };
    let (a, b) = (fit_in(1), fit_in(3));
    assert_eq!(a.beta, b.beta);
    assert_eq!(a.intercept.to_bits(), b.intercept.to_bits());
}

#[test]
fn bad_examples_are_refused() {
    let ex = |labels: &[bool], weights: &[f64], groups: &[u32]| Owned {
        rows: vec![0.0, 1.0, 2.0, 3.0],
        dim: 2,
        labels: labels.to_vec(),
        weights: weights.to_vec(),
        groups: groups.to_vec(),
    };
    let one_class = ex(&[false, false], &[1.0, 1.0], &[0, 1]);
    let e = fit_logistic(&one_class.view(), 1.0).unwrap_err();
    assert!(matches!(e, Error::NotEnoughData(_)), "{e}");
    assert!(e.to_string().contains("positive and negative"), "{e}");
    assert!(difference_of_means(&one_class.view()).is_err());
    let negative_weight = ex(&[true, false], &[1.0, -1.0], &[0, 1]);
    let e = fit_logistic(&negative_weight.view(), 1.0).unwrap_err();
    assert!(e.to_string().contains("weight"), "{e}");
    let mixed_group = ex(&[true, false], &[1.0, 1.0], &[0, 0]);
    let e = folds(&mixed_group.view(), 2, 0).unwrap_err();
    assert!(e.to_string().contains("both 0 and 1"), "{e}");
    let tiny = ex(&[true, false], &[1.0, 1.0], &[0, 1]);
    assert!(matches!(
        choose_c(&tiny.view(), &[1.0], 2, 0),
        Err(Error::NotEnoughData(_))
    ));
    assert!(fit_logistic(&tiny.view(), 0.0).is_err());
    assert!(fit_logistic(&tiny.view(), f64::NAN).is_err());
}
