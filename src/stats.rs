//! Database statistics as metric families: what each engine's [`stats`] hook returns and the
//! sidecar serves from memory on `/metrics` and `/stats`. Neutral of any exposition format:
//! the names, types, labels and units are the ones the exporters users already know
//! (oliver006/redis_exporter, percona/mongodb_exporter), so their dashboards keep working.
//!
//! [`stats`]: crate::engine::EngineOps::stats

use serde::Serialize;

/// How a family's values behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A value that only goes up (reset when the server restarts). The family's `name` is the
    /// sample name exactly as exporters print it, `_total` suffix included.
    Counter,
}

/// One metric family: a name, a type, a help line and its samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Family {
    pub name: String,
    pub kind: Kind,
    pub help: String,
    pub samples: Vec<Sample>,
}

/// One sample of a family: label pairs (never a secret or a user's key name) and a value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Family {
    pub fn new(name: impl Into<String>, kind: Kind, help: impl Into<String>) -> Family {
        Family {
            name: name.into(),
            kind,
            help: help.into(),
            samples: Vec::new(),
        }
    }

    /// A family of one unlabelled sample.
    pub fn single(
        name: impl Into<String>,
        kind: Kind,
        help: impl Into<String>,
        value: f64,
    ) -> Family {
        let mut f = Family::new(name, kind, help);
        f.push(&[], value);
        f
    }

    pub fn push(&mut self, labels: &[(&str, &str)], value: f64) {
        self.samples.push(Sample {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
        });
    }
}
