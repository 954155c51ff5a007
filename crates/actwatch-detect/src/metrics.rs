//! Evaluation metrics for a monitor's scores: AUROC, FPR at a TPR, detection rates.
//!
//! Scores are "higher = more anomalous"; the positive class is the anomalous one. Ties count
//! half, as in the Mann-Whitney U statistic (and scikit-learn's `roc_auc_score`).

/// Area under the ROC curve of `anomalous` against `normal` (Mann-Whitney, ties counted half).
/// None if either side is empty.
pub fn auroc(normal: &[f64], anomalous: &[f64]) -> Option<f64> {
    if normal.is_empty() || anomalous.is_empty() {
        return None;
    }
    let mut all: Vec<(f64, bool)> = normal
        .iter()
        .map(|&s| (s, false))
        .chain(anomalous.iter().map(|&s| (s, true)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of (mid-)ranks of the anomalous scores.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mid * all[i..=j].iter().filter(|x| x.1).count() as f64;
        i = j + 1;
    }
    let (n0, n1) = (normal.len() as f64, anomalous.len() as f64);
    Some((rank_sum - n1 * (n1 + 1.0) / 2.0) / (n0 * n1))
}

/// False-positive rate at the smallest threshold that reaches `tpr` true positives: the share of
/// normal scores at or above the anomalous score at quantile `1 - tpr`.
pub fn fpr_at_tpr(normal: &[f64], anomalous: &[f64], tpr: f64) -> Option<f64> {
    if normal.is_empty() || anomalous.is_empty() {
        return None;
    }
    let mut a = anomalous.to_vec();
    a.sort_by(|x, y| y.total_cmp(x));
    let need = ((tpr * a.len() as f64).ceil() as usize).clamp(1, a.len());
    let threshold = a[need - 1];
    Some(normal.iter().filter(|&&s| s >= threshold).count() as f64 / normal.len() as f64)
}

/// Share of `true` values.
pub fn rate(flags: &[bool]) -> Option<f64> {
    (!flags.is_empty()).then(|| flags.iter().filter(|&&f| f).count() as f64 / flags.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_auroc(n: &[f64], a: &[f64]) -> f64 {
        let mut s = 0.0;
        for &x in a {
            for &y in n {
                s += if x > y {
                    1.0
                } else if x == y {
                    0.5
                } else {
                    0.0
                };
            }
        }
        s / (n.len() * a.len()) as f64
    }

    #[test]
    fn auroc_matches_pairwise_definition() {
        let n = [0.1, 0.4, 0.35, 0.8, 0.4];
        let a = [0.9, 0.4, 0.7, 0.35];
        assert!((auroc(&n, &a).unwrap() - brute_auroc(&n, &a)).abs() < 1e-12);
        assert_eq!(auroc(&[0.0, 1.0], &[2.0, 3.0]), Some(1.0));
        assert_eq!(auroc(&[2.0, 3.0], &[0.0, 1.0]), Some(0.0));
        assert_eq!(auroc(&[], &[1.0]), None);
    }

    #[test]
    fn fpr_at_tpr_by_hand() {
        let normal = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
        let anomalous = [5.5, 6.5, 7.5, 8.5];
        // 95% of 4 anomalous -> all 4 -> threshold 5.5 -> normals 6,7,8,9 above.
        assert_eq!(fpr_at_tpr(&normal, &anomalous, 0.95), Some(0.4));
        assert_eq!(fpr_at_tpr(&normal, &anomalous, 0.5), Some(0.2));
        assert_eq!(rate(&[true, false, false, true]), Some(0.5));
    }
}
