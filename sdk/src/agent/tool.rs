//! Tools: what the model may call. A [`Tool`] has a name, a description, a JSON schema for its
//! arguments and an async body; [`tool_fn`] turns an async function over a serde argument type
//! into one, deriving the schema (and descriptions, from doc comments) with schemars.

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed future returning a tool's result text or its error text.
pub type ToolFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Something the model can call.
pub trait Tool: Send + Sync {
    /// The name the model uses (`"name"` in a call).
    fn name(&self) -> &str;
    /// What it does, for the model.
    fn description(&self) -> &str;
    /// The JSON schema of its arguments (an object schema).
    fn parameters(&self) -> serde_json::Value;
    /// Runs it. An `Err` goes back to the model as the tool's result, like an `Ok`.
    fn call(&self, arguments: serde_json::Value) -> ToolFuture;
}

/// A tool made from an async function (see [`tool_fn`]).
pub struct FnTool<A, F> {
    name: String,
    description: String,
    parameters: serde_json::Value,
    f: Arc<F>,
    _args: std::marker::PhantomData<fn(A)>,
}

/// A tool named `name` that deserialises its arguments into `A` (whose JSON schema, with the
/// doc comments of `A` and its fields as descriptions, is what the model must match) and runs
/// `f`. `f`'s error is shown to the model as the result.
///
/// The schema is closed (`"additionalProperties": false`) unless `A` says otherwise: without
/// that, a constrained model may fill the call with keys it copies from the schema itself.
pub fn tool_fn<A, F, Fut, E>(name: &str, description: &str, f: F) -> Arc<dyn Tool>
where
    A: DeserializeOwned + JsonSchema + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: std::fmt::Display + 'static,
{
    let mut parameters =
        serde_json::to_value(schemars::schema_for!(A)).expect("a JSON schema serialises");
    if let Some(obj) = parameters.as_object_mut() {
        obj.remove("$schema");
        obj.remove("title");
        if obj.get("type").and_then(|t| t.as_str()) == Some("object") {
            obj.entry("additionalProperties")
                .or_insert(serde_json::Value::Bool(false));
        }
    }
    Arc::new(FnTool {
        name: name.to_owned(),
        description: description.to_owned(),
        parameters,
        f: Arc::new(f),
        _args: std::marker::PhantomData,
    })
}

impl<A, F, Fut, E> Tool for FnTool<A, F>
where
    A: DeserializeOwned + JsonSchema + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: std::fmt::Display + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> &str {
        &self.description
    }
    fn parameters(&self) -> serde_json::Value {
        self.parameters.clone()
    }
    fn call(&self, arguments: serde_json::Value) -> ToolFuture {
        let f = self.f.clone();
        let name = self.name.clone();
        Box::pin(async move {
            let args: A = serde_json::from_value(arguments)
                .map_err(|e| format!("invalid arguments for {name}: {e}"))?;
            f(args).await.map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adds two numbers.
    #[derive(serde::Deserialize, JsonSchema)]
    struct Add {
        /// The first term.
        a: i64,
        /// The second term.
        b: i64,
    }

    #[tokio::test]
    async fn schema_comes_from_the_type_and_errors_are_results() {
        let t = tool_fn("add", "Adds", |x: Add| async move {
            Ok::<_, String>((x.a + x.b).to_string())
        });
        let p = t.parameters();
        assert_eq!(p["type"], "object");
        assert_eq!(p["properties"]["a"]["description"], "The first term.");
        assert_eq!(p["required"], serde_json::json!(["a", "b"]));
        assert_eq!(p["additionalProperties"], false);
        assert_eq!(
            t.call(serde_json::json!({"a": 2, "b": 3})).await,
            Ok("5".into())
        );
        let e = t.call(serde_json::json!({"a": "x"})).await.unwrap_err();
        assert!(e.contains("invalid arguments for add"), "{e}");
    }
}
