//! A TorchScript model that returns its hidden states.

use std::path::{Path, PathBuf};

use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::{Error, Result};

/// A loaded TorchScript model.
pub struct Model {
    module: CModule,
    pub(crate) path: PathBuf,
    pub(crate) device: Device,
}

impl Model {
    /// Loads `path` onto `device` in evaluation mode.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::model(path, "no such TorchScript file"));
        }
        let mut module = CModule::load_on_device(path, device).map_err(|e| {
            Error::model(
                path,
                format!("cannot load it as TorchScript: {}", first_line(&e)),
            )
        })?;
        module
            .f_set_eval()
            .map_err(|e| Error::model(path, format!("cannot switch to eval mode: {e}")))?;
        Ok(Self {
            module,
            path: path.to_path_buf(),
            device,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs forward on one padded batch and returns its hidden states as f32 `[B, T, d]` tensors,
    /// checked against the contract. `what` names the rows, for errors.
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor, what: &str) -> Result<Vec<Tensor>> {
        let out = self
            .module
            .forward_is(&[
                IValue::Tensor(ids.shallow_clone()),
                IValue::Tensor(mask.shallow_clone()),
            ])
            .map_err(|e| {
                Error::model(
                    &self.path,
                    format!("forward failed on {what}: {}", first_line(&e)),
                )
            })?;
        let items: Vec<IValue> = match out {
            IValue::Tuple(v) | IValue::GenericList(v) => v,
            IValue::TensorList(v) => v.into_iter().map(IValue::Tensor).collect(),
            other => {
                return Err(Error::model(
                    &self.path,
                    format!(
                        "forward returned {}, not a tuple of hidden states [batch, tokens, width] \
                         (see `actwatch capture --help` for the contract)",
                        ivalue_kind(&other)
                    ),
                ))
            }
        };
        let (b, t) = (ids.size()[0], ids.size()[1]);
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                IValue::Tensor(h) if h.size().len() == 3 && h.size()[..2] == [b, t] => {
                    if matches!(
                        h.f_kind(),
                        Ok(Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
                    ) {
                        Ok(h.f_to_kind(Kind::Float)?)
                    } else {
                        Err(Error::model(
                            &self.path,
                            format!("hidden state {i} is not a float tensor ({:?})", h.kind()),
                        ))
                    }
                }
                IValue::Tensor(h) => Err(Error::model(
                    &self.path,
                    format!(
                        "hidden state {i} has shape {:?}; expected [batch {b}, tokens {t}, width]",
                        h.size()
                    ),
                )),
                other => Err(Error::model(
                    &self.path,
                    format!(
                        "element {i} of forward's output is {}, not a tensor",
                        ivalue_kind(&other)
                    ),
                )),
            })
            .collect()
    }
}

fn first_line(e: &tch::TchError) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or("").to_string()
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "a single tensor",
        IValue::Double(_) | IValue::Int(_) | IValue::Bool(_) => "a scalar",
        IValue::String(_) => "a string",
        IValue::GenericDict(_) => "a dict",
        IValue::Tuple(_) | IValue::GenericList(_) | IValue::TensorList(_) => "a list",
        _ => "a non-tensor value",
    }
}
