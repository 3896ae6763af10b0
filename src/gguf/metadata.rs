//! Ordered GGUF metadata: a list of (key, value) in file order, never a hash map, so a file read
//! and written back keeps its key order.

use super::error::GgufError;
use super::value::{Value, ValueType};

/// Metadata in order. Keys are unique (the reader and `insert_new` refuse duplicates; `set`
/// replaces in place).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
}

impl Metadata {
    pub fn new() -> Metadata {
        Metadata::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    pub fn position(&self, key: &str) -> Option<usize> {
        self.entries.iter().position(|(k, _)| k == key)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.position(key).is_some()
    }

    /// Set a value: replaced in place when the key exists (its position kept), else appended.
    /// Returns the old value.
    pub fn set(&mut self, key: impl Into<String>, value: Value) -> Option<Value> {
        let key = key.into();
        match self.position(&key) {
            Some(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            None => {
                self.entries.push((key, value));
                None
            }
        }
    }

    /// Append a key that must not exist yet.
    pub fn insert_new(&mut self, key: impl Into<String>, value: Value) -> Result<(), GgufError> {
        let key = key.into();
        if self.contains(&key) {
            return Err(GgufError::DuplicateKey { offset: 0, key });
        }
        self.entries.push((key, value));
        Ok(())
    }

    /// Append without checking for duplicates (the reader has checked already).
    pub(crate) fn push_unchecked(&mut self, key: String, value: Value) {
        self.entries.push((key, value));
    }

    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.position(key)?;
        Some(self.entries.remove(i).1)
    }

    /// Rename a key in place (position kept). Fails when `new` exists already.
    pub fn rename(&mut self, old: &str, new: impl Into<String>) -> Result<bool, GgufError> {
        let new = new.into();
        if old == new {
            return Ok(self.contains(old));
        }
        if self.contains(&new) {
            return Err(GgufError::DuplicateKey {
                offset: 0,
                key: new,
            });
        }
        match self.position(old) {
            Some(i) => {
                self.entries[i].0 = new;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A value that must have type `ty` when present (llama.cpp rejects a key of the wrong type).
    pub fn get_typed(&self, key: &str, ty: ValueType) -> Result<Option<&Value>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.value_type() == ty => Ok(Some(v)),
            Some(v) => Err(GgufError::KeyWrongType {
                key: key.to_string(),
                expected: ty.name().to_string(),
                found: v.type_label(),
            }),
        }
    }

    pub fn get_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        Ok(match self.get_typed(key, ValueType::U32)? {
            Some(Value::U32(x)) => Some(*x),
            _ => None,
        })
    }

    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        Ok(match self.get_typed(key, ValueType::F32)? {
            Some(Value::F32(x)) => Some(*x),
            _ => None,
        })
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get_typed(key, ValueType::String)? {
            Some(v) => v.as_str().map(Some).ok_or_else(|| GgufError::BadValue {
                key: key.to_string(),
                value: v.to_string(),
                reason: "not valid UTF-8".to_string(),
            }),
            None => Ok(None),
        }
    }
}

impl FromIterator<(String, Value)> for Metadata {
    /// Later duplicates replace earlier ones in place.
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Metadata {
        let mut m = Metadata::new();
        for (k, v) in iter {
            m.set(k, v);
        }
        m
    }
}
