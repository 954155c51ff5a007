use tch::{Cuda, Device};

use crate::{Error, Result};

/// `cpu`, `cuda` (GPU 0) or `cuda:N`. CUDA must be available to libtorch (a GPU, its driver, and
/// the CUDA libraries of the torch wheel): asking for it otherwise is an error, not a fallback.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    let device = match s.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => {
                return Err(Error::InvalidOption(format!(
                    "unknown device {s:?} (expected cpu, cuda or cuda:N)"
                )))
            }
        },
    };
    let count = if Cuda::is_available() {
        Cuda::device_count().max(0) as usize
    } else {
        0
    };
    match device {
        Device::Cuda(n) if n >= count => Err(Error::InvalidOption(format!(
            "device {s}: libtorch sees {count} CUDA device(s){}",
            if count == 0 {
                " (no GPU, or no CUDA driver); use --device cpu"
            } else {
                ""
            }
        ))),
        d => Ok(d),
    }
}

/// `cpu` or `cuda:N`, for reports.
pub(crate) fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
