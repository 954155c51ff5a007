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
use actwatch_testkit::{on_threads, Rng};

type Owned = OwnedExamples;

/// Examples of weight 1, one computation per row.
fn unweighted(rows: Vec<f32>, dim: usize, labels: Vec<bool>) -> Owned {
    let n = labels.len();
    Owned {
        rows,
        dim,
        labels,
        weights: vec![1.0; n],
        groups: (0..n as u32).collect(),
    }
}

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
    let ex = unweighted(rows, d, labels);
    let fit_in = |threads: usize| on_threads(threads, || fit_logistic(&ex.view(), 0.5).unwrap());
    let (a, b) = (fit_in(1), fit_in(3));
    assert_eq!(a.beta, b.beta);
    assert_eq!(a.intercept.to_bits(), b.intercept.to_bits());
}

/// Nearly separable classes (a 3-sigma shift along one axis, as a user's first test would use)
/// fit at every C of the cross-validation grid. (The case that once failed, warm-started
/// cross-validation stalling at a gradient of 1.6e-8, is `tests/cli.rs`'s
/// `a_logistic_probe_fits_nearly_separable_examples`, on files numpy made.)
#[test]
fn separable_examples_fit_across_the_grid() {
    let mut rng = Rng::new(5);
    for (n, d) in [(109usize, 8usize); 24]
        .into_iter()
        .chain([(140, 8), (400, 8), (300, 64)])
    {
        let mut rows = rng.gaussian_rows(n, d, 0.0);
        let labels: Vec<bool> = (0..n).map(|i| i % 7 >= 2).collect();
        for (i, &l) in labels.iter().enumerate() {
            if l {
                rows[i * d] += 3.0;
            }
        }
        let ex = unweighted(rows, d, labels);
        for c in default_c_grid() {
            let fit =
                fit_logistic(&ex.view(), c).unwrap_or_else(|e| panic!("n={n} d={d} C={c}: {e}"));
            assert!(
                fit.beta[0] > 0.0,
                "n={n} d={d} C={c}: the concept axis is learnt"
            );
        }
        choose_c(&ex.view(), &default_c_grid(), 5, 1).unwrap();
    }
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

// ---- Probes inside a monitor: fit, calibration and p-values against their definitions ----

use actwatch_core::{SiteBatch, Vectors};
use actwatch_detect::monitor::{Monitor, MonitorFitter, MonitorOptions};
use actwatch_detect::probe::{ProbeKind, ProbeSpec};
use actwatch_detect::spec::DetectorSpec;
use actwatch_detect::{Aggregation, Fusion, OpenComputations};

const SITES: [(&str, usize); 2] = [("a", 6), ("b", 4)];

/// A computation: per site, its traces (1 to 4 tokens), row-major.
struct Comp {
    id: String,
    traces: Vec<Vec<f32>>,
}

/// Benign traffic is standard normal; the concept shifts the first two components of every
/// trace at both sites; `style` shifts component 3 (a nuisance the labelled negatives share).
fn comp(rng: &mut Rng, id: String, concept: f64, style: f64) -> Comp {
    let len = 1 + (rng.next_u64() % 4) as usize;
    let traces = SITES
        .iter()
        .map(|&(_, d)| {
            let mut rows = rng.gaussian_rows(len, d, 0.0);
            for t in 0..len {
                rows[t * d] += concept as f32;
                rows[t * d + 1] += concept as f32;
                rows[t * d + 3] += style as f32;
            }
            rows
        })
        .collect();
    Comp { id, traces }
}

struct ProbeData {
    reference: Vec<Comp>,
    examples: Vec<(Comp, bool)>,
}

fn probe_data(seed: u64) -> ProbeData {
    let mut rng = Rng::new(seed);
    ProbeData {
        reference: (0..800)
            .map(|i| comp(&mut rng, format!("ref-{i}"), 0.0, 0.0))
            .collect(),
        examples: (0..400)
            .map(|i| {
                let positive = i % 2 == 0;
                let c = comp(
                    &mut rng,
                    format!("ex-{i}"),
                    if positive { 1.5 } else { 0.0 },
                    0.7,
                );
                (c, positive)
            })
            .collect(),
    }
}

fn probe_options(probes: Vec<ProbeSpec>) -> MonitorOptions {
    MonitorOptions {
        detectors: DetectorSpec::parse_list("gaussian").unwrap(),
        joint: Vec::new(),
        aggregation: Aggregation::Max,
        fusion: Fusion::Fisher,
        fpr: 0.05,
        calibration_fraction: 0.4,
        seed: 7,
        length_strata: 1,
        probes,
    }
}

fn fit_with_probes(data: &ProbeData, options: MonitorOptions) -> actwatch_detect::Result<Monitor> {
    let mut fitter = MonitorFitter::new(options)?;
    for c in &data.reference {
        if fitter.is_calibration(&c.id) {
            continue;
        }
        for (&(site, d), rows) in SITES.iter().zip(&c.traces) {
            fitter.push_fit(site, rows, d)?;
            let ids = vec![c.id.as_str(); rows.len() / d];
            fitter.push_reference_negatives(site, &ids, rows, d)?;
        }
    }
    for (c, label) in &data.examples {
        if fitter.is_calibration(&c.id) {
            continue;
        }
        for (&(site, d), rows) in SITES.iter().zip(&c.traces) {
            let n = rows.len() / d;
            fitter.push_examples(site, &vec![c.id.as_str(); n], rows, d, &vec![*label; n])?;
        }
    }
    let mut cal = fitter.finish_fit()?;
    for c in &data.reference {
        if !cal.is_calibration(&c.id) {
            continue;
        }
        for (&(site, d), rows) in SITES.iter().zip(&c.traces) {
            cal.push_calibration(&vec![c.id.as_str(); rows.len() / d], site, rows)?;
        }
    }
    for (c, label) in &data.examples {
        if !cal.is_calibration(&c.id) {
            continue;
        }
        for (&(site, d), rows) in SITES.iter().zip(&c.traces) {
            let n = rows.len() / d;
            cal.push_example_calibration(&vec![c.id.as_str(); n], site, rows, &vec![*label; n])?;
        }
    }
    cal.finish()
}

/// Scores whole computations through the one scoring door; returns each one's results.
fn score_comps(monitor: &Monitor, comps: &[&Comp]) -> Vec<actwatch_detect::ComputationResult> {
    let mut open = OpenComputations::default();
    for c in comps {
        for (&(site, d), rows) in SITES.iter().zip(&c.traces) {
            let n = rows.len() / d;
            let batch = SiteBatch::new(
                site.to_string(),
                vec![c.id.clone(); n],
                Some((0..n as i32).collect()),
                Vectors::new(d, rows.clone()).unwrap(),
            )
            .unwrap();
            open.score(monitor, &batch).unwrap();
        }
    }
    let ids: Vec<String> = comps.iter().map(|c| c.id.clone()).collect();
    open.complete(monitor, &ids)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

#[test]
fn a_probe_is_fitted_and_calibrated_as_defined() {
    let data = probe_data(1);
    let mut dm = ProbeSpec::named("concept");
    dm.kind = ProbeKind::DiffMeans;
    dm.defer_fpr = Some(0.2);
    let mut lr = ProbeSpec::named("lr");
    lr.kind = ProbeKind::Logistic { c: Some(1.0) };
    lr.sites = vec!["b".into()];
    lr.aggregation = Some(Aggregation::Mean);
    let options = probe_options(vec![dm, lr]);
    let monitor = fit_with_probes(&data, options.clone()).unwrap();
    let split = MonitorFitter::new(options.clone()).unwrap();
    let is_cal = |id: &str| split.is_calibration(id);

    // 1. Difference of means: per site, the class means of the fit part's labelled traces,
    //    each computation weighing 1 over its traces there.
    let probe = &monitor.probes()[0];
    for (k, &(site, d)) in SITES.iter().enumerate() {
        let mut sums = [vec![0.0f64; d], vec![0.0f64; d]];
        let mut totals = [0.0f64; 2];
        for (c, label) in data.examples.iter().filter(|(c, _)| !is_cal(&c.id)) {
            let rows = &c.traces[k];
            let n = rows.len() / d;
            totals[usize::from(*label)] += 1.0;
            for t in 0..n {
                for j in 0..d {
                    sums[usize::from(*label)][j] += f64::from(rows[t * d + j]) / n as f64;
                }
            }
        }
        let w: Vec<f64> = (0..d)
            .map(|j| sums[1][j] / totals[1] - sums[0][j] / totals[0])
            .collect();
        assert_eq!(probe.sites[k].site, monitor.site_index(site).unwrap());
        assert!(
            max_abs_diff(&probe.sites[k].probe.weights, &w) < 1e-9,
            "site {site}"
        );
    }

    // 2. Per site, the calibration is the raw scores of the benign calibration traces
    //    (reference and labelled negatives of the calibration part), and nothing else.
    let benign_cal: Vec<&Comp> = data
        .reference
        .iter()
        .filter(|c| is_cal(&c.id))
        .chain(
            data.examples
                .iter()
                .filter(|(c, l)| is_cal(&c.id) && !l)
                .map(|(c, _)| c),
        )
        .collect();
    let positives: Vec<&Comp> = data
        .examples
        .iter()
        .filter(|(c, l)| is_cal(&c.id) && *l)
        .map(|(c, _)| c)
        .collect();
    assert!(positives.len() > 50 && benign_cal.len() > 300);
    for (pi, p) in monitor.probes().iter().enumerate() {
        let agg = p.spec.aggregation.unwrap_or(options.aggregation);
        for ps in &p.sites {
            let k = ps.site;
            let d = SITES[k].1;
            let mut want: Vec<f64> = benign_cal
                .iter()
                .flat_map(|c| c.traces[k].chunks_exact(d))
                .map(|r| {
                    r.iter()
                        .zip(&ps.probe.weights)
                        .map(|(x, w)| f64::from(*x) * w)
                        .sum::<f64>()
                        + ps.probe.bias
                })
                .collect();
            want.sort_by(f64::total_cmp);
            let got = ps.calibration.scores();
            assert_eq!(got.len(), want.len());
            assert!(max_abs_diff(got, &want) < 1e-9, "probe {pi} site {k}");
        }
        // 3. The computation-level calibration: per benign computation, each site's traces'
        //    leave-one-out -ln p aggregated, fused over the probe's sites.
        let mut want: Vec<f64> = benign_cal
            .iter()
            .map(|c| {
                let slots: Vec<f64> = p
                    .sites
                    .iter()
                    .map(|ps| {
                        let raw = ps.probe.scores(&c.traces[ps.site]);
                        let nlp: Vec<f64> = raw
                            .iter()
                            .map(|&x| ps.calibration.smooth_neg_log_p(x, true))
                            .collect();
                        agg.of(&nlp).unwrap()
                    })
                    .collect();
                options.fusion.fuse_slots(&slots)
            })
            .collect();
        want.sort_by(f64::total_cmp);
        let cal = &p.fused.calibrations()[0];
        assert_eq!(p.fused.len(), 1);
        assert_eq!(cal.scores(), want.as_slice(), "probe {pi}");
    }

    // 4. Fresh computations: p-values by definition, and the fit's recall is the share of the
    //    held-out positives flagged when they are scored like any computation.
    let mut rng = Rng::new(99);
    let fresh: Vec<Comp> = (0..400)
        .map(|i| {
            comp(
                &mut rng,
                format!("fresh-{i}"),
                if i % 2 == 0 { 1.5 } else { 0.0 },
                0.0,
            )
        })
        .collect();
    let fresh_refs: Vec<&Comp> = fresh.iter().collect();
    let results = score_comps(&monitor, &fresh_refs);
    for (pi, p) in monitor.probes().iter().enumerate() {
        let cal = &p.fused.calibrations()[0];
        let n = cal.len();
        for r in &results {
            let pr = &r.probes[pi];
            let at_least = cal.scores().iter().filter(|&&c| c >= pr.score).count();
            assert_eq!(pr.p_value, (1 + at_least) as f64 / (n + 1) as f64);
            assert_eq!(pr.flagged, pr.p_value <= options.fpr);
            let defer = p.spec.defer_fpr;
            assert_eq!(
                pr.deferred,
                !pr.flagged && defer.is_some_and(|d| pr.p_value <= d)
            );
            assert_eq!(
                pr.verdict(),
                if pr.flagged {
                    "flag"
                } else if pr.deferred {
                    "defer"
                } else {
                    "pass"
                }
            );
        }
        let held = score_comps(&monitor, &positives);
        let flagged = held.iter().filter(|r| r.probes[pi].flagged).count();
        assert_eq!(p.summary.heldout_positives as usize, positives.len());
        assert_eq!(
            p.summary.recall,
            Some(flagged as f64 / positives.len() as f64)
        );
    }
    // The concept is found (the shift is large) and benign fresh traffic is flagged near the rate.
    let dm_recall = monitor.probes()[0].summary.recall.unwrap();
    assert!(dm_recall > 0.8, "recall {dm_recall}");
    let benign_flagged = results
        .iter()
        .skip(1)
        .step_by(2)
        .filter(|r| r.probes[0].flagged)
        .count();
    assert!(
        benign_flagged <= 25,
        "{benign_flagged} of 200 benign flagged at 5%"
    );
    assert!(monitor.probes()[0].summary.deferred_benign.is_some());
    assert!(monitor.probes()[1].summary.deferred_benign.is_none());
}

#[test]
fn probe_fits_refuse_bad_examples() {
    let data = probe_data(2);
    // Labelled examples on a monitor without probes.
    let mut fitter = MonitorFitter::new(probe_options(Vec::new())).unwrap();
    let (c, l) = &data.examples[0];
    let e = fitter
        .push_examples("a", &[c.id.as_str()], &c.traces[0][..6], 6, &[*l])
        .unwrap_err();
    assert!(e.to_string().contains("no probe"), "{e}");
    // No positive examples.
    let negatives = ProbeData {
        reference: data
            .reference
            .iter()
            .map(|c| Comp {
                id: c.id.clone(),
                traces: c.traces.clone(),
            })
            .collect(),
        examples: data
            .examples
            .iter()
            .filter(|(_, l)| !l)
            .map(|(c, l)| {
                (
                    Comp {
                        id: c.id.clone(),
                        traces: c.traces.clone(),
                    },
                    *l,
                )
            })
            .collect(),
    };
    let e = fit_with_probes(&negatives, probe_options(vec![ProbeSpec::named("p")])).unwrap_err();
    assert!(matches!(e, Error::NotEnoughData(_)), "{e}");
    assert!(e.to_string().contains("positive and negative"), "{e}");
    // One computation labelled both ways.
    let mut fitter = MonitorFitter::new(probe_options(vec![ProbeSpec::named("p")])).unwrap();
    fitter
        .push_examples("a", &["x"], &[0.0; 6], 6, &[true])
        .unwrap();
    let e = fitter
        .push_examples("b", &["x"], &[0.0; 4], 4, &[false])
        .unwrap_err();
    assert!(e.to_string().contains("labelled both"), "{e}");
    // Examples of another width than their site's reference traffic.
    let mut fitter = MonitorFitter::new(probe_options(vec![ProbeSpec::named("p")])).unwrap();
    let distinct: Vec<f32> = (0..12).map(|i| i as f32).collect();
    fitter.push_fit("a", &distinct, 6).unwrap();
    fitter
        .push_examples("a", &["x", "y"], &[0.0; 10], 5, &[true, false])
        .unwrap();
    let e = fitter.finish_fit().err().expect("a width mismatch");
    assert!(e.to_string().contains("width 6"), "{e}");
    // A probe reading a site the monitor lacks.
    let mut spec = ProbeSpec::named("p");
    spec.sites = vec!["zz".into()];
    let e = fit_with_probes(&data, probe_options(vec![spec])).unwrap_err();
    assert!(e.to_string().contains("does not have"), "{e}");
    // Specs: names, duplicates, rates.
    for bad in [
        "",
        "a b",
        "p:kind=svm",
        "p:c=-1",
        "p:c=1,kind=diff_means",
        "p:defer_fpr=2",
        "p:sites=a+a",
        "p:x=1",
    ] {
        assert!(ProbeSpec::parse(bad).is_err(), "{bad:?} parsed");
    }
    let twice = probe_options(vec![ProbeSpec::named("p"), ProbeSpec::named("p")]);
    assert!(twice.validate().unwrap_err().to_string().contains("twice"));
    let mut low = ProbeSpec::named("p");
    low.defer_fpr = Some(0.01);
    assert!(probe_options(vec![low])
        .validate()
        .unwrap_err()
        .to_string()
        .contains("defer_fpr"));
    let parsed = ProbeSpec::parse("harm:kind=logistic,c=0.5,sites=a+b,aggregation=max_rolling_mean:8,reference_negatives=true,defer_fpr=0.05").unwrap();
    assert_eq!(parsed.kind, ProbeKind::Logistic { c: Some(0.5) });
    assert_eq!(parsed.sites, vec!["a", "b"]);
    assert_eq!(
        parsed.aggregation,
        Some(Aggregation::MaxRollingMean { window: 8 })
    );
    assert!(parsed.reference_negatives);
}

#[test]
fn reference_negatives_join_the_fit_weighing_as_much_as_the_labelled_negatives() {
    let data = probe_data(3);
    let mut spec = ProbeSpec::named("p");
    spec.kind = ProbeKind::DiffMeans;
    spec.reference_negatives = true;
    let monitor = fit_with_probes(&data, probe_options(vec![spec])).unwrap();
    let s = &monitor.probes()[0].summary.sites[0];
    assert!(s.fit.reference > 0 && s.fit.negative > 0);
    // μ0 is the mean of the labelled negatives' mean and the reference traffic's mean (equal
    // group weights), so the style shift of the negatives (component 3) is halved in w.
    let w = &monitor.probes()[0].sites[0].probe.weights;
    let mut plain = ProbeSpec::named("p");
    plain.kind = ProbeKind::DiffMeans;
    let without = fit_with_probes(&data, probe_options(vec![plain])).unwrap();
    let w0 = &without.probes()[0].sites[0].probe.weights;
    assert!(w[3] > w0[3] + 0.2, "style component {} vs {}", w[3], w0[3]);
}

/// A probe flags a computation mid-way, as the anomaly question does: streamed token by token,
/// the first position at which its running statistic reaches every stratum's threshold is noted,
/// handed out once as an early flag, and the final result is flagged with the same position.
#[test]
fn a_probe_flags_a_computation_before_it_completes() {
    let data = probe_data(4);
    let mut spec = ProbeSpec::named("concept");
    spec.aggregation = Some(Aggregation::Max);
    let options = probe_options(vec![spec]);
    let monitor = fit_with_probes(&data, options).unwrap();
    // Eight benign tokens, then the concept from token 5 on, at both sites.
    let mut rng = Rng::new(17);
    let mut open = OpenComputations::default();
    let mut first_flag = None;
    for t in 0..8 {
        for &(site, d) in &SITES {
            let mut row = rng.gaussian_rows(1, d, 0.0);
            if t >= 5 {
                row[0] += 4.0;
                row[1] += 4.0;
            }
            let batch = SiteBatch::new(
                site.to_string(),
                vec!["live".into()],
                Some(vec![t]),
                Vectors::new(d, row).unwrap(),
            )
            .unwrap();
            open.score(&monitor, &batch).unwrap();
        }
        let early = open.take_early_flags(&monitor);
        if let Some((id, r)) = early.first() {
            // (The anomaly question may flag it too, at its own position: a computation comes
            // back once per question that flags it, and the probe's position never moves.)
            assert_eq!(id, "live");
            assert!(r.partial);
            match first_flag {
                None => first_flag = r.probes[0].flagged_at,
                Some(at) => assert_eq!(r.probes[0].flagged_at, Some(at)),
            }
        }
    }
    let at = first_flag.expect("flagged before completion");
    assert!(
        at >= 5,
        "flagged at token {at}, before the concept appeared"
    );
    let done = open.complete(&monitor, &["live".into()]).unwrap();
    let final_probe = &done[0].1.probes[0];
    assert!(final_probe.flagged);
    assert_eq!(final_probe.flagged_at, Some(at));
}

/// Probes of one monitor do not influence each other: a cross-validated logistic probe is the
/// same alone as beside a probe that fits on reference negatives (whose reference rows the fit
/// then also holds). Its folds depend on its own computations' ids only.
#[test]
fn probes_of_one_monitor_are_independent() {
    let data = probe_data(6);
    let mut lr = ProbeSpec::named("lr");
    lr.kind = ProbeKind::Logistic { c: None };
    let mut other = ProbeSpec::named("other");
    other.reference_negatives = true;
    let alone = fit_with_probes(&data, probe_options(vec![lr.clone()])).unwrap();
    let beside = fit_with_probes(&data, probe_options(vec![lr, other])).unwrap();
    let (a, b) = (&alone.probes()[0], &beside.probes()[0]);
    assert_eq!(a.summary, b.summary);
    for (x, y) in a.sites.iter().zip(&b.sites) {
        assert_eq!(x.probe, y.probe);
    }
}
