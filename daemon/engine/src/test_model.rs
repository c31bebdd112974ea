//! The default model, loaded once per test binary for the tests that need the real weights or
//! tokenizer.

use crate::model::LoadOptions;
use crate::LoadedModel;
use std::sync::OnceLock;

/// SmolLM2-135M-Instruct Q4_1, fetched on first use, loaded with the default options.
pub(crate) fn default_engine() -> &'static LoadedModel {
    static ENGINE: OnceLock<LoadedModel> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let path = crate::model_files::ensure_default_model(&mut |m| eprintln!("{m}"))
            .expect("default model");
        LoadedModel::load(&path, LoadOptions::default()).expect("load model")
    })
}
