//! Gaussian and exact kNN raw scores on a libtorch device.
//!
//! [`TorchBackend::new`] copies a fitted monitor's detector parameters to the device once
//! (Gaussian: projection and eigenvalue weights; kNN: the reference matrix); attached with
//! [`TorchBackend::attach`], it computes every raw score the monitor asks for, and the monitor's
//! own code turns them into p-values, fuses and calibrates them. Only the raw-score kernels are
//! here:
//!
//! - Gaussian: the rows are normalised and centred on the host by the detector's own code
//!   ([`GaussianDetector::centred_rows`], cheap and bit-identical), projected on the device with one
//!   f32 GEMM, and the score is the squared f32 vector norm of each projected row (at low rank, the
//!   weighted squares summed in f64). The default backend runs the same GEMM with another summation
//!   order and sums the squares in f32, so raw scores differ by rounding: a few 1e-7 relative on
//!   the MiniLM activations.
//! - kNN (exact search only): queries normalised on the host by the same function as the default
//!   (cosine), similarities by one f32 GEMM per block of queries (minus `||r||²/2` for L2), the k
//!   best by `topk`; the k candidates' distances are then recomputed in f64, as the default does,
//!   and the largest is the score. Both backends pick the same k references except where two
//!   similarities tie to within f32 rounding, so scores agree to about 1e-13.
//!
//! A p-value is a rank among calibration scores, so a raw score that lies within rounding of a
//! calibration score can land on the other side of it: such a p-value differs by one rank
//! (measured: a few in 10,000; see tests/backend.rs).
//!
//! Detectors it does not implement (kNN over an HNSW index), and those of a family the caller
//! left out ([`Families`]), are handed back to the default backend ([`RawScorer::raw_scores`]
//! returns `None`). Bad rows get the default's errors (checked
//! with [`actwatch_core::check_rows`]).

use std::sync::{Arc, Mutex};

use actwatch_core::check_rows;
use actwatch_core::l2_normalize_rows;
use actwatch_detect::backend::{Backend, RawScorer};
use actwatch_detect::knn::Metric;
use actwatch_detect::spec::FittedDetector;
use actwatch_detect::{GaussianDetector, KnnDetector, Monitor};
use tch::{Device, Kind, TchError, Tensor};

use crate::device::device_name;
use crate::{Error, Result};

/// At most this many similarity values (f32) per kNN GEMM block on the CPU: 64 Mi = 256 MiB.
const KNN_BLOCK_VALUES: usize = 64 << 20;
/// The same on a GPU: 256 Mi = 1 GiB of its memory. The block's queries are the rows of the
/// product, and a product of few rows runs far below the GPU's rate: on an H200, 1M x 4096
/// references took 67 queries per block at 26 TFLOP/s and 268 at 41 (docs/benchmarks-gpu.md).
const KNN_BLOCK_VALUES_GPU: usize = 256 << 20;
/// Rows per Gaussian block (bounds host and device memory for huge batches).
const GAUSSIAN_BLOCK_ROWS: usize = 65_536;

/// The detector families a [`TorchBackend`] takes onto its device; the others stay with the
/// default backend. On a GPU exact kNN gains most and a low-rank Gaussian can lose (it is bound by
/// copying rows to the device: docs/benchmarks-gpu.md), so a caller may move kNN alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families {
    pub gaussian: bool,
    pub knn: bool,
}

impl Families {
    /// Every family the backend implements.
    pub const ALL: Families = Families {
        gaussian: true,
        knn: true,
    };

    /// A comma-separated list of `gaussian` and `knn` (at least one).
    pub fn parse(list: &str) -> Result<Self> {
        let mut f = Families {
            gaussian: false,
            knn: false,
        };
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name.to_ascii_lowercase().as_str() {
                "gaussian" => f.gaussian = true,
                "knn" => f.knn = true,
                other => {
                    return Err(Error::InvalidOption(format!(
                        "unknown detector family {other:?} (expected gaussian, knn or both)"
                    )))
                }
            }
        }
        if !f.gaussian && !f.knn {
            return Err(Error::InvalidOption(
                "no detector family given (expected gaussian, knn or both)".into(),
            ));
        }
        Ok(f)
    }
}

/// Raw-score kernels of one monitor on one device.
pub struct TorchBackend {
    device: Device,
    /// `[site][detector]`; `None`: scored by the default backend. tch tensors are `Send` but not
    /// `Sync`: one caller at a time.
    kernels: Mutex<Vec<Vec<Option<Kernel>>>>,
    /// Detectors on the device, and handed back to the default backend.
    coverage: (usize, usize),
}

enum Kernel {
    Gaussian {
        dim: usize,
        /// `[d, r]` f32.
        proj: Tensor,
        /// Low rank: `[r]` f64 weights `1/λ_j - 1/σ²` (full rank: all 1).
        weights: Option<Tensor>,
    },
    Knn {
        dim: usize,
        k: i64,
        metric: Metric,
        /// `[n, d]` f32, normalised for cosine (as stored by the detector). The k candidates are
        /// gathered from it and widened to f64, exactly (every f32 is an f64), so no f64 copy of
        /// the references is kept (it was twice their size on the device).
        refs: Tensor,
        /// L2 only: `[n]` f32 `||r||²/2`, computed in f64 as the default does.
        half_sq_norms: Option<Tensor>,
    },
}

impl TorchBackend {
    /// Copies the parameters of every Gaussian and exact-search kNN detector of `monitor` of the
    /// given families to `device`.
    pub fn new(monitor: &Monitor, device: Device, families: Families) -> Result<Self> {
        Self::for_sites(
            monitor.sites().iter().map(|s| s.detectors.as_slice()),
            device,
            families,
        )
    }

    /// The same for detectors outside a monitor, `[site][detector]` (a benchmark's, say):
    /// [`Self::score`] takes the same indices.
    pub fn for_sites<'a>(
        sites: impl IntoIterator<Item = &'a [FittedDetector]>,
        device: Device,
        families: Families,
    ) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let mut kernels = Vec::new();
        for detectors in sites {
            let mut row = Vec::with_capacity(detectors.len());
            for det in detectors {
                row.push(match det {
                    FittedDetector::Gaussian(g) if families.gaussian => {
                        Some(gaussian_kernel(g, device)?)
                    }
                    FittedDetector::Knn(k) if families.knn && k.is_exact() => {
                        Some(knn_kernel(k, device)?)
                    }
                    FittedDetector::Gaussian(_) | FittedDetector::Knn(_) => None,
                });
            }
            kernels.push(row);
        }
        let on = kernels.iter().flatten().filter(|k| k.is_some()).count();
        let all = kernels.iter().map(Vec::len).sum::<usize>();
        Ok(Self {
            device,
            kernels: Mutex::new(kernels),
            coverage: (on, all - on),
        })
    }

    /// Builds the backend for `monitor` on `device` and makes the monitor score with it; returns
    /// [`Self::coverage`].
    pub fn attach(
        monitor: &mut Monitor,
        device: Device,
        families: Families,
    ) -> Result<(usize, usize)> {
        let backend = Self::new(monitor, device, families)?;
        let coverage = backend.coverage;
        monitor.set_backend(Backend::new(Arc::new(backend)));
        Ok(coverage)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// How many detectors run on the device, and how many are handed back to the default backend.
    pub fn coverage(&self) -> (usize, usize) {
        self.coverage
    }

    /// Raw scores of `detector`, detector `index` of site `site` of the monitor this backend was
    /// built for (`None`: not implemented here).
    pub fn score(
        &self,
        site: usize,
        index: usize,
        detector: &FittedDetector,
        rows: &[f32],
    ) -> Result<Option<Vec<f64>>> {
        let kernels = self.kernels.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Some(kernel)) = kernels.get(site).and_then(|s| s.get(index)) else {
            return Ok(None);
        };
        let _guard = tch::no_grad_guard();
        match (kernel, detector) {
            (Kernel::Gaussian { dim, proj, weights }, FittedDetector::Gaussian(g)) => {
                let n = check_rows(*dim, rows)?;
                let mut out = Vec::with_capacity(n);
                for block in rows.chunks(GAUSSIAN_BLOCK_ROWS * dim) {
                    let (y, residual) = g.centred_rows(block)?;
                    let y = self.upload(&y, *dim)?;
                    out.extend(gaussian_scores(&y, proj, weights.as_ref(), &residual)?);
                }
                Ok(Some(out))
            }
            (
                Kernel::Knn {
                    dim,
                    k,
                    metric,
                    refs,
                    half_sq_norms,
                },
                FittedDetector::Knn(_),
            ) => {
                let n = check_rows(*dim, rows)?;
                let n_refs = refs.size()[0].max(1) as usize;
                let values = match self.device {
                    Device::Cpu => KNN_BLOCK_VALUES,
                    _ => KNN_BLOCK_VALUES_GPU,
                };
                let block_rows = (values / n_refs).clamp(1, 8192);
                let mut out = Vec::with_capacity(n);
                for block in rows.chunks(block_rows * dim) {
                    let mut q = block.to_vec();
                    if *metric == Metric::Cosine {
                        l2_normalize_rows(&mut q, *dim);
                    }
                    let q = self.upload(&q, *dim)?;
                    out.extend(knn_scores(&q, *k, *metric, refs, half_sq_norms.as_ref())?);
                }
                Ok(Some(out))
            }
            _ => Err(Error::InvalidOption(format!(
                "torch backend: detector {index} of site {site} is not the one it was built for"
            ))),
        }
    }

    fn upload(&self, rows: &[f32], dim: usize) -> Result<Tensor, TchError> {
        tensor_f32(rows, &[(rows.len() / dim) as i64, dim as i64], self.device)
    }
}

impl RawScorer for TorchBackend {
    fn name(&self) -> String {
        format!("torch:{}", device_name(self.device))
    }

    fn raw_scores(
        &self,
        site: usize,
        index: usize,
        detector: &FittedDetector,
        rows: &[f32],
    ) -> actwatch_detect::Result<Option<Vec<f64>>> {
        self.score(site, index, detector, rows)
            .map_err(|e| match e {
                Error::Detect(e) => e,
                other => actwatch_detect::Error::Numerical(format!("torch backend: {other}")),
            })
    }
}

fn tensor_f32(values: &[f32], shape: &[i64], device: Device) -> Result<Tensor, TchError> {
    Tensor::f_from_slice(values)?
        .f_reshape(shape)?
        .f_to_device(device)
}

fn gaussian_kernel(g: &GaussianDetector, device: Device) -> Result<Kernel> {
    let (d, r) = (g.dim(), g.rank());
    // score = Σ_j w_j p_j² + ||y||²/σ², as the default: full rank w = 1, no residual term.
    let weights = match g.residual_variance() {
        None => None,
        Some(s2) => {
            let w: Vec<f64> = g.eigenvalues().iter().map(|l| 1.0 / l - 1.0 / s2).collect();
            Some(Tensor::f_from_slice(&w)?.f_to_device(device)?)
        }
    };
    Ok(Kernel::Gaussian {
        dim: d,
        proj: tensor_f32(g.projection(), &[d as i64, r as i64], device)?,
        weights,
    })
}

fn knn_kernel(k: &KnnDetector, device: Device) -> Result<Kernel> {
    let (n, d) = (k.len(), k.dim());
    let refs = k.references();
    let half_sq_norms = match k.options().metric {
        Metric::Cosine => None,
        Metric::L2 => {
            let h: Vec<f32> = refs
                .chunks_exact(d)
                .map(|r| (0.5 * r.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>()) as f32)
                .collect();
            Some(Tensor::f_from_slice(&h)?.f_to_device(device)?)
        }
    };
    Ok(Kernel::Knn {
        dim: d,
        k: k.options().k as i64,
        metric: k.options().metric,
        refs: tensor_f32(refs, &[n as i64, d as i64], device)?,
        half_sq_norms,
    })
}

fn to_host_f64(t: &Tensor) -> Result<Vec<f64>, TchError> {
    let t = t
        .f_to_kind(Kind::Double)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?;
    let n = t.numel();
    let mut out = vec![0.0f64; n];
    t.f_copy_data(&mut out, n)?;
    Ok(out)
}

/// `y`: centred rows `[m, d]`; `residual`: the host-computed low-rank term per row.
fn gaussian_scores(
    y: &Tensor,
    proj: &Tensor,
    weights: Option<&Tensor>,
    residual: &[f64],
) -> Result<Vec<f64>, TchError> {
    let p = y.f_matmul(proj)?;
    let sums = match weights {
        // Full rank: the squared norm of each projected row, from libtorch's f32 vector norm
        // (scaled accumulation; as accurate as the default's f32 sum of squares, and the fastest).
        None => to_host_f64(&p.f_linalg_norm(2.0, [1i64].as_slice(), false, None::<Kind>)?)?
            .into_iter()
            .map(|n| n * n)
            .collect(),
        // Low rank: weights of both signs cancel against the residual term: sum in f64.
        Some(w) => to_host_f64(
            &p.f_to_kind(Kind::Double)?
                .f_square()?
                .f_mul(w)?
                .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?,
        )?,
    };
    // As the default: never negative (rounding at low rank), +inf rather than NaN on f32 overflow.
    Ok(sums
        .into_iter()
        .zip(residual)
        .map(|(s, r)| {
            let s = s + r;
            if s.is_nan() {
                f64::INFINITY
            } else {
                s.max(0.0)
            }
        })
        .collect())
}

/// `q`: the prepared queries `[m, d]` (normalised for cosine).
fn knn_scores(
    q: &Tensor,
    k: i64,
    metric: Metric,
    refs: &Tensor,
    half_sq_norms: Option<&Tensor>,
) -> Result<Vec<f64>, TchError> {
    let mut sims = q.f_matmul(&refs.f_tr()?)?;
    if let Some(h) = half_sq_norms {
        // L2 ranking key: q·r - ||r||²/2.
        sims = sims.f_sub(&h.f_unsqueeze(0)?)?;
    }
    let (_, idx) = sims.f_topk(k, 1, true, false)?;
    let (m, d) = (q.size()[0], q.size()[1]);
    // [m, k, d] f64 candidates; their exact distances as the default computes them (in f64).
    let cands = refs
        .f_index_select(0, &idx.f_reshape([-1i64])?)?
        .f_to_kind(Kind::Double)?
        .f_reshape([m, k, d])?;
    let q64 = q.f_to_kind(Kind::Double)?;
    let dist = match metric {
        Metric::Cosine => cands
            .f_bmm(&q64.f_unsqueeze(2)?)?
            .f_reshape([m, k])?
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_clamp(0.0, 2.0)?,
        Metric::L2 => cands
            .f_sub(&q64.f_unsqueeze(1)?)?
            .f_square()?
            .f_sum_dim_intlist([2i64].as_slice(), false, Kind::Double)?
            .f_sqrt()?,
    };
    to_host_f64(&dist.f_amax([1i64].as_slice(), false)?)
}
