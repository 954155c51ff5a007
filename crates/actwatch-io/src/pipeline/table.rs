//! [`ComputationTable`]: scored computations with the input columns constant within each, as
//! one Arrow batch.

use super::score::ProvenanceConflicts;
use std::collections::HashMap;
use std::sync::Arc;

use actwatch_detect::monitor::Monitor;
use actwatch_detect::ComputationResult;
use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, UInt64Array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};

use crate::Result;

/// Scored computations in first-seen order, with the input columns that are constant within
/// every computation.
pub struct ComputationTable {
    pub trace_column: String,
    pub ids: Vec<String>,
    pub results: Vec<ComputationResult>,
    pub slot_names: Vec<String>,
    /// The monitor's concept probes, by name, in the order of each result's `probes`.
    pub probe_names: Vec<String>,
    pub(super) passthrough: Vec<PassColumn>,
    pub input_rows: u64,
    /// Per site, the first provenance conflict scored under `ProvenancePolicy::Warn`.
    pub provenance_conflicts: ProvenanceConflicts,
}

/// Values of one pass-through column, one per computation (the first seen), while it stays constant.
pub(super) struct PassColumn {
    name: String,
    data_type: DataType,
    values: PassValues,
    constant: bool,
}

enum PassValues {
    Str(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
}

impl PassValues {
    /// The normalised type values are kept in, or None for types that are not carried.
    fn for_type(dt: &DataType) -> Option<(DataType, PassValues)> {
        use DataType::*;
        Some(match dt {
            Utf8 | LargeUtf8 | Utf8View => (Utf8, PassValues::Str(Vec::new())),
            Dictionary(_, v) if matches!(**v, Utf8 | LargeUtf8) => {
                (Utf8, PassValues::Str(Vec::new()))
            }
            Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 => {
                (Int64, PassValues::Int(Vec::new()))
            }
            Float16 | Float32 | Float64 => (Float64, PassValues::Float(Vec::new())),
            Boolean => (Boolean, PassValues::Bool(Vec::new())),
            _ => return None,
        })
    }

    /// Records row `row` of `col` (already cast to the normalised type) for computation `comp`;
    /// returns false if it differs from what that computation already has.
    fn observe(&mut self, col: &ArrayRef, row: usize, comp: usize) -> bool {
        fn put<T: PartialEq>(v: &mut Vec<Option<T>>, comp: usize, x: Option<T>) -> bool {
            if comp == v.len() {
                v.push(x);
                true
            } else {
                v[comp] == x
            }
        }
        let null = col.is_null(row);
        match self {
            PassValues::Str(v) => {
                let a = col
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("cast to Utf8");
                put(v, comp, (!null).then(|| a.value(row).to_string()))
            }
            PassValues::Int(v) => {
                let a = col
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("cast to Int64");
                put(v, comp, (!null).then(|| a.value(row)))
            }
            PassValues::Float(v) => {
                let a = col
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .expect("cast to Float64");
                put(v, comp, (!null).then(|| a.value(row)))
            }
            PassValues::Bool(v) => {
                let a = col
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .expect("cast to Boolean");
                put(v, comp, (!null).then(|| a.value(row)))
            }
        }
    }

    fn push_null(&mut self) {
        match self {
            PassValues::Str(v) => v.push(None),
            PassValues::Int(v) => v.push(None),
            PassValues::Float(v) => v.push(None),
            PassValues::Bool(v) => v.push(None),
        }
    }

    fn to_array(&self) -> ArrayRef {
        match self {
            PassValues::Str(v) => Arc::new(v.iter().map(|x| x.as_deref()).collect::<StringArray>()),
            PassValues::Int(v) => Arc::new(v.iter().copied().collect::<Int64Array>()),
            PassValues::Float(v) => Arc::new(v.iter().copied().collect::<Float64Array>()),
            PassValues::Bool(v) => Arc::new(v.iter().copied().collect::<BooleanArray>()),
        }
    }
}

pub(super) fn slot_column_names(monitor: &Monitor) -> Vec<String> {
    monitor
        .slots()
        .into_iter()
        .map(|(site, det)| format!("p_{site}_{det}"))
        .collect()
}

pub(super) fn track_passthrough(
    other: &RecordBatch,
    skip: &[String],
    comps: &[usize],
    pass: &mut Vec<PassColumn>,
    pass_index: &mut HashMap<String, usize>,
) -> Result<()> {
    let schema = other.schema();
    for (f, col) in schema.fields().iter().zip(other.columns()) {
        if skip.iter().any(|s| s == f.name()) {
            continue;
        }
        let ci = match pass_index.get(f.name()) {
            Some(&ci) => ci,
            None => {
                let Some((_, values)) = PassValues::for_type(f.data_type()) else {
                    continue;
                };
                pass.push(PassColumn {
                    name: f.name().clone(),
                    data_type: f.data_type().clone(),
                    values,
                    constant: true,
                });
                pass_index.insert(f.name().clone(), pass.len() - 1);
                pass.len() - 1
            }
        };
        let pc = &mut pass[ci];
        if !pc.constant {
            continue;
        }
        let norm_type = PassValues::for_type(&pc.data_type).map(|(d, _)| d);
        let Some(norm_type) = norm_type.filter(|_| f.data_type() == &pc.data_type) else {
            pc.constant = false;
            continue;
        };
        let col = cast(col, &norm_type)?;
        // Computations first seen before this column existed get nulls.
        for (row, &c) in comps.iter().enumerate() {
            while values_len(&pc.values) < c {
                pc.values.push_null();
            }
            if !pc.values.observe(&col, row, c) {
                pc.constant = false;
                break;
            }
        }
    }
    Ok(())
}

fn values_len(v: &PassValues) -> usize {
    match v {
        PassValues::Str(v) => v.len(),
        PassValues::Int(v) => v.len(),
        PassValues::Float(v) => v.len(),
        PassValues::Bool(v) => v.len(),
    }
}

impl ComputationTable {
    /// Values of a pass-through column as strings, one per computation; None if the column is
    /// absent or not constant within every computation.
    pub fn column_strings(&self, name: &str) -> Option<Vec<Option<String>>> {
        let pc = self
            .passthrough
            .iter()
            .find(|p| p.name == name && p.constant)?;
        let mut v: Vec<Option<String>> = match &pc.values {
            PassValues::Str(v) => v.clone(),
            PassValues::Int(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
            PassValues::Float(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
            PassValues::Bool(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
        };
        v.resize(self.ids.len(), None);
        Some(v)
    }

    /// The table as one Arrow batch: trace id, constant pass-through columns, score, p_value,
    /// flagged, traces, flagged_at (where the running statistic first reached the threshold, for
    /// monitors that flag early; null otherwise), one p-value column per (site, detector), and
    /// per concept probe `p_probe_<name>`, `flagged_probe_<name>`, `verdict_probe_<name>`
    /// (`flag`, `defer` or `pass`) and `flagged_at_probe_<name>`.
    pub fn to_record_batch(&self) -> Result<RecordBatch> {
        let n = self.ids.len();
        let mut fields = vec![Field::new(&self.trace_column, DataType::Utf8, false)];
        let mut cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(&self.ids))];
        for pc in self.passthrough.iter().filter(|p| p.constant) {
            if ["score", "p_value", "flagged", "flagged_at"].contains(&pc.name.as_str())
                || pc.name.starts_with("p_probe_")
                || pc.name.starts_with("flagged_probe_")
                || pc.name.starts_with("verdict_probe_")
                || pc.name.starts_with("flagged_at_probe_")
            {
                continue;
            }
            let mut values = match &pc.values {
                PassValues::Str(v) => PassValues::Str(v.clone()),
                PassValues::Int(v) => PassValues::Int(v.clone()),
                PassValues::Float(v) => PassValues::Float(v.clone()),
                PassValues::Bool(v) => PassValues::Bool(v.clone()),
            };
            while values_len(&values) < n {
                values.push_null();
            }
            let arr = values.to_array();
            let arr = match &pc.data_type {
                DataType::Dictionary(..) | DataType::Utf8View | DataType::Float16 => arr,
                dt => cast(&arr, dt)?,
            };
            fields.push(Field::new(&pc.name, arr.data_type().clone(), true));
            cols.push(arr);
        }
        fields.push(Field::new("score", DataType::Float64, false));
        cols.push(Arc::new(Float64Array::from_iter_values(
            self.results.iter().map(|r| r.score),
        )));
        fields.push(Field::new("p_value", DataType::Float64, false));
        cols.push(Arc::new(Float64Array::from_iter_values(
            self.results.iter().map(|r| r.p_value),
        )));
        fields.push(Field::new("flagged", DataType::Boolean, false));
        cols.push(Arc::new(
            self.results
                .iter()
                .map(|r| Some(r.flagged))
                .collect::<BooleanArray>(),
        ));
        fields.push(Field::new("traces", DataType::UInt64, false));
        cols.push(Arc::new(UInt64Array::from_iter_values(
            self.results.iter().map(|r| r.traces),
        )));
        fields.push(Field::new("flagged_at", DataType::Int64, true));
        cols.push(Arc::new(
            self.results
                .iter()
                .map(|r| r.flagged_at)
                .collect::<Int64Array>(),
        ));
        for (j, name) in self.slot_names.iter().enumerate() {
            fields.push(Field::new(name, DataType::Float64, true));
            cols.push(Arc::new(
                self.results
                    .iter()
                    .map(|r| r.slot_p[j])
                    .collect::<Float64Array>(),
            ));
        }
        for (i, name) in self.probe_names.iter().enumerate() {
            let probe = |r: &ComputationResult| r.probes[i].clone();
            fields.push(Field::new(
                format!("p_probe_{name}"),
                DataType::Float64,
                false,
            ));
            cols.push(Arc::new(Float64Array::from_iter_values(
                self.results.iter().map(|r| probe(r).p_value),
            )));
            fields.push(Field::new(
                format!("flagged_probe_{name}"),
                DataType::Boolean,
                false,
            ));
            cols.push(Arc::new(
                self.results
                    .iter()
                    .map(|r| Some(probe(r).flagged))
                    .collect::<BooleanArray>(),
            ));
            fields.push(Field::new(
                format!("verdict_probe_{name}"),
                DataType::Utf8,
                false,
            ));
            cols.push(Arc::new(StringArray::from_iter_values(
                self.results.iter().map(|r| probe(r).verdict()),
            )));
            fields.push(Field::new(
                format!("flagged_at_probe_{name}"),
                DataType::Int64,
                true,
            ));
            cols.push(Arc::new(
                self.results
                    .iter()
                    .map(|r| probe(r).flagged_at)
                    .collect::<Int64Array>(),
            ));
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }
}
