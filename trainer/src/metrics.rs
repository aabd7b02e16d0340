//! Evaluation metrics: AUC, log loss, accuracy, calibration.

/// Metrics of predictions against labels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalMetrics {
    /// Area under the ROC curve (ties averaged).
    pub auc: f64,
    /// Mean log loss.
    pub logloss: f64,
    /// Accuracy at threshold 0.5.
    pub accuracy: f64,
    /// Mean prediction / mean label.
    pub calibration: f64,
}

/// Computes the metrics. `preds` and `labels` have the same length.
pub fn evaluate(preds: &[f32], labels: &[f32]) -> EvalMetrics {
    let n = preds.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| preds[a].total_cmp(&preds[b]));
    // Rank-sum AUC with average ranks for ties.
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && preds[order[j + 1]] == preds[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &o in &order[i..=j] {
            if labels[o] > 0.5 {
                rank_sum += avg;
            }
        }
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&y| y > 0.5).count() as f64;
    let neg = n as f64 - pos;
    let auc = if pos > 0.0 && neg > 0.0 {
        (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
    } else {
        f64::NAN
    };
    let mut logloss = 0f64;
    let mut correct = 0usize;
    for (&p, &y) in preds.iter().zip(labels) {
        let p = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
        logloss -= f64::from(y) * p.ln() + (1.0 - f64::from(y)) * (1.0 - p).ln();
        if (p >= 0.5) == (y > 0.5) {
            correct += 1;
        }
    }
    let mean_p: f64 = preds.iter().map(|&p| f64::from(p)).sum::<f64>() / n as f64;
    EvalMetrics {
        auc,
        logloss: logloss / n as f64,
        accuracy: correct as f64 / n as f64,
        calibration: mean_p / (pos / n as f64),
    }
}

/// Head `h`'s values of `values` laid out row by row with `heads` values per row.
pub fn head_of(values: &[f32], heads: usize, h: usize) -> Vec<f32> {
    values
        .iter()
        .skip(h)
        .step_by(heads.max(1))
        .copied()
        .collect()
}

/// [`evaluate`] for each head of predictions and labels laid out row by row with `heads` values
/// per row; a head is evaluated on the rows that have its label (not NaN).
pub fn evaluate_heads(preds: &[f32], labels: &[f32], heads: usize) -> Vec<EvalMetrics> {
    (0..heads)
        .map(|h| {
            let (p, y): (Vec<f32>, Vec<f32>) = head_of(preds, heads, h)
                .into_iter()
                .zip(head_of(labels, heads, h))
                .filter(|(_, y)| !y.is_nan())
                .unzip();
            evaluate(&p, &y)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_head_is_evaluated_on_the_rows_with_its_label() {
        // Two heads, row by row; head 1 has no label on rows 1 and 3.
        let preds = [0.9, 0.2, 0.1, 0.8, 0.7, 0.3, 0.4, 0.6];
        let labels = [1.0, 0.0, 0.0, f32::NAN, 1.0, 1.0, 0.0, f32::NAN];
        let m = super::evaluate_heads(&preds, &labels, 2);
        assert_eq!(
            m[0],
            super::evaluate(&[0.9, 0.1, 0.7, 0.4], &[1.0, 0.0, 1.0, 0.0])
        );
        assert_eq!(m[1], super::evaluate(&[0.2, 0.3], &[0.0, 1.0]));
        assert!(m[1].logloss.is_finite());
    }

    use super::*;

    #[test]
    fn auc_of_known_rankings() {
        assert_eq!(
            evaluate(&[0.1, 0.2, 0.8, 0.9], &[0.0, 0.0, 1.0, 1.0]).auc,
            1.0
        );
        assert_eq!(
            evaluate(&[0.9, 0.8, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]).auc,
            0.0
        );
        // One inversion of four pairs.
        assert_eq!(
            evaluate(&[0.1, 0.6, 0.5, 0.9], &[0.0, 0.0, 1.0, 1.0]).auc,
            0.75
        );
        // Ties count half.
        assert_eq!(evaluate(&[0.5, 0.5], &[0.0, 1.0]).auc, 0.5);
        let m = evaluate(&[0.2, 0.8], &[0.0, 1.0]);
        assert_eq!(m.accuracy, 1.0);
        assert!((m.logloss - (-(0.8f64.ln()))).abs() < 1e-6);
        assert!((m.calibration - 1.0).abs() < 1e-6);
    }
}
