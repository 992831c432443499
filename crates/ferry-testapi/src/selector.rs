//! Label and field selectors, as far as a proxy's watches use them.
//!
//! Labels: `key`, `!key`, `key=value`, `key==value`, `key!=value`, comma-joined
//! (all must hold). Fields: `metadata.name` and `metadata.namespace` with `=`,
//! `==` or `!=`. Set-based label forms (`in`, `notin`) are refused with an error
//! rather than silently matching everything, so a test never passes by accident.

use serde_json::Value;

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelRequirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let req = if let Some(key) = term.strip_prefix('!') {
                LabelRequirement::NotExists(valid_key(key.trim())?)
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelRequirement::NotEquals(valid_key(k.trim())?, v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelRequirement::Equals(valid_key(k.trim())?, v.trim().to_string())
            } else if term.contains(' ') || term.contains('(') {
                return Err(format!("set-based label selector {term:?} is not supported by the fake API server"));
            } else {
                LabelRequirement::Exists(valid_key(term)?)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            // As in Kubernetes: an object without the label matches `key!=value`.
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
        })
    }
}

fn valid_key(key: &str) -> Result<String, String> {
    if key.is_empty() || key.contains(|c: char| c.is_whitespace() || "!=(),".contains(c)) {
        return Err(format!("invalid label key {key:?} in label selector"));
    }
    Ok(key.to_string())
}

/// A parsed `fieldSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(Field, bool, String)>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
}

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}: expected FIELD=VALUE"));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => return Err(format!("field selector on {other:?} is not supported by the fake API server")),
            };
            reqs.push((field, equal, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, want)| {
            let pointer = match field {
                Field::Name => "/metadata/name",
                Field::Namespace => "/metadata/namespace",
            };
            let have = obj.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (have == want) == *equal
        })
    }
}

/// Both selectors of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(name: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": "default", "labels": labels}})
    }

    #[test]
    fn label_forms() {
        let headless = obj("a", json!({"service.kubernetes.io/headless": "", "app": "web"}));
        let plain = obj("b", json!({"app": "db"}));
        let bare = json!({"metadata": {"name": "c"}});
        let cases = [
            ("", [true, true, true]),
            ("!service.kubernetes.io/headless", [false, true, true]),
            ("service.kubernetes.io/headless", [true, false, false]),
            ("app=web", [true, false, false]),
            ("app==db", [false, true, false]),
            ("app!=web", [false, true, true]),
            ("app, !service.kubernetes.io/headless", [false, true, false]),
        ];
        for (sel, want) in cases {
            let sel = LabelSelector::parse(sel).unwrap();
            let got = [&headless, &plain, &bare].map(|o| sel.matches(o));
            assert_eq!(got, want, "{sel:?}");
        }
    }

    #[test]
    fn set_based_labels_are_refused() {
        assert!(LabelSelector::parse("app in (a,b)").is_err());
        assert!(LabelSelector::parse("app notin (a)").is_err());
    }

    #[test]
    fn field_forms() {
        let a = obj("node-a", json!({}));
        let sel = FieldSelector::parse("metadata.name=node-a").unwrap();
        assert!(sel.matches(&a));
        assert!(!sel.matches(&obj("node-b", json!({}))));
        assert!(!FieldSelector::parse("metadata.name!=node-a").unwrap().matches(&a));
        assert!(FieldSelector::parse("metadata.namespace==default").unwrap().matches(&a));
        assert!(FieldSelector::parse("spec.nodeName=x").is_err());
    }
}
