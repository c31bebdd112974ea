//! End to end on a mixture-of-experts file: the default model "upcycled" into a Mixtral-style
//! GGUF (every MLP copied into four identical experts, per-expert tensors as Mixtral files
//! have them, and a random router choosing two per token), served by the real daemon. Its
//! answers come from the experts' products, and the `Stats` RPC reports the rows each expert
//! received, which add up to rows × experts per token × layers.

mod common;

use agentd_sdk::{Client, GenerateOptions, Message};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::Daemon;
use std::path::Path;

const EXPERTS: usize = 4;
const USED: usize = 2;

/// Writes the default model as a Mixtral-style file with `EXPERTS` copies of each MLP.
fn upcycle(src: &Path, dst: &Path) -> usize {
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let arch = match content.metadata.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        other => panic!("architecture: {other:?}"),
    };
    let layers = content.metadata[&format!("{arch}.block_count")]
        .to_u32()
        .unwrap() as usize;
    let hidden = content.metadata[&format!("{arch}.embedding_length")]
        .to_u32()
        .unwrap() as usize;
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push((format!("{arch}.expert_count"), Value::U32(EXPERTS as u32)));
    metadata.push((format!("{arch}.expert_used_count"), Value::U32(USED as u32)));
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let t = content.tensor(&mut f, &name, &dev).unwrap();
        let mlp = ["ffn_gate", "ffn_up", "ffn_down"]
            .iter()
            .find(|m| name.ends_with(&format!(".{m}.weight")));
        match mlp {
            Some(m) => {
                let layer = name.trim_end_matches(&format!(".{m}.weight"));
                // The same blocks under each expert's name (the copy keeps the exact bytes).
                let data = t.data().unwrap().to_vec();
                for e in 0..EXPERTS {
                    let copy = QTensor::new(
                        candle_core::quantized::QStorage::from_data(
                            std::borrow::Cow::Owned(data.clone()),
                            &dev,
                            t.dtype(),
                        )
                        .unwrap(),
                        t.shape().clone(),
                    )
                    .unwrap();
                    tensors.push((format!("{layer}.{m}.{e}.weight"), copy));
                }
            }
            None => tensors.push((name, t)),
        }
    }
    for l in 0..layers {
        let router = Tensor::randn(0f32, 1.0, (EXPERTS, hidden), &dev).unwrap();
        let q = QTensor::quantize(&router, GgmlDType::F32).unwrap();
        tensors.push((format!("blk.{l}.ffn_gate_inp.weight"), q));
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &md, &ts).unwrap();
    layers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upcycled_mixture_of_experts_serves_and_reports_expert_load() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("smollm2-moe.gguf");
    let layers = upcycle(&common::model(), &file);
    let d = Daemon::start_model(&file, &dir.path().join("m.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let s = c.create_session(None, Vec::new()).await.unwrap();
    s.append_messages(&[Message::user("What is the capital of France?")], true)
        .await
        .unwrap();
    let stream = s
        .generate(&GenerateOptions::default().temperature(0.0).max_tokens(12))
        .await
        .unwrap();
    let (text, usage) = common::run(stream).await;
    eprintln!("{text:?} {usage:?}");
    assert!(!text.trim().is_empty());
    let st = c.stats().await.unwrap();
    assert_eq!(st.expert_load_total.len(), EXPERTS, "{st:?}");
    let total: u64 = st.expert_load_total.iter().sum();
    // Every computed row went to USED experts in every layer.
    let rows =
        usage.prompt_tokens as u64 - usage.cached_tokens as u64 + usage.generated_tokens as u64;
    assert!(
        total > 0 && total.is_multiple_of((USED * layers) as u64),
        "{st:?}"
    );
    assert!(
        total >= (rows - 1) * (USED * layers) as u64,
        "{total} for {rows} rows"
    );
    // The last step was one decode row.
    let last: u64 = st.expert_load_last_step.iter().sum();
    assert_eq!(last, (USED * layers) as u64, "{st:?}");
}
