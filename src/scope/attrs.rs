//! Request attributes that scope decisions are made on: the capability a provider path
//! exercises and the model a request names. They are read per provider family by
//! [`crate::providers`] (the JSON body by [`crate::providers::json_scan`]); this module names
//! them for `scope` and its callers.

pub use crate::providers::json_scan::{MAX_MODEL_LEN, ModelScanner, ScanState, model_from_json};
pub use crate::providers::{
    ALL_CAPABILITIES, Capability, ModelSource, UnknownCapability, capability, model_from_path,
    model_source,
};
